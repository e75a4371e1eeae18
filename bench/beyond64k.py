"""The ``beyond64k`` scenario: more tunnels to ONE backend host and port than
one source address has ports (issue 4's scale proof).

An upstream connection is the 4-tuple (source IP, source port, backend IP,
backend port): to one backend endpoint, one source address carries at most
one tunnel per port of ``ip_local_port_range`` (28,232 here). N tunnels need
``ceil(N / ports)`` source addresses, and, at 2 descriptors per tunnel and
~20,000 descriptors per process, ``ceil(2N / (nofile - 64))`` worker
processes. The scenario sizes both from that arithmetic with headroom (the
kernel's SO_REUSEPORT hash spreads tunnels over workers, and so over their
port slices, only about evenly), writes them into the target's config, and
records the target's own arithmetic (``shardproxy plan --json``; for HAProxy,
server lines x ports per source address against one process's descriptors).

Steps (each bounded in time; everything is stopped when the run ends):

1. the echo backend on a fresh port below the ephemeral range, as
   ``--backend-procs`` processes on ``SO_REUSEPORT`` sockets (one per
   12,000 tunnels by default); the target in front of it with the upstream
   source addresses 127.64.0.1, .2, ... (clients use 127.10.i.x: never the
   same address on both sides);
2. "before": the target's summed RSS once stable, /proc/net/sockstat and
   the socket slab caches;
3. ``ceil(N / --per-loadgen)`` generators open the tunnels, each with at most
   ``--concurrency`` handshakes in flight; a generator that sees
   ``--give-up-after`` failures stops starting new ones (a target at its wall,
   like HAProxy at its descriptor limit, ends the run in seconds, and the
   result says how far it got and how the rest failed);
4. "after": once the target holds 2 more descriptors per tunnel and RSS is
   stable; sockstat and slabs again;
5. every tunnel is held ``--hold`` seconds; then the generators count what
   they still hold and a random sample of ``--sample`` tunnels must echo a
   random payload byte-exactly.

Figures: tunnels opened and held, failures by kind, the time to open them,
user memory per tunnel (RSS delta of every process of the target / tunnels),
kernel socket memory (sockstat's TCP ``mem`` pages and the socket slab caches,
before, after, per tunnel: every socket of the run is on this machine, so a
tunnel's figure covers its 4 sockets, client, proxy x 2 and backend), the
plan's arithmetic, the sample echoed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import time
from collections import Counter
from typing import Any

from shardproxy.host.rlimits import FD_RESERVE, fd_capacity

from . import measure, scenario
from .peers import fd_hard_limit
from .procs import Upstream
from .scenario import Session, fmt

UPSTREAM_FIRST = ipaddress.IPv4Address("127.64.0.1")  # the proxy's upstream sources
PER_BACKEND_PROC = 12_000  # tunnels per echo process: far below its descriptor limit
# Plan to fill at most this share of a worker's descriptors and of the tuple
# space: SO_REUSEPORT's hash spreads tunnels over workers only about evenly.
DESCRIPTOR_USE = 0.8
TUPLE_USE = 0.85
SETTLE_TOLERANCE = 1 << 20  # RSS is stable when it varies by ≤ 1 MiB over ~20 workers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tunnels", "-n", type=int, default=150_000, help="tunnels (150000)")
    p.add_argument("--hold", type=float, default=60.0, help="seconds to hold them all (60)")
    p.add_argument("--sample", type=int, default=1000, help="held tunnels checked to echo (1000)")
    p.add_argument("--per-loadgen", type=int, default=15_000, help="tunnels per loadgen (15000)")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per loadgen")
    p.add_argument("--handshake-timeout", type=float, default=15.0, help="per tunnel (15 s)")
    p.add_argument("--open-timeout", type=float, default=600.0, help="to open them all (600 s)")
    p.add_argument(
        "--give-up-after", type=int, default=200, help="failures per loadgen, then stop (200)"
    )
    p.add_argument(
        "--upstream-sources", type=int, default=0, help="proxy source addresses (0: the plan's)"
    )
    p.add_argument("--port-range", default="auto", help="auto (the system's) or FIRST-LAST")
    p.add_argument("--port-allocator", default="auto", help="shardproxy: auto|kernel|userspace")
    p.add_argument("--settle-timeout", type=float, default=60.0, help="seconds for RSS to settle")


# -- sizing -------------------------------------------------------------------


def sizing(args: Any) -> dict[str, Any]:
    """Workers, upstream source addresses, generators and echo processes for
    N tunnels, from the descriptor limit and the port range."""
    n = args.tunnels
    nofile = fd_hard_limit()
    first, last = Upstream(port_range=args.port_range).ports()
    ports = last - first + 1
    per_worker = fd_capacity(nofile)
    workers = args.workers or math.ceil(n / (DESCRIPTOR_USE * per_worker))
    sources = args.upstream_sources or math.ceil(n / (TUPLE_USE * ports))
    return {
        "tunnels": n,
        "nofile": nofile,
        "port_range": f"{first}-{last}",
        "ports": ports,
        "tunnels_per_worker_by_fds": per_worker,
        "workers": workers,
        "upstream_sources": sources,
        "loadgens": math.ceil(n / args.per_loadgen),
        "backend_procs": args.backend_procs or max(2, math.ceil(n / PER_BACKEND_PROC)),
        "rule": f"workers = ceil(N / ({DESCRIPTOR_USE:g} x (nofile - {FD_RESERVE}) / 2)); "
        f"sources = ceil(N / ({TUPLE_USE:g} x ports)); given values win",
    }


def upstream_addresses(count: int) -> tuple[str, ...]:
    return tuple(str(UPSTREAM_FIRST + i) for i in range(count))


def arithmetic(plan: dict[str, Any] | None) -> str | None:
    """The plan in one line: sources x ports x endpoints = tuples (and how the
    ports are sliced per worker), what descriptors allow, the limit."""
    if not plan or "total" not in plan:
        return None
    t, r, w = plan["total"], plan["port_range"], plan["workers"]
    ports = r["last"] - r["first"] + 1
    sources = max(1, len(plan["sources"]))
    slices = plan.get("slices") or []
    cut = (
        f" (in {len(slices)} slices of ~{ports // len(slices):,}, one per worker)" if slices else ""
    )
    return (
        f"{sources} source address{'es' if sources != 1 else ''} x {ports:,} ports{cut} x "
        f"{len(plan['endpoints'])} endpoint = {t['tuples']:,} tuples; "
        f"descriptors (2 per tunnel) in {w} process{'es' if w != 1 else ''} allow "
        f"{t['descriptors']:,}; limit {t['limit']:,} ({t['binding']})"
    )


# -- the run ------------------------------------------------------------------


def run(args: Any) -> dict[str, Any]:
    size = sizing(args)
    args.workers = size["workers"]
    n = args.tunnels
    upstream = Upstream(
        upstream_addresses(size["upstream_sources"]), args.port_range, args.port_allocator
    )
    params = {
        "tunnels": n,
        "hold_s": args.hold,
        "sample": args.sample,
        "sizing": size,
        "upstream_sources": list(upstream.sources),
        "loadgen_processes": size["loadgens"],
        "per_loadgen": args.per_loadgen,
        "source_addresses_per_loadgen": args.sources,
        "concurrency_per_loadgen": args.concurrency,
        "handshake_timeout_s": args.handshake_timeout,
        "give_up_after_per_loadgen": args.give_up_after,
        "backend_procs": size["backend_procs"],
        "log_level": args.log_level,
    }
    hold = args.open_timeout + 2 * args.settle_timeout + args.hold + 300
    with Session("beyond64k", args, params) as s:
        s.start(size["backend_procs"], lifetime=hold + 60, upstream=upstream)
        before = _state(s, fds_at_most=s.idle_fds, timeout=args.settle_timeout)
        meter = s.cpu_meter()
        net = scenario.netstat()
        meter.start()
        opened, reasons, open_s = _open(s, args, size["loadgens"], hold)
        cpu = meter.stop()
        s.result.update(cpu=cpu, failures=scenario.failures(reasons))  # kept if a later step fails
        after = _state(
            s, fds_at_least=(before["fds"] or 0) + 2 * opened, timeout=args.settle_timeout
        )
        # the kernel's own count: more connections to one host:port than one address has ports
        tuples = measure.connections_to("127.0.0.1", s.result["parameters"]["backend_port"])
        s.wait(args.hold)
        held = {**scenario.held(s, args.sample, opened), "backend_connections": tuples}
        # from the first connect to the end of the hold: what the kernel dropped or gave up
        s.result["kernel_tcp_counters"] = scenario.netstat_delta(net)
        _figures(s.result, n, opened, open_s, before, after, held)
    return s.result


def _state(
    s: Session,
    *,
    timeout: float,
    fds_at_least: int | None = None,
    fds_at_most: int | None = None,
) -> dict[str, Any]:
    """The target's memory once its descriptors are where they should be
    and RSS is stable, and the kernel's socket memory."""
    target = s.target
    mem: dict[str, Any] | None = None
    if target is not None and target.processes():

        def take() -> measure.Snapshot:
            return measure.snapshot(target.processes(), target.role)

        snap, settle = measure.settle(
            take,
            fds_at_least=fds_at_least,
            fds_at_most=fds_at_most,
            tolerance=SETTLE_TOLERANCE,
            timeout=timeout,
        )
        mem = {"rss": snap["rss"], "uss": snap["uss"], "fds": snap["fds"], "settle": settle}
    return {
        "memory": mem,
        "fds": None if mem is None else mem["fds"],
        "sockstat": measure.sockstat(),
        "slab": measure.slabinfo(),
        "conntrack": _conntrack(),
        "time": time.time(),
    }


def _conntrack() -> int | None:
    """Connections the netfilter conntrack table holds (a full table drops SYNs)."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except OSError:
        return None


def _open(
    s: Session, args: Any, gens: int, hold: float
) -> tuple[int, Counter[str], dict[str, Any]]:
    """Every generator opens its share; (tunnels open, failure reasons, timings)."""
    t0 = time.monotonic()
    for i, count in enumerate(scenario.split(args.tunnels, gens)):
        s.loadgen(
            f"loadgen-{i}", "idle", count, f"127.10.{i}.1/{args.sources}",
            "--concurrency", str(args.concurrency),
            "--handshake-timeout", str(args.handshake_timeout),
            "--open-timeout", str(args.open_timeout),
            "--give-up-after", str(args.give_up_after),
            "--hold", str(hold),
        )  # fmt: skip
    deadline = t0 + args.open_timeout + 60
    opened, seconds = 0, []
    reasons: Counter[str] = Counter()
    for g in s.gens:
        words = g.expect("open", max(1.0, deadline - time.monotonic()))
        opened += int(words[1])
        seconds.append(float(words[3]))
        reasons.update(json.loads(words[4]))
    wall = time.monotonic() - t0
    timings = {
        "open_wall_s": round(wall, 2),
        "open_s": round(max(seconds), 2),
        "open_rate_per_s": round(opened / max(wall, 1e-6), 1),
    }
    s.result["timings"].update(timings)
    return opened, reasons, timings


# -- figures ------------------------------------------------------------------


def _per(delta: float | None, tunnels: int) -> float | None:
    return round(delta / tunnels, 1) if delta is not None and tunnels else None


def _kernel(before: dict[str, Any], after: dict[str, Any], tunnels: int) -> dict[str, Any]:
    """sockstat's TCP buffer pages and the socket slab caches, before and after."""
    page = os.sysconf("SC_PAGE_SIZE")
    mem0, mem1 = (x["sockstat"].get("mem", 0) * page for x in (before, after))
    slab0, slab1 = (sum((x["slab"] or {}).values()) for x in (before, after))
    readable = before["slab"] is not None
    return {
        "tcp_inuse_before": before["sockstat"].get("inuse"),
        "tcp_inuse_after": after["sockstat"].get("inuse"),
        "tcp_mem_bytes_before": mem0,
        "tcp_mem_bytes_after": mem1,
        "tcp_mem_per_tunnel_bytes": _per(mem1 - mem0, tunnels),
        "socket_slab_bytes_before": slab0 if readable else None,
        "socket_slab_bytes_after": slab1 if readable else None,
        "socket_slab_per_tunnel_bytes": _per(slab1 - slab0, tunnels) if readable else None,
        "slab_caches": {"before": before["slab"], "after": after["slab"]},
        "sockstat": {"before": before["sockstat"], "after": after["sockstat"]},
        "conntrack": {"before": before["conntrack"], "after": after["conntrack"]},
    }


def _user(before: dict[str, Any], after: dict[str, Any], tunnels: int) -> dict[str, Any]:
    """The target's RSS (and USS) delta over every process, per tunnel."""
    m0, m1 = before["memory"], after["memory"]
    if m0 is None or m1 is None:
        return {"rss_before": None, "rss_after": None, "user_memory_per_tunnel_bytes": None}
    return {
        "rss_before": m0["rss"],
        "rss_after": m1["rss"],
        "user_memory_per_tunnel_bytes": _per(m1["rss"] - m0["rss"], tunnels),
        "uss_per_tunnel_bytes": _per(m1["uss"] - m0["uss"], tunnels),
        "fds_before": m0["fds"],
        "fds_after": m1["fds"],
        "settled": m1["settle"]["settled"],
    }


def _figures(
    result: dict[str, Any],
    n: int,
    opened: int,
    open_s: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    held: dict[str, Any],
) -> None:
    plan = result.get("plan")
    limit = ((plan or {}).get("total") or {}).get("limit")
    cpu = result["cpu"]
    result["figures"] = {
        "requested": n,
        "opened": opened,
        **held,
        **open_s,
        **_user(before, after, opened),
        **_kernel(before, after, opened),
        "target_cpu_us_per_tunnel_opened": scenario.per_unit_us(cpu, "target", opened),
        "arithmetic": arithmetic(plan),
        "plan_limit": limit,
        "plan_allows_all": None if limit is None else limit >= n,
    }
    echo = held["sample_echo"]
    result["ok"] = (
        opened == n
        and result["failures"]["total"] == 0
        and held["held_at_once"] == n
        and held["dropped_while_held"] == 0
        and echo["ok"] == echo["requested"] == min(result["parameters"]["sample"], n)
    )


# -- the table ----------------------------------------------------------------


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def markdown(r: dict[str, Any]) -> str:
    f, p = r["figures"], r["parameters"]
    k = r.get("kernel_tcp_counters") or {}
    echo = f.get("sample_echo", {})
    t = r["timings"]
    rows = [
        ("**tunnels held** (requested)", f"**{fmt(f.get('held_at_once'))}** ({fmt(p['tunnels'])})"),
        ("opened; dropped while held",
         f"{fmt(f.get('opened'))}; {fmt(f.get('dropped_while_held'))}"),
        ("plan", f.get("arithmetic") or _plan_error(r)),
        ("upstream source addresses; workers", f"{_sources(p['upstream_sources'])}; "
         f"{fmt(r['workers'])}"),
        ("**time to open them**", f"**{fmt(t.get('open_s'), ' s', 1)}** "
         f"({fmt(t.get('open_rate_per_s'), '/s', 0)}, wall {fmt(t.get('open_wall_s'), ' s', 1)})"),
        ("**user memory per tunnel** (RSS, all processes)",
         f"**{fmt(f.get('user_memory_per_tunnel_bytes'), ' B', 0)}** "
         f"({_mib(f.get('rss_before'))} → {_mib(f.get('rss_after'))})"),
        ("**kernel TCP memory** (sockstat mem, per tunnel)",
         f"{_mib(f.get('tcp_mem_bytes_before'))} → {_mib(f.get('tcp_mem_bytes_after'))} "
         f"(**{fmt(f.get('tcp_mem_per_tunnel_bytes'), ' B', 0)}**)"),
        ("kernel socket slabs (per tunnel: all its sockets)",
         f"{_mib(f.get('socket_slab_bytes_before'))} → {_mib(f.get('socket_slab_bytes_after'))} "
         f"({fmt(f.get('socket_slab_per_tunnel_bytes'), ' B', 0)})"),
        ("TCP sockets in use before → after",
         f"{fmt(f.get('tcp_inuse_before'))} → {fmt(f.get('tcp_inuse_after'))}"),
        ("connections to the backend port (kernel)", _by_source(f.get("backend_connections"))),
        ("held for", fmt(p["hold_s"], " s", 0)),
        ("sample echoed byte-exactly", f"{fmt(echo.get('ok'))} / {fmt(echo.get('requested'))}"),
        ("target descriptors while held", fmt(f.get("target_fds"))),
        ("kernel: packets its input backlogs dropped; connections it gave up (timeouts)",
         f"{fmt(k.get('SoftnetDropped', 0))}; {fmt(k.get('TCPAbortOnTimeout', 0))} "
         f"(net.core.netdev_max_backlog = {r['machine']['net'].get('netdev_max_backlog')})"),
    ]  # fmt: skip
    title = f"{p['tunnels']:,} tunnels to one backend host and port, held {p['hold_s']:g} s"
    return scenario.markdown(r, title, rows)


def _by_source(c: dict[str, Any] | None) -> str:
    if not c or "total" not in c:
        return "n/a"
    by = c["by_source"]
    most = max(by.values(), default=0)
    return f"{c['total']:,} from {len(by)} source addresses (≤ {most:,} each)"


def _sources(addrs: list[str]) -> str:
    if len(addrs) <= 2:
        return f"{len(addrs)} ({', '.join(addrs) or 'the kernel chooses'})"
    return f"{len(addrs)} ({addrs[0]} … {addrs[-1]})"


def _plan_error(r: dict[str, Any]) -> str:
    plan = r.get("plan")
    return f"n/a ({plan['error'][:200]})" if plan and plan.get("error") else "n/a"
