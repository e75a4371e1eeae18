"""A keepalived pair in network namespaces (deploy/ha-lab/run), driven by
bench/ha.py: a killed node's VIP moves and its clients reconnect through the
other node; a drained node gives its VIP away before it closes a tunnel;
the other node's tunnels never blink. Bounds are generous: the figures
themselves are in BENCHMARKS.md (``python -m bench.ha``)."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import needs_namespaces

from bench import ha

pytestmark = needs_namespaces


@pytest.fixture(autouse=True)
def _tools() -> None:
    # Installed by scripts/install-ha-deps: missing means the set-up is broken.
    for tool in ("keepalived", "nft", "curl"):
        assert shutil.which(tool, path=os.environ["PATH"] + ":/usr/sbin:/sbin"), tool


def test_a_killed_node_gives_its_vip_and_clients_to_the_other() -> None:
    with ha.lab() as lab:
        r = ha.failover(lab, tunnels=1000, other=200)
    print(r)
    assert r["held_by_node1_before"]
    assert r["vip_moved_seconds"] is not None and r["vip_moved_seconds"] < 10
    assert r["all_reconnected_seconds"] is not None and r["reconnected"] == 1000
    assert r["all_on_node2_after"]  # node 2 serves VIP A's clients and its own
    assert r["other_blinks"] == 0  # VIP B's tunnels never noticed


def test_a_drained_node_moves_its_vip_before_closing_a_tunnel() -> None:
    with ha.lab() as lab:
        r = ha.maintenance(lab, tunnels=1000, other=200)
    print(r)
    assert r["vip_moved_before_first_close"]
    assert r["closes"] == {"1001": 1000}  # every tunnel closed the WebSocket way
    assert r["close_spread_seconds"] is not None and r["close_spread_seconds"] > 2.5
    assert r["failed_connect_attempts"] == 0 and r["reconnected"] == 1000
    assert r["all_on_node2_after"]
    assert r["other_blinks"] == 0
