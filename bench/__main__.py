"""``python -m bench SCENARIO [options]`` (run from the repository root).

Scenarios: ``idle`` (user memory per idle tunnel). Results go to
``bench/results/`` (gitignored) as one JSON file per run; a Markdown table is
printed. Exit status 0 when the run completed cleanly (every tunnel opened,
none dropped, the sample echoed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import idle

RESULTS = Path(__file__).resolve().parent / "results"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the scenario's cleanup


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="scenario", required=True)
    i = sub.add_parser("idle", help="user memory per idle tunnel")
    i.add_argument("--tunnels", type=int, default=9000, help="idle tunnels to hold (default 9000)")
    i.add_argument("--workers", type=int, default=1, help="proxy workers (default 1)")
    i.add_argument("--warmup", type=int, default=200, help="tunnels opened+closed first (200)")
    i.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per loadgen")
    i.add_argument("--sample", type=int, default=100, help="tunnels checked to still echo (100)")
    i.add_argument("--backend-procs", type=int, default=2, help="echo backend processes (2)")
    i.add_argument("--per-loadgen", type=int, default=9000, help="connections per loadgen (≤9000)")
    i.add_argument("--sources", type=int, default=32, help="source addresses per loadgen (32)")
    i.add_argument("--open-timeout", type=float, default=300.0, help="seconds to open them all")
    i.add_argument("--settle-timeout", type=float, default=60.0, help="seconds to wait for RSS")
    i.add_argument("--log-level", default="info", help="shardproxy log level (info)")
    i.add_argument("--results-dir", default=str(RESULTS), help="where the JSON goes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.per_loadgen <= 9000:
        parser().error("--per-loadgen must be 1-9000")
    if args.tunnels < 1 or args.workers < 1:
        parser().error("--tunnels and --workers must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    result = idle.run(args)
    print(idle.markdown(result))
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
