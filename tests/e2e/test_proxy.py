"""End to end through a real ``shardproxy run`` with 2 workers: the
``websockets`` library on both sides."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy
from peers import FLOOD_MESSAGES, FLOOD_SIZE, WsBackend, read_head, upgrade_head
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, Request, TextMessage

# Every test here runs on both engines (conftest.proxy_engine).
pytestmark = pytest.mark.usefixtures("proxy_engine")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def backend() -> Any:
    with WsBackend() as b:
        yield b


@pytest.fixture
def proxy(backend: WsBackend, start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy([backend.port], workers=2)


def client(proxy: Proxy, path: str = "/echo", **kw: Any) -> Any:
    return connect(proxy.url + path, max_size=None, ping_interval=None, **kw)


def test_text_and_binary_round_trip(proxy: Proxy) -> None:
    async def main() -> None:
        async with client(proxy) as ws:
            await ws.send("héllo wörld")
            assert await ws.recv() == "héllo wörld"
            payload = os.urandom(70_000)
            await ws.send(payload)
            assert await ws.recv() == payload

    run(main())


def test_fragmented_message_arrives_whole(proxy: Proxy) -> None:
    parts = [os.urandom(n) for n in (10, 200, 70_000, 1)]

    async def main() -> None:
        async with client(proxy) as ws:
            await ws.send(parts)  # one message in four frames
            assert await ws.recv() == b"".join(parts)

    run(main())
    closed = proxy.wait_for(lambda evs: [e for e in evs if _action(e) == "tunnel-closed"], "log")
    # The tracker counts messages, not frames: one each way.
    assert closed[0]["shardproxy"]["messages"]["up"] == 1
    assert closed[0]["shardproxy"]["messages"]["down"] >= 1


def test_sixteen_mebibyte_message(proxy: Proxy) -> None:
    big = os.urandom(16 << 20)

    async def main() -> None:
        async with client(proxy) as ws:
            await ws.send(big)
            assert await ws.recv() == big

    run(main())


def test_client_ping_answered_by_backend(proxy: Proxy) -> None:
    async def main() -> float:
        async with client(proxy) as ws:
            waiter = await ws.ping(b"are you there")
            return await asyncio.wait_for(waiter, 10)

    assert run(main()) >= 0


def test_close_codes_carried_both_ways(proxy: Proxy, backend: WsBackend) -> None:
    async def main() -> tuple[int | None, int | None]:
        async with client(proxy) as ws:
            await ws.send("x")
            await ws.recv()
            await ws.close(4001, "client says bye")
        async with client(proxy, "/close/4002") as ws2:
            await ws2.send("trigger")
            with pytest.raises(ConnectionClosed):
                await ws2.recv()
        return ws.close_code, ws2.close_code

    client_side, backend_initiated = run(main())
    assert backend.wait_close_code(4001)  # the backend saw the client's code
    assert client_side == 4001  # and echoed it back through the proxy
    assert backend_initiated == 4002  # the client saw the backend's code
    closed = proxy.wait_for(
        lambda evs: len([e for e in evs if _action(e) == "tunnel-closed"]) >= 2 and evs, "logs"
    )
    codes = {
        (e["shardproxy"]["close"]["client_code"], e["shardproxy"]["close"]["backend_code"])
        for e in closed
        if _action(e) == "tunnel-closed"
    }
    assert (4001, 4001) in codes
    assert (4002, 4002) in codes


def _action(event: dict[str, Any]) -> str:
    return str(event.get("event", {}).get("action"))


def _masked_text(text: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(text) < 126
    return (
        bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )


@pytest.mark.parametrize("with_head", [16, 3], ids=["whole-frame", "part-of-a-frame"])
def test_frame_sent_with_the_head_is_delivered(proxy: Proxy, with_head: int) -> None:
    """A client may send its first frame (or part of it) in the same packet
    as the head; it is forwarded, and counted as the message it is."""
    frame = _masked_text(b"early bird")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(upgrade_head("/echo") + frame[:with_head])
        data = read_head(s)
        assert data.startswith(b"HTTP/1.1 101")
        s.sendall(frame[with_head:])
        rest = data.split(b"\r\n\r\n", 1)[1]
        while len(rest) < 12:
            rest += s.recv(100)
        assert rest[:12] == bytes([0x81, 10]) + b"early bird"
    closed = proxy.wait_for(lambda _: proxy.actions("tunnel-closed"), "the access event")
    assert closed[0]["shardproxy"]["messages"] == {"up": 1, "down": 1}


def test_backend_message_right_after_101_is_delivered(proxy: Proxy) -> None:
    async def main() -> None:
        async with client(proxy, "/greet") as ws:
            assert await ws.recv() == "hello from backend"
            await ws.send("and echo")
            assert await ws.recv() == "and echo"

    run(main())


def test_forwarded_headers(proxy: Proxy) -> None:
    async def main() -> dict[str, list[str]]:
        async with client(
            proxy,
            "/headers",
            additional_headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
        ) as ws:
            seen: dict[str, list[str]] = {}
            for name, value in json.loads(await ws.recv()):
                seen.setdefault(name.lower(), []).append(value)
            return seen

    seen = run(main())
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]  # the client's claim is replaced
    assert seen["x-forwarded-port"] == [str(proxy.port)]


def test_two_thousand_concurrent_clients(proxy: Proxy) -> None:
    n = 2000

    async def one(i: int, ready: asyncio.Barrier) -> bytes:
        async with client(proxy, open_timeout=30) as ws:
            await ready.wait()  # all 2,000 tunnels are open at once
            payload = f"client {i} ".encode() + os.urandom(i % 300)
            for _ in range(3):
                await ws.send(payload)
                assert await ws.recv() == payload
            return payload

    async def main() -> list[bytes]:
        ready = asyncio.Barrier(n)
        return await asyncio.gather(*(one(i, ready) for i in range(n)))

    assert len(run(main())) == n
    closed = proxy.wait_for(
        lambda evs: (c := [e for e in evs if _action(e) == "tunnel-closed"]) and len(c) >= n and c,
        "every tunnel-closed event",
    )
    per_worker = Counter(e["shardproxy"]["worker"] for e in closed)
    assert set(per_worker) == {0, 1}, per_worker
    assert min(per_worker.values()) > n * 0.2, per_worker  # SO_REUSEPORT spreads them
    assert all(e["shardproxy"]["messages"]["up"] == 3 for e in closed)


def test_backpressure_bounds_proxy_memory(proxy: Proxy, backend: WsBackend) -> None:
    """A client that stops reading while the backend floods: the proxy parks
    at most a read per direction, so the flood stalls instead of filling RAM,
    and everything arrives once the client reads again."""
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        rss_before = proxy.rss()
        s.sendall(ws.send(Request(host="127.0.0.1", target="/flood")))
        stalled_at = _wait_until_stalled(lambda: backend.flood_sent)
        assert stalled_at < FLOOD_MESSAGES, "the backend was never held back"
        growth = proxy.rss() - rss_before
        assert growth < 24 << 20, f"proxy grew by {growth} bytes while the client did not read"

        messages, received, done = 0, 0, False
        while not done:
            ws.receive_data(s.recv(1 << 20))
            for event in ws.events():
                if isinstance(event, BytesMessage):
                    received += len(event.data)
                    messages += event.message_finished
                elif isinstance(event, TextMessage) and event.data == "done":
                    done = True
        assert (messages, received) == (FLOOD_MESSAGES, FLOOD_MESSAGES * FLOOD_SIZE)
    assert backend.flood_sent == FLOOD_MESSAGES


def _wait_until_stalled(progress: Callable[[], int], quiet: float = 1.0, limit: float = 30) -> int:
    """Poll ``progress`` until it stops changing for ``quiet`` seconds."""
    last, since, start = progress(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() - start < limit:
        time.sleep(0.1)
        if progress() != last:
            last, since = progress(), time.monotonic()
    return last


def test_several_listen_addresses_including_ipv6(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    from conftest import free_port

    v4, v6 = free_port(), free_port()
    proxy = start_proxy(
        [backend.port], workers=2, proxy={"listen": [f"127.0.0.1:{v4}", f"[::1]:{v6}"]}
    )

    async def main() -> list[str]:
        seen = []
        for url in (f"ws://127.0.0.1:{v4}/headers", f"ws://[::1]:{v6}/headers"):
            async with connect(url) as ws:
                headers = dict((k.lower(), v) for k, v in json.loads(await ws.recv()))
                seen.append(headers["x-forwarded-for"] + " " + headers["x-forwarded-port"])
        return seen

    assert run(main()) == [f"127.0.0.1 {v4}", f"::1 {v6}"]
    assert proxy.actions("worker-ready")
