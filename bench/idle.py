"""The ``idle`` scenario: user memory per idle tunnel.

Steps (each bounded in time; everything is stopped in ``finally``):

1. start the echo backend (``bench.backend``) on a fresh port, and the proxy
   (a generated config) on another; wait until every worker logged
   ``worker-ready``;
2. warm-up: open ``--warmup`` tunnels (same concurrency as the measurement)
   and close them, so one-time allocations (lazy imports, buffers, the
   handshake path's first use) are not charged to tunnels;
3. "before": sample the proxy's processes until their descriptor count is
   back to its pre-warm-up value and their summed RSS is stable;
4. open N tunnels with at most ``--concurrency`` handshakes in flight
   (``bench.loadgen``, ≤ 9,000 per process, 32 source addresses each);
5. "after": sample until the proxy holds 2 more descriptors per tunnel and
   RSS is stable;
6. a random sample of tunnels must still echo; count tunnels the proxy dropped;
7. user memory per tunnel = (RSS after - RSS before) / tunnels opened.

While the tunnels open (step 4), the proxy's summed RSS and descriptor count
are sampled every 0.05 s: ``rss_curve`` is a list of ``[tunnels held, RSS
delta bytes]`` with tunnels held ≈ (descriptors - descriptors before) / 2,
starting at ``[0, 0]`` and ending with the settled "after" point (memory
against tunnels, for ``python -m bench … --compare``'s chart).

``--target`` picks the proxy (``bench.targets``); ``direct`` has no process
of its own, so its memory figures are null (the run still checks that every
tunnel opened and echoes).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from . import measure
from .procs import REPO, BenchError, LineProcess, pick_port
from .targets import make_target
from .wire import raise_nofile

KEYS = (
    "scenario", "target", "workers", "ok", "error", "command", "started_at", "method",
    "machine", "proxy", "tunnels_requested", "tunnels_opened", "failures", "failure_reasons",
    "dropped",
    "unexpected_frames", "sample_echo", "rss_before", "rss_after", "rss_delta",
    "user_memory_per_tunnel_bytes", "uss_per_tunnel_bytes", "worker_rss_delta",
    "worker_rss_per_tunnel_bytes", "fds_before", "fds_after", "kernel_tcp", "timings",
    "settle", "shutdown", "proxy_log_actions", "rss_curve", "files",
)  # fmt: skip

# seconds between (tunnels, RSS) samples while tunnels open: 9,000 tunnels open
# in under a second here, so a coarser step leaves the curve a few points
CURVE_INTERVAL = 0.05


class _Curve(threading.Thread):
    """Samples ``[tunnels held, RSS delta]`` of the proxy every ``interval``
    seconds until :meth:`finish`: summed RSS and descriptors of its processes
    (cheap reads: no USS here), tunnels ≈ (descriptors - ``fds0``) / 2."""

    def __init__(
        self,
        procs: Callable[[], list[psutil.Process]],
        rss0: int,
        fds0: int,
        interval: float = CURVE_INTERVAL,
    ) -> None:
        super().__init__(name="rss-curve", daemon=True)
        self.procs, self.rss0, self.fds0, self.interval = procs, rss0, fds0, interval
        self.points: list[list[int]] = [[0, 0]]
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            rss = fds = 0
            for p in self.procs():
                try:
                    rss += p.memory_info().rss
                    fds += p.num_fds()
                except psutil.Error:
                    continue
            self.points.append([max(0, (fds - self.fds0) // 2), rss - self.rss0])

    def finish(self) -> list[list[int]]:
        self._done.set()
        self.join(5)
        return self.points


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _loadgen(
    name: str, target: tuple[str, int], count: int, sources: str, args: Any
) -> LineProcess:
    return LineProcess(
        name,
        [
            sys.executable, "-m", "bench.loadgen",
            "--target", f"{target[0]}:{target[1]}",
            "--count", str(count),
            "--sources", sources,
            "--concurrency", str(args.concurrency),
            "--open-timeout", str(args.open_timeout),
            "--hold", str(args.open_timeout + 2 * args.settle_timeout + 300),
        ],
    )  # fmt: skip


def _by_role(snap: dict[str, Any]) -> dict[str, int]:
    return {r["role"]: r["rss"] for r in snap["processes"]}


def run(args: Any) -> dict[str, Any]:
    nofile = raise_nofile()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = Path(args.results_dir).resolve()
    name = f"idle-{stamp}-{os.getpid()}"
    workdir = results_dir / name
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.tunnels
    result: dict[str, Any] = dict.fromkeys(KEYS)
    result.update(
        scenario="idle",
        target=args.target,
        workers=None if args.target == "direct" else args.workers,
        ok=False,
        command=" ".join(["python -m bench", *sys.argv[1:]]),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tunnels_requested=n,
        method={
            "warmup_tunnels": args.warmup,
            "handshake_concurrency": args.concurrency,
            "measure": "sum of RSS (and USS) over supervisor + worker processes (psutil)",
            "before": "after the warm-up tunnels were opened and closed, once the proxy's "
            "descriptor count was back to its pre-warm-up value and RSS stable",
            "after": "once the proxy held 2 more descriptors per opened tunnel and RSS was "
            "stable (5 samples 0.5 s apart within 64 KiB)",
            "per_tunnel": "(RSS after - RSS before) / tunnels opened",
            "rss_curve": f"[tunnels held, RSS - RSS before] every {CURVE_INTERVAL:g} s while "
            "the tunnels open; tunnels held = (descriptors - descriptors before) / 2; "
            "from [0, 0] to the settled 'after' point",
            "loadgen_processes": math.ceil(n / args.per_loadgen),
            "source_addresses_per_loadgen": args.sources,
            "bench_nofile": nofile,
        },
        machine=measure.machine(),
    )
    backend_port = pick_port()
    proxy_port = pick_port(avoid={backend_port})
    backend: LineProcess | None = None
    proxy = make_target(
        args.target,
        workdir,
        listen=("127.0.0.1", proxy_port),
        backend=("127.0.0.1", backend_port),
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log == "on",
    )
    result["files"] = {
        "config": str(
            proxy.config_path.relative_to(REPO)
            if proxy.config_path.is_relative_to(REPO)
            else proxy.config_path
        ),
        "proxy_log": str(
            proxy.log_path.relative_to(REPO)
            if proxy.log_path.is_relative_to(REPO)
            else proxy.log_path
        ),
    }
    gens: list[LineProcess] = []
    timings: dict[str, float] = {}
    started = time.monotonic()
    proxy_started = False
    curve: _Curve | None = None
    try:
        result["proxy"] = proxy.version()
        result["proxy"]["config"] = proxy.config_text()
        result["proxy"]["listen_port"] = proxy_port
        result["proxy"]["backend_port"] = backend_port
        lifetime = args.open_timeout + 2 * args.settle_timeout + 600
        backend = LineProcess(
            "backend",
            [sys.executable, "-m", "bench.backend", "--port", str(backend_port),
             "--procs", str(args.backend_procs), "--lifetime", str(lifetime)],
            stdin=False,
        )  # fmt: skip
        backend.expect("ready", 20)
        proxy.start()
        proxy_started = True
        timings["proxy_ready_s"] = round(proxy.wait_ready(60), 2)

        def take() -> dict[str, Any]:
            return measure.snapshot(proxy.processes(), proxy.role)

        measured = bool(proxy.processes())  # direct: no process of its own
        idle_fds = take()["fds"]
        target = proxy.address
        if args.warmup:
            t0 = time.monotonic()
            w = _loadgen("warm-up loadgen", target, args.warmup, "127.0.250.1/8", args)
            gens.append(w)
            words = w.expect("open", args.open_timeout + 30)
            if int(words[2]):
                raise BenchError(
                    f"warm-up: {words[2]} of {args.warmup} handshakes failed: {words[4]}"
                )
            w.send("quit")
            w.expect("bye", 30)
            w.stop()
            gens.remove(w)
            timings["warmup_s"] = round(time.monotonic() - t0, 2)

        before, settle_before = (
            measure.settle(take, fds_at_most=idle_fds, timeout=args.settle_timeout)
            if measured
            else (take(), {"settled": True, "skipped": "the target has no processes"})
        )
        result["settle"] = {"before": settle_before}
        tcp_before = measure.sockstat()
        if measured:
            curve = _Curve(proxy.processes, before["rss"], before["fds"])
            curve.start()

        t0 = time.monotonic()
        counts = _split(n, math.ceil(n / args.per_loadgen))
        for i, count in enumerate(counts):
            gens.append(
                _loadgen(f"loadgen-{i}", target, count, f"127.0.{11 + i}.1/{args.sources}", args)
            )
        opened = failed = 0
        reasons: Counter[str] = Counter()
        per_gen_open: list[int] = []
        for g in gens:
            words = g.expect("open", args.open_timeout + 30)
            per_gen_open.append(int(words[1]))
            opened += int(words[1])
            failed += int(words[2])
            reasons.update(json.loads(words[4]))
        timings["open_s"] = round(time.monotonic() - t0, 2)
        timings["open_rate_per_s"] = round(opened / max(timings["open_s"], 1e-6), 1)
        result.update(tunnels_opened=opened, failures=failed, failure_reasons=dict(reasons))
        points = curve.finish() if curve is not None else None

        after, settle_after = (
            measure.settle(
                take, fds_at_least=before["fds"] + 2 * opened, timeout=args.settle_timeout
            )
            if measured
            else (take(), {"settled": True, "skipped": "the target has no processes"})
        )
        result["settle"]["after"] = settle_after
        if points is not None:
            result["rss_curve"] = [*points, [opened, after["rss"] - before["rss"]]]
        tcp_after = measure.sockstat()

        # the sample: proportional to what each generator holds
        sample = min(args.sample, opened)
        asks = (
            _split(sample, len(gens))
            if opened == 0
            else [round(sample * k / opened) for k in per_gen_open]
        )
        asks[-1] += sample - sum(asks)
        ok_echo = bad_echo = 0
        for g, k in zip(gens, asks, strict=True):
            g.send(f"verify {k}")
        for g in gens:
            words = g.expect("verify", 30)
            ok_echo += int(words[1])
            bad_echo += int(words[2])
        result["sample_echo"] = {"requested": sample, "ok": ok_echo, "failed": bad_echo}
        dropped = unexpected = 0
        for g in gens:
            g.send("status")
        for g in gens:
            words = g.expect("status", 30)
            dropped += int(words[2])
            unexpected += int(words[3])
        result.update(dropped=dropped, unexpected_frames=unexpected)

        # figures
        delta = after["rss"] - before["rss"]
        rb, ra = _by_role(before), _by_role(after)
        worker_delta = sum(ra[r] - rb.get(r, 0) for r in ra if proxy.is_worker(r))
        per = opened if measured else 0  # no per-tunnel figure without processes
        result.update(
            rss_before=before,
            rss_after=after,
            rss_delta=delta if measured else None,
            user_memory_per_tunnel_bytes=round(delta / per, 1) if per else None,
            uss_per_tunnel_bytes=(round((after["uss"] - before["uss"]) / per, 1) if per else None),
            worker_rss_delta=worker_delta if measured else None,
            worker_rss_per_tunnel_bytes=round(worker_delta / per, 1) if per else None,
            fds_before=before["fds"],
            fds_after=after["fds"],
            kernel_tcp={"before": tcp_before, "after": tcp_after},
        )
        result["ok"] = (
            failed == 0
            and opened == n
            and dropped == 0
            and ok_echo == sample
            and settle_after["settled"]
        )
    except BenchError as e:
        result["error"] = str(e)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    finally:
        if curve is not None:
            curve.finish()
        t0 = time.monotonic()
        for g in gens:
            try:
                g.send("quit")
            except BenchError:
                pass
        for g in gens:
            try:
                g.expect("bye", 30)
            except BenchError:
                pass
            g.stop(10)
        timings["clients_close_s"] = round(time.monotonic() - t0, 2)
        if proxy_started:
            result["shutdown"] = proxy.stop(30)
            actions = Counter(
                f"{e.get('log.level', '?')}:{e.get('event', {}).get('action', '?')}"
                for e in proxy.events()
            )
            result["proxy_log_actions"] = dict(sorted(actions.items()))
        if backend is not None:
            backend.stop(10)
        timings["total_s"] = round(time.monotonic() - started, 2)
        result["timings"] = timings

    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["files"]["result"] = str(path)
    return result


def _kib(b: float | None) -> str:
    return "-" if b is None else f"{b / 1024:,.1f} KiB"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    px = r["proxy"] or {}
    per = r["user_memory_per_tunnel_bytes"]
    wper = r["worker_rss_per_tunnel_bytes"]
    echo = r["sample_echo"] or {}
    rows = [
        ("tunnels opened / requested", f"{r['tunnels_opened']} / {r['tunnels_requested']}"),
        ("handshake failures", f"{r['failures']} {r['failure_reasons'] or ''}".strip()),
        ("tunnels dropped while held", r["dropped"]),
        ("sample still echoing", f"{echo.get('ok')} / {echo.get('requested')}"),
        ("proxy RSS before (all processes)", _kib((r["rss_before"] or {}).get("rss"))),
        ("proxy RSS after (all processes)", _kib((r["rss_after"] or {}).get("rss"))),
        ("**user memory per tunnel (RSS, all)**", "-" if per is None else f"**{per:,.0f} B**"),
        ("worker RSS delta per tunnel", "-" if wper is None else f"{wper:,.0f} B"),
        ("USS per tunnel (all)", "-" if r["uss_per_tunnel_bytes"] is None
         else f"{r['uss_per_tunnel_bytes']:,.0f} B"),
        ("proxy descriptors before → after", f"{r['fds_before']} → {r['fds_after']}"),
    ]  # fmt: skip
    for label, snap in (("before", r["rss_before"]), ("after", r["rss_after"])):
        for p in (snap or {}).get("processes", []):
            rows.append((f"  RSS {label}: {p['role']} (pid {p['pid']})", _kib(p["rss"])))
    out = [
        f"### {r.get('target', 'shardproxy')} idle: {r['tunnels_requested']} tunnels, "
        f"{r['method']['loadgen_processes']} loadgen process(es)",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {a} | {b} |" for a, b in rows),
        "",
        f"Method: warm-up of {r['method']['warmup_tunnels']} tunnels opened and closed before "
        f"'before'; ≤ {r['method']['handshake_concurrency']} handshakes in flight; 'after' once "
        "the proxy held 2 descriptors per tunnel and RSS was stable.",
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}. "
        f"Proxy: {px.get('version') or r.get('target')} @ {(px.get('commit') or '')[:10]}"
        f"{' (dirty)' if px.get('dirty') else ''}.",
        f"Result: {'OK' if r['ok'] else 'NOT OK'}"
        + (f" — error: {r['error']}" if r["error"] else "")
        + f"; JSON: {r['files'].get('result')}",
    ]
    return "\n".join(out)
