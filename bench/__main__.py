"""``python -m bench SCENARIO [options]`` (run from the repository root).

Scenarios: ``idle`` (user memory per idle tunnel), ``pingpong`` (CPU per
relayed message, round-trip latency), ``handshake`` (CPU per handshake,
handshake rate and latency), ``spike`` (N clients at once), ``beyond64k``
(150,000 tunnels to one backend host and port: the scale proof). ``--target``
picks what is measured: shardproxy (default), haproxy, nginx, or direct (no
proxy: the generator and the backend alone). Results go to ``bench/results/``
(gitignored) as one JSON file per run; a Markdown table is printed. Exit
status 0 when the run completed cleanly (every client served, nothing
dropped, no failure), 1 otherwise.

``--compare shardproxy,haproxy,nginx`` on any scenario runs it for each of
those targets in turn; ``all --compare … [--quick]`` runs every scenario but
beyond64k (minutes per target; run it on its own) for each target
(BENCH.md's sizes, or small ones with ``--quick``). A comparison writes
``compare-<stamp>.json``, ``.md`` (printed too) and PNG charts
(``bench/compare.py``); exit status 0 when every run was clean.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from types import ModuleType

from . import beyond64k, compare, handshake, idle, pingpong, spike
from .targets import TARGETS

RESULTS = Path(__file__).resolve().parent / "results"

SCENARIOS = {
    "pingpong": (pingpong, "CPU per relayed message, round-trip latency", 1),
    "handshake": (handshake, "CPU per handshake, handshakes/s, latency", 1),
    "spike": (spike, "N clients connecting at the same moment", 4),
    # workers None: as many as the descriptor limit requires (bench/beyond64k.py)
    "beyond64k": (beyond64k, "150,000 tunnels to one backend host and port, held", None),
}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the scenario's cleanup


def _common(p: argparse.ArgumentParser, workers: int | None, backend_procs: int | None) -> None:
    p.add_argument("--target", choices=TARGETS, default="shardproxy", help="(shardproxy)")
    p.add_argument(
        "--compare",
        type=compare.target_list,
        metavar="T1,T2,...",
        help="run for each of these targets in turn and compare them (instead of --target)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=workers,
        help=f"proxy workers ({workers or 'as many as the descriptor limit requires'})",
    )
    p.add_argument(
        "--backend-procs",
        type=int,
        default=backend_procs,
        help=f"echo backend processes ({backend_procs or 'as many as the clients need'})",
    )
    p.add_argument("--log-level", default="info", help="target log level (info)")
    p.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="one log line per connection in every target, as operators run them (on)",
    )
    p.add_argument("--results-dir", default=str(RESULTS), help="where the JSON goes")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="scenario", required=True)
    i = sub.add_parser("idle", help="user memory per idle tunnel")
    i.add_argument("--tunnels", type=int, default=9000, help="idle tunnels to hold (default 9000)")
    i.add_argument("--warmup", type=int, default=200, help="tunnels opened+closed first (200)")
    i.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per loadgen")
    i.add_argument("--sample", type=int, default=100, help="tunnels checked to still echo (100)")
    i.add_argument("--per-loadgen", type=int, default=9000, help="connections per loadgen (≤9000)")
    i.add_argument("--sources", type=int, default=32, help="source addresses per loadgen (32)")
    i.add_argument("--open-timeout", type=float, default=300.0, help="seconds to open them all")
    i.add_argument("--settle-timeout", type=float, default=60.0, help="seconds to wait for RSS")
    _common(i, workers=1, backend_procs=2)
    for name, (module, help_text, workers) in SCENARIOS.items():
        s = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").split("\n")[0])
        module.add_arguments(s)
        s.add_argument("--sources", type=int, default=64, help="source addresses per loadgen (64)")
        _common(s, workers=workers, backend_procs=2 if name in ("pingpong", "handshake") else None)
    a = sub.add_parser(
        "all",
        help="every scenario for each target, compared",
        description="idle, pingpong, handshake and spike for each target of --compare, one "
        "after another, at BENCH.md's sizes (idle 9,000 tunnels, pingpong 50 tunnels x 10 s x "
        "64 B, handshake 5,000 clients, all with 1 worker; spike 20,000 clients with 4 "
        "workers); one JSON, one Markdown table per scenario, PNG charts.",
    )
    a.add_argument(
        "--compare",
        type=compare.target_list,
        default=["shardproxy", "haproxy", "nginx"],
        metavar="T1,T2,...",
        help="targets (shardproxy,haproxy,nginx)",
    )
    a.add_argument("--quick", action="store_true", help="small sizes: a check in seconds")
    a.add_argument("--log-level", default="info", help="target log level (info)")
    a.add_argument(
        "--access-log", choices=("on", "off"), default="on", help="per-connection log lines (on)"
    )
    a.add_argument("--results-dir", default=str(RESULTS), help="where the results go")
    return p


def module_of(scenario: str) -> ModuleType:
    return idle if scenario == "idle" else SCENARIOS[scenario][0]


def scenario_args(
    p: argparse.ArgumentParser, scenario: str, knobs: list[str], top: argparse.Namespace
) -> argparse.Namespace:
    """A scenario's arguments for ``all``: its own defaults, then ``knobs``."""
    argv = [
        scenario,
        *knobs,
        "--log-level",
        top.log_level,
        "--access-log",
        top.access_log,
        "--results-dir",
        top.results_dir,
    ]
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if not 1 <= args.sources <= 250:
        p.error("--sources must be 1-250")
    if args.backend_procs is not None and not 1 <= args.backend_procs <= 64:
        p.error("--backend-procs must be 1-64")
    count: int = args.tunnels if hasattr(args, "tunnels") else args.clients
    if count < 1:
        p.error("--tunnels/--clients must be at least 1")
    limit = {"idle": 9000, "spike": 9000, "pingpong": 1000, "beyond64k": 19000}.get(args.scenario)
    if limit and not 1 <= args.per_loadgen <= limit:
        p.error(f"--per-loadgen must be 1-{limit}")
    if args.scenario == "pingpong" and (args.duration <= 0 or args.size < 0):
        p.error("--duration must be positive and --size not negative")
    if args.scenario == "handshake" and not (1 <= args.loadgens <= 64 and args.concurrency >= 1):
        p.error("--loadgens must be 1-64 and --concurrency at least 1")
    if args.scenario == "beyond64k":
        _check_beyond64k(p, args)


def _check_beyond64k(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.hold < 0 or args.sample < 0 or args.give_up_after < 0 or args.concurrency < 1:
        p.error("--hold, --sample and --give-up-after must not be negative, --concurrency ≥ 1")
    if not 0 <= args.upstream_sources <= 250:
        p.error("--upstream-sources must be 0-250 (0: as many as the plan requires)")
    if args.port_range != "auto" and not re.fullmatch(r"\d+-\d+", args.port_range):
        p.error('--port-range must be "auto" or FIRST-LAST')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.scenario == "all" or args.compare:
        if args.scenario == "all":
            sizes = compare.QUICK if args.quick else compare.FULL
            plans = [
                (s, module_of(s), scenario_args(p, s, sizes[s], args))
                for s in compare.SCENARIO_ORDER
            ]
        else:
            _check(p, args)
            plans = [(args.scenario, module_of(args.scenario), args)]
        doc, status = compare.run(
            plans,
            args.compare,
            argv,
            Path(args.results_dir).resolve(),
            quick=getattr(args, "quick", False),
        )
        print(compare.markdown(doc))
        sys.stdout.flush()
        return status
    _check(p, args)
    module = module_of(args.scenario)
    result = module.run(args)
    print(module.markdown(result))
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
