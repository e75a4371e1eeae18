"""Tests for shardproxy.demo.echo.

The backend runs as a real process (``python -m shardproxy.demo.echo --port 0``) and
is driven by an independent client, the ``websockets`` library, plus raw
sockets for what a well-behaved client cannot send. The pure ``_Echoer`` is
also fed text one character at a time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from base64 import b64encode
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
from conftest import REPO
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, TextMessage

from shardproxy.demo.echo import _Echoer

NAME = "echo-test"
TIMEOUT = 10.0
REPO = REPO
T = TypeVar("T")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardproxy.demo.echo", "--port", "0", "--name", NAME],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until listening, "" if it died
        assert line.startswith(f"{NAME} listening on 127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1])
        assert proc.poll() is None, "the echo backend died during the tests"
    finally:
        proc.kill()
        proc.wait()


def run(port: int, body: Callable[[ClientConnection], Awaitable[T]]) -> T:
    """Connect a websockets client to the backend and run body with it."""

    async def main() -> T:
        async with asyncio.timeout(TIMEOUT):
            url = f"ws://127.0.0.1:{port}/any/path?x=1"
            async with connect(url, proxy=None, max_size=None) as ws:
                return await body(ws)

    return asyncio.run(main())


async def echo(ws: ClientConnection, message: str | bytes | list[str] | list[bytes]) -> str | bytes:
    await ws.send(message)
    return await ws.recv()


# -- echo over a real connection -----------------------------------------------


def test_text_echo(port: int) -> None:
    text = "héllo wörld ✓ 🙂"
    assert run(port, lambda ws: echo(ws, text)) == text


def test_binary_echo(port: int) -> None:
    data = bytes(range(256)) * 4
    reply = run(port, lambda ws: echo(ws, data))
    assert isinstance(reply, bytes)
    assert reply == data


def test_empty_messages(port: int) -> None:
    async def body(ws: ClientConnection) -> list[str | bytes]:
        return [await echo(ws, ""), await echo(ws, b"")]

    assert run(port, body) == ["", b""]


def test_one_mebibyte_messages(port: int) -> None:
    data = os.urandom(1 << 20)
    text = "ab✓" * (1 << 18)

    async def body(ws: ClientConnection) -> list[str | bytes]:
        return [await echo(ws, data), await echo(ws, text)]

    assert run(port, body) == [data, text]


def test_fragmented_messages(port: int) -> None:
    async def body(ws: ClientConnection) -> list[str | bytes]:
        # An iterable is sent as one message in several frames (RFC 6455 5.4).
        return [
            await echo(ws, ["frag", "mén", "", "ted"]),
            await echo(ws, [b"\x00\x01", b"\xff" * 70000, b"end"]),
        ]

    assert run(port, body) == ["fragménted", b"\x00\x01" + b"\xff" * 70000 + b"end"]


def test_ping_is_answered(port: int) -> None:
    async def body(ws: ClientConnection) -> float:
        pong = await ws.ping(b"are you there")
        return await pong

    assert run(port, body) >= 0


def test_whoami_returns_the_name(port: int) -> None:
    async def body(ws: ClientConnection) -> list[str | bytes]:
        return [
            await echo(ws, "whoami"),
            await echo(ws, ["who", "am", "i"]),
            await echo(ws, "who"),
            await echo(ws, "whoami?"),
            await echo(ws, ["who", "amx"]),
            await echo(ws, b"whoami"),
        ]

    assert run(port, body) == [NAME, NAME, "who", "whoami?", "whoamx", b"whoami"]


def test_close_code_is_echoed(port: int) -> None:
    async def body(ws: ClientConnection) -> ClientConnection:
        await ws.close(4001, "bye")
        return ws

    ws = run(port, body)
    assert ws.close_code == 4001
    assert ws.close_reason == "bye"


def test_subprotocol_offer_selects_none(port: int) -> None:
    async def main() -> str | None:
        async with asyncio.timeout(TIMEOUT):
            url = f"ws://127.0.0.1:{port}/"
            async with connect(url, proxy=None, subprotocols=[Subprotocol("chat")]) as ws:
                assert await echo(ws, "x") == "x"
                return ws.subprotocol

    assert asyncio.run(main()) is None


# -- plain HTTP and misbehaving clients ------------------------------------------


def http_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_plain_http_get(port: int) -> None:
    reply = http_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == f"shardproxy echo backend {NAME}\n".encode()


def test_bad_upgrade_is_rejected(port: int) -> None:
    # Upgrade: websocket but no Sec-WebSocket-Key (RFC 6455 4.2.1).
    request = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert http_exchange(port, request).startswith(b"HTTP/1.1 400 ")


def test_garbage_client_does_not_take_the_server_down(port: int) -> None:
    assert http_exchange(port, b"\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert run(port, lambda ws: echo(ws, "still here")) == "still here"


def handshake(extra: bytes = b"") -> bytes:
    key = b64encode(os.urandom(16))
    return (
        b"GET /raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n" + extra
    )


def frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    """One final frame with a payload under 126 bytes (RFC 6455 5.2)."""
    assert len(payload) < 126
    if not masked:
        return bytes([0x80 | opcode, len(payload)]) + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def test_frame_bytes_sent_with_the_handshake_are_not_lost(port: int) -> None:
    request = handshake(frame(0x1, b"early") + frame(0x8, struct.pack("!H", 1000)))
    head, _, frames = http_exchange(port, request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    # Unmasked server frames: the echo, then the Close answer.
    assert frames == b"\x81\x05early" + b"\x88\x02" + struct.pack("!H", 1000)


def test_protocol_error_is_answered_with_close_1002(port: int) -> None:
    # A client frame must be masked (RFC 6455 5.1); this one is not.
    request = handshake(frame(0x1, b"hi", masked=False))
    head, _, frames = http_exchange(port, request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames[:4] == b"\x88" + bytes([frames[1]]) + struct.pack("!H", 1002)
    assert run(port, lambda ws: echo(ws, "ok")) == "ok"


def test_client_vanishing_mid_frame(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(handshake(frame(0x2, b"x" * 100)[:20]))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
    assert run(port, lambda ws: echo(ws, b"ok")) == b"ok"


# -- the pure reply logic, one character at a time ------------------------------


def feed(echoer: _Echoer, pieces: list[str]) -> list[Event]:
    replies: list[Event] = []
    for i, piece in enumerate(pieces):
        event = TextMessage(data=piece, message_finished=i == len(pieces) - 1)
        replies += echoer.replies(event, ConnectionState.OPEN)
    return replies


@pytest.mark.parametrize("text", ["whoami", "whoam", "whoamix", "hello whoami", "w"])
def test_echoer_text_one_character_at_a_time(text: str) -> None:
    echoer = _Echoer(NAME)
    replies = feed(echoer, list(text))
    texts = [r for r in replies if isinstance(r, TextMessage)]
    assert texts == replies
    assert "".join(r.data for r in texts) == (NAME if text == "whoami" else text)
    assert texts[-1].message_finished
    # The next message starts fresh.
    assert feed(echoer, ["who", "ami"]) == [TextMessage(data=NAME)]


def test_echoer_close_replies() -> None:
    echoer = _Echoer(NAME)
    close = CloseConnection(code=4001, reason="bye")
    assert echoer.replies(close, ConnectionState.REMOTE_CLOSING) == [close]
    assert echoer.replies(close, ConnectionState.OPEN) == [close]
    assert echoer.replies(CloseConnection(code=1006), ConnectionState.CLOSED) == []
