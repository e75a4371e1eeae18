"""Side-by-side comparison: the same scenarios against several targets in one
invocation, reported as one JSON file, one Markdown file (a table per
scenario, a column per target, and shardproxy ÷ the best peer), and PNG
charts (``bench/charts.py``).

``python -m bench SCENARIO --compare shardproxy,haproxy,nginx [knobs]`` runs
one scenario for each target; ``python -m bench all --compare … [--quick]``
runs idle, pingpong, handshake and spike (BENCH.md's sizes, or small ones with
``--quick``). Runs go scenario by scenario, the targets one after another
within a scenario, so that each scenario's figures are taken close together
in time (this machine is shared and noisy: ratios taken in one run hold,
absolute figures drift). Every run is the scenario's own ``run(args)`` with
``args.target`` set and its own results directory, on fresh ports. A run that
fails is recorded (error, failures) and the comparison goes on; an interrupt
(Ctrl-C, SIGTERM) stops it and what was measured so far is still written.

Files, in the results directory (``bench/results/`` by default)::

    compare-<stamp>.json           every run's figures, failures and target version,
                                   the machine, the exact command
    compare-<stamp>.md             the tables (also printed on stdout)
    compare-<stamp>-memory.png     RSS delta against tunnels held (idle)
    compare-<stamp>-latency.png    round-trip and handshake latency percentiles
    compare-<stamp>/<target>/      each run's own JSON, config and log
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import measure
from .procs import REPO
from .targets import TARGETS

PEERS = ("haproxy", "nginx")
SCENARIO_ORDER = ("idle", "pingpong", "handshake", "spike")

# ``all``: each scenario's knobs, BENCH.md's figures (full) or a check in seconds (quick)
FULL = {
    "idle": ["--tunnels", "9000", "--workers", "1"],
    "pingpong": ["--tunnels", "50", "--duration", "10", "--size", "64", "--workers", "1"],
    "handshake": ["--clients", "5000", "--workers", "1"],
    "spike": ["--clients", "20000", "--workers", "4"],
}
QUICK = {
    "idle": ["--tunnels", "200", "--workers", "1", "--warmup", "20", "--sample", "20"],
    "pingpong": ["--tunnels", "4", "--duration", "1", "--warmup", "0.3", "--size", "64",
                 "--workers", "1"],
    "handshake": ["--clients", "200", "--workers", "1"],
    "spike": ["--clients", "300", "--workers", "4", "--sample", "20"],
}  # fmt: skip
PAUSE_S = {"full": 2.0, "quick": 0.0}  # between runs: let the last one's teardown finish


def target_list(text: str) -> list[str]:
    """``--compare``'s value: comma-separated target names, in order, no repeats."""
    names: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name not in TARGETS:
            raise argparse.ArgumentTypeError(
                f"unknown target {name!r}; choose from {', '.join(TARGETS)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("name at least one target")
    return names


# -- the figures of one run ---------------------------------------------------


def _lat(lat: dict[str, Any] | None, q: str) -> float | None:
    v = (lat or {}).get(q)
    return None if v is None else float(v)


def _idle(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from .scenario import failures

    reasons = dict(r.get("failure_reasons") or {})
    if r.get("dropped"):
        reasons["dropped-while-held"] = r["dropped"]
    echo = r.get("sample_echo") or {}
    if echo.get("failed"):
        reasons["sample-echo-failed"] = echo["failed"]
    figures = {
        "tunnels_requested": r.get("tunnels_requested"),
        "tunnels_opened": r.get("tunnels_opened"),
        "user_memory_per_tunnel_bytes": r.get("user_memory_per_tunnel_bytes"),
        "uss_per_tunnel_bytes": r.get("uss_per_tunnel_bytes"),
        "worker_rss_per_tunnel_bytes": r.get("worker_rss_per_tunnel_bytes"),
        "rss_before_bytes": (r.get("rss_before") or {}).get("rss"),
        "rss_after_bytes": (r.get("rss_after") or {}).get("rss"),
        "rss_delta_bytes": r.get("rss_delta"),
        "fds_before": r.get("fds_before"),
        "fds_after": r.get("fds_after"),
        "open_rate_per_s": (r.get("timings") or {}).get("open_rate_per_s"),
        "rss_curve": r.get("rss_curve"),
    }
    return figures, failures(reasons)


def _pingpong(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    f = r.get("figures") or {}
    lat = f.get("latency_us")
    figures = {
        "tunnels": f.get("tunnels"),
        "round_trips": f.get("round_trips"),
        "messages_per_s": f.get("messages_per_s"),
        "target_cpu_us_per_round_trip": f.get("target_cpu_us_per_round_trip"),
        "target_user_us_per_round_trip": f.get("target_user_us_per_round_trip"),
        "target_kernel_us_per_round_trip": f.get("target_kernel_us_per_round_trip"),
        "target_cpu_cores": f.get("target_cpu_cores"),
        "rtt_p50_us": _lat(lat, "p50"),
        "rtt_p99_us": _lat(lat, "p99"),
        "rtt_p99.9_us": _lat(lat, "p99.9"),
        "rtt_max_us": _lat(lat, "max"),
        "loadgen_cpu_cores": f.get("loadgen_cpu_cores"),
        "machine_busy_cores": f.get("machine_busy_cores"),
    }
    return figures, r.get("failures") or {}


def _handshake(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    f = r.get("figures") or {}
    lat = f.get("latency_us")
    figures = {
        "requested": f.get("requested"),
        "handshakes": f.get("handshakes"),
        "handshakes_per_s": f.get("handshakes_per_s"),
        "target_cpu_us_per_handshake": f.get("target_cpu_us_per_handshake"),
        "target_user_us_per_handshake": f.get("target_user_us_per_handshake"),
        "target_kernel_us_per_handshake": f.get("target_kernel_us_per_handshake"),
        "target_cpu_cores": f.get("target_cpu_cores"),
        "latency_p50_us": _lat(lat, "p50"),
        "latency_p99_us": _lat(lat, "p99"),
        "latency_max_us": _lat(lat, "max"),
        "close_p50_us": _lat(f.get("close_latency_us"), "p50"),
        "close_p99_us": _lat(f.get("close_latency_us"), "p99"),
        "machine_busy_cores": f.get("machine_busy_cores"),
    }
    return figures, r.get("failures") or {}


def _spike(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    f = r.get("figures") or {}
    lat = f.get("latency_us")
    figures = {
        "requested": f.get("requested"),
        "upgraded": f.get("upgraded"),
        "upgraded_pct": f.get("upgraded_pct"),
        "latency_p50_us": _lat(lat, "p50"),
        "latency_p99_us": _lat(lat, "p99"),
        "latency_max_us": _lat(lat, "max"),
        "last_upgrade_s": f.get("last_upgrade_s"),
        "held_at_once": f.get("held_at_once"),
        "dropped_while_held": f.get("dropped_while_held"),
        "target_cpu_us_per_upgrade": f.get("target_cpu_us_per_upgrade"),
    }
    return figures, r.get("failures") or {}


def _beyond64k(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    f = r.get("figures") or {}
    keys = (
        "requested", "opened", "held_at_once", "dropped_while_held", "open_s",
        "open_rate_per_s", "user_memory_per_tunnel_bytes", "uss_per_tunnel_bytes",
        "tcp_mem_per_tunnel_bytes", "socket_slab_per_tunnel_bytes", "plan_limit", "arithmetic",
        "sample_echo",
    )  # fmt: skip
    return {k: f.get(k) for k in keys}, r.get("failures") or {}


EXTRACT: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]] = {
    "idle": _idle,
    "pingpong": _pingpong,
    "handshake": _handshake,
    "spike": _spike,
    "beyond64k": _beyond64k,
}


# -- the table's rows ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str  # in a run's normalized figures
    label: str
    kind: str  # how to show it: bytes, us, latency, rate, count, seconds, pct
    better: str  # "lower" or "higher"


ROWS: dict[str, list[Row]] = {
    "idle": [
        Row("user_memory_per_tunnel_bytes", "**user memory per idle tunnel** (RSS)", "bytes",
            "lower"),
        Row("uss_per_tunnel_bytes", "USS per idle tunnel", "bytes", "lower"),
    ],
    "pingpong": [
        Row("target_cpu_us_per_round_trip", "**proxy CPU per round trip**", "us", "lower"),
        Row("target_user_us_per_round_trip", "of which user", "us", "lower"),
        Row("target_kernel_us_per_round_trip", "of which kernel", "us", "lower"),
        Row("messages_per_s", "round trips/s", "rate", "higher"),
        Row("rtt_p50_us", "round trip p50", "latency", "lower"),
        Row("rtt_p99_us", "round trip p99", "latency", "lower"),
        Row("rtt_p99.9_us", "round trip p99.9", "latency", "lower"),
    ],
    "handshake": [
        Row("target_cpu_us_per_handshake", "**proxy CPU per handshake**", "us", "lower"),
        Row("target_user_us_per_handshake", "of which user", "us", "lower"),
        Row("target_kernel_us_per_handshake", "of which kernel", "us", "lower"),
        Row("handshakes_per_s", "handshakes/s", "rate", "higher"),
        Row("latency_p50_us", "connect → 101 p50", "latency", "lower"),
        Row("latency_p99_us", "connect → 101 p99", "latency", "lower"),
        Row("close_p50_us", "Close → EOF p50", "latency", "lower"),
        Row("close_p99_us", "Close → EOF p99", "latency", "lower"),
    ],
    "spike": [
        Row("upgraded_pct", "**upgraded**", "pct", "higher"),
        Row("latency_p50_us", "connect → 101 p50", "latency", "lower"),
        Row("latency_p99_us", "connect → 101 p99", "latency", "lower"),
    ],
    "beyond64k": [
        Row("held_at_once", "**tunnels held**", "count", "higher"),
        Row("plan_limit", "plan: tunnels the config allows", "count", "higher"),
        Row("open_rate_per_s", "tunnels opened/s", "rate", "higher"),
        Row("user_memory_per_tunnel_bytes", "**user memory per tunnel** (RSS)", "bytes", "lower"),
    ],
}  # fmt: skip

TITLES = {
    "idle": "user memory per idle tunnel",
    "pingpong": "CPU per relayed message, round-trip latency",
    "handshake": "CPU per handshake, handshake rate and latency",
    "spike": "clients connecting at the same moment",
    "beyond64k": "tunnels to one backend host and port, held",
}


def show(v: Any, kind: str) -> str:
    if v is None:
        return "n/a"
    x = float(v)
    if kind == "bytes":
        return f"{x:,.0f} B"
    if kind == "us":
        return f"{x:,.1f} µs"
    if kind in ("rate", "count"):
        return f"{x:,.0f}"
    if kind == "seconds":
        return f"{x:,.1f} s"
    if kind == "pct":
        return f"{x:.2f} %"
    if kind == "latency":  # µs in, the readable unit out
        if x < 1000:
            return f"{x:,.0f} µs"
        if x < 1_000_000:
            return f"{x / 1000:,.2f} ms"
        return f"{x / 1e6:,.2f} s"
    return f"{v}"


def ratio(runs: dict[str, dict[str, Any]], row: Row) -> dict[str, Any] | None:
    """shardproxy's figure ÷ the best peer's (haproxy, nginx; the lower or the
    higher as ``row.better`` says). The peers considered are those whose run
    was clean; when none was, those whose run ended without an error
    (``peer_clean`` False): a peer that upgraded half the clients has latency
    figures for that half only. None when shardproxy was not compared, or it
    or every peer lacks the figure."""
    own = runs.get("shardproxy")
    if own is None or own["figures"].get(row.key) is None:
        return None
    have = {
        t: float(runs[t]["figures"][row.key])
        for t in PEERS
        if t in runs and runs[t]["error"] is None and runs[t]["figures"].get(row.key) is not None
    }
    clean = {t: v for t, v in have.items() if runs[t].get("ok")}
    peers = clean or have
    if not peers:
        return None
    pick = min if row.better == "lower" else max
    best = pick(peers, key=lambda t: peers[t])
    value = float(own["figures"][row.key])
    return {
        "shardproxy": value,
        "best_peer": best,
        "best_peer_value": peers[best],
        "ratio": round(value / peers[best], 3) if peers[best] else None,
        "better": row.better,
        "peer_clean": bool(clean),
    }


# -- one comparison -----------------------------------------------------------


def _plain(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """A target's version as the scenario recorded it (the idle one carries its config too)."""
    if not r:
        return None
    return {k: v for k, v in r.items() if k not in ("config", "listen_port", "backend_port")}


def _record(
    scenario: str, target: str, result: dict[str, Any] | None, seconds: float, error: str | None
) -> dict[str, Any]:
    if result is None:
        return {
            "scenario": scenario,
            "target": target,
            "ok": False,
            "error": error,
            "version": None,
            "figures": {},
            "failures": {"total": 0, "by_kind": {}, "reasons": {}},
            "seconds": round(seconds, 2),
            "result_file": None,
        }
    figures, fails = EXTRACT[scenario](result)
    version = result.get("target_version") if scenario != "idle" else result.get("proxy")
    return {
        "scenario": scenario,
        "target": target,
        "ok": bool(result.get("ok")),
        "error": error or result.get("error"),
        "version": _plain(version),
        "workers": result.get("workers"),
        "figures": figures,
        "failures": fails,
        "scenario_figures": result.get("figures") if scenario != "idle" else None,
        "parameters": result.get("parameters") if scenario != "idle" else result.get("method"),
        "seconds": round(seconds, 2),
        "result_file": _rel((result.get("files") or {}).get("result")),
    }


def _rel(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        return path
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def _knobs(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"target", "results_dir", "compare", "scenario"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def _stamp(results_dir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if any(results_dir.glob(f"compare-{stamp}*")):
        stamp = f"{stamp}-{os.getpid()}"
    return stamp


def _versions(runs: dict[str, dict[str, dict[str, Any]]], targets: list[str]) -> dict[str, Any]:
    """Each target's version: from its first run that recorded one, or asked directly."""
    from .targets import make_target

    out: dict[str, Any] = {}
    for t in targets:
        found = next((r[t]["version"] for r in runs.values() if r.get(t, {}).get("version")), None)
        if found is None:
            try:
                tgt = make_target(t, Path("/nonexistent"), listen=("127.0.0.1", 1),
                                  backend=("127.0.0.1", 1), workers=1)  # fmt: skip
                found = _plain(tgt.version())
            except Exception as e:  # a missing peer: say so in the report
                found = {"name": t, "version": None, "error": str(e)}
        out[t] = found
    return out


def run(
    plans: list[tuple[str, ModuleType, argparse.Namespace]],
    targets: list[str],
    argv: list[str],
    results_dir: Path,
    *,
    quick: bool = False,
) -> tuple[dict[str, Any], int]:
    """Every scenario of ``plans`` for every target, in that order; writes and
    returns the comparison, with the exit status (0: every run clean)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(results_dir)
    base = f"compare-{stamp}"
    rundir = results_dir / base
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.monotonic()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    interrupted = False
    total = len(plans) * len(targets)
    k = 0
    pause = PAUSE_S["quick" if quick else "full"]
    for scenario, module, args in plans:
        runs[scenario] = {}
        for target in targets:
            if interrupted:
                break
            k += 1
            ns = argparse.Namespace(**vars(args))
            ns.target = target
            ns.results_dir = str(rundir / target)
            print(f"[{k}/{total}] {scenario}: {target} …", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            result: dict[str, Any] | None = None
            error: str | None = None
            try:
                result = module.run(ns)
            except KeyboardInterrupt:
                error, interrupted = "interrupted", True
            except Exception as e:  # a broken run must not sink the comparison
                error = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            rec = _record(scenario, target, result, time.monotonic() - t0, error)
            if rec["error"] == "interrupted":
                interrupted = True
            runs[scenario][target] = rec
            state = "OK" if rec["ok"] else f"NOT OK ({rec['error'] or _fails(rec['failures'])})"
            print(f"    {state} in {rec['seconds']:.1f} s", file=sys.stderr, flush=True)
            if pause and not interrupted and k < total:
                time.sleep(pause)

    doc: dict[str, Any] = {
        "kind": "compare",
        "stamp": stamp,
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "started_at": started_at,
        "seconds": round(time.monotonic() - t_start, 1),
        "quick": quick,
        "interrupted": interrupted,
        "ok": not interrupted and all(r["ok"] for s in runs.values() for r in s.values()),
        "targets": targets,
        "scenarios": [s for s, _, _ in plans],
        "machine": measure.machine(),
        "versions": _versions(runs, targets),
        "parameters": {s: _knobs(a) for s, _, a in plans},
        "runs": runs,
        "ratios": {s: {row.key: ratio(runs[s], row) for row in ROWS[s]} for s in runs if s in ROWS},
        "files": {},
    }
    json_path = results_dir / f"{base}.json"
    md_path = results_dir / f"{base}.md"
    charts = _charts(doc, results_dir, base)
    doc["files"] = {
        "json": _rel(str(json_path)),
        "markdown": _rel(str(md_path)),
        "charts": charts,
        "runs": _rel(str(rundir)),
    }
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    md_path.write_text(text + "\n")
    return doc, 0 if doc["ok"] else 1


def _charts(doc: dict[str, Any], results_dir: Path, base: str) -> dict[str, Any]:
    """The PNGs next to the JSON; a chart that cannot be drawn says why instead."""
    try:
        from . import charts
    except ImportError as e:
        why = f"matplotlib missing ({e}): pip install -e '.[test]'"
        return {"memory": {"error": why}, "latency": {"error": why}}
    out: dict[str, Any] = {}
    for name, draw in (("memory", charts.memory_chart), ("latency", charts.latency_chart)):
        path = results_dir / f"{base}-{name}.png"
        try:
            drawn = draw(doc, path)
        except Exception as e:  # a chart must not lose the figures
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc(file=sys.stderr)
            continue
        out[name] = _rel(str(path)) if drawn else None
    return out


# -- Markdown -----------------------------------------------------------------


def _fails(f: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {n:,}" for k, n in (f.get("by_kind") or {}).items())
    return f"{f.get('total', 0):,}" + (f" ({kinds})" if kinds else "")


def _version_label(v: dict[str, Any] | None, target: str) -> str:
    if not v:
        return f"{target} (version unknown)"
    if v.get("error"):
        return f"{target}: {v['error']}"
    label = str(v.get("version") or "")
    if target not in label.lower():  # shardproxy's own says "shardproxy 0.1.0"
        label = f"{target} {label}".strip()
    if v.get("commit"):
        label += f" @ {v['commit'][:10]}" + (" (uncommitted changes)" if v.get("dirty") else "")
    if v.get("package_version"):
        label += f" (Debian {v.get('package')} {v['package_version']})"
    return label


def _scenario_title(scenario: str, p: dict[str, Any]) -> str:
    w = p.get("workers")
    workers = f"{w} worker{'s' if w != 1 else ''}"
    if scenario == "idle":
        return f"{p['tunnels']:,} idle tunnels, {workers}"
    if scenario == "pingpong":
        return f"{p['tunnels']:,} tunnels x {p['size']} B, {p['duration']:g} s, {workers}"
    if scenario == "handshake":
        return f"{p['clients']:,} clients, ≤ {p['concurrency']} in flight, {workers}"
    if scenario == "spike":
        return f"{p['clients']:,} clients at once, {workers}"
    if scenario == "beyond64k":
        w = workers if w else "workers as the descriptor limit requires"
        return f"{p['tunnels']:,} tunnels held {p['hold']:g} s, {w}"
    return workers


def _ratio_cell(r: dict[str, Any] | None) -> str:
    if r is None or r["ratio"] is None:
        return "n/a"
    x = r["ratio"]
    ahead = x <= 1 if r["better"] == "lower" else x >= 1
    dagger = "" if r.get("peer_clean", True) else "†"
    return f"{x:.2f} vs {r['best_peer']}{dagger} {'✓' if ahead else '✗'}"


def markdown(doc: dict[str, Any]) -> str:
    targets: list[str] = doc["targets"]
    m = doc["machine"]
    show_ratio = "shardproxy" in targets and any(t in targets for t in PEERS)
    mins, secs = divmod(int(doc["seconds"]), 60)
    out = [
        f"## Comparison: {', '.join(targets)}{' (quick)' if doc['quick'] else ''}",
        "",
        f"Run {doc['started_at']}, {sum(len(r) for r in doc['runs'].values())} runs in "
        f"{mins} min {secs} s; "
        + ("every run clean." if doc["ok"] else "**not every run clean** (see each table).")
        + (" **Interrupted.**" if doc["interrupted"] else ""),
        f"Command: `{doc['command']}`",
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}.",
        "Versions: " + "; ".join(_version_label(doc["versions"].get(t), t) for t in targets) + ".",
    ]
    if show_ratio:
        out.append(
            "Last column: shardproxy's figure ÷ the best of haproxy's and nginx's for that "
            "figure (the lower one for memory, CPU and latency; the higher one for rates and "
            "upgraded %), among the peers whose run was clean († when none was); "
            "✓ = shardproxy at least as good."
        )
    head = ["figure", "better", *targets, *(["shardproxy ÷ best peer"] if show_ratio else [])]
    for scenario, runs in doc["runs"].items():
        if runs:
            p = doc["parameters"][scenario]
            out += ["", f"### {scenario}: {TITLES[scenario]} — {_scenario_title(scenario, p)}", ""]
            out += _table(scenario, runs, targets, doc["ratios"][scenario], head, show_ratio)
    charts = doc["files"].get("charts") or {}
    out += [
        "",
        f"JSON: {doc['files'].get('json')}; "
        + "; ".join(
            f"{k} chart: {v if isinstance(v, str) else (v or {}).get('error', 'none')}"
            for k, v in charts.items()
        )
        + f"; each run's files: {doc['files'].get('runs')}/",
    ]
    return "\n".join(out)


def _count(r: dict[str, Any], done: str, asked: str) -> str:
    f = r["figures"]
    if f.get(asked) is None:
        return "n/a"
    return f"{f.get(done) or 0:,} / {f[asked]:,}"


def _table(
    scenario: str,
    runs: dict[str, dict[str, Any]],
    targets: list[str],
    ratios: dict[str, Any],
    head: list[str],
    show_ratio: bool,
) -> list[str]:
    """One scenario's table (a row per figure, a column per target), then its errors."""
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def line(
        label: str, better: str, show_cell: Callable[[dict[str, Any]], str], last: str
    ) -> None:
        cells = [show_cell(runs[t]) if t in runs else "not run" for t in targets]
        out.append(
            "| " + " | ".join([label, better, *cells, *([last] if show_ratio else [])]) + " |"
        )

    if scenario == "idle":
        line("tunnels opened", "", lambda r: _count(r, "tunnels_opened", "tunnels_requested"), "")
    if scenario == "spike":
        line("upgraded (count)", "higher", lambda r: _count(r, "upgraded", "requested"), "")
    if scenario == "beyond64k":
        line("opened", "higher", lambda r: _count(r, "opened", "requested"), "")
        # no ratio: a target that stopped at 10,000 opened fewer, not faster
        line("time to open them", "", lambda r: show(r["figures"].get("open_s"), "seconds"), "")
    for row in ROWS[scenario]:

        def value(r: dict[str, Any], row: Row = row) -> str:
            return show(r["figures"].get(row.key), row.kind)

        line(row.label, row.better, value, _ratio_cell(ratios.get(row.key)))
    if scenario == "beyond64k":  # the kernel's, whatever the proxy: no ratio
        for key, text in (
            ("tcp_mem_per_tunnel_bytes", "kernel TCP buffers per tunnel (sockstat mem)"),
            ("socket_slab_per_tunnel_bytes", "kernel socket slabs per tunnel (4 sockets)"),
        ):

            def kernel(r: dict[str, Any], key: str = key) -> str:
                return show(r["figures"].get(key), "bytes")

            line(text, "", kernel, "")
    label = "failures by kind" if scenario == "spike" else "failures"
    line(label, "lower", lambda r: _fails(r["failures"]), "")
    line("run", "", lambda r: "OK" if r["ok"] else "**NOT OK**", "")
    notes = [f"- {t}: {runs[t]['error']}" for t in targets if t in runs and runs[t]["error"]]
    if scenario == "beyond64k":
        notes += [
            f"- {t} plan: {runs[t]['figures']['arithmetic']}"
            for t in targets
            if t in runs and runs[t]["figures"].get("arithmetic")
        ]
    return out + (["", *notes] if notes else [])
