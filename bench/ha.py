"""Failover and planned maintenance of a keepalived pair, measured in the
lab that ``deploy/ha-lab/run`` builds in network namespaces.

    .venv/bin/python -m bench.ha [--tunnels 1000] [--other 200]

Two scenarios, each on a fresh lab: clients hold ``tunnels`` websockets
through VIP A (node 1) and ``other`` through VIP B (node 2), echoing every
second and reconnecting when closed.

- failover: node 1's shardproxy is SIGKILLed. Measured: how long until VIP
  A is on node 2, until every client is reconnected (through node 2), and
  the connect attempts that failed meanwhile; VIP B's tunnels must not blink.
- maintenance: node 1's shardproxy gets SIGTERM (drain with drain_delay).
  Measured: when VIP A moved and when the first Close 1001 arrived (the VIP
  must move first), how the closes spread, and the reconnects.

Prints a Markdown table and writes bench/results/ha-STAMP.json.
tests/lab/test_ha.py runs the same scenarios with generous bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / "deploy" / "ha-lab" / "run"
RESULTS = REPO / "bench" / "results"


class Lab:
    """A running deploy/ha-lab/run; ``env`` holds what it printed (LAB_*)."""

    def __init__(self, env: dict[str, str], proc: subprocess.Popen[str]) -> None:
        self.env = env
        self.proc = proc

    def has_vip(self, node: int, vip: str) -> bool:
        out = subprocess.run(
            ["ip", "-n", self.env[f"LAB_NS_NODE{node}"], "-o", "addr", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
        ).stdout
        return f" {vip}/" in out

    def stats(self, node: int) -> dict[str, Any]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.env[f"LAB_NS_NODE{node}"], "curl", "-sf", "-m", "2",
             f"http://{self.env['LAB_ADMIN']}/stats"],
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
        return json.loads(out) if out else {}

    def clients(self, vip: str, tunnels: int) -> Clients:
        url = f"ws://{vip}:{self.env['LAB_PORT']}/"
        return Clients(self.env["LAB_NS_CLIENT"], url, tunnels)


@contextmanager
def lab() -> Iterator[Lab]:
    """Build the lab; tear it down (SIGTERM to the script) on leaving."""
    shardproxy = f"{sys.executable} -m shardproxy"
    proc = subprocess.Popen(
        ["bash", str(LAB), "--shardproxy", shardproxy],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        env: dict[str, str] = {}
        ready = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "LAB_NODE2_CONFIG" not in env:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"the lab did not come up: {err.strip()}")
            ready = ready or line.startswith("ha-lab: ready")
            if ready and "=" in line:
                key, _, value = line.strip().partition("=")
                env[key] = value
        yield Lab(env, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Clients:
    """bench/ha_client.py inside the lab's client namespace."""

    def __init__(self, namespace: str, url: str, tunnels: int) -> None:
        self.tunnels = tunnels
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "bench.ha_client", url,
             "--tunnels", str(tunnels)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ha_client exited ({self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def ready(self) -> None:
        assert self._line()["event"] == "ready"

    def report(self, command: str = "report") -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()
        return self._line()

    def stop(self) -> dict[str, Any]:
        final = self.report("stop")
        self.proc.wait(30)
        return final


def _until(predicate: Callable[[], Any], limit: float, step: float = 0.02) -> float | None:
    """Seconds until ``predicate()`` is true, or None after ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    return None


def _blinks(report: dict[str, Any]) -> int:
    closes = sum(report["closes"].values())
    return int(closes + sum(report["failed_attempts"].values()) + report["echo_timeouts"])


def _all_back(clients: Clients) -> bool:
    """Every tunnel was closed once and is open again."""
    r = clients.report()
    return bool(r["open"] == clients.tunnels and sum(r["closes"].values()) >= clients.tunnels)


def _held(lab: Lab, tunnels: int, other: int) -> tuple[Clients, Clients]:
    a = lab.clients(lab.env["LAB_VIP_A"], tunnels)
    b = lab.clients(lab.env["LAB_VIP_B"], other)
    a.ready()
    b.ready()
    return a, b


def _on_node(lab: Lab, node: int, tunnels: int) -> float | None:
    """Seconds until ``node``'s workers report ``tunnels`` (once a second)."""
    return _until(lambda: lab.stats(node).get("tunnels") == tunnels, 30, 0.2)


def failover(lab: Lab, tunnels: int = 1000, other: int = 200) -> dict[str, Any]:
    a, b = _held(lab, tunnels, other)
    node1_before = _on_node(lab, 1, tunnels) is not None
    killed = time.monotonic()
    os.kill(int(lab.env["LAB_NODE1_PID"]), signal.SIGKILL)
    moved = _until(lambda: lab.has_vip(2, lab.env["LAB_VIP_A"]), 30)
    reconnected = _until(lambda: _all_back(a), 60, 0.2)
    since_kill = time.monotonic() - killed
    node2_after = _on_node(lab, 2, tunnels + other) is not None
    ra, rb = a.stop(), b.stop()
    return {
        "scenario": "failover",
        "tunnels": tunnels,
        "other": other,
        "held_by_node1_before": node1_before,
        "vip_moved_seconds": moved,
        "all_reconnected_seconds": None if reconnected is None else since_kill,
        "reconnected": ra["open"],
        "closes": ra["closes"],
        "failed_connect_attempts": sum(ra["failed_attempts"].values()),
        "failed_connect_errors": ra["failed_attempts"],
        "all_on_node2_after": node2_after,
        "other_blinks": _blinks(rb),
    }


def maintenance(lab: Lab, tunnels: int = 1000, other: int = 200) -> dict[str, Any]:
    a, b = _held(lab, tunnels, other)
    _on_node(lab, 1, tunnels)
    signalled = time.time()
    os.kill(int(lab.env["LAB_NODE1_PID"]), signal.SIGTERM)
    moved = _until(lambda: lab.has_vip(2, lab.env["LAB_VIP_A"]), 30)
    moved_at = None if moved is None else time.time()
    _until(lambda: _all_back(a), 60, 0.2)
    node2_after = _on_node(lab, 2, tunnels + other) is not None
    ra, rb = a.stop(), b.stop()
    closes = sorted(ra["close_times"])
    return {
        "scenario": "maintenance",
        "tunnels": tunnels,
        "other": other,
        "vip_moved_seconds": moved,
        "first_close_seconds": closes[0] - signalled if closes else None,
        "vip_moved_before_first_close": bool(closes and moved_at and moved_at < closes[0]),
        "close_spread_seconds": closes[-1] - closes[0] if closes else None,
        "closes": ra["closes"],
        "reconnected": ra["open"],
        "failed_connect_attempts": sum(ra["failed_attempts"].values()),
        "failed_connect_errors": ra["failed_attempts"],
        "reconnect_p99_seconds": _p99(ra["reconnect_seconds"]),
        "all_on_node2_after": node2_after,
        "other_blinks": _blinks(rb),
    }


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _table(results: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {n}" for k, n in v.items()) or "none"
        return str(v)

    keys = sorted({k for r in results for k in r} - {"scenario", "failed_connect_errors"})
    lines = ["| figure | " + " | ".join(r["scenario"] for r in results) + " |"]
    lines.append("|---|" + "---:|" * len(results))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(fmt(r.get(key, "")) for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ha")
    parser.add_argument("--tunnels", type=int, default=1000, help="through VIP A (node 1)")
    parser.add_argument("--other", type=int, default=200, help="through VIP B (node 2)")
    args = parser.parse_args()
    results = []
    for scenario in (failover, maintenance):
        with lab() as running:
            results.append(scenario(running, args.tunnels, args.other))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ha-{stamp}.json").write_text(json.dumps(results, indent=2))
    print(f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: python -m bench.ha "
          f"--tunnels {args.tunnels} --other {args.other}\n")  # fmt: skip
    print(_table(results))


if __name__ == "__main__":
    main()
