"""The ``spike`` scenario: N clients connect at the same moment.

Steps (each bounded in time; everything is stopped when the run ends):

1. the echo backend on a fresh port (``--backend-procs``, by default one
   process per 6,000 clients, so each stays far below its descriptor limit),
   and the target in front of it (``--workers 4`` by default: a proxy needs 2
   descriptors per tunnel and a process may hold 20,000, so 20,000 tunnels
   need at least 3 processes);
2. ``ceil(N / --per-loadgen)`` generator processes (≤ 9,000 clients each)
   create and bind all their sockets, then say ``ready``;
3. barrier: once every generator is ready, each is told ``go`` at once and
   starts every connect without a concurrency cap; each client must see its
   101 (with the right Sec-WebSocket-Accept) within ``--timeout`` seconds;
4. every generator reports (upgraded, failures by reason, latencies) and
   keeps its connections open, so that all tunnels are held at the same time;
   then the target's descriptors are counted, every generator reports what it
   still holds, and a sample of tunnels must still echo;
5. everything is closed.

Figures: upgraded count and %, failures by kind (refused, reset, timeout,
``status:503``…), handshake latency p50/p99/max, when the last 101 came, the
target's CPU during the spike, and the kernel's listen-queue counters.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import Any

from . import scenario
from .scenario import Session, fmt

PER_BACKEND_PROC = 6000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", "-n", type=int, default=20000, help="clients (default 20000)")
    p.add_argument("--per-loadgen", type=int, default=9000, help="clients per loadgen (≤9000)")
    p.add_argument("--timeout", type=float, default=60.0, help="per client, for its 101 (60 s)")
    p.add_argument("--sample", type=int, default=100, help="held tunnels checked to echo (100)")


def run(args: Any) -> dict[str, Any]:
    n = args.clients
    gens = math.ceil(n / args.per_loadgen)
    backend_procs = args.backend_procs or max(2, math.ceil(n / PER_BACKEND_PROC))
    params = {
        "clients": n,
        "loadgen_processes": gens,
        "source_addresses_per_loadgen": args.sources,
        "timeout_s": args.timeout,
        "sample": args.sample,
        "backend_procs": backend_procs,
        "log_level": args.log_level,
    }
    hold = args.timeout + 300
    with Session("spike", args, params) as s:
        s.start(backend_procs, lifetime=hold + 60)
        for i, count in enumerate(scenario.split(n, gens)):
            s.loadgen(
                f"loadgen-{i}", "spike", count, f"127.3.{i}.1/{args.sources}",
                "--handshake-timeout", str(args.timeout),
                "--open-timeout", str(args.timeout + 30), "--hold", str(hold),
            )  # fmt: skip
        for g in s.gens:
            g.expect("ready", 120)
        meter = s.cpu_meter()
        net = scenario.netstat()
        meter.start()
        s.send_all("go")  # the barrier: every generator waits for this line
        results = s.results("result", args.timeout + 90)
        cpu = meter.stop()
        s.result["kernel_tcp_counters"] = scenario.netstat_delta(net)
        s.result["loadgens"] = scenario.without_histograms(results)
        held = scenario.held(s, args.sample, sum(r["open"] for r in results))
        _figures(s.result, results, cpu, n, held)
    return s.result


def _figures(
    result: dict[str, Any],
    results: list[dict[str, Any]],
    cpu: dict[str, Any],
    n: int,
    held: dict[str, Any],
) -> None:
    up = sum(r["upgraded"] for r in results)
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    target = cpu["groups"]["target"]
    result.update(
        cpu=cpu,
        failures=scenario.failures(reasons),
        figures={
            "requested": n,
            "upgraded": up,
            "upgraded_pct": round(100 * up / n, 3),
            "latency_us": scenario.latency(r["latency_us"] for r in results),
            "last_upgrade_s": max(r["last_upgrade_s"] for r in results),
            "all_done_s": max(r["seconds"] for r in results),
            "target_cpu_s": target["cpu_s"] if target["processes"] else None,
            "target_cpu_us_per_upgrade": scenario.per_unit_us(cpu, "target", up),
            "loadgen_cpu_s": cpu["groups"]["loadgen"]["cpu_s"],
            **held,
        },
    )
    echo = held["sample_echo"]
    result["ok"] = (
        up == n
        and not reasons
        and held["dropped_while_held"] == 0
        and held["held_at_once"] == n
        and echo["ok"] == echo["requested"]
    )


def markdown(r: dict[str, Any]) -> str:
    f, p = r["figures"], r["parameters"]
    lat = f.get("latency_us", {})
    echo = f.get("sample_echo", {})
    rows = [
        ("**upgraded**", f"**{fmt(f.get('upgraded'))} / {fmt(p['clients'])} "
         f"({fmt(f.get('upgraded_pct'), ' %', 2)})**"),
        ("**handshake latency p50 / p99 / max**",
         "**" + " / ".join(fmt(_ms(lat.get(q)), " ms", 1) for q in ("p50", "p99", "max")) + "**"),
        ("last 101 after go", fmt(f.get("last_upgrade_s"), " s", 2)),
        ("tunnels held at once (dropped while held)",
         f"{fmt(f.get('held_at_once'))} ({fmt(f.get('dropped_while_held'))})"),
        ("sample still echoing", f"{fmt(echo.get('ok'))} / {fmt(echo.get('requested'))}"),
        ("target descriptors while held", fmt(f.get("target_fds"))),
        ("target CPU during the spike", f"{fmt(f.get('target_cpu_s'), ' s', 2)} "
         f"({fmt(f.get('target_cpu_us_per_upgrade'), ' µs', 0)} per upgrade)"),
        ("kernel TCP counters (delta)",
         ", ".join(f"{k} {v}" for k, v in (r.get("kernel_tcp_counters") or {}).items()) or "-"),
    ]  # fmt: skip
    title = f"{p['clients']} clients at once from {p['loadgen_processes']} loadgen process(es)"
    return scenario.markdown(r, title, rows)


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000
