"""The ``handshake`` scenario: CPU per handshake, and handshake latency.

Steps (each bounded in time; everything is stopped when the run ends):

1. the echo backend on a fresh port and the target in front of it;
2. ``--loadgens`` generator processes (``bench.loadgen --mode handshake``),
   each from ``--sources`` source addresses of its own, say ``ready``;
3. the CPU times of the target's, the generators' and the backend's
   processes are read and every generator is told ``go``: N clients in all,
   at most ``--concurrency`` in flight per process, each connecting, upgrading
   (random key; 101 and Sec-WebSocket-Accept checked), sending a Close frame
   and its FIN (the client closes first: TIME_WAIT stays on the client side),
   reading until the peer's EOF, and closing;
4. when every generator has reported, and the target's descriptor count is
   back where it was (its side of every tunnel torn down; ≤ 5 s), the CPU
   times are read again;
5. figures: handshakes/s over go → the last client done (the slowest
   generator's own clock), target CPU µs per handshake
   (user + system of every process of the target ÷ completed handshakes),
   latency (connect start → 101 verified) percentiles, the close's latency
   (Close and FIN sent → the peer's EOF: the rest of each client's cycle,
   so it bounds the rate too), failures by kind.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from . import scenario
from .scenario import Session, fmt, per_unit_us

SETTLE_TIMEOUT = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", "-n", type=int, default=5000, help="handshakes (default 5000)")
    p.add_argument("--concurrency", type=int, default=100, help="in flight per loadgen (100)")
    p.add_argument("--loadgens", type=int, default=1, help="generator processes (1)")
    p.add_argument("--handshake-timeout", type=float, default=10.0, help="per client (10 s)")
    p.add_argument("--close-timeout", type=float, default=10.0, help="Close → EOF (10 s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")


def run(args: Any) -> dict[str, Any]:
    n = args.clients
    gens = min(args.loadgens, n)
    params = {
        "clients": n,
        "concurrency_per_loadgen": args.concurrency,
        "loadgen_processes": gens,
        "source_addresses_per_loadgen": args.sources,
        "handshake_timeout_s": args.handshake_timeout,
        "close_timeout_s": args.close_timeout,
        "backend_procs": args.backend_procs,
        "log_level": args.log_level,
    }
    with Session("handshake", args, params) as s:
        s.start(args.backend_procs, lifetime=args.timeout + 120)
        for i, count in enumerate(scenario.split(n, gens)):
            s.loadgen(
                f"loadgen-{i}", "handshake", count, f"127.2.{i}.1/{args.sources}",
                "--concurrency", str(args.concurrency),
                "--handshake-timeout", str(args.handshake_timeout),
                "--close-timeout", str(args.close_timeout),
                "--open-timeout", str(args.timeout), "--hold", str(args.timeout + 60),
            )  # fmt: skip
        for g in s.gens:
            g.expect("ready", 30)
        meter = s.cpu_meter()
        net = scenario.netstat()
        meter.start()
        s.send_all("go")
        results = s.results("result", args.timeout + 30)
        fds_after, released_s = s.release(SETTLE_TIMEOUT)  # the last tunnels' teardown
        cpu = meter.stop()
        s.result["kernel_tcp_counters"] = scenario.netstat_delta(net)
        s.result["loadgens"] = scenario.without_histograms(results)
        _figures(s.result, results, cpu, n)
        s.result["figures"].update(
            target_fds_idle=s.idle_fds, target_fds_after=fds_after, target_release_s=released_s
        )
    return s.result


def _figures(
    result: dict[str, Any],
    results: list[dict[str, Any]],
    cpu: dict[str, Any],
    n: int,
) -> None:
    done = sum(r["upgraded"] for r in results)
    # go → the last client closed, by the generators' own clocks
    window = max(r["seconds"] for r in results)
    clean = sum(r["closed_clean"] for r in results)
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    groups = cpu["groups"]
    result.update(
        cpu=cpu,
        failures=scenario.failures(reasons),
        figures={
            "requested": n,
            "handshakes": done,
            "closed_clean": clean,
            "window_s": round(window, 4),
            "handshakes_per_s": round(done / window, 1),
            "target_cpu_us_per_handshake": per_unit_us(cpu, "target", done),
            "target_user_us_per_handshake": per_unit_us(cpu, "target", done, "user_s"),
            "target_kernel_us_per_handshake": per_unit_us(cpu, "target", done, "system_s"),
            "target_cpu_cores": scenario.cores(cpu, "target"),
            "loadgen_cpu_us_per_handshake": per_unit_us(cpu, "loadgen", done),
            "loadgen_cpu_cores": scenario.cores(cpu, "loadgen"),
            "backend_cpu_us_per_handshake": per_unit_us(cpu, "backend", done),
            "backend_cpu_cores": scenario.cores(cpu, "backend"),
            "machine_busy_cores": cpu["machine_busy_cores"],
            "latency_us": scenario.latency(r["latency_us"] for r in results),
            "close_latency_us": scenario.latency(r["close_latency_us"] for r in results),
        },
    )
    result["ok"] = done == n and clean == n and not reasons and not groups["target"]["gone"]


def markdown(r: dict[str, Any]) -> str:
    f, p = r["figures"], r["parameters"]
    lat, closing = f.get("latency_us", {}), f.get("close_latency_us", {})
    rows = [
        ("handshakes completed / requested", f"{fmt(f.get('handshakes'))} / {fmt(p['clients'])}"
         f" ({fmt(f.get('closed_clean'))} closed cleanly)"),
        ("**handshakes/s**", f"**{fmt(f.get('handshakes_per_s'), '', 0)}** "
         f"(in {fmt(f.get('window_s'), ' s', 2)})"),
        ("**target CPU per handshake**",
         f"**{fmt(f.get('target_cpu_us_per_handshake'), ' µs')}** "
         f"({fmt(f.get('target_cpu_cores'), ' cores', 2)})"),
        ("loadgen CPU per handshake", f"{fmt(f.get('loadgen_cpu_us_per_handshake'), ' µs')} "
         f"({fmt(f.get('loadgen_cpu_cores'), ' cores', 2)})"),
        ("backend CPU per handshake", f"{fmt(f.get('backend_cpu_us_per_handshake'), ' µs')} "
         f"({fmt(f.get('backend_cpu_cores'), ' cores', 2)})"),
        ("machine busy", fmt(f.get("machine_busy_cores"), " cores", 2)),
        ("latency connect → 101, p50 / p99 / max",
         " / ".join(fmt(lat.get(q), " µs", 0) for q in ("p50", "p99", "max"))),
        ("latency Close sent → EOF, p50 / p99 / max",
         " / ".join(fmt(closing.get(q), " µs", 0) for q in ("p50", "p99", "max"))),
    ]  # fmt: skip
    title = (
        f"{p['clients']} clients, ≤ {p['concurrency_per_loadgen']} in flight x "
        f"{p['loadgen_processes']} loadgen process(es)"
    )
    return scenario.markdown(r, title, rows)
