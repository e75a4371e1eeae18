"""The relay engine on its own, over real loopback TCP connections.

Each test builds tunnels by hand: a "client" socket connected to the proxy
side A, and a "backend" socket connected to the proxy side B; the engine
relays A⇄B. The test plays both peers with blocking sockets in threads
(trio.to_thread), so the engine runs exactly as in a worker.
"""

from __future__ import annotations

import io
import os
import re
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from engines import current

from shardproxy.engine.api import (
    BACKEND_RESET,
    CLIENT_RESET,
    CLOSED,
    DRAINED,
    INTERNAL_ERROR,
    NOTE_BYTES,
    OUTCOMES,
    PING_TIMEOUT,
    STOPPED,
    EndSummary,
    Keepalive,
    TunnelStats,
    TunnelView,
)
from shardproxy.engine.transport import PLAIN, PLAIN_PAIR, PlainTransport, Transports
from shardproxy.protocol.frames import close_frame
from shardproxy.telemetry import logs
from shardproxy.worker.tunnels import pack_note

pytestmark = pytest.mark.usefixtures("engine_kind")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(peer, proxy side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        proxy_side, _ = server.accept()
    proxy_side.setblocking(False)
    return peer, proxy_side


class Harness:
    """An engine and the events it reports (it is their TunnelEvents)."""

    def __init__(self, keepalive: Keepalive | None = None) -> None:
        self.closed: list[tuple[Any, str, TunnelStats]] = []
        self.summaries: list[tuple[Any, EndSummary]] = []
        self.errors: list[BaseException | None] = []
        self.engine = current.relay(self, keepalive)

    def tunnel_closed(self, token: Any, outcome: str, stats: TunnelStats) -> None:
        self.closed.append((token, outcome, stats))

    def tunnels_closed(self, token: Any, summary: EndSummary) -> None:
        self.summaries.append((token, summary))

    def relay_error(self) -> None:
        self.errors.append(sys.exc_info()[1])

    def tunnel(
        self,
        to_backend: bytes = b"",
        to_client: bytes = b"",
        token: Any = "token",
        note: bytes = b"",
        summary: tuple[bytes, ...] | None = None,
    ) -> tuple[socket.socket, socket.socket, int]:
        client, a = tcp_pair()
        backend, b = tcp_pair()
        tid = self.engine.add(
            a.detach(), b.detach(), token, to_backend, to_client, PLAIN_PAIR, note, summary
        )
        for s in (client, backend):
            s.settimeout(10)
        return client, backend, tid

    def view(self, tid: int) -> TunnelView:
        """A live tunnel as its engine sees it."""
        t: TunnelView | None = self.engine.inspect(tid)
        assert t is not None
        return t

    def inside(self, tid: int) -> Any:
        """White-box: the Python engine's own object for a live tunnel
        (tests marked python_engine_only)."""
        t = self.engine._tunnel(tid)
        assert t is not None
        return t

    def stats(self, i: int = 0) -> TunnelStats:
        return self.closed[i][2]

    async def wait_closed(self, count: int = 1) -> list[str]:
        with trio.fail_after(10):
            while len(self.closed) < count:
                await trio.sleep(0.01)
        return [outcome for _, outcome, _ in self.closed]

    def ended(self) -> int:
        """Ends told so far, alone or in summaries."""
        return len(self.closed) + sum(s.tunnels for _, s in self.summaries)


def run(test: Callable[[Harness], Awaitable[None]], keepalive: Keepalive | None = None) -> Harness:
    harness = Harness(keepalive)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.engine.run)
            await test(harness)
            nursery.cancel_scope.cancel()
        harness.engine.close()

    trio.run(main)
    return harness


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def test_bytes_flow_both_ways_and_first_bytes_go_first() -> None:
    async def test(h: Harness) -> None:
        client, backend, _ = h.tunnel(to_backend=b"early-up ", to_client=b"early-down ")
        await trio.to_thread.run_sync(client.sendall, b"later-up")
        assert await trio.to_thread.run_sync(recv_exactly, backend, 17) == b"early-up later-up"
        await trio.to_thread.run_sync(backend.sendall, b"later-down")
        assert await trio.to_thread.run_sync(recv_exactly, client, 21) == b"early-down later-down"
        client.close()
        backend.close()

    run(test)


def test_half_close_is_passed_on_and_the_other_direction_keeps_flowing() -> None:
    async def test(h: Harness) -> None:
        client, backend, _ = h.tunnel()
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)  # FIN from the client
        got = await trio.to_thread.run_sync(lambda: recv_exactly(backend, 10) + backend.recv(10))
        assert got == b"last words"  # ...then EOF: the FIN was passed on
        assert not h.closed  # the tunnel stays up for the other direction
        await trio.to_thread.run_sync(backend.sendall, b"reply after FIN")
        assert await trio.to_thread.run_sync(recv_exactly, client, 15) == b"reply after FIN"
        backend.shutdown(socket.SHUT_WR)
        assert await trio.to_thread.run_sync(client.recv, 10) == b""
        assert await h.wait_closed() == [CLOSED]
        assert (h.stats().up.bytes, h.stats().down.bytes) == (10, 15)
        client.close()
        backend.close()

    run(test)


def _until_eof(s: socket.socket) -> bytes:
    data = bytearray()
    while chunk := s.recv(1 << 16):
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("size", [6, 8 << 20], ids=["fits", "parks"])
def test_bytes_with_the_fin_behind_them_all_arrive_then_the_fin(size: int) -> None:
    """A read that finds the peer's FIN behind its bytes (the compiled
    relay then reads the EOF at once and holds the bytes for its own FIN):
    whether they fit into the destination at once or must be parked, every
    byte arrives, in order, then the EOF; the other direction keeps flowing."""

    async def test(h: Harness) -> None:
        client, backend, _ = h.tunnel()
        payload = os.urandom(size)

        def send() -> None:
            client.sendall(payload, socket.MSG_MORE)  # the FIN in the last segment
            client.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, send)
            got = await trio.to_thread.run_sync(_until_eof, backend)
        assert got == payload
        assert not h.closed  # half closed: the backend may still answer
        await trio.to_thread.run_sync(backend.sendall, b"answer")
        backend.shutdown(socket.SHUT_WR)
        assert await trio.to_thread.run_sync(_until_eof, client) == b"answer"
        assert await h.wait_closed() == [CLOSED]
        assert (h.stats().up.bytes, h.stats().down.bytes) == (size, 6)
        client.close()
        backend.close()

    run(test)


def _abort(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.mark.parametrize("side", ["client", "backend"])
def test_reset_is_passed_on_as_a_reset(side: str) -> None:
    async def test(h: Harness) -> None:
        client, backend, _ = h.tunnel()
        aborting, other = (client, backend) if side == "client" else (backend, client)
        _abort(aborting)
        assert await h.wait_closed() == [CLIENT_RESET if side == "client" else BACKEND_RESET]
        with pytest.raises(ConnectionResetError):  # a reset, not a clean EOF
            await trio.to_thread.run_sync(other.recv, 10)
        other.close()

    run(test)


def test_slow_reader_parks_at_most_one_read_and_loses_nothing() -> None:
    total = 32 << 20

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()

        payload = os.urandom(1 << 20)
        sent = 0

        def flood() -> None:
            nonlocal sent
            backend.settimeout(0.5)
            try:
                while sent < total:
                    sent += backend.send(payload[: min(len(payload), total - sent)])
            except TimeoutError:
                pass  # the proxy stopped taking bytes: backpressure reached us

        await trio.to_thread.run_sync(flood)
        assert sent < total, "the backend was never held back"
        parked = h.view(t).parked[1]
        assert 0 < parked <= 65536  # and the source is paused while bytes are parked

        received = bytearray()

        def drain() -> None:
            while len(received) < total:
                received.extend(client.recv(1 << 20))

        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, drain)
            backend.settimeout(10)
            rest = total - sent
            chunks = [payload[: min(len(payload), rest - i)] for i in range(0, rest, len(payload))]
            for chunk in chunks:
                await trio.to_thread.run_sync(backend.sendall, chunk)
        assert len(received) == total
        h.engine.end(t)
        assert h.stats().down.bytes == total
        client.close()
        backend.close()

    run(test)


def test_a_tunnels_note_comes_back_and_tunnels_are_found_by_token() -> None:
    """The owner's note is kept with the tunnel and handed back at its end;
    ``tunnels(tokens)`` gives the tunnels whose token is one of those (by
    identity: equal tokens that are not the same object do not count)."""
    shared, other = ["placement"], ["placement"]  # equal, not the same

    async def test(h: Harness) -> None:
        pairs = [
            h.tunnel(token=shared, note=b"\x01\x02" * 10),
            h.tunnel(token=other, note=b"x"),
            h.tunnel(token=shared),
        ]
        ids = [t for _, _, t in pairs]
        assert sorted(t for t, _ in h.engine.tunnels([shared])) == sorted([ids[0], ids[2]])
        assert [t for t, _ in h.engine.tunnels([other])] == [ids[1]]
        assert h.engine.tunnels([]) == []
        assert h.view(ids[1]).note == b"x"
        sockets = [*tcp_pair(), *tcp_pair()]
        with pytest.raises(ValueError):  # refused: the descriptors stay the caller's
            h.engine.add(
                sockets[1].fileno(),
                sockets[3].fileno(),
                "t",
                b"",
                b"",
                PLAIN_PAIR,
                b"n" * (NOTE_BYTES + 1),
            )
        for s in sockets:
            s.close()
        for t in ids:
            h.engine.end(t)
        assert [stats.note for _, _, stats in h.closed] == [b"\x01\x02" * 10, b"x", b""]
        for client, backend, _ in pairs:
            client.close()
            backend.close()

    run(test)


# A summary form whose texts name their places: |0|, the timestamp, |1|, ...
_FORM = (*(b"|%d|" % i for i in range(13)), b"|13|\n")
_LINE = re.compile(rb"\|0\|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\|1\|(?P<rest>.*)\|13\|")


def test_ordinary_ends_may_come_in_summaries_and_every_end_is_told_once() -> None:
    """api.TunnelEngine.summarize: an engine may tell the ordinary ends of
    tunnels with a form together, per token, their access lines written
    from the form; every other end comes alone. Either way each end is
    told once with its outcome and figures (the Python engine tells each
    alone; the compiled one summarizes, and writes the lines in C)."""
    stream = io.StringIO()
    logs.configure("info", {}, stream=stream)
    note = pack_note("10.1.2.3", 5555, 6666)[0]
    forwarded = pack_note("10.1.2.3", 5555, 6666, "192.0.2.1")[0]
    unseen = pack_note(None, 5555, 6666)[0]

    async def test(h: Harness) -> None:
        h.engine.summarize((1.0, 60.0), (1002, 1007))
        ordinary = [h.tunnel(token="p", note=note, summary=_FORM) for _ in range(3)]
        silent = h.tunnel(token="q", note=note, summary=())  # no line for this one
        alone = [
            h.tunnel(token="p", note=forwarded, summary=_FORM),  # a forwarded address
            h.tunnel(token="p", note=unseen, summary=_FORM),  # the client's address elsewhere
            h.tunnel(token="p", note=note, summary=_FORM),  # a bad-stream Close
            h.tunnel(token="p", note=note),  # no form
        ]
        bad_close = close_frame(1002, b"", b"mask")
        await trio.to_thread.run_sync(alone[2][0].sendall, bad_close)
        assert await trio.to_thread.run_sync(recv_exactly, alone[2][1], len(bad_close))
        client, backend, _ = ordinary[0]
        message = b"\x82\x85\0\0\0\0hello"  # one masked frame (a zero mask)
        await trio.to_thread.run_sync(client.sendall, message)
        assert await trio.to_thread.run_sync(recv_exactly, backend, 11) == message
        _abort(ordinary[1][0])  # a client reset is ordinary too
        for client, backend, _ in [ordinary[0], ordinary[2], silent, *alone]:
            client.shutdown(socket.SHUT_WR)
            backend.shutdown(socket.SHUT_WR)
        with trio.fail_after(10):  # every end is told
            while h.ended() < 8:
                await trio.sleep(0.01)
        for client, backend, _ in [*ordinary, silent, *alone]:
            client.close()
            backend.close()

    h = run(test)
    everything = [(token, outcome, stats.up.bytes) for token, outcome, stats in h.closed]
    lines = [m["rest"] for m in _LINE.finditer(stream.getvalue().encode())]
    if current.name == "python":
        assert not h.summaries and not lines
        assert len(everything) == 8
        return
    assert sorted(everything) == [("p", CLOSED, 0)] * 3 + [("p", CLOSED, 8)]  # 1002, masked
    assert [s.note for _, _, s in h.closed if s.up.close_code == 1002] == [note]
    by_token: dict[str, list[int]] = {}
    for token, summary in h.summaries:
        totals = by_token.setdefault(token, [0] * (len(OUTCOMES) + 4))
        figures = [*summary.outcomes, summary.tunnels, summary.up_bytes, summary.down_bytes]
        for i, n in enumerate([*figures, sum(summary.seconds)]):
            totals[i] += n
        assert len(summary.seconds) == 3 and summary.seconds_sum >= 0
    outcomes = dict.fromkeys(OUTCOMES, 0)
    closed_p = [*outcomes.values()]
    closed_p[OUTCOMES.index(CLOSED)] = 2
    closed_p[OUTCOMES.index(CLIENT_RESET)] = 1
    closed_q = [*outcomes.values()]
    closed_q[OUTCOMES.index(CLOSED)] = 1
    assert by_token == {"p": [*closed_p, 3, 11, 0, 3], "q": [*closed_q, 1, 0, 0, 1]}
    # The three lines of "p" (none for "q"): client, ports, outcome, figures, codes.
    common = b"10.1.2.3|2|5555|3|6666|4|"
    assert sorted(line.rsplit(b"|12|", 1)[0] for line in lines) == [
        common + b"client_reset|5|0|6|0|7|0|8|0|9|null|10|null|11|failure",
        common + b"closed|5|0|6|0|7|0|8|0|9|null|10|null|11|success",
        common + b"closed|5|11|6|0|7|1|8|0|9|null|10|null|11|success",
    ]
    assert all(line.rsplit(b"|12|", 1)[1].isdigit() for line in lines)  # the duration in ns


def test_frames_are_tracked_per_direction() -> None:
    ping = bytes([0x89, 0x80]) + b"mask"  # masked, empty ping: not a message
    text = bytes([0x81, 0x82]) + b"\x00\x00\x00\x00" + b"hi"
    close = bytes([0x88, 0x82]) + b"\x00\x00\x00\x00" + struct.pack("!H", 4321)

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel(to_backend=text)
        await trio.to_thread.run_sync(client.sendall, ping + text + close)
        await trio.to_thread.run_sync(recv_exactly, backend, 2 * len(text) + len(ping) + len(close))
        assert h.view(t).at_boundary[0]
        h.engine.end(t)
        up, down = h.stats().up, h.stats().down
        assert (up.messages, up.close_code, up.close_order > 0) == (2, 4321, True)
        assert (down.messages, down.close_code, down.close_order) == (0, None, 0)
        client.close()
        backend.close()

    run(test)


def test_closing_the_engine_ends_every_tunnel() -> None:
    peers: list[Any] = []

    async def test(h: Harness) -> None:
        for _ in range(3):
            peers.append(h.tunnel())

    h = run(test)
    assert [o for _, o, _ in h.closed] == [STOPPED] * 3
    assert len(h.engine) == 0
    for client, backend, _ in peers:
        for s in (client, backend):
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()


def test_first_bytes_to_a_dead_backend_end_the_tunnel_once() -> None:
    async def test(h: Harness) -> None:
        client, a = tcp_pair()
        backend, b = tcp_pair()
        _abort(backend)  # the backend is gone before the engine takes over
        with trio.fail_after(5):
            while True:  # the proxy side sees the reset once it arrives
                try:
                    b.send(b"x")
                except OSError:
                    break
                await trio.sleep(0.01)
        h.engine.add(a.detach(), b.detach(), "info", b"to the backend", b"to the client")
        assert await h.wait_closed() == [BACKEND_RESET]
        assert len(h.engine) == 0
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(100)
        client.close()

    run(test)


# -- closing a tunnel the WebSocket way (drain) ------------------------------------

GOING_AWAY = close_frame(1001, b"going away")


def unmask(frame: bytes) -> tuple[int, bytes]:
    """(first byte, payload) of a masked frame with a short payload."""
    assert frame[1] & 0x80, "frames to the backend must be masked (RFC 6455 §5.3)"
    n = frame[1] & 0x7F
    key = frame[2:6]
    return frame[0], bytes(b ^ key[i % 4] for i, b in enumerate(frame[6 : 6 + n]))


def client_close() -> bytes:
    return close_frame(1001, b"", b"\x01\x02\x03\x04")


def test_begin_close_sends_close_both_ways_then_ends_on_the_answers() -> None:
    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        h.engine.begin_close(t, 1001, b"going away")
        got = await trio.to_thread.run_sync(recv_exactly, client, len(GOING_AWAY))
        assert got == GOING_AWAY
        to_backend = await trio.to_thread.run_sync(recv_exactly, backend, 6 + 12)
        assert unmask(to_backend) == (0x88, GOING_AWAY[2:])
        assert h.closed == []  # waiting for both answers
        await trio.to_thread.run_sync(client.sendall, client_close())
        await trio.to_thread.run_sync(backend.sendall, close_frame(1001))
        assert await h.wait_closed() == [DRAINED]
        assert (h.stats().up.close_code, h.stats().down.close_code) == (1001, 1001)
        for s in (client, backend):  # an orderly FIN, no reset
            assert s.recv(100) == b""
            s.close()

    run(test)


def test_close_waits_for_the_frame_in_progress_and_drops_what_follows() -> None:
    big = bytes([0x82, 126]) + (1000).to_bytes(2, "big") + b"x" * 1000
    later = bytes([0x81, 5]) + b"later"

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        await trio.to_thread.run_sync(backend.sendall, big[:300])
        await trio.to_thread.run_sync(recv_exactly, client, 300)
        h.engine.begin_close(t, 1001, b"going away")
        # The backend's frame is finished first; what comes after it is dropped.
        await trio.to_thread.run_sync(backend.sendall, big[300:] + later)
        expected = big[300:] + GOING_AWAY
        assert await trio.to_thread.run_sync(recv_exactly, client, len(expected)) == expected
        # A message the client sent meanwhile and its answer never reach the backend.
        message = bytes([0x81, 0x82]) + b"abcd" + bytes([ord("h") ^ 97, ord("i") ^ 98])
        await trio.to_thread.run_sync(client.sendall, message + client_close())
        to_backend = await trio.to_thread.run_sync(recv_exactly, backend, 6 + 12)
        assert unmask(to_backend)[1] == GOING_AWAY[2:]
        await trio.to_thread.run_sync(backend.sendall, close_frame(1001))
        assert await h.wait_closed() == [DRAINED]
        client.settimeout(2)
        assert client.recv(100) == b""  # nothing after our Close: not `later`
        assert backend.recv(100) == b""  # nor the client's message
        client.close()
        backend.close()

    run(test)


def test_a_peer_that_never_answers_is_ended_after_the_wait() -> None:
    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        answering, answering_backend, t2 = h.tunnel()
        h.engine.begin_close(t, 1001, b"going away", wait=0.2)
        h.engine.begin_close(t2, 1001, b"going away", wait=0.2)
        await trio.to_thread.run_sync(recv_exactly, client, len(GOING_AWAY))
        # t2's peers answer at once: it ends DRAINED, and its wait runs out
        # on nothing (its descriptors may already carry the next tunnel).
        await trio.to_thread.run_sync(recv_exactly, answering, len(GOING_AWAY))
        await trio.to_thread.run_sync(answering.sendall, client_close())
        await trio.to_thread.run_sync(answering_backend.sendall, close_frame(1001))
        assert await h.wait_closed() == [DRAINED]
        successor, successor_backend, t3 = h.tunnel()
        assert await h.wait_closed(2) == [DRAINED, STOPPED]  # t: nobody answered
        assert h.closed[1][0] == "token" and h.engine.alive(t3)
        for s in (client, backend, answering, answering_backend, successor, successor_backend):
            s.close()

    run(test)


def test_a_close_wave_goes_on_while_nothing_else_happens() -> None:
    """A wave set while the engine sleeps with no timer (no keepalive, no
    traffic) wakes it for its next tunnel: nobody answers the first Close,
    and still the second goes out at its time, and the wait ends both."""

    async def test(h: Harness) -> None:
        await trio.sleep(0.05)  # the engine is asleep, with nothing due
        tunnels = [h.tunnel() for _ in range(2)]
        h.engine.close_spread([t for _, _, t in tunnels], 0.3, 1001, b"going away", 0.5)
        second = tunnels[1][0]
        assert await trio.to_thread.run_sync(recv_exactly, second, len(GOING_AWAY)) == GOING_AWAY
        assert await h.wait_closed(2) == [STOPPED, STOPPED]  # their waits ran out
        for client, backend, _ in tunnels:
            client.close()
            backend.close()

    run(test)


def test_close_spread_closes_one_tunnel_at_once_and_the_rest_in_turn() -> None:
    async def test(h: Harness) -> None:
        tunnels = [h.tunnel() for _ in range(4)]
        ids = [t for _, _, t in tunnels]
        h.engine.close_spread(ids, 0.6, 1001, b"going away", None)
        assert [h.view(t).closing for t in ids] == [True, False, False, False]
        order = []
        for client, _, t in tunnels:  # they come in the order given
            await trio.to_thread.run_sync(recv_exactly, client, len(GOING_AWAY))
            order.append(t)
            assert all(h.view(x).closing for x in order)
        assert order == ids
        for client, backend, _ in tunnels:
            client.close()
            backend.close()

    run(test)


def test_a_peer_that_never_answers_is_ended_by_end() -> None:
    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        h.engine.begin_close(t, 1001, b"going away")
        await trio.to_thread.run_sync(recv_exactly, client, len(GOING_AWAY))
        h.engine.end(t)
        h.engine.end(t)  # once only
        assert await h.wait_closed() == [STOPPED]
        client.close()
        backend.close()

    run(test)


# -- the proxy's pings ---------------------------------------------------------------


def masked(opcode: int, payload: bytes, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + body


@pytest.mark.parametrize("bytewise", [False, True])
def test_our_pong_is_taken_out_of_the_stream_and_nothing_else(bytewise: bool) -> None:
    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        assert h.engine.ping(t)
        assert not h.engine.ping(t)  # one at a time
        ping = bytes([0x89, len(h.engine.ping_payload)]) + h.engine.ping_payload
        assert await trio.to_thread.run_sync(recv_exactly, client, len(ping)) == ping
        before = masked(0x1, b"before")
        theirs = masked(0xA, b"x" * len(h.engine.ping_payload))  # same length, not ours
        after = masked(0x2, b"after" * 40)
        stream = before + masked(0xA, h.engine.ping_payload) + theirs + after
        if bytewise:  # every frame cut everywhere: the held-back path
            for i in range(len(stream)):
                await trio.to_thread.run_sync(client.sendall, stream[i : i + 1])
                await trio.sleep(0.001)
        else:
            await trio.to_thread.run_sync(client.sendall, stream)
        expected = before + theirs + after
        assert await trio.to_thread.run_sync(recv_exactly, backend, len(expected)) == expected
        assert (h.view(t).ping, h.view(t).held) == ("none", 0)
        h.engine.end(t)
        assert h.stats().up.messages == 2
        client.close()
        backend.close()

    run(test)


def test_a_ping_waits_for_the_frame_in_progress() -> None:
    big = bytes([0x82, 126]) + (3000).to_bytes(2, "big") + b"y" * 3000

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        await trio.to_thread.run_sync(backend.sendall, big[:100])
        await trio.to_thread.run_sync(recv_exactly, client, 100)
        assert h.engine.ping(t)
        await trio.to_thread.run_sync(backend.sendall, big[100:] + bytes([0x81, 2]) + b"ok")
        ping = bytes([0x89, len(h.engine.ping_payload)]) + h.engine.ping_payload
        expected = big[100:] + ping + bytes([0x81, 2]) + b"ok"
        assert await trio.to_thread.run_sync(recv_exactly, client, len(expected)) == expected
        client.close()
        backend.close()

    run(test)


def test_a_ping_waits_for_the_client_to_finish_its_frame() -> None:
    """RFC 6455 §5.4 lets control frames come between frames, never inside
    one; a client that answers our Ping at once must not be asked while it
    is inside a frame of its own (Autobahn's client then writes its Pong
    into that frame, and the backend gets a corrupt stream)."""
    theirs = masked(0x1, b"z" * 100)
    echo = bytes([0x81, 4]) + b"echo"

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        await trio.to_thread.run_sync(client.sendall, theirs[:30])
        await trio.to_thread.run_sync(recv_exactly, backend, 30)
        assert h.engine.ping(t)
        assert h.view(t).ping == "due"  # due, not written
        assert not h.engine.ping(t)  # one at a time, even before it is written
        # The stream towards the client is between frames, yet no Ping: the
        # backend's message arrives alone.
        await trio.to_thread.run_sync(backend.sendall, echo)
        assert await trio.to_thread.run_sync(recv_exactly, client, len(echo)) == echo
        assert h.view(t).ping == "due"
        # The client's frame ends: now the Ping goes, and its timeout starts.
        await trio.to_thread.run_sync(client.sendall, theirs[30:])
        ping = bytes([0x89, len(h.engine.ping_payload)]) + h.engine.ping_payload
        assert await trio.to_thread.run_sync(recv_exactly, client, len(ping)) == ping
        assert await trio.to_thread.run_sync(recv_exactly, backend, len(theirs) - 30)
        assert h.view(t).ping == "sent"  # written: its timeout runs from now
        await trio.to_thread.run_sync(client.sendall, masked(0xA, h.engine.ping_payload))
        await trio.to_thread.run_sync(backend.sendall, echo)  # a round trip: Pong read
        await trio.to_thread.run_sync(recv_exactly, client, len(echo))
        await trio.to_thread.run_sync(client.sendall, theirs)
        assert await trio.to_thread.run_sync(recv_exactly, backend, len(theirs)) == theirs
        assert h.view(t).ping == "none"
        client.close()
        backend.close()

    run(test)


def test_a_ping_waits_for_both_directions_and_is_dropped_by_a_close() -> None:
    big = bytes([0x82, 126]) + (3000).to_bytes(2, "big") + b"y" * 3000
    theirs = masked(0x2, b"q" * 50)

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        await trio.to_thread.run_sync(client.sendall, theirs[:10])
        await trio.to_thread.run_sync(recv_exactly, backend, 10)
        await trio.to_thread.run_sync(backend.sendall, big[:100])
        await trio.to_thread.run_sync(recv_exactly, client, 100)
        assert h.engine.ping(t)
        # The backend's frame ends while the client is still inside its own:
        # no Ping yet.
        await trio.to_thread.run_sync(backend.sendall, big[100:] + big[:100])
        assert await trio.to_thread.run_sync(recv_exactly, client, len(big)) == (
            big[100:] + big[:100]
        )
        # The client's frame ends while the backend is inside its next one.
        await trio.to_thread.run_sync(client.sendall, theirs[10:])
        await trio.to_thread.run_sync(recv_exactly, backend, len(theirs) - 10)
        assert h.view(t).ping == "due"
        # A drain now: our Close takes the Ping's place, after the frame.
        h.engine.begin_close(t, 1001, b"going away")
        await trio.to_thread.run_sync(backend.sendall, big[100:])
        expected = big[100:] + GOING_AWAY
        assert await trio.to_thread.run_sync(recv_exactly, client, len(expected)) == expected
        assert h.view(t).ping == "none"  # never written
        client.close()
        backend.close()

    run(test)


@pytest.mark.python_engine_only
def test_a_bug_while_relaying_costs_one_tunnel_not_the_others() -> None:
    """Like the handshake engine, the relay contains an exception of its own
    to the tunnel it happened on: that one is reset both ways, the rest go on."""

    async def test(h: Harness) -> None:
        client, backend, t = h.tunnel()
        other_client, other_backend, _ = h.tunnel()
        inside = h.inside(t)
        inside.down.parked = 12345  # a state no code of ours makes
        h.engine._update(inside)  # now waits for the client to be writable: _flush fails
        assert await h.wait_closed() == [INTERNAL_ERROR]
        assert len(h.errors) == 1 and isinstance(h.errors[0], TypeError)
        with pytest.raises(ConnectionResetError):
            await trio.to_thread.run_sync(client.recv, 100)
        with pytest.raises(ConnectionResetError):
            await trio.to_thread.run_sync(backend.recv, 100)
        await trio.to_thread.run_sync(other_client.sendall, b"still relayed")
        assert await trio.to_thread.run_sync(recv_exactly, other_backend, 13) == b"still relayed"
        for s in (client, backend, other_client, other_backend):
            s.close()

    run(test)


@pytest.mark.python_engine_only
def test_a_bug_while_ending_a_broken_tunnel_still_closes_and_reports_it() -> None:
    """Containment's own fallback: the tunnel's end fails too (here its
    backend transport's close raises), and still both descriptors are
    closed and its owner hears of its end once."""

    class BrokenClose(PlainTransport):
        @staticmethod
        def close(fd: int) -> None:
            raise RuntimeError("a transport bug")

    async def test(h: Harness) -> None:
        before = len(os.listdir("/proc/self/fd"))
        client, backend, t = h.tunnel()
        inside = h.inside(t)
        inside.io = Transports(PLAIN, BrokenClose())
        inside.down.parked = 12345  # a state no code of ours makes
        h.engine._update(inside)
        assert await h.wait_closed() == [INTERNAL_ERROR]
        assert len(h.errors) == 1
        assert h.closed[0][0] == "token" and not h.engine.alive(t)
        with pytest.raises(ConnectionResetError):  # its fd was closed, after the reset
            await trio.to_thread.run_sync(backend.recv, 100)
        client.close()
        backend.close()
        assert len(os.listdir("/proc/self/fd")) == before  # nothing left open

    run(test)


def test_keepalive_ends_a_silent_client_and_keeps_one_that_sends() -> None:
    """The engine's own pings (interval 0.2 s, timeout 0.5 s): a client that
    sends nothing at all after a Ping is ended, outcome ping_timeout; one
    that does not answer but sends bytes (here: a long frame of its own,
    begun after the Ping came) is alive for as long as it sends."""
    keepalive = Keepalive(interval=0.2, timeout=0.5)
    payload = b"p" * 3000
    key = b"\x01\x02\x03\x04"
    big = bytes([0x82, 0x80 | 126]) + len(payload).to_bytes(2, "big") + key
    big += bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    async def test(h: Harness) -> None:
        silent_client, silent_backend, _ = h.tunnel()
        client, backend, t = h.tunnel()
        ping = bytes([0x89, len(h.engine.ping_payload)]) + h.engine.ping_payload
        assert await trio.to_thread.run_sync(recv_exactly, client, len(ping)) == ping
        # No Pong; instead a frame trickled over 1.5 s (three timeouts).
        for i in range(0, len(big), len(big) // 15 + 1):
            await trio.to_thread.run_sync(client.sendall, big[i : i + len(big) // 15 + 1])
            await trio.sleep(0.1)
        assert await trio.to_thread.run_sync(recv_exactly, backend, len(big)) == big
        assert await h.wait_closed() == [PING_TIMEOUT]  # the silent one, long ago
        assert h.engine.alive(t)
        await trio.to_thread.run_sync(client.sendall, masked(0xA, h.engine.ping_payload))
        h.engine.end(t)
        assert await h.wait_closed(2) == [PING_TIMEOUT, STOPPED]
        assert h.stats(0).duration < 0.2 + 0.5 + 0.5  # interval + timeout, with room
        for s in (silent_client, silent_backend, client, backend):
            s.close()

    run(test, keepalive)
