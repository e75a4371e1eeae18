"""Both engines move bytes only through a connection's transport
(engine/transport.py): with a toy transport that is not TCP as it is (every
byte on the wire XORed with a key), a peer that speaks it gets through the
handshake engine and the relay, and one that does not would see garbage.
Real loopback sockets, the engines in-process."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Sequence

import pytest
import trio
from handshake_harness import Harness as HandshakeHarness
from handshake_harness import answer_101, client
from handshake_harness import run as run_handshakes
from peers import RawServer, read_head, upgrade_head
from test_relay import Harness as RelayHarness
from test_relay import recv_exactly, tcp_pair
from test_relay import run as run_relay

from shardproxy.engine.api import CLOSED
from shardproxy.engine.transport import PLAIN, PLAIN_PAIR, Transports, pair
from shardproxy.protocol.frames import close_frame

pytestmark = pytest.mark.usefixtures("engine_kind")

KEY = 0x5A
_XOR = bytes(b ^ KEY for b in range(256))


def xor(data: bytes) -> bytes:
    return data.translate(_XOR)


class XorTransport:
    """Every byte XORed with KEY both ways; counts what the engines called."""

    forwarded_proto = "https"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def readv(self, fd: int, buffers: Sequence[bytearray]) -> int:
        self.calls["readv"] += 1
        n = os.readv(fd, buffers)
        buffers[0][:n] = xor(bytes(buffers[0][:n]))
        return n

    def read(self, fd: int, n: int) -> bytes:
        self.calls["read"] += 1
        return xor(os.read(fd, n))

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.calls["write"] += 1
        return os.write(fd, xor(bytes(data)))

    def shutdown_write(self, fd: int) -> None:
        self.calls["shutdown_write"] += 1
        PLAIN.shutdown_write(fd)

    def reset(self, fd: int) -> None:
        self.calls["reset"] += 1
        PLAIN.reset(fd)

    def close(self, fd: int) -> None:
        self.calls["close"] += 1
        PLAIN.close(fd)


def test_plain_connections_share_one_pair() -> None:
    assert pair(PLAIN, PLAIN) is PLAIN_PAIR
    toy = XorTransport()
    assert pair(toy, PLAIN) == Transports(toy, PLAIN)


def test_the_relay_reads_writes_and_shuts_down_through_the_transports() -> None:
    toy = XorTransport()

    async def test(h: RelayHarness) -> None:
        peer, a = tcp_pair()
        backend, b = tcp_pair()
        h.engine.add(a.detach(), b.detach(), "token", b"", b"early ", Transports(toy, PLAIN))
        peer.settimeout(10)
        backend.settimeout(10)
        close = close_frame(1000, b"bye", os.urandom(4))
        await trio.to_thread.run_sync(peer.sendall, xor(close))
        got = await trio.to_thread.run_sync(recv_exactly, backend, len(close))
        assert got == close  # the toy transport's bytes, decoded
        await trio.to_thread.run_sync(backend.sendall, b"world")
        assert await trio.to_thread.run_sync(recv_exactly, peer, 11) == xor(b"early world")
        backend.shutdown(socket.SHUT_WR)
        assert await trio.to_thread.run_sync(peer.recv, 10) == b""  # FIN via the transport
        peer.shutdown(socket.SHUT_WR)
        assert await h.wait_closed() == [CLOSED]
        # The frame tracker read the decoded stream: it saw the client's Close.
        assert h.stats().up.close_code == 1000
        peer.close()
        backend.close()

    run_relay(test)
    assert toy.calls["readv"] >= 2 and toy.calls["write"] >= 2
    assert (toy.calls["shutdown_write"], toy.calls["close"]) == (1, 1)


# The compiled handshake engine takes plain listeners only (a worker with
# another transport runs the Python one: engine/factory.py).
@pytest.mark.python_engine_only
def test_the_handshake_engine_uses_the_listeners_transport() -> None:
    toy = XorTransport()
    heads: list[bytes] = []

    def backend(conn: socket.socket) -> None:
        heads.append(read_head(conn))
        answer_101(conn, heads[-1])

    async def test(h: HandshakeHarness) -> None:
        c = client(h.port)
        c.sendall(xor(upgrade_head("/")))
        await h.events.until(lambda: bool(h.events.tunnels), "a tunnel")
        (tunnel,) = h.events.tunnels
        assert tunnel.io == Transports(toy, PLAIN)
        assert tunnel.request.path == "/" and tunnel.lease.endpoint is not None
        answer = xor(await trio.to_thread.run_sync(c.recv, 4096))
        assert answer.startswith(b"HTTP/1.1 101")
        c.close()

    with RawServer(backend) as server:
        run_handshakes([server.port], test, [toy])
    (head,) = heads
    assert b"\r\nx-forwarded-proto: https\r\n" in head.lower()  # the transport's word
    assert toy.calls["read"] >= 1 and toy.calls["write"] >= 1
