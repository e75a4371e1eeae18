"""Differential: the Python and the compiled handshake engine answer the
same bytes alike, however they are cut into reads.

Each example is a batch of client conversations, a valid upgrade head
mutated (a byte replaced, bytes cut out or put in, the head cut short,
padded past max_header_bytes) and sent in random pieces, with or without
the client's FIN after it (without, a head cut short is a 408 after the
harness's 0.3 s header timeout); both engines get the same batch, in front of the
same 101-answering backend, and every client must get the same first
answer line from both, and both engines the same refusals (status and
reason)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import trio
from engines import handshake_class
from handshake_harness import Harness, accepting_backend, client, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import RawServer

from shardproxy.engine.choice import COMPILED

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example key
BASE = (
    b"GET /chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
    b"User-Agent: differential\r\n\r\n"
)
MAX_HEADER_BYTES = 16384  # the harness's configuration: the default


@dataclass(frozen=True)
class Conversation:
    data: bytes
    cuts: tuple[int, ...]  # sizes of the pieces sent one after another
    fin: bool  # shut the write side after the last piece


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    head = BASE
    kind = draw(st.sampled_from(["asis", "replace", "cut", "insert", "short", "padded"]))
    at = draw(st.integers(0, len(head) - 1))
    if kind == "replace":
        head = head[:at] + draw(st.binary(min_size=1, max_size=3)) + head[at + 1 :]
    elif kind == "cut":
        head = head[:at] + head[at + draw(st.integers(1, 12)) :]
    elif kind == "insert":
        insert = draw(st.sampled_from([b"\r\n", b" ", b":", b"\x00", b"X-A: b\r\n", b"\r\n\r\n"]))
        head = head[:at] + insert + head[at:]
    elif kind == "short":
        head = head[:at]
    elif kind == "padded":
        head = head[:-2] + b"X-Pad: " + b"p" * draw(st.integers(16000, 17000)) + b"\r\n\r\n"
    pieces = draw(st.lists(st.integers(1, max(1, len(head))), min_size=1, max_size=4))
    return Conversation(head, tuple(pieces), draw(st.booleans()))


async def _talk(c: socket.socket, conversation: Conversation) -> None:
    data = conversation.data
    for size in conversation.cuts:
        piece, data = data[:size], data[size:]
        if piece:
            c.sendall(piece)
            await trio.sleep(0.003)  # a read per piece, most of the time
    if data:
        c.sendall(data)
    if conversation.fin:
        c.shutdown(socket.SHUT_WR)


def _first_line(c: socket.socket) -> bytes:
    c.settimeout(5)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:  # a reset instead of an answer is an answer too
        return f"error {e.errno}".encode()
    return data.split(b"\r\n", 1)[0]


def answers(
    engine: str, batch: Sequence[Conversation]
) -> tuple[list[bytes], list[tuple[int, str]]]:
    """Every client's first answer line, and the engine's refusals."""
    lines: list[bytes] = []

    async def test(h: Harness) -> None:
        clients = [client(h.port) for _ in batch]
        async with trio.open_nursery() as nursery:
            for c, conversation in zip(clients, batch, strict=True):
                nursery.start_soon(_talk, c, conversation)
        for c in clients:
            lines.append(await trio.to_thread.run_sync(_first_line, c))
            c.close()

    with RawServer(accepting_backend) as backend:
        h = run([backend.port], test, engine=handshake_class(engine))
    return lines, sorted((r.status, r.reason) for r in h.events.refusals)


@pytest.mark.skipif(COMPILED is None, reason="the compiled engine was not built")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(conversations(), min_size=1, max_size=10))
def test_both_engines_answer_any_head_cut_anyhow_alike(batch: list[Conversation]) -> None:
    python, compiled = answers("python", batch), answers("compiled", batch)
    assert compiled == python
    assert len(python[0]) == len(batch)
