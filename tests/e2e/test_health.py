"""Health checks: the rise/fall state, each kind of check against real
servers, and a real ``shardproxy run`` taking servers out and back in."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import Proxy
from peers import RawServer, WsBackend, closed_port, read_head
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK

from shardproxy.config import Endpoint, HealthConfig
from shardproxy.control.health import DOWN, UP, EndpointHealth, run_check


def health(kind: str = "tcp", **kw: Any) -> HealthConfig:
    values: dict[str, Any] = {
        "kind": kind,
        "path": "/health",
        "expect": 200,
        "interval": 1.0,
        "timeout": 0.5,
        "rise": 2,
        "fall": 3,
        "on_server_down": "keep",
    }
    return HealthConfig(**{**values, **kw})


# -- the state ------------------------------------------------------------------


def test_fall_failures_in_a_row_take_it_down_and_rise_successes_bring_it_back() -> None:
    h = EndpointHealth(rise=2, fall=3)
    assert h.state == UP
    assert [h.record("refused"), h.record("refused"), h.record(None)] == [False] * 3
    assert h.state == UP  # a success in between starts the count again
    assert [h.record("refused") for _ in range(3)] == [False, False, True]
    assert (h.state, h.last_error) == (DOWN, "refused")
    assert [h.record(None), h.record("timeout"), h.record(None), h.record(None)] == [
        False,
        False,
        False,
        True,
    ]
    assert h.state == UP
    assert h.failed_checks == 6  # every failure since start, for the metric


# -- the checks, against real servers -------------------------------------------


def check(endpoint: Endpoint, cfg: HealthConfig) -> str | None:
    return trio.run(run_check, endpoint, cfg)


def test_tcp_check() -> None:
    with WsBackend() as b:
        assert check(Endpoint("127.0.0.1", b.port), health("tcp")) is None
    with closed_port() as port:
        assert check(Endpoint("127.0.0.1", port), health("tcp")) == "Connection refused"


def test_http_check_wants_the_expected_status() -> None:
    with WsBackend() as b:
        ep = Endpoint("127.0.0.1", b.port)
        assert check(ep, health("http")) is None
        b.healthy = False
        assert check(ep, health("http")) == "status 503, expected 200"
        assert check(ep, health("http", expect=503)) is None


def test_websocket_check_wants_a_real_101() -> None:
    with WsBackend() as b:
        ep = Endpoint("127.0.0.1", b.port)
        assert check(ep, health("websocket", path="/echo")) is None
        # The backend's handler ends after our check returned.
        assert b.wait_close_code(1000) and b.close_codes == [1000]  # closed the WebSocket way

    def fake_101(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")

    with RawServer(fake_101) as server:
        error = check(Endpoint("127.0.0.1", server.port), health("websocket"))
        assert error == "101 without the right Sec-WebSocket-Accept"


def test_a_silent_server_times_out() -> None:
    def silent(conn: socket.socket) -> None:
        time.sleep(2)

    with RawServer(silent) as server:
        cfg = health("http", timeout=0.3)
        assert check(Endpoint("127.0.0.1", server.port), cfg) == "no answer within 0.3s"


# -- through the proxy ----------------------------------------------------------

FAST = (
    '\n[pools.main.health]\nkind = "http"\npath = "/health"\n'
    'interval = "200ms"\ntimeout = "150ms"\nrise = 2\nfall = 2\n'
)


async def open_clients(proxy: Proxy, n: int) -> list[ClientConnection]:
    return [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(n)]


def test_a_server_that_goes_down_gets_no_new_tunnels_until_it_is_back(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsBackend() as b1, WsBackend() as b2:
        proxy = start_proxy([b1.port, b2.port], extra=FAST)
        b2.healthy = False
        event = proxy.wait_for(lambda evs: proxy.actions("server-down"), what="server-down")[0]
        assert event["destination"]["port"] == b2.port
        assert event["error"]["message"] == "status 503, expected 200"
        before = len(b2.peers)

        async def some(n: int) -> None:
            for ws in await open_clients(proxy, n):
                await ws.close()

        asyncio.run(some(20))
        assert len(b2.peers) == before  # every one went to b1
        b2.healthy = True
        proxy.wait_for(lambda evs: proxy.actions("server-up"), what="server-up")
        asyncio.run(some(20))
        assert len(b2.peers) > before
        assert not proxy.actions("request-rejected")


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_on_server_down_close_sends_its_tunnels_a_close_1001(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsBackend() as b1, WsBackend() as b2:
        proxy = start_proxy(
            [b1.port, b2.port],
            extra=FAST + 'on_server_down = "close"\n\n[lifecycle]\nclose_spread = "1s"\n',
        )

        async def main() -> None:
            clients = await open_clients(proxy, 20)
            # A backend's handler (which records the peer) may run just
            # after its 101 reached the client: wait until both recorded all
            # 20 (the http health checks record none).
            proxy.wait_for(lambda _: len(b1.peers) + len(b2.peers) == 20, "every peer recorded")
            on_b2 = len(b2.peers)
            assert 0 < on_b2 < 20
            b2.healthy = False
            proxy.wait_for(lambda evs: proxy.actions("server-down"), what="server-down")

            async def outcome(ws: ClientConnection) -> str:
                try:
                    await asyncio.wait_for(ws.recv(), 4)  # close_spread 1 s, close_wait 5 s
                except ConnectionClosedOK as e:
                    assert e.rcvd is not None and e.rcvd.code == 1001
                    return "closed"
                except TimeoutError:
                    await ws.send("still here")
                    assert await ws.recv() == "still here"
                    return "kept"
                return "message?"

            outcomes = await asyncio.gather(*(outcome(ws) for ws in clients))
            assert outcomes.count("closed") == on_b2  # every tunnel to b2 got its Close
            assert outcomes.count("kept") == 20 - on_b2  # every tunnel to b1 is untouched
            assert b2.close_codes.count(1001) == on_b2
            for ws in clients:
                await ws.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        assert proxy.actions("server-down-close")


def test_refused_connects_count_as_failed_checks(start_proxy: Callable[..., Proxy]) -> None:
    with WsBackend() as b1, closed_port() as dead:
        # Active checks every 60 s, so going down within seconds takes the
        # workers' reports of refused connects.
        proxy = start_proxy(
            [b1.port, dead],
            extra='\n[pools.main.health]\nkind = "tcp"\ninterval = "60s"\nfall = 3\n',
        )
        started = time.monotonic()

        async def clients() -> None:
            for ws in await open_clients(proxy, 20):
                await ws.close()

        asyncio.run(clients())  # half of them tried the dead server first
        event = proxy.wait_for(lambda evs: proxy.actions("server-down"), what="server-down")[0]
        assert time.monotonic() - started < 20
        assert event["destination"]["port"] == dead


@pytest.mark.parametrize("kind", ["tcp", "websocket"])
def test_check_kinds_through_the_config(kind: str, start_proxy: Callable[..., Proxy]) -> None:
    with WsBackend() as b1, closed_port() as dead:
        proxy = start_proxy(
            [b1.port, dead],
            extra=f'\n[pools.main.health]\nkind = "{kind}"\npath = "/echo"\n'
            'interval = "200ms"\ntimeout = "150ms"\nfall = 2\n',
        )
        events = proxy.wait_for(lambda evs: proxy.actions("server-down"), what="server-down")
        assert [e["destination"]["port"] for e in events] == [dead]


def test_a_killed_backend_goes_down_and_comes_back_when_restarted(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsBackend() as b1:
        with WsBackend() as b2:
            port2 = b2.port
            proxy = start_proxy(
                [b1.port, port2],
                extra='\n[pools.main.health]\nkind = "tcp"\ninterval = "200ms"\n'
                'timeout = "150ms"\nrise = 2\nfall = 2\n',
            )
        # b2 is gone (its listener closed): down after `fall` failed checks.
        event = proxy.wait_for(lambda evs: proxy.actions("server-down"), what="server-down")[0]
        assert event["destination"]["port"] == port2

        async def some(n: int) -> None:
            for ws in await open_clients(proxy, n):
                await ws.close()

        asyncio.run(some(10))  # every one served, by b1
        assert not proxy.actions("request-rejected")
        with WsBackend(port=port2) as restarted:
            proxy.wait_for(lambda evs: proxy.actions("server-up"), what="server-up")
            asyncio.run(some(20))
            assert restarted.peers  # back in rotation
