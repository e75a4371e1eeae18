"""Interop with the Autobahn|Testsuite (``tests/conformance.py``): the proxy
is transparent, with and without its own pings, and the Pongs of a client
that answers at once never reach the backend. The suite's Python 2.7
environment comes from ``scripts/install-autobahn`` (``scripts/test`` runs
it first)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import conformance
import pytest
from conftest import Proxy
from peers import WsprotoBackend


@pytest.fixture(autouse=True)
def _suite_installed() -> None:
    if (why := conformance.missing()) is not None:
        pytest.fail(why)  # not a skip: CI installs it, and a skip would hide that it did not


def our_pings(report: Path) -> int:
    """Pings of the proxy's the suite's client received in one case."""
    wirelog = json.loads(report.read_text()).get("wirelog", [])
    return sum(
        1 for e in wirelog if e[0] == "RF" and e[2] == 9 and e[1][1].startswith("shardproxy:")
    )


def test_every_case_has_its_direct_outcome_through_the_proxy(tmp_path: Path) -> None:
    agents, results = conformance.run(conformance.CASES, tmp_path)
    print(conformance.summary(agents, results))
    counts = {agent.name: len(results[agent.name]) for agent in agents}
    assert len(set(counts.values())) == 1 and min(counts.values()) > 200, counts
    assert [str(d) for d in conformance.compare(agents, results)] == []
    # The pinging proxies did ping the suite's client: at least in cases
    # 6.4.1-6.4.4, which last over 2 s (two 1 s pauses) and so always meet
    # a ping round.
    for agent in agents:
        pinged = sum(our_pings(f) for f in (tmp_path / agent.name).glob("*_case_*.json"))
        if agent.name.endswith("-pings"):
            assert pinged >= 4, (agent.name, pinged)
        else:
            assert pinged == 0, (agent.name, pinged)


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_the_pongs_of_autobahns_client_stop_at_the_proxy(
    start_proxy: Callable[..., Proxy],
) -> None:
    """Autobahn's client answers every Ping the moment it comes, while it
    keeps sending messages: the backend sees every message and none of the
    Pongs to the proxy's Pings."""
    pings = '\n[keepalive]\nping_interval = "200ms"\nping_timeout = "2s"\n'
    with WsprotoBackend() as backend:
        proxy = start_proxy([backend.port], workers=1, extra=pings)
        done = subprocess.run(
            [
                str(conformance.PYTHON27),
                str(conformance.HERE / "pong_client.py"),
                f"{proxy.url}/",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["clean"] and report["sent"] >= 30
        assert report["echoes"] == report["sent"]
        ours = [p for p in report["pings"] if p.startswith("shardproxy:")]
        assert len(ours) >= 5 and ours == report["pings"], report["pings"]
        assert backend.ended.wait(10)
        assert backend.pongs == []
        assert not proxy.actions("ping-timeout")
