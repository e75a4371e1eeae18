"""Keepalive through a real ``shardproxy run``: TCP keepalive on both sides
of every tunnel, and the proxy's own WebSocket pings to clients (with wsproto
peers, which show every Ping and Pong)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy
from peers import (
    RawServer,
    WsBackend,
    WsprotoBackend,
    read_head,
    read_until_closed,
    websocket_accept,
)
from websockets.asyncio.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

# Every test here runs on both engines (conftest.proxy_engine).
pytestmark = pytest.mark.usefixtures("proxy_engine")


@pytest.fixture
def backend() -> Any:
    with WsBackend() as b:
        yield b


def keepalive_timers(side: str, port: int) -> list[str | None]:
    """The keepalive timer that ``ss -o`` shows for every established socket
    whose ``side`` ("sport" or "dport") is ``port`` (None: no keepalive)."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( {side} = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        m.group(1) if (m := re.search(r"timer:\(keepalive,([^,]+),", line)) else None
        for line in out.splitlines()
    ]


@pytest.mark.parametrize("idle", ["7s", "0s"])
def test_tcp_keepalive_on_both_sides_of_a_tunnel(
    idle: str, backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=1, extra=f'\n[keepalive]\ntcp_idle = "{idle}"\n')

    async def main() -> tuple[list[str | None], list[str | None]]:
        async with connect(proxy.url + "/echo", ping_interval=None) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            # Once everything is acknowledged, ss shows the keepalive timer
            # (not the retransmission one).
            await asyncio.sleep(0.5)
            return (
                await asyncio.to_thread(keepalive_timers, "sport", proxy.port),
                await asyncio.to_thread(keepalive_timers, "dport", backend.port),
            )

    client_side, backend_side = asyncio.run(main())
    assert len(client_side) == len(backend_side) == 1, (client_side, backend_side)
    if idle == "0s":
        assert client_side == backend_side == [None]
    else:
        # Seconds left, not the kernel default's "119min…" (2 h).
        for left in client_side + backend_side:
            assert left is not None and "min" not in left, (client_side, backend_side)


# -- the proxy's WebSocket pings ---------------------------------------------------

PINGS = '\n[keepalive]\nping_interval = "200ms"\nping_timeout = "500ms"\n'


def upgraded_client(port: int) -> tuple[socket.socket, WSConnection, list[Any]]:
    """A wsproto client through the proxy, and the events that came with the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target="/")))
    events: list[Any] = []
    while not any(isinstance(e, AcceptConnection) for e in events):
        events += _events(sock, ws)
    return sock, ws, [e for e in events if not isinstance(e, AcceptConnection)]


def _events(sock: socket.socket, ws: WSConnection) -> list[Any]:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the proxy closed the connection")
    ws.receive_data(data)
    return list(ws.events())


def test_a_client_that_answers_pings_stays_and_its_pongs_stop_at_the_proxy(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsprotoBackend(ping_first=True) as backend:
        proxy = start_proxy([backend.port], workers=1, extra=PINGS)
        sock, ws, events = upgraded_client(proxy.port)
        pings: list[bytes] = []
        deadline = time.monotonic() + 2.5  # a dozen ping intervals
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            for event in events:
                if isinstance(event, Ping):
                    pings.append(bytes(event.payload))
                    sock.sendall(ws.send(event.response()))
            try:
                events = _events(sock, ws)
            except TimeoutError:
                events = []
        sock.settimeout(10)
        sock.sendall(ws.send(Message(data="still here")))
        replies: list[Any] = []
        while not any(isinstance(e, TextMessage) for e in replies):
            replies += [e for e in _events(sock, ws) if not isinstance(e, Ping)]
        assert [e.data for e in replies if isinstance(e, TextMessage)] == ["still here"]
        ours = [p for p in pings if p != b"backend ping"]
        assert len(ours) >= 5, pings
        assert b"backend ping" in pings  # the backend's own Ping reached the client…
        assert backend.pongs == [b"backend ping"]  # …and only its answer reached the backend
        assert not proxy.actions("ping-timeout")
        sock.close()


def test_a_client_that_stops_answering_is_closed_after_ping_timeout(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsprotoBackend() as backend:
        proxy = start_proxy([backend.port], workers=1, extra=PINGS)
        sock, _, _ = upgraded_client(proxy.port)  # and never reads again
        started = time.monotonic()
        assert backend.ended.wait(10), "the proxy kept the silent client"
        assert time.monotonic() - started < 3  # interval + timeout, with room
        event = proxy.wait_for(lambda evs: proxy.actions("ping-timeout"), what="ping-timeout")[0]
        assert event["client"]["port"] == sock.getsockname()[1]
        closed = proxy.wait_for(lambda evs: proxy.actions("tunnel-closed"), what="access event")
        assert closed[0]["shardproxy"]["outcome"] == "ping_timeout"
        sock.close()


# -- long frames and ping_timeout (ping_timeout runs from the Ping's write,
#    and any byte from the client proves it alive) ------------------------------

LONG_PING_INTERVAL = 0.5  # seconds
LONG_PING_TIMEOUT = 1.5
LONG_PINGS = (
    f'\n[keepalive]\nping_interval = "{LONG_PING_INTERVAL * 1000:.0f}ms"\n'
    f'ping_timeout = "{LONG_PING_TIMEOUT * 1000:.0f}ms"\n'
)
LONG_FRAME = 200_000  # bytes, streamed over LONG_SECONDS in LONG_PIECES writes
# 2.5 x interval + timeout: a Ping written into the frame, or one left unanswered
# while it lasts, would have ended the tunnel twice over.
LONG_SECONDS = 2.5 * (LONG_PING_INTERVAL + LONG_PING_TIMEOUT)
LONG_PIECES = 100


def frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One whole frame (RFC 6455 §5.2), masked with ``key`` if given."""
    n = len(payload)
    mask_bit = 0 if key is None else 0x80
    if n < 126:
        head = bytes([0x80 | opcode, mask_bit | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, mask_bit | 127]) + n.to_bytes(8, "big")
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def stream_slowly(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` in LONG_PIECES pieces spread over LONG_SECONDS."""
    piece = -(-len(data) // LONG_PIECES)
    start = time.monotonic()
    for i in range(LONG_PIECES):
        sock.sendall(data[i * piece : (i + 1) * piece])
        # Pacing is the scenario here (a slow sender), not a wait for an event.
        time.sleep(max(0.0, start + (i + 1) * LONG_SECONDS / LONG_PIECES - time.monotonic()))


def answer_next_ping(sock: socket.socket, ws: WSConnection, events: list[Any]) -> None:
    """Wait for the proxy's next Ping (``events`` first, then what comes)
    and answer it. After the first one, the next is an interval away, so a
    frame begun at once is seen by the proxy before that Ping is due."""
    while not any(isinstance(e, Ping) for e in events):
        events = _events(sock, ws)
    for e in events:
        if isinstance(e, Ping):
            sock.sendall(ws.send(e.response()))


def receive_message(sock: socket.socket, ws: WSConnection) -> tuple[bytes, list[Any]]:
    """The next data message, answering the Pings that come meanwhile; and
    the events that came after it."""
    data = b""
    while True:
        events = _events(sock, ws)
        for i, e in enumerate(events):
            if isinstance(e, Ping):
                sock.sendall(ws.send(e.response()))
            elif isinstance(e, Message):
                data += bytes(e.data) if isinstance(e.data, bytes) else e.data.encode()
                if e.message_finished:
                    return data, events[i + 1 :]


def test_a_client_sending_one_long_frame_slowly_keeps_its_tunnel(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    """5 s inside one frame, with a Ping due every 0.5 s and 1.5 s to answer:
    the proxy writes no Ping into the client's frame (the client could only
    answer inside it), and the client's bytes prove it alive. A client that
    is silent all along is still ended within interval + timeout."""
    proxy = start_proxy([backend.port], workers=1, extra=LONG_PINGS)
    sock, ws, events = upgraded_client(proxy.port)
    silent, _, _ = upgraded_client(proxy.port)  # never reads, never answers
    answer_next_ping(sock, ws, events)
    payload = os.urandom(LONG_FRAME)
    whole = frame(0x2, payload, os.urandom(4))
    stream_slowly(sock, whole[:-1])
    # Nothing came from the proxy while the client was inside its frame
    # (the backend answers only whole messages: it could only be a Ping).
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)
    sock.settimeout(10)
    sock.sendall(whole[-1:])
    echoed, rest = receive_message(sock, ws)
    assert echoed == payload
    answer_next_ping(sock, ws, rest)  # pinged again once its frame ended, and answered
    timeouts = proxy.actions("ping-timeout")
    assert [e["client"]["port"] for e in timeouts] == [silent.getsockname()[1]]
    (closed,) = proxy.actions("tunnel-closed")
    assert closed["shardproxy"]["outcome"] == "ping_timeout"
    # ended within interval + timeout, with a second of room
    assert closed["event"]["duration"] / 1e9 < LONG_PING_INTERVAL + LONG_PING_TIMEOUT + 1
    sock.close()
    silent.close()


def test_a_backend_sending_one_long_frame_slowly_keeps_the_tunnel(
    start_proxy: Callable[..., Proxy],
) -> None:
    """The Ping waits for the end of the backend's frame towards the client,
    and its timeout starts only when it is written."""
    payload = os.urandom(LONG_FRAME)
    done = threading.Event()

    def slow_backend(conn: socket.socket) -> None:
        head = read_head(conn)
        key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head)
        assert key is not None
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + websocket_accept(key.group(1))
            + b"\r\n\r\n"
        )
        assert conn.recv(100)  # the client's "go"
        stream_slowly(conn, frame(0x2, payload))
        done.set()
        read_until_closed(conn, 30)

    with RawServer(slow_backend) as server:
        proxy = start_proxy([server.port], workers=1, extra=LONG_PINGS)
        sock, ws, events = upgraded_client(proxy.port)
        answer_next_ping(sock, ws, events)
        sock.sendall(ws.send(Message(data="go")))
        received, rest = receive_message(sock, ws)
        assert received == payload
        assert done.wait(10)
        answer_next_ping(sock, ws, rest)
        assert not proxy.actions("ping-timeout")
        assert not proxy.actions("tunnel-closed")
        sock.close()
