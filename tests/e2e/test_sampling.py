"""Access-log sampling per route and the error budget: the pure rules, then
a real instance whose log holds exactly what they say and whose metrics
account for what was left out."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from pathlib import Path

from conftest import Proxy, free_port
from hypothesis import given
from hypothesis import strategies as st
from peers import WsBackend, read_head
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from shardproxy.policy.sampling import AccessSampler, ErrorBudget


@given(st.floats(0.0, 1.0), st.integers(0, 500))
def test_a_route_logs_its_share_evenly(rate: float, n: int) -> None:
    sampler = AccessSampler()
    kept = [sampler.keep("route", rate) for _ in range(n)]
    assert abs(sum(kept) - n * rate) <= 1
    if n and rate > 0:
        assert kept[0]  # the first tunnel of a route is always logged
    run = 0  # never more than 1/rate left out in a row
    for k in kept:
        run = 0 if k else run + 1
        assert rate == 0 or run < 1 / rate + 1


def test_routes_are_sampled_apart() -> None:
    sampler = AccessSampler()
    a = [sampler.keep("a", 0.5) for _ in range(4)]
    b = [sampler.keep("b", 0.25) for _ in range(4)]
    assert a == [True, False, True, False] and b == [True, False, False, False]


def test_the_budget_allows_a_burst_then_the_rate() -> None:
    budget = ErrorBudget(rate=10, burst=5)
    assert [budget.allow("x", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.allow("y", 0.05) is False  # half a token
    assert budget.allow("y", 0.1) is True  # 0.1 s at 10/s: one token
    assert budget.allow("x", 10.0) and budget.take_suppressed() == {"x": 2, "y": 1}
    assert budget.take_suppressed() == {}
    unlimited = ErrorBudget(rate=0, burst=1)
    assert all(unlimited.allow("x", 0.0) for _ in range(1000))


CONFIG = """
[proxy]
listen = ["127.0.0.1:{port}"]
workers = 1

[admin]
listen = "127.0.0.1:{admin}"

[log]
error_rate = {rate}
error_burst = {burst}

[[routes]]
path_prefix = "/quarter"
pool = "main"
access_sample = 0.25

[[routes]]
path_prefix = "/quiet"
pool = "main"
access_sample = 0

[[routes]]
path_prefix = "/"
pool = "main"

[pools.main]
servers = [{{ name = "b", address = "127.0.0.1", ports = [{backend}] }}]
"""


def _metric(admin: int, name: str, **labels: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_sampled_routes_and_a_flood_of_bad_requests(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    with WsBackend() as backend:
        path = tmp_path / "sampling.toml"
        path.write_text(
            CONFIG.format(port=port, admin=admin, rate=5, burst=10, backend=backend.port)
        )
        proxy = Proxy(path, port, workers=1)
        try:

            async def tunnels(prefix: str, n: int) -> None:
                for _ in range(n):
                    async with connect(f"{proxy.url}{prefix}/x") as ws:
                        await ws.send("m")
                        await ws.recv()

            asyncio.run(tunnels("/quarter", 20))
            asyncio.run(tunnels("/quiet", 5))
            asyncio.run(tunnels("/chat", 3))
            flood = 200
            started = time.monotonic()
            for _ in range(flood):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert read_head(s).startswith(b"HTTP/1.1 426")  # every one is answered
            elapsed = time.monotonic() - started

            def settled() -> float:
                suppressed = _metric(
                    admin, "shardproxy_log_events_suppressed_total", action="request-rejected"
                )
                logged = len(proxy.actions("request-rejected"))
                return suppressed if suppressed + logged == flood else 0

            suppressed = proxy.wait_for(lambda _: settled(), what="the flood accounted for")
            closed = proxy.wait_for(
                lambda _: _metric(admin, "shardproxy_tunnels_closed_total", outcome="closed"),
                what="the tunnels counted",
            )
            reports = proxy.actions("log-suppressed")
        finally:
            proxy.stop()

    access = proxy.actions("tunnel-closed")
    routes = [e["shardproxy"]["route"] for e in access]
    assert routes.count("*/quarter") == 5 and routes.count("*/") == 3 and len(routes) == 8
    assert {e["shardproxy"].get("access_sample") for e in access} == {0.25, None}
    assert closed == 28  # every tunnel counted, logged or not

    logged = len(proxy.actions("request-rejected"))
    assert logged <= 10 + 5 * elapsed + 1  # the burst, then error_rate per second
    assert suppressed == flood - logged > 0
    assert reports and reports[0]["log.level"] == "warning"
    assert 0 < reports[0]["shardproxy"]["suppressed"]["request-rejected"] <= suppressed
