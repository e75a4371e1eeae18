"""The handshake engine in-process, through its collaborators (admission,
upstream, policy decisions, an event sink), over real loopback sockets.

The timing cases of bad input run here with short timeouts and awaited
events, where a subprocess run would need long sleeps: a request head not
complete in time (408, even when trickled), a backend that never answers
(504), a refused server retried on the next one. One end-to-end test per
class of bad input stays in tests/e2e/test_bad_input.py.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import time

import pytest
import trio
from handshake_harness import (
    HEADER_TIMEOUT,
    Harness,
    accepting_backend,
    client,
    run,
    silent_backend,
)
from peers import (
    RawServer,
    closed_port,
    read_head,
    read_until_closed,
    unanswered_port,
    upgrade_head,
    websocket_accept,
)

from shardproxy.config import ServerConfig
from shardproxy.protocol.proxyproto import encode_v2

# On both engines: the Python handshake engine, and the compiled one.
pytestmark = pytest.mark.usefixtures("engine_kind")


def test_a_head_not_complete_in_time_is_408_even_when_trickled() -> None:
    async def test(h: Harness) -> None:
        whole, trickled = client(h.port), client(h.port)
        whole.sendall(b"GET / HTTP/1.1\r\n")  # and stops
        started = time.monotonic()
        head = upgrade_head("/")
        for i in range(len(head) - 1):  # one byte every 20 ms: would take > 2 s
            trickled.send(head[i : i + 1])
            if len(h.events.refusals) == 2:
                break
            await trio.sleep(0.02)  # the trickle is the scenario
        await h.events.until(lambda: len(h.events.refusals) == 2, "both refused")
        assert [r.status for r in h.events.refusals] == [408, 408]
        assert time.monotonic() - started < HEADER_TIMEOUT + 1
        for s in (whole, trickled):
            assert (await trio.to_thread.run_sync(read_head, s)).startswith(b"HTTP/1.1 408")
            s.close()
        # Both leases come back once the engine reads our FIN after its answer
        # (a lingering close): no event says so, so look until then.
        with trio.fail_after(5):
            while h.admission.in_use:
                await trio.sleep(0.01)

    with RawServer(accepting_backend) as backend:
        run([backend.port], test)


def test_a_backend_that_never_answers_is_504() -> None:
    async def test(h: Harness) -> None:
        c = client(h.port)
        c.sendall(upgrade_head("/"))
        await h.events.until(lambda: bool(h.events.refusals), "refused")
        (r,) = h.events.refusals
        assert (r.status, r.reason) == (504, "upstream_timeout")
        assert (await trio.to_thread.run_sync(read_head, c)).startswith(b"HTTP/1.1 504")
        c.close()

    with RawServer(silent_backend) as backend:
        run([backend.port], test)


def test_a_refused_server_is_retried_on_the_next_one() -> None:
    async def test(h: Harness) -> None:
        clients = [client(h.port) for _ in range(4)]
        for c in clients:  # round robin: two of the four pick the refusing server first
            c.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 4, "four tunnels")
        assert h.events.connect_failures.count("s0") == 2
        assert not h.events.refusals
        for c in clients:
            answer = await trio.to_thread.run_sync(read_head, c)
            assert answer.startswith(b"HTTP/1.1 101")
            c.close()
        assert h.admission.in_use == 4  # the tunnels hold their leases

    with closed_port() as refusing, RawServer(accepting_backend) as backend:
        run([refusing, backend.port], test)


def test_a_connect_that_stays_in_progress_times_out_and_goes_to_the_next_server() -> None:
    """A server whose SYNs go unanswered: the connect is still in progress
    when the engine would send the head, and ends at connect_timeout (1 s
    here) as a connect failure, retried on the next server."""

    async def test(h: Harness) -> None:
        clients = [client(h.port) for _ in range(2)]
        for c in clients:  # round robin: one of the two picks the silent server first
            c.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 2, "two tunnels")
        assert h.events.connect_failures == ["s0"]
        assert not h.events.refusals
        for c in clients:
            assert (await trio.to_thread.run_sync(read_head, c)).startswith(b"HTTP/1.1 101")
            c.close()

    with unanswered_port() as silent, RawServer(accepting_backend) as backend:
        run([silent, backend.port], test)


def test_servers_added_and_removed_at_runtime() -> None:
    """The registry changes under a running engine: a server unknown at
    start gets tunnels (its tuple space made on its first connect), a
    removed one gets none, and its tunnel stays up."""

    async def test(h: Harness) -> None:
        first = client(h.port)
        first.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 1, "the first tunnel")
        registry = h.pools["p"]
        assert h.events.tunnels[0].lease.endpoint.server.name == "s0"  # type: ignore[union-attr]
        registry.add(ServerConfig(name="new", address="127.0.0.1", ports=(later.port,), weight=1))
        registry.remove("s0")
        clients = [client(h.port) for _ in range(3)]
        for c in clients:
            c.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 4, "three more tunnels")
        servers = [u.lease.endpoint.server.name for u in h.events.tunnels[1:]]  # type: ignore[union-attr]
        assert servers == ["new"] * 3
        spaces = {u["endpoint"]: u["used"] for u in h.upstream.snapshot()}
        assert spaces[f"127.0.0.1:{later.port}"] == 3
        for c in [first, *clients]:
            assert (await trio.to_thread.run_sync(read_head, c)).startswith(b"HTTP/1.1 101")
            c.close()
        removed = h.events.tunnels[0].lease.endpoint
        assert removed is not None and removed.server.removed and removed.active == 1

    with RawServer(accepting_backend) as backend, RawServer(accepting_backend) as later:
        run([backend.port], test)


async def _answer(c: socket.socket) -> bytes:
    return await trio.to_thread.run_sync(read_until_closed, c)


async def _leases_back(h: Harness) -> None:
    """Every lease given back (after a lingering close, which no event marks)."""
    with trio.fail_after(5):
        while h.admission.in_use:
            await trio.sleep(0.01)


def test_heads_the_reader_refuses_get_their_answers() -> None:
    """Over max_header_bytes (431, also when it comes in pieces), closed
    before its end (400 client_closed), malformed (400)."""

    async def test(h: Harness) -> None:
        big, pieces, early, bad = (client(h.port) for _ in range(4))
        big.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        for _ in range(3):
            pieces.sendall(b"X-Long: " + b"b" * 7000 + b"\r\n")
            await trio.sleep(0.01)  # separate reads
        early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        early.shutdown(socket.SHUT_WR)
        bad.sendall(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        await h.events.until(lambda: len(h.events.refusals) == 4, "four refusals")
        reasons = sorted((r.status, r.reason) for r in h.events.refusals)
        assert reasons == [
            (400, "bad_request"),
            (400, "client_closed"),
            (431, "header_too_large"),
            (431, "header_too_large"),
        ]
        for c, status in ((big, 431), (pieces, 431), (early, 400), (bad, 400)):
            assert (await _answer(c)).startswith(b"HTTP/1.1 %d " % status)
            c.close()
        await _leases_back(h)
        assert not h.events.tunnels and not h.events.connect_failures

    with RawServer(accepting_backend) as backend:
        run([backend.port], test)


def _refusing_backend_with_a_late_body(conn: socket.socket) -> None:
    read_head(conn)
    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nfirst")
    time.sleep(0.05)  # the rest of the body in a later read
    conn.sendall(b"-half")
    conn.recv(1)


def test_a_non_101_answer_and_its_body_are_passed_back_then_closed() -> None:
    async def test(h: Harness) -> None:
        c = client(h.port)
        c.sendall(upgrade_head("/"))
        answer = await _answer(c)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 Forbidden") and b"Connection: close" in head
        assert body == b"first-half"
        (r,) = h.events.refusals
        assert (r.status, r.reason) == (403, "backend_refused")
        c.close()
        await _leases_back(h)

    with RawServer(_refusing_backend_with_a_late_body) as backend:
        run([backend.port], test)


def _vanishing_backend(conn: socket.socket) -> None:
    read_head(conn)  # and closes without an answer


def test_a_backend_that_closes_before_its_answer_is_502() -> None:
    async def test(h: Harness) -> None:
        c = client(h.port)
        c.sendall(upgrade_head("/"))
        assert (await _answer(c)).startswith(b"HTTP/1.1 502 ")
        (r,) = h.events.refusals
        assert (r.status, r.reason) == (502, "bad_gateway")
        assert "backend closed before its response head" in r.detail
        c.close()
        await _leases_back(h)

    with RawServer(_vanishing_backend) as backend:
        run([backend.port], test)


def test_the_first_tunnel_bytes_each_way_are_handed_over() -> None:
    """Bytes behind the request head and behind the 101 go to the relay."""

    peers: list[tuple[str, int]] = []

    def backend(conn: socket.socket) -> None:
        peers.append(conn.getpeername())  # the proxy's source address and port
        head = read_head(conn)
        key = [v for v in head.split(b"\r\n") if v.lower().startswith(b"sec-websocket-key:")]
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: "
            + websocket_accept(key[0].split(b":", 1)[1].strip())
            + b"\r\n\r\n\x81\x02hi"
        )
        conn.recv(1)

    async def test(h: Harness) -> None:
        c = client(h.port)
        c.sendall(upgrade_head("/") + b"\x81\x82abcd\x09\x0d")
        await h.events.until(lambda: bool(h.events.tunnels), "the tunnel")
        (u,) = h.events.tunnels
        assert u.to_backend == b"\x81\x82abcd\x09\x0d"
        with trio.fail_after(5):  # the 101 and the frame behind it may come in one read
            while not u.to_client:
                await trio.sleep(0.01)  # (they are one send, so they do)
        assert u.to_client == b"\x81\x02hi"
        assert u.seconds > 0 and u.lease.client_port == c.getsockname()[1]
        assert [("127.0.0.1", u.lease.source_port)] == peers
        assert u.lease.space is not None and u.lease.space.seen_address == "127.0.0.1"  # type: ignore[attr-defined]
        assert (await trio.to_thread.run_sync(read_head, c)).startswith(b"HTTP/1.1 101")
        c.close()

    with RawServer(backend) as server:
        run([server.port], test)


def _answering_101(*sends: bytes, pause: float = 0.0):  # type: ignore[no-untyped-def]
    """A backend whose answer is ``sends``, with the Sec-WebSocket-Accept
    header line put in for ``{accept}`` (a pause between the sends: they
    arrive as separate reads, or else they merely coalesce)."""

    def backend(conn: socket.socket) -> None:
        head = read_head(conn)
        key = [v for v in head.split(b"\r\n") if v.lower().startswith(b"sec-websocket-key:")]
        accept = websocket_accept(key[0].split(b":", 1)[1].strip())
        for i, data in enumerate(sends):
            if i:
                time.sleep(pause)
            conn.sendall(data.replace(b"{accept}", accept))
        conn.recv(1)

    return backend


_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {accept}\r\n\r\n"
)


@pytest.mark.parametrize(
    ("sends", "pause"),
    [
        ((_101 + b"\x81\x02hi",), 0.0),  # whole in one read (the compiled core passes it on)
        ((_101[:20], _101[20:] + b"\x81\x02hi"), 0.05),  # in pieces: the reader's
        ((b"HTTP/1.1 100 Continue\r\n\r\n" + _101 + b"\x81\x02hi",), 0.0),  # behind a 1xx
    ],
    ids=["whole", "in-pieces", "behind-100"],
)
def test_a_101_is_passed_on_alone_and_the_bytes_behind_it_go_to_the_relay(
    sends: tuple[bytes, ...], pause: float
) -> None:
    async def test(h: Harness) -> None:
        c = client(h.port)
        c.sendall(upgrade_head("/"))
        await h.events.until(lambda: bool(h.events.tunnels), "the tunnel")
        (u,) = h.events.tunnels
        assert u.to_client == b"\x81\x02hi"
        head = await trio.to_thread.run_sync(read_head, c)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"100 Continue" not in head and b"Sec-WebSocket-Accept: " in head
        c.close()

    with RawServer(_answering_101(*sends, pause=pause)) as backend:
        run([backend.port], test)


def test_a_proxy_header_names_the_client_even_in_pieces_and_a_bad_one_is_400() -> None:
    """An accept_proxy listener: the PROXY header (v1 whole, v2 cut into
    pieces with the head behind it) makes its source the client; garbage
    where the header belongs is 400; a header that never ends is 408."""

    async def test(h: Harness) -> None:
        v1, v2, garbage, slow = (client(h.port) for _ in range(4))
        v1.sendall(b"PROXY TCP4 198.18.0.7 127.0.0.1 40001 443\r\n" + upgrade_head("/"))
        whole = encode_v2(("198.18.0.9", 40002), ("127.0.0.1", 443)) + upgrade_head("/")
        for i in range(0, len(whole), 7):  # a read per piece, for the core's raw reads
            v2.sendall(whole[i : i + 7])
            await trio.sleep(0.002)
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
        slow.sendall(b"PROXY TCP4 198.18")
        await h.events.until(
            lambda: len(h.events.tunnels) == 2 and len(h.events.refusals) == 2,
            "two tunnels and two refusals",
        )
        clients = sorted((u.lease.client_ip, u.lease.client_port) for u in h.events.tunnels)
        assert clients == [("198.18.0.7", 40001), ("198.18.0.9", 40002)]
        assert sorted((r.status, r.reason) for r in h.events.refusals) == [
            (400, "bad_proxy_header"),
            (408, "header_timeout"),
        ]
        for c in (v1, v2):
            assert (await trio.to_thread.run_sync(read_head, c)).startswith(b"HTTP/1.1 101")
        for c in (garbage, slow):
            assert (await _answer(c)).startswith(b"HTTP/1.1 4")
        for c in (v1, v2, garbage, slow):
            c.close()

    with RawServer(accepting_backend) as backend:
        run([backend.port], test, proxied=True)


def test_accept_out_of_descriptors_backs_off_then_serves_the_queue() -> None:
    """accept fails with EMFILE: reported once, the engine stops accepting
    for a moment instead of spinning, and once descriptors are back the
    connections that waited in the accept queue are served."""

    async def test(h: Harness) -> None:
        clients = [socket.socket() for _ in range(3)]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest = os.open("/dev/null", os.O_RDONLY)  # the number accept would get
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            for c in clients:
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", h.port))  # completes in the kernel's accept queue
            await h.events.until(lambda: bool(h.events.accept_errors), "accept failing")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert {e.errno for e in h.events.accept_errors} == {errno.EMFILE}
        errors = len(h.events.accept_errors)
        for c in clients:
            c.setblocking(True)
            c.settimeout(5)
            c.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 3, "the queue served")
        assert len(h.events.accept_errors) == errors <= 3  # backed off, no spinning
        for c in clients:
            assert (await trio.to_thread.run_sync(read_head, c)).startswith(b"HTTP/1.1 101")
            c.close()

    with RawServer(accepting_backend) as backend:
        run([backend.port], test, accept_errors=True)
