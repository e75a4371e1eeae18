"""The relay over TLS (engine/tls.py's TlsConnection as a tunnel's client
transport), on each engine: a real TLS client (Python's ``ssl`` over a
loopback socket, in a thread) on one side, a plain socket as the backend
on the other. Records of every size, close_notify both ways, a corrupted
record, and a client that stops reading."""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_relay import Harness, recv_exactly, run, tcp_pair
from tlscerts import TestCA

from shardproxy.config import CertificateFiles, TlsProfile
from shardproxy.engine.api import CLIENT_RESET, CLOSED
from shardproxy.engine.tls import TlsConnection, TlsServer
from shardproxy.engine.transport import PLAIN, Transports

pytestmark = pytest.mark.usefixtures("engine_kind")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsServer, TestCA]]:
    tmp: Path = tmp_path_factory.mktemp("tls-relay")
    ca = TestCA(tmp)
    leaf = ca.issue(["relay.example.com"])
    profile = TlsProfile(
        "t", (CertificateFiles(str(leaf.cert), str(leaf.key), ("relay.example.com",)),)
    )
    yield TlsServer(profile), ca


def _handshake(server: TlsServer, ca: TestCA) -> tuple[ssl.SSLSocket, socket.socket, TlsConnection]:
    """A TLS client socket and the proxy's side of it, handshaken."""
    client_raw, ours = tcp_pair()
    ours.setblocking(False)
    conn = server.connection()
    out: dict[str, ssl.SSLSocket] = {}

    def connect() -> None:
        out["s"] = ca.client_context().wrap_socket(client_raw, server_hostname="relay.example.com")

    t = threading.Thread(target=connect)
    t.start()
    fd = ours.fileno()
    while wait := conn.handshake(fd):
        r, w, _ = select.select(
            [fd] if wait & select.EPOLLIN else [], [fd] if wait & select.EPOLLOUT else [], [], 5
        )
        assert r or w, "the handshake stalled"
    t.join(5)
    conn.tls_info = conn.info()
    client = out["s"]
    client.settimeout(10)
    return client, ours, conn


def _tls_tunnel(
    h: Harness, server: TlsServer, ca: TestCA
) -> tuple[ssl.SSLSocket, socket.socket, int]:
    client, ours, conn = _handshake(server, ca)
    backend, b = tcp_pair()
    backend.settimeout(10)
    tid = h.engine.add(ours.detach(), b.detach(), "tls", b"", b"", Transports(conn, PLAIN))
    return client, backend, tid


@pytest.mark.parametrize("size", [1, 1000, 16383, 16384, 16385, 65535, 65536, 300_000])
def test_records_of_every_size_arrive_whole_both_ways(
    server: tuple[TlsServer, TestCA], size: int
) -> None:
    data = os.urandom(size)

    async def test(h: Harness) -> None:
        client, backend, _ = _tls_tunnel(h, *server)
        await trio.to_thread.run_sync(client.sendall, data)
        assert await trio.to_thread.run_sync(recv_exactly, backend, size) == data
        await trio.to_thread.run_sync(backend.sendall, data)
        assert await trio.to_thread.run_sync(recv_exactly, client, size) == data
        client.close()
        backend.close()

    run(test)


def test_close_notify_is_a_fin_and_a_fin_is_a_close_notify(
    server: tuple[TlsServer, TestCA],
) -> None:
    async def test(h: Harness) -> None:
        client, backend, _ = _tls_tunnel(h, *server)
        await trio.to_thread.run_sync(backend.sendall, b"last words")
        backend.shutdown(socket.SHUT_WR)
        # The client reads the bytes, then the close_notify (recv gives b"").
        assert await trio.to_thread.run_sync(recv_exactly, client, 10) == b"last words"
        assert await trio.to_thread.run_sync(client.recv, 100) == b""
        # The other direction still flows (TLS 1.3 half-close), then ends the same way.
        await trio.to_thread.run_sync(client.sendall, b"still here")
        assert await trio.to_thread.run_sync(recv_exactly, backend, 10) == b"still here"
        raw = await trio.to_thread.run_sync(client.unwrap)  # our close_notify
        assert await trio.to_thread.run_sync(backend.recv, 100) == b""
        assert await h.wait_closed() == [CLOSED]
        stats = h.stats()
        assert stats.tls is not None and stats.tls.version == "TLSv1.3"
        raw.close()
        backend.close()

    run(test)


def test_a_corrupted_record_ends_its_tunnel_alone(server: tuple[TlsServer, TestCA]) -> None:
    async def test(h: Harness) -> None:
        good, good_backend, _ = _tls_tunnel(h, *server)
        bad, bad_backend, _ = _tls_tunnel(h, *server)
        raw = socket.socket(fileno=os.dup(bad.fileno()))
        # An application-data record whose bytes are not what the key sealed.
        raw.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
        assert await h.wait_closed() == [CLIENT_RESET]
        # The client hears why (OpenSSL's alert); the backend gets the abort as an abort.
        with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
            await trio.to_thread.run_sync(bad.recv, 100)
        with pytest.raises(ConnectionResetError):
            await trio.to_thread.run_sync(bad_backend.recv, 100)
        await trio.to_thread.run_sync(good.sendall, b"unharmed")
        assert await trio.to_thread.run_sync(recv_exactly, good_backend, 8) == b"unharmed"
        for s in (raw, bad, bad_backend, good, good_backend):
            s.close()

    run(test)


def test_a_client_that_stops_reading_parks_one_read_and_loses_nothing(
    server: tuple[TlsServer, TestCA],
) -> None:
    total = 64 << 20  # more than loopback's socket buffers hold

    async def test(h: Harness) -> None:
        client, backend, tid = _tls_tunnel(h, *server)
        sent = 0
        chunk = os.urandom(65536)
        backend.setblocking(False)
        # Fill until the proxy stops reading the backend (TCP backpressure).
        with trio.fail_after(10):
            while True:
                try:
                    sent += backend.send(chunk)
                except BlockingIOError:
                    await trio.sleep(0.05)
                    try:
                        sent += backend.send(chunk)
                    except BlockingIOError:
                        if h.view(tid).parked[1]:
                            break
                if sent >= total:
                    break
        parked = h.view(tid).parked[1]
        assert parked <= 65536 + 16384, parked
        backend.setblocking(True)
        got = await trio.to_thread.run_sync(recv_exactly, client, sent)
        assert len(got) == sent
        client.close()
        backend.close()

    run(test)
