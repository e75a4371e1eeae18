"""What the load scenarios share: the target, the echo backend, the load
generator processes, CPU accounting, failure kinds and the result file.

A scenario runs inside a :class:`Session`::

    with Session("pingpong", args, parameters) as s:
        s.start(backend_procs=2)          # backend on a fresh port, then the target
        g = s.loadgen("loadgen-0", "pingpong", 50, "127.1.0.1/64")
        ...
        s.result["figures"] = {...}
    s.result                              # also written to <results-dir>/<name>.json

Leaving the block stops everything it started (loadgens, target, backend),
records a :class:`BenchError` or an interrupt as the run's ``error`` instead
of raising it, and writes the JSON. Every child is bounded in time by itself
too (``--hold``, ``--lifetime``), so nothing outlives a killed orchestrator
for long.

The target comes from :func:`bench.targets.make_target` (``shardproxy``,
``haproxy``, ``nginx``, or ``direct``: the load generator talks to the echo
backend itself, which shows the generator's and backend's own cost, the floor
under every proxy).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from . import measure
from .histogram import Histogram
from .procs import REPO, BenchError, LineProcess, Upstream, pick_port
from .targets import Target, make_target

PERCENTILES = (50.0, 99.0, 99.9)
RELEASE_TIMEOUT = 30.0  # for the target to close its side of every tunnel at the end


# -- the target's log -------------------------------------------------------


def log_summary(target: Target) -> dict[str, Any]:
    """What the target logged, counted: for shardproxy's ECS lines, events by
    level and action, tunnel outcomes, rejections by status and reason, and the
    distinct messages of everything above info; the last lines of the log
    (the peers' plain-text logs have no structured events)."""
    actions: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    notable: Counter[str] = Counter()
    for e in target.events():
        level = e.get("log.level", "?")
        action = e.get("event", {}).get("action", "?")
        sp = e.get("shardproxy", {})
        actions[f"{level}:{action}"] += 1
        if action == "tunnel-closed":
            outcomes[str(sp.get("outcome"))] += 1
        elif action == "request-rejected":
            status = e.get("http", {}).get("response", {}).get("status_code")
            rejected[f"{status}:{sp.get('reason')}"] += 1
        elif action == "handshake-failed":
            failed[str(e.get("error", {}).get("message"))] += 1
        if level not in ("info", "debug"):
            notable[f"{level}:{action}: {e.get('message')}"] += 1
    return {
        "actions": dict(sorted(actions.items())),
        "tunnel_outcomes": dict(outcomes),
        "rejected": dict(rejected),
        "handshake_failed": dict(failed.most_common(10)),
        "above_info": dict(notable.most_common(20)),
        "tail": target.log_tail(10),
    }


# -- failures -----------------------------------------------------------------


def failure_kind(reason: str) -> str:
    """A load generator's reason (``recv:ECONNRESET``) → its kind (``reset``).

    Kinds: ``refused``, ``reset``, ``timeout``, ``status:<code>``,
    ``bad-accept``, ``closed`` (EOF before the 101, or an EOF where an echo
    was due), ``close-frame`` (a Close where an echo was due), ``no-address``
    (EADDRNOTAVAIL: no free port/tuple), ``open-deadline``; failures after the
    101 are prefixed ``after-101:`` (``after-101:reset``, ``after-101:timeout``,
    ``after-101:mismatch``…). Anything else keeps its reason.
    """
    if reason.startswith("status:") or reason in ("bad-accept", "open-deadline"):
        return reason
    phase, _, what = reason.partition(":")
    after = phase in ("close", "echo")
    if what == "ECONNREFUSED":
        kind = "refused"
    elif what in ("ECONNRESET", "EPIPE"):
        kind = "reset"
    elif "timeout" in reason or what == "ETIMEDOUT":
        kind = "timeout"
    elif reason == "eof-before-101" or what == "eof":
        kind = "closed"
    elif what == "close":
        kind = "close-frame"
    elif what == "EADDRNOTAVAIL":
        kind = "no-address"
    else:
        kind = what if after else reason
    return f"after-101:{kind}" if after else kind


def failures(reasons: Counter[str] | dict[str, int]) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    for reason, n in reasons.items():
        kinds[failure_kind(reason)] += n
    return {
        "total": sum(kinds.values()),
        "by_kind": dict(kinds.most_common()),
        "reasons": dict(Counter(reasons).most_common()),
    }


# -- latency ------------------------------------------------------------------


def latency(histograms: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge the generators' histograms: count, p50/p99/p99.9 and max, in µs."""
    h = Histogram()
    for d in histograms:
        h.merge(Histogram.from_json(d))
    out: dict[str, Any] = {"n": h.n}
    for q in PERCENTILES:
        v = h.percentile(q)
        out[f"p{q:g}"] = None if v is None else round(v, 1)
    out["max"] = h.max if h.n else None
    return out


def without_histograms(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generators' result lines for the JSON, their (merged) histograms left out."""
    return [{k: v for k, v in r.items() if not k.endswith("latency_us")} for r in results]


# -- CPU ----------------------------------------------------------------------


def _cpu(procs: Iterable[psutil.Process]) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each process still alive (children not included)."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = (t.user, t.system)
    return out


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class CpuMeter:
    """CPU seconds spent by groups of processes between ``start`` and ``stop``.

    A group is a function returning its processes, asked at both ends: a
    process that appeared in between is charged all its CPU (it ran only in
    the window); one that vanished cannot be read and is listed as ``gone``
    (its CPU is missing from the figure). The granularity is the kernel's
    clock tick (10 ms per process).
    """

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]]) -> None:
        self.groups = groups
        self.before: dict[str, dict[int, tuple[float, float]]] = {}
        self.started = 0.0
        self.busy = 0.0

    def start(self) -> None:
        self.before = {g: _cpu(f()) for g, f in self.groups.items()}
        self.busy = _machine_busy()
        self.started = time.monotonic()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        busy = _machine_busy() - self.busy
        out: dict[str, Any] = {"seconds": round(wall, 4), "groups": {}}
        for g, f in self.groups.items():
            before, after = self.before[g], _cpu(f())
            split = {
                pid: (
                    user - before.get(pid, (0.0, 0.0))[0],
                    system - before.get(pid, (0.0, 0.0))[1],
                )
                for pid, (user, system) in after.items()
            }
            per = {pid: user + system for pid, (user, system) in split.items()}
            total = sum(per.values())
            out["groups"][g] = {
                "processes": len(after),
                "cpu_s": round(total, 3),
                "user_s": round(sum(user for user, _ in split.values()), 3),
                "system_s": round(sum(system for _, system in split.values()), 3),
                "cores": round(total / wall, 3) if wall > 0 else None,
                "per_process_s": {str(pid): round(s, 3) for pid, s in per.items()},
                "gone": [pid for pid in before if pid not in after],
                "new": [pid for pid in after if pid not in before],
            }
        out["machine_busy_cores"] = round(busy / wall, 3) if wall > 0 else None
        # CPU nobody here spent: other work on a shared machine (noise), kernel threads
        ours = sum(g["cpu_s"] for g in out["groups"].values())
        out["other_cores"] = round((busy - ours) / wall, 3) if wall > 0 else None
        return out


def cores(cpu: dict[str, Any], group: str) -> float | None:
    """Cores ``group`` kept busy on average over the window; None without processes."""
    g = cpu["groups"].get(group)
    return float(g["cores"]) if g and g["processes"] and g["cores"] is not None else None


def per_unit_us(cpu: dict[str, Any], group: str, units: int, part: str = "cpu_s") -> float | None:
    """CPU µs of ``group`` per unit of work (``part``: "cpu_s" all of it,
    "user_s" or "system_s" the user or kernel share); None without
    processes or work."""
    g = cpu["groups"].get(group)
    if not g or not g["processes"] or not units or part not in g:
        return None
    return round(float(g[part]) / units * 1e6, 2)


# -- the kernel's view --------------------------------------------------------

_NETSTAT = {
    "TcpExt": (
        "ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies",
        "SyncookiesSent", "TCPTimeWaitOverflow", "TCPAbortOnData", "TCPAbortOnClose",
        "TCPSynRetrans", "TCPAbortOnTimeout",
    ),
    "Tcp": ("AttemptFails", "EstabResets", "RetransSegs"),
}  # fmt: skip


def netstat() -> dict[str, int]:
    """Kernel-wide TCP counters that explain failed or slow connects."""
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            section, *keys = names.split()
            section = section.rstrip(":")
            for k, v in zip(keys, values.split()[1:], strict=False):
                if k in _NETSTAT.get(section, ()):
                    out[k] = int(v)
    dropped = softnet_dropped()
    if dropped is not None:
        out["SoftnetDropped"] = dropped
    return out


def softnet_dropped() -> int | None:
    """Packets the kernel's per-CPU input backlogs dropped (all CPUs):
    every loopback packet passes through one, and a backlog fuller than
    ``net.core.netdev_max_backlog`` drops what comes, so that TCP must
    retransmit (and gives a connection up once retransmissions time out:
    ``TCPAbortOnTimeout``). The second column of /proc/net/softnet_stat."""
    try:
        lines = Path("/proc/net/softnet_stat").read_text().splitlines()
    except OSError:
        return None
    return sum(int(line.split()[1], 16) for line in lines if line.strip())


def netstat_delta(before: dict[str, int]) -> dict[str, int]:
    after = netstat()
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def net_settings() -> dict[str, str]:
    out = {}
    for name in ("core/somaxconn", "core/netdev_max_backlog", "ipv4/tcp_max_syn_backlog",
                 "ipv4/tcp_syncookies", "ipv4/tcp_tw_reuse", "ipv4/tcp_fin_timeout"):  # fmt: skip
        try:
            out[name.split("/")[1]] = Path(f"/proc/sys/net/{name}").read_text().strip()
        except OSError:
            pass
    return out


# -- one run ------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO) if p.is_relative_to(REPO) else p)


class Session:
    """One scenario run: its directory, children and result (see the module notes)."""

    def __init__(self, scenario: str, args: Any, parameters: dict[str, Any]) -> None:
        self.args = args
        self.results_dir = Path(args.results_dir).resolve()
        self.name = f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.workdir = self.results_dir / self.name
        self.backend: LineProcess | None = None
        self.target: Target | None = None
        self.gens: list[LineProcess] = []
        self.started = time.monotonic()
        self._target_started = False
        self.idle_fds: int | None = None  # the target's descriptors with no client
        self.result: dict[str, Any] = {
            "scenario": scenario,
            "ok": False,
            "error": None,
            "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": args.target,
            "target_version": None,
            "workers": None if args.target == "direct" else args.workers,
            "parameters": parameters,
            "machine": {**measure.machine(), "net": net_settings()},
            "figures": {},
            "failures": failures({}),
            "cpu": None,
            "kernel_tcp_counters": None,
            "loadgens": [],
            "timings": {},
            "target_log": None,
            "shutdown": None,
            "files": {},
        }

    def __enter__(self) -> Session:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def start(self, backend_procs: int, lifetime: float, upstream: Upstream | None = None) -> None:
        """The echo backend on a fresh port, then the target in front of it;
        with ``upstream``, the target's upstream arithmetic goes to ``plan``
        before it starts."""
        backend_port = pick_port()
        listen_port = pick_port(avoid={backend_port})
        self.result["parameters"].update(backend_port=backend_port, listen_port=listen_port)
        self.backend = LineProcess(
            "backend",
            [sys.executable, "-m", "bench.backend", "--port", str(backend_port),
             "--procs", str(backend_procs), "--lifetime", str(lifetime)],
            stdin=False,
        )  # fmt: skip
        self.backend.expect("ready", 20)
        self.target = target = make_target(
            self.args.target,
            self.workdir,
            listen=("127.0.0.1", listen_port),
            backend=("127.0.0.1", backend_port),
            workers=self.args.workers,
            log_level=self.args.log_level,
            access_log=self.args.access_log == "on",
            upstream=upstream,
        )
        self.result["target_version"] = target.version()
        if upstream is not None:
            self.result["plan"] = target.plan()
        self.result["files"].update(config=_rel(target.config_path), log=_rel(target.log_path))
        t0 = time.monotonic()
        target.start()
        self._target_started = True
        target.wait_ready(60)
        self.result["timings"]["target_ready_s"] = round(time.monotonic() - t0, 2)
        self.idle_fds = self.target_fds()

    def loadgen(self, name: str, mode: str, count: int, sources: str, *extra: str) -> LineProcess:
        assert self.target is not None
        host, port = self.target.address
        g = LineProcess(
            name,
            [sys.executable, "-m", "bench.loadgen", "--mode", mode,
             "--target", f"{host}:{port}", "--count", str(count), "--sources", sources, *extra],
        )  # fmt: skip
        self.gens.append(g)
        return g

    def send_all(self, line: str) -> None:
        for g in self.gens:
            g.send(line)

    def results(self, word: str, timeout: float) -> list[dict[str, Any]]:
        """Every generator's ``<word> <JSON>`` line, within ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        out = []
        for g in self.gens:
            words = g.expect(word, max(1.0, deadline - time.monotonic()))
            out.append(json.loads(" ".join(words[1:])))
        return out

    def wait(self, seconds: float) -> None:
        """Let the load run for ``seconds``, failing early if a generator dies."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(0.25, left))
            for g in self.gens:
                if g.proc.poll() is not None:
                    raise BenchError(f"{g.name} exited ({g.proc.returncode}) during the run")

    def target_processes(self) -> list[psutil.Process]:
        return self.target.processes() if self.target is not None else []

    def target_fds(self) -> int | None:
        """The target's descriptors summed over its processes; None without any."""
        procs = self.target_processes()
        if not procs or self.target is None:
            return None
        return int(measure.snapshot(procs, self.target.role)["fds"])

    def release(self, timeout: float) -> tuple[int | None, float]:
        """Wait (≤ ``timeout``) until the target holds no more descriptors than
        when it was idle: every tunnel's end processed. (fds, seconds waited)."""
        t0 = time.monotonic()
        while True:
            fds = self.target_fds()
            waited = time.monotonic() - t0
            if fds is None or self.idle_fds is None or fds <= self.idle_fds or waited >= timeout:
                return fds, round(waited, 3)
            time.sleep(0.05)

    def cpu_meter(self) -> CpuMeter:
        def gens() -> list[psutil.Process]:
            return [psutil.Process(g.pid) for g in self.gens if g.proc.poll() is None]

        def backend() -> list[psutil.Process]:
            if self.backend is None:
                return []
            try:
                root = psutil.Process(self.backend.pid)
                return [root, *root.children()]
            except psutil.NoSuchProcess:
                return []

        return CpuMeter({"target": self.target_processes, "loadgen": gens, "backend": backend})

    def stop_loadgens(self) -> None:
        for g in self.gens:
            try:
                g.send("quit")
            except BenchError:
                pass
        for g in self.gens:
            g.stop(10)
        self.gens.clear()

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(e, BenchError):
            self.result["error"] = str(e)
        elif isinstance(e, KeyboardInterrupt):
            self.result["error"] = "interrupted"
        if e is not None:
            self.result["ok"] = False
        timings = self.result["timings"]
        t0 = time.monotonic()
        self.stop_loadgens()
        timings["clients_close_s"] = round(time.monotonic() - t0, 2)
        if self._target_started and self.target is not None:
            # Stop the target only once it has seen every client go, so that its
            # log tells how tunnels ended rather than that it was stopped.
            fds, timings["target_release_s"] = self.release(RELEASE_TIMEOUT)
            self.result["target_fds_at_stop"] = {"idle": self.idle_fds, "at_stop": fds}
            self.result["shutdown"] = self.target.stop(30)
            self.result["target_log"] = log_summary(self.target)
        if self.backend is not None:
            self.backend.stop(10)
        timings["total_s"] = round(time.monotonic() - self.started, 2)
        path = self.results_dir / f"{self.name}.json"
        self.result["files"]["result"] = _rel(path)
        path.write_text(json.dumps(self.result, indent=2) + "\n")
        return isinstance(e, BenchError | KeyboardInterrupt)


def held(s: Session, sample: int, holding: int) -> dict[str, Any]:
    """With every tunnel still open: the target's descriptors, what each
    generator holds, and a proportional sample that must still echo."""
    fds = s.target_fds()
    s.send_all("status")
    statuses = [g.expect("status", 30) for g in s.gens]
    open_now = [int(w[1]) for w in statuses]
    k = min(sample, holding)
    asks = [round(k * o / holding) if holding else 0 for o in open_now]
    asks[-1] += k - sum(asks)
    for g, ask in zip(s.gens, asks, strict=True):
        g.send(f"verify {ask}")
    ok = bad = 0
    for g in s.gens:
        words = g.expect("verify", 30)
        ok, bad = ok + int(words[1]), bad + int(words[2])
    return {
        "target_fds": fds,
        "held_at_once": sum(open_now),
        "dropped_while_held": sum(int(w[2]) for w in statuses),
        "sample_echo": {"requested": sum(asks), "ok": ok, "failed": bad},
    }


# -- the table ----------------------------------------------------------------


def fmt(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def markdown(r: dict[str, Any], title: str, rows: list[tuple[str, str]]) -> str:
    m = r["machine"]
    v = r["target_version"] or {}
    label = str(v.get("version") or "")
    if r["target"] not in label:  # shardproxy's own says "shardproxy 0.1.0"
        label = f"{r['target']} {label}".strip()
    version = " ".join(x for x in (label, (v.get("commit") or "")[:10]) if x)
    fails = r["failures"]
    kinds = ", ".join(f"{k} {n}" for k, n in fails["by_kind"].items())
    out = [
        f"### {r['target']} {r['scenario']}: {title}",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {a} | {b} |" for a, b in rows),
        f"| failures | {fails['total']}{f' ({kinds})' if kinds else ''} |",
        "",
        f"Target: {version}{' (dirty)' if v.get('dirty') else ''}, "
        f"workers {fmt(r['workers'])}. "
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}.",
        f"Command: `{r['command']}`",
        f"Result: {'OK' if r['ok'] else 'NOT OK'}"
        + (f" — error: {r['error']}" if r["error"] else "")
        + f"; JSON: {r['files'].get('result')}",
    ]
    return "\n".join(out)
