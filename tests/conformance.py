"""The Autobahn|Testsuite through shardproxy: the proxy must be transparent.

``wstest -m fuzzingclient`` (the standard WebSocket conformance suite,
Python 2.7, installed in ``.autobahn/`` by ``scripts/install-autobahn``)
plays a client against two independent echo backends, the ``websockets``
library's server (:class:`peers.WsBackend`) and Autobahn's own
(``autobahn/echo_server.py``), each directly and through ``shardproxy run``
with 2 workers, without proxy pings and with ``ping_interval = "1s"``. Every
case must have the outcome through the proxy that it has directly, OK and
NON-STRICT counting as one (some cases race with themselves: 3.4, 4.1.5 and
4.2.5 flip between the two with no proxy at all).

Run it (``bash scripts/autobahn``, which installs the suite first, or
``.venv/bin/python tests/conformance.py``); ``--deflate`` runs cases 9, 12
and 13 (large messages and permessage-deflate, about half an hour) instead
of the default 1-7 and 10. ``tests/test_autobahn.py`` runs the default set
in the suite. The agents run concurrently, one wstest process each; their
reports are left in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import Proxy, free_port, toml_config
from peers import WsBackend

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / ".autobahn" / "env"
WSTEST = ENV / "bin" / "wstest"
PYTHON27 = ENV / "bin" / "python"
HERE = Path(__file__).resolve().parent / "autobahn"

CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"]
DEFLATE_CASES = ["9.*", "12.*", "13.*"]
PINGS = '\n[keepalive]\nping_interval = "1s"\n'
SAME = {"NON-STRICT": "OK"}  # outcomes that count as one
START_TIMEOUT = 20.0


def missing() -> str | None:
    """Why the suite cannot run here, or None."""
    if not WSTEST.exists():
        return f"no {WSTEST.relative_to(ROOT)}: run scripts/install-autobahn"
    return None


@dataclass(frozen=True)
class Agent:
    """One server the suite tests: a backend, directly or through a proxy."""

    name: str
    url: str
    direct: str  # the agent it must match (itself when direct)


@dataclass(frozen=True)
class Difference:
    agent: str
    case: str
    outcome: str
    direct: str

    def __str__(self) -> str:
        return f"{self.agent} case {self.case}: {self.outcome}, directly {self.direct}"


@contextlib.contextmanager
def autobahn_echo() -> Iterator[int]:
    """Autobahn's echo server on 127.0.0.1; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [str(PYTHON27), str(HERE / "echo_server.py"), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "listening", or "" if it died
        if line.strip() != "listening":
            raise RuntimeError(f"Autobahn's echo server did not start (exit {proc.poll()})")
        yield port
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def proxies(backends: dict[str, int], workdir: Path) -> Iterator[tuple[list[Agent], list[Proxy]]]:
    """Every agent: each backend directly, through a proxy, and through a
    proxy that pings its clients every second."""
    agents: list[Agent] = []
    started: list[Proxy] = []
    try:
        for name, port in backends.items():
            agents.append(Agent(name, f"ws://127.0.0.1:{port}", name))
            for suffix, extra in (("proxy", ""), ("proxy-pings", PINGS)):
                listen = free_port()
                path = workdir / f"{name}-{suffix}.toml"
                path.write_text(toml_config([port], port=listen, workers=2, extra=extra))
                started.append(Proxy(path, listen, 2))
                agents.append(Agent(f"{name}-{suffix}", f"ws://127.0.0.1:{listen}", name))
        yield agents, started
    finally:
        for proxy in started:
            proxy.stop()


def fuzz(agents: list[Agent], cases: list[str], out: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Run wstest once per agent, all at once; {agent: {case: result}}."""
    runs = []
    for agent in agents:
        outdir = out / agent.name
        spec = out / f"{agent.name}.json"
        spec.write_text(
            json.dumps(
                {
                    "outdir": str(outdir),
                    "servers": [{"agent": agent.name, "url": agent.url}],
                    "cases": cases,
                    "exclude-cases": [],
                    "exclude-agent-cases": {},
                }
            )
        )
        log = open(out / f"{agent.name}.wstest.log", "wb")
        proc = subprocess.Popen(
            [str(WSTEST), "-m", "fuzzingclient", "-s", str(spec)],
            cwd=out,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        runs.append((agent, proc, log, outdir))
    results = {}
    for agent, proc, log, outdir in runs:
        code = proc.wait()
        log.close()
        index = outdir / "index.json"
        if code != 0 or not index.exists():
            raise RuntimeError(f"wstest for {agent.name} failed (exit {code}): see {log.name}")
        results[agent.name] = json.loads(index.read_text())[agent.name]
    return results


def outcome(result: dict[str, str]) -> str:
    behavior = result["behavior"]
    return SAME.get(behavior, behavior)


def compare(agents: list[Agent], results: dict[str, dict[str, dict[str, str]]]) -> list[Difference]:
    """Every case whose outcome through a proxy differs from the direct one."""
    found = []
    for agent in agents:
        if agent.direct == agent.name:
            continue
        direct = results[agent.direct]
        for case, result in sorted(results[agent.name].items(), key=lambda kv: case_key(kv[0])):
            if outcome(result) != outcome(direct[case]):
                found.append(
                    Difference(agent.name, case, result["behavior"], direct[case]["behavior"])
                )
    return found


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


def summary(agents: list[Agent], results: dict[str, dict[str, dict[str, str]]]) -> str:
    """A line per agent: how many cases had each outcome."""
    lines = []
    for agent in agents:
        counts: dict[str, int] = {}
        for result in results[agent.name].values():
            counts[result["behavior"]] = counts.get(result["behavior"], 0) + 1
        figures = ", ".join(f"{n} {behavior}" for behavior, n in sorted(counts.items()))
        lines.append(f"{agent.name:28} {len(results[agent.name]):4} cases: {figures}")
    return "\n".join(lines)


def run(cases: list[str], out: Path) -> tuple[list[Agent], dict[str, dict[str, dict[str, str]]]]:
    """The whole comparison: backends, proxies, wstest; the agents and results."""
    with WsBackend() as websockets_backend, autobahn_echo() as autobahn_port:
        backends = {"websockets": websockets_backend.port, "autobahn": autobahn_port}
        with proxies(backends, out) as (agents, _):
            return agents, fuzz(agents, cases, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--deflate", action="store_true", help="cases 9, 12 and 13 (about half an hour)"
    )
    parser.add_argument("--cases", nargs="+", help="case patterns, e.g. 6.4.* (overrides)")
    parser.add_argument("--out", type=Path, help="where the reports go (default: a temp dir)")
    args = parser.parse_args()
    if (why := missing()) is not None:
        print(f"conformance: {why}", file=sys.stderr)
        return 2
    cases = args.cases or (DEFLATE_CASES if args.deflate else CASES)
    out = args.out or Path(tempfile.mkdtemp(prefix="shardproxy-autobahn-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    agents, results = run(cases, out)
    print(summary(agents, results))
    differences = compare(agents, results)
    for d in differences:
        print(f"DIFFERENT {d}")
    verdict = "the same outcome" if not differences else f"{len(differences)} differences"
    print(
        f"conformance: cases {' '.join(cases)}: {verdict} through the proxy, "
        f"{time.monotonic() - started:.0f} s; reports in {out}"
    )
    return 1 if differences else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
