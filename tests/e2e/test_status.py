"""The status screen's arithmetic: rates from two /stats samples, and what
the screen shows with and without them (the screen against a running
instance is in test_admin.py)."""

from __future__ import annotations

from typing import Any

from shardproxy.telemetry.status import rates, render


def sample(opened: int, closed: int, rejected: int, up: int, w0: int, w1: int) -> dict[str, Any]:
    return {
        "tunnels": opened - closed,
        "handshakes": 0,
        "capacity": 100,
        "workers": [
            {"slot": 0, "generation": 1, "tunnels": 0, "handshakes": 0, "capacity": 50,
             "opened": w0},
            {"slot": 1, "generation": 2, "tunnels": 0, "handshakes": 0, "capacity": 50,
             "opened": w1},
        ],
        "totals": {
            "tunnels": opened,
            "closed": {"closed": closed - 1, "client_reset": 1},
            "rejected": {"not_upgrade": rejected},
            "bytes": {"up": up, "down": 2 * up},
        },
        "upstream": [{"source": "auto", "endpoint": "10.0.0.1:80", "used": 5, "capacity": 20}],
    }  # fmt: skip


def test_rates_are_differences_over_the_time_between_samples() -> None:
    before = sample(opened=10, closed=4, rejected=0, up=1000, w0=6, w1=4)
    after = sample(opened=30, closed=14, rejected=6, up=5000, w0=10, w1=20)
    assert rates(before, after, 2.0) == {
        "opened": 10.0,
        "closed": 5.0,
        "rejected": 3.0,
        "bytes up": 2000.0,
        "bytes down": 4000.0,
        "0": 2.0,
        "1.2": 8.0,
    }
    # A worker that restarted starts from 0 again: never a negative rate.
    assert rates(after, before, 1.0)["1.2"] == 0.0


def test_the_screen_shows_rates_once_it_has_two_samples() -> None:
    after = sample(opened=30, closed=14, rejected=6, up=5000, w0=10, w1=20)
    servers = [{"pool": "p", "server": "s", "admin": "ready",
                "endpoints": [{"endpoint": "10.0.0.1:80", "health": "up"}]}]  # fmt: skip
    first = render(after, servers, {"status": "ok"}).splitlines()
    assert first[1] == "per second: (from the next refresh on)"
    before = sample(opened=10, closed=4, rejected=0, up=1000, w0=6, w1=4)
    lines = render(after, servers, {"status": "ok"}, rates(before, after, 2.0)).splitlines()
    assert lines[0].startswith("shardproxy: ok  tunnels 16 / capacity 100")
    assert lines[1].startswith("per second: opened 10.0  closed 5.0  rejected 3.0")
    assert [line.split()[-1] for line in lines if line.startswith(("0 ", "1.2 "))] == ["2.0", "8.0"]
    assert any(line.endswith(" 75.0%") for line in lines)  # headroom of 10.0.0.1:80
    assert lines[-1].startswith("p/s") and "10.0.0.1:80 up" in lines[-1]
