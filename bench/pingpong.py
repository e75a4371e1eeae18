"""The ``pingpong`` scenario: CPU per relayed message, and round-trip latency.

Steps (each bounded in time; everything is stopped when the run ends):

1. the echo backend on a fresh port and the target in front of it;
2. K tunnels opened by ``ceil(K / --per-loadgen)`` generator processes
   (``bench.loadgen --mode pingpong``);
3. ``go``: every tunnel keeps exactly one binary message of ``--size`` bytes
   in flight (send, await the echo, send again);
4. after ``--warmup`` seconds the CPU times of the target's, the generators'
   and the backend's processes are read and every generator is told ``mark``;
   ``--duration`` seconds later ``stop``, and the CPU times are read again;
5. figures over that window: round trips per second (each generator's
   round trips over its own mark → stop, summed), target CPU µs per round
   trip (user + system of every process of the target ÷ round trips; null for
   ``direct``, which has none), round-trip latency percentiles, and the
   generators' and backend's CPU, so that a saturated generator shows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from typing import Any

from . import scenario
from .procs import BenchError
from .scenario import Session, fmt, per_unit_us


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tunnels", "-k", type=int, default=50, help="tunnels (default 50)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    p.add_argument("--size", type=int, default=64, help="message payload bytes (64)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the window (1)")
    p.add_argument("--per-loadgen", type=int, default=1000, help="tunnels per loadgen (≤1000)")
    p.add_argument("--open-timeout", type=float, default=120.0, help="seconds to open them all")


def run(args: Any) -> dict[str, Any]:
    k = args.tunnels
    gens = math.ceil(k / args.per_loadgen)
    params = {
        "tunnels": k,
        "duration_s": args.duration,
        "size_bytes": args.size,
        "warmup_s": args.warmup,
        "loadgen_processes": gens,
        "source_addresses_per_loadgen": args.sources,
        "backend_procs": args.backend_procs,
        "log_level": args.log_level,
    }
    hold = args.open_timeout + args.warmup + args.duration + 120
    with Session("pingpong", args, params) as s:
        s.start(args.backend_procs, lifetime=hold + 60)
        for i, n in enumerate(scenario.split(k, gens)):
            s.loadgen(
                f"loadgen-{i}", "pingpong", n, f"127.1.{i}.1/{args.sources}",
                "--size", str(args.size), "--open-timeout", str(args.open_timeout),
                "--hold", str(hold),
            )  # fmt: skip
        opened, reasons = _open(s, args.open_timeout + 30)
        if opened < k:
            s.result["failures"] = scenario.failures(reasons)
            raise BenchError(f"{k - opened} of {k} tunnels did not open: {dict(reasons)}")
        meter = s.cpu_meter()
        s.send_all("go")
        s.wait(args.warmup)
        meter.start()
        s.send_all("mark")
        s.wait(args.duration)
        s.send_all("stop")
        cpu = meter.stop()
        results = s.results("result", 30)
        s.result["loadgens"] = scenario.without_histograms(results)
        _figures(s.result, results, cpu, opened)
    return s.result


def _open(s: Session, timeout: float) -> tuple[int, Counter[str]]:
    """Every generator's ``open`` line: tunnels opened, failure reasons."""
    started = time.monotonic()
    opened = 0
    reasons: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    for g in s.gens:
        words = g.expect("open", max(1.0, deadline - time.monotonic()))
        opened += int(words[1])
        reasons.update(json.loads(words[4]))
    s.result["timings"]["open_s"] = round(time.monotonic() - started, 2)
    return opened, reasons


def _figures(
    result: dict[str, Any],
    results: list[dict[str, Any]],
    cpu: dict[str, Any],
    opened: int,
) -> None:
    trips = sum(r["round_trips"] for r in results)
    # each generator's own mark → stop: the orchestrator may be preempted between sends
    rate = sum(r["round_trips"] / r["window_s"] for r in results if r["window_s"])
    lost = sum(r["lost"] for r in results)
    reasons: Counter[str] = Counter()  # each generator's, opening included
    for r in results:
        reasons.update(r["reasons"])
    groups = cpu["groups"]
    result.update(
        cpu=cpu,
        failures=scenario.failures(reasons),
        figures={
            "tunnels": opened,
            "round_trips": trips,
            "window_s": cpu["seconds"],
            "messages_per_s": round(rate, 1),
            "target_cpu_us_per_round_trip": per_unit_us(cpu, "target", trips),
            "target_user_us_per_round_trip": per_unit_us(cpu, "target", trips, "user_s"),
            "target_kernel_us_per_round_trip": per_unit_us(cpu, "target", trips, "system_s"),
            "target_cpu_cores": scenario.cores(cpu, "target"),
            "loadgen_cpu_us_per_round_trip": per_unit_us(cpu, "loadgen", trips),
            "loadgen_cpu_cores": scenario.cores(cpu, "loadgen"),
            "backend_cpu_us_per_round_trip": per_unit_us(cpu, "backend", trips),
            "backend_cpu_cores": scenario.cores(cpu, "backend"),
            "machine_busy_cores": cpu["machine_busy_cores"],
            "latency_us": scenario.latency(r["latency_us"] for r in results),
            "tunnels_lost": lost,
        },
    )
    result["ok"] = (
        trips > 0
        and lost == 0
        and not reasons
        and not any(r["expired"] for r in results)
        and not groups["target"]["gone"]
    )


def markdown(r: dict[str, Any]) -> str:
    f, p = r["figures"], r["parameters"]
    lat = f.get("latency_us", {})
    rows = [
        ("tunnels", fmt(f.get("tunnels"))),
        ("round trips in the window", f"{fmt(f.get('round_trips'))} in "
         f"{fmt(f.get('window_s'), ' s', 2)}"),
        ("**messages/s (round trips)**", f"**{fmt(f.get('messages_per_s'), '', 0)}**"),
        ("**target CPU per round trip**",
         f"**{fmt(f.get('target_cpu_us_per_round_trip'), ' µs')}** "
         f"({fmt(f.get('target_cpu_cores'), ' cores', 2)})"),
        ("loadgen CPU per round trip", f"{fmt(f.get('loadgen_cpu_us_per_round_trip'), ' µs')} "
         f"({fmt(f.get('loadgen_cpu_cores'), ' cores', 2)})"),
        ("backend CPU per round trip", f"{fmt(f.get('backend_cpu_us_per_round_trip'), ' µs')} "
         f"({fmt(f.get('backend_cpu_cores'), ' cores', 2)})"),
        ("machine busy", fmt(f.get("machine_busy_cores"), " cores", 2)),
        ("round trip p50 / p99 / p99.9 / max",
         " / ".join(fmt(lat.get(q), " µs", 0) for q in ("p50", "p99", "p99.9", "max"))),
        ("tunnels lost", fmt(f.get("tunnels_lost"))),
    ]  # fmt: skip
    title = (
        f"{p['tunnels']} tunnels x {p['size_bytes']} B, {p['duration_s']:g} s "
        f"(after {p['warmup_s']:g} s warm-up), {p['loadgen_processes']} loadgen process(es)"
    )
    return scenario.markdown(r, title, rows)
