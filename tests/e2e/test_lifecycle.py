"""Stopping without dropping websockets: the drain on SIGTERM, through a real
``shardproxy run`` with the ``websockets`` library on both sides."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy
from peers import WsBackend
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

# Every test here runs on both engines (conftest.proxy_engine).
pytestmark = pytest.mark.usefixtures("proxy_engine")

TUNNELS = 500
SPREAD = 5.0


@pytest.fixture
def backend() -> Any:
    with WsBackend() as b:
        yield b


async def open_clients(proxy: Proxy, n: int) -> list[ClientConnection]:
    clients: list[ClientConnection] = []
    for i in range(0, n, 50):
        clients += await asyncio.gather(
            *(
                connect(proxy.url + "/echo", ping_interval=None, open_timeout=20)
                for _ in range(min(50, n - i))
            )
        )
    return clients


async def await_close(ws: ClientConnection) -> tuple[float, BaseException | None]:
    """When the connection ended, and how (the exception recv() raised)."""
    try:
        await ws.recv()
    except ConnectionClosed as e:
        return time.monotonic(), e
    return time.monotonic(), None  # a message: not expected


def test_sigterm_closes_every_tunnel_with_1001_spread_over_the_window(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(
        [backend.port],
        workers=2,
        extra=f'\n[lifecycle]\nclose_spread = "{SPREAD:g}s"\nclose_wait = "5s"\n',
    )

    async def main() -> tuple[float, list[tuple[float, BaseException | None]]]:
        clients = await open_clients(proxy, TUNNELS)
        await asyncio.gather(*(ws.send("ping") for ws in clients))
        assert await asyncio.gather(*(ws.recv() for ws in clients)) == ["ping"] * TUNNELS
        endings = [asyncio.ensure_future(await_close(ws)) for ws in clients]
        sent = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        done = await asyncio.wait_for(asyncio.gather(*endings), SPREAD + 20)
        return sent, done

    sent, endings = asyncio.run(main())
    for _, e in endings:
        # A Close frame each, answered: not a reset, not a bare EOF (1006).
        assert isinstance(e, ConnectionClosedOK), repr(e)
        assert e.rcvd is not None and e.rcvd.code == 1001 and e.rcvd.reason == "going away"
    per_second = Counter(int(t - sent) for t, _ in endings)
    assert max(per_second.values()) <= TUNNELS // 3, per_second
    assert max(t - sent for t, _ in endings) < SPREAD + 3, "closes spread beyond the window"
    assert proxy.proc.wait(20) == 0
    assert Counter(backend.close_codes) == {1001: TUNNELS}  # the backend got its Close too
    closed = proxy.actions("tunnel-closed")
    assert Counter(e["shardproxy"]["outcome"] for e in closed) == {"drained": TUNNELS}
    assert {e["shardproxy"]["close"]["client_code"] for e in closed} == {1001}
    assert len(proxy.actions("drain-start")) == 2
    assert not proxy.actions("drain-timeout")


def test_new_connections_are_refused_once_draining(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=2, extra='\n[lifecycle]\nclose_spread = "10s"\n')

    async def main() -> None:
        held = await open_clients(proxy, 4)  # keeps the workers draining
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for(lambda evs: len(proxy.actions("drain-start")) == 2, what="drain start")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
        # Tunnels keep working until their turn comes (each worker's first
        # one is closed at once, the next ones over the 10 s).
        kept = 0
        for ws in held:
            try:
                await ws.send("still here")
                assert await ws.recv() == "still here"
                kept += 1
            except ConnectionClosedOK as e:
                assert e.rcvd is not None and e.rcvd.code == 1001
        assert kept >= 1
        for ws in held:
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert proxy.proc.wait(20) == 0


def test_a_second_signal_stops_at_once(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=2, extra='\n[lifecycle]\nclose_spread = "60s"\n')

    async def main() -> None:
        clients = await open_clients(proxy, 20)
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for(lambda evs: len(proxy.actions("drain-start")) == 2, what="drain start")
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(await_close(ws) for ws in clients)), 15)
        assert time.monotonic() - started < 10  # not the 60 s spread

    asyncio.run(asyncio.wait_for(main(), 60))
    assert proxy.proc.wait(20) == 0
    assert proxy.actions("supervisor-stop-now")
    outcomes = Counter(e["shardproxy"]["outcome"] for e in proxy.actions("tunnel-closed"))
    assert outcomes["stopped"] >= 1 and sum(outcomes.values()) == 20
