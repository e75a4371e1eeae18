"""The relay engine: every established tunnel of a worker in one epoll set.

After the 101, a tunnel is two connected TCP sockets and two byte streams.
Giving each tunnel two trio tasks costs about 11 KB of Python memory per idle
tunnel; this engine costs a few hundred bytes: one :class:`Tunnel` and two
:class:`Flow` objects (``__slots__``), two dict entries, and nothing else.
One receive buffer serves every tunnel of the worker.

Kernel semantics this relies on (Linux ``epoll(7)``, ``socket(7)``, ``tcp(7)``):

- The set is **level-triggered**: a readable socket is reported again on the
  next ``epoll_wait`` until drained, so one read per event per round is enough
  and a busy tunnel cannot starve the others (fairness by construction).
- ``EPOLLERR`` and ``EPOLLHUP`` are reported whether asked for or not. A
  socket whose reading is paused (backpressure) and whose peer has gone would
  be reported forever, so a descriptor with nothing to wait for is removed
  from the set entirely (``mask == 0``) and added back when it has.
- ``read`` returning 0 is the peer's FIN: the stream in that direction is over,
  and we pass it on with ``shutdown(SHUT_WR)`` on the other socket (TCP
  half-close, RFC 9293 §3.6). Every byte before it has been written already,
  since the source is not read while bytes are parked. The other
  direction keeps flowing. ``ECONNRESET`` is an abort: we pass it on as an
  abort too, by closing the other socket with ``SO_LINGER {1, 0}``, which
  sends RST instead of FIN.
- ``write`` on a non-blocking socket may take fewer bytes than offered when
  the socket's send buffer is full. The rest is *parked* on the flow (a bytes
  object of at most one read, 64 KiB) and the engine stops reading the source
  until the destination is writable again and the parked bytes are gone.
  Memory per tunnel is therefore bounded by two reads, whatever the peers do;
  the kernel's socket buffers provide the rest of the backpressure all the way
  back to the sender (TCP flow control).
- Python ignores SIGPIPE, so writing to a reset socket raises ``EPIPE``
  (or ``ECONNRESET``) instead of killing the process.
- trio waits on the epoll descriptor itself (``wait_readable`` on a nested
  epoll fd): trio's own epoll reports it readable when any of ours is ready.
  The sockets were detached from trio before they came here, and trio keeps
  no waiter on them.

Frames of the proxy's own go into the streams only at frame boundaries,
which each direction's frame tracker knows (a frame written into another
frame would corrupt the stream; control frames may come between the
fragments of a message, RFC 6455 §5.4): a Close when a tunnel is closed the
WebSocket way (:meth:`RelayEngine.begin_close`, for drains and backends that
went down) and a Ping to the client (:meth:`RelayEngine.ping`), whose Pong is
then looked for frame by frame in the client's stream and taken out of it.
A Ping waits until *both* directions are between frames: a client that
answers a Ping at once may not answer inside a frame of its own that it is
still sending, but some do (Autobahn's client wrote its Pong into its
unfinished frame, which corrupted the stream to the backend), and only the
proxy's Ping would have provoked it. The common path (no frame of ours
pending) is one read, one tracker feed and one write per event, as before.

Every read, write, half-close, abort and close goes through the tunnel's
transports (``engine/transport.py``, one per side); what the notes above say
of system calls is the plain transport's contract, which a TLS one keeps.

Resource handling: the engine owns the descriptors of every tunnel added to it
and closes both when the tunnel ends or the engine is closed. Error handling:
socket errors end only the tunnel they happen on; the engine never raises
them. An exception of ours while handling a tunnel's event (a bug) is
contained the same way: ``events.relay_error()`` reports it (inside the
``except``, so the trace can be logged) and that tunnel is reset both ways,
outcome INTERNAL_ERROR, while every other tunnel goes on.

Keepalive (engine/api.py's Keepalive): every client is pinged once per
interval, the round's pings spread evenly over it and sent in batches; a
written Ping is looked at again ``timeout`` later, and a client that sent no
byte at all since is ended, outcome PING_TIMEOUT (one that sent bytes is
looked at again a timeout later).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import time
from array import array
from collections.abc import Collection, Sequence
from typing import Any

from shardproxy.engine.api import (
    BACKEND_RESET,
    CLIENT_RESET,
    CLOSED,
    DRAINED,
    INTERNAL_ERROR,
    NOTE_BYTES,
    PING_TIMEOUT,
    STOPPED,
    FlowStats,
    Keepalive,
    TunnelEvents,
    TunnelStats,
    TunnelView,
)
from shardproxy.engine.loop import Closes, Spread, Timers, run_epoll
from shardproxy.engine.transport import PLAIN_PAIR, Transports
from shardproxy.protocol.frames import (
    PONG,
    FrameTracker,
    close_frame,
    peek_frame,
    ping_frame,
    unmasked_payload,
)

__all__ = [
    "BACKEND_RESET",
    "CLIENT_RESET",
    "CLOSED",
    "DRAINED",
    "INTERNAL_ERROR",
    "PING_TIMEOUT",
    "STOPPED",
    "RelayEngine",
]

BUFFER_SIZE = 65536
PING_BATCH = 0.01  # seconds: the pings of a round go out in batches at most this often
# A tunnel id is (how many tunnels its client descriptor has carried, this
# one included) << _FD_BITS | that descriptor: unique while the engine lives,
# and nothing per tunnel to store (the counts are one array per engine).
_FD_BITS = 32
_FD_MASK = (1 << _FD_BITS) - 1

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP

# Flow.state. A FIN is only ever read while nothing is parked (reading is
# paused otherwise), so it can be passed on at once: no "FIN pending" state.
OPEN = 0  # bytes may still come from the source
SHUT = 1  # the source sent FIN and it was passed on; this direction is over
CLOSING = 2  # our Close went to dst; bytes from src are tracked, not passed on

# Numbers the first Close of every direction in the order the worker saw
# them, so that a tunnel's two Closes can be told apart: who closed first.
_CLOSE_ORDER = itertools.count(1)


class Flow(FrameTracker):
    """One direction of a tunnel: bytes from ``src`` are written to ``dst``.

    It is the frame tracker of that direction too (frames, messages, the
    first Close code), so that a direction costs one object.
    """

    # (One more slot would not grow it: 14 slots and the GC header fill the
    # same 144-byte pymalloc block as 13 did.)
    __slots__ = ("close_order", "dst", "inject", "mask", "nbytes", "parked", "src", "state")

    def __init__(self, src: int, dst: int) -> None:
        super().__init__()
        self.src = src
        self.dst = dst
        self.parked: bytes | None = None  # written to dst when it becomes writable
        self.nbytes = 0
        self.state = OPEN
        self.mask = 0  # epoll interest currently registered for ``src``
        self.inject: bytes | None = None  # our Close for dst, at the next frame boundary
        self.close_order = 0  # see _CLOSE_ORDER; 0 until a Close went by

    def _close_seen(self) -> None:
        self.close_order = next(_CLOSE_ORDER)

    @property
    def reading(self) -> bool:
        return self.state != SHUT and self.parked is None


# Tunnel.ping_sent while our Ping waits for both directions to be between
# frames (not written yet, so no ping_timeout runs).
PING_DUE = -1.0


class Tunnel:
    """An established client⇄backend connection pair."""

    # (No start time: a float would be one more object per tunnel; the
    # engine keeps it per client descriptor, see RelayEngine._started.)
    __slots__ = ("closing", "down", "held", "io", "note", "ping_sent", "token", "up")

    def __init__(
        self, client_fd: int, backend_fd: int, token: Any, io: Transports, note: bytes
    ) -> None:
        self.up = Flow(client_fd, backend_fd)  # client → backend
        self.down = Flow(backend_fd, client_fd)  # backend → client
        self.io = io  # how each side's bytes move (PLAIN_PAIR: shared by every plain tunnel)
        self.token = token  # the worker's, handed back with the tunnel's end
        self.note = note  # the worker's too, in the TunnelStats
        self.closing = False  # the proxy is closing it (begin_close)
        # When our unanswered Ping was written (time.monotonic()); PING_DUE:
        # waiting for a frame boundary both ways; 0: none.
        self.ping_sent = 0.0
        self.held = b""  # client bytes kept back while looking for our Pong

    @property
    def client_fd(self) -> int:
        return self.up.src

    @property
    def backend_fd(self) -> int:
        return self.down.src


def _flow_stats(flow: Flow) -> FlowStats:
    return FlowStats(flow.nbytes, flow.messages, flow.close_code, flow.close_order, flow.error)


class RelayEngine:
    """Moves bytes for every tunnel of one worker from a single trio task:
    the Python implementation of :class:`~shardproxy.engine.api.TunnelEngine`.

    ``events`` hears of every tunnel that ended and of every bug contained;
    with ``keepalive.interval`` set, the engine pings every client once per
    interval, the pings of a round spread evenly over it, and ends a client
    silent for a whole ``keepalive.timeout`` after a Ping was written to it.
    """

    def __init__(
        self,
        events: TunnelEvents,
        keepalive: Keepalive | None = None,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self._epoll = select.epoll()
        self._tunnels: dict[int, Tunnel] = {}  # both descriptors of each tunnel
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._buffers = [self._buffer]  # os.readv's argument, built once
        self._events = events
        # Per descriptor: the tunnels it carried as a client (ids), and when
        # its tunnel started (arrays: 12 bytes per descriptor, no object per tunnel).
        self._uses = array("I")
        self._started = array("d")
        self._keepalive = keepalive or Keepalive()
        # The ping round: every tunnel once per interval, spread over it.
        self._round: Spread[Tunnel] = Spread([], -math.inf, self._keepalive.interval)
        # Closes spread over a span (drains, servers gone), and the
        # close_wait of every closing tunnel that has one.
        self._closes: Closes[Tunnel] = Closes()
        # Pokes the loop asleep without a timer when a close is set (loop.Sleep).
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._closes.sleep.poke = self._poke
        # Written Pings to check: (tunnel, when written, client bytes then).
        self._ping_checks: Timers[tuple[Tunnel, float, int]] = Timers()
        # Our Pings carry this payload; a client's Pong with it is ours to
        # take (RFC 6455 §5.5.3: a Pong echoes its Ping's payload), any
        # other Pong is the backend's business and passes.
        self.ping_payload = b"shardproxy:" + os.urandom(8).hex().encode()
        self._ping = ping_frame(self.ping_payload)

    def __len__(self) -> int:
        return len(self._tunnels) // 2

    def tunnels(self, tokens: Collection[Any] | None = None) -> list[tuple[int, Any]]:
        """(id, token) of every open tunnel; with ``tokens``, of those whose
        token is one of them."""
        ids = None if tokens is None else {id(token) for token in tokens}
        return [
            (self._id(t), t.token)
            for fd, t in self._tunnels.items()
            if fd == t.client_fd and (ids is None or id(t.token) in ids)
        ]

    def _id(self, t: Tunnel) -> int:
        fd = t.up.src
        return self._uses[fd] << _FD_BITS | fd

    def _tunnel(self, tunnel: int) -> Tunnel | None:
        fd = tunnel & _FD_MASK
        t = self._tunnels.get(fd)
        if t is None or t.up.src != fd or self._uses[fd] != tunnel >> _FD_BITS:
            return None
        return t

    def summarize(self, bounds: tuple[float, ...], bad_codes: tuple[int, ...]) -> bool:
        """No: this engine tells every end alone (api.TunnelEngine.summarize),
        as a summary would cost the same Python here."""
        return False

    def add(
        self,
        client_fd: int,
        backend_fd: int,
        token: Any,
        to_backend: bytes,
        to_client: bytes,
        io: Transports = PLAIN_PAIR,
        note: bytes = b"",
        summary: tuple[bytes, ...] | None = None,
    ) -> int:
        """Take over two connected non-blocking sockets; the tunnel's id.

        ``to_backend``/``to_client`` are the tunnel's first bytes, which
        arrived together with the handshake heads; they are sent first.
        ``io``: the transports the handshake used on each side; ``note``:
        the owner's, handed back in the TunnelStats. ``summary``: unused
        (:meth:`summarize`).
        """
        if len(note) > NOTE_BYTES:
            raise ValueError(f"a tunnel's note holds at most {NOTE_BYTES} bytes")
        uses = self._uses
        if client_fd >= len(uses):
            more = client_fd + 1024 - len(uses)
            uses.extend([0] * more)
            self._started.extend([0.0] * more)
        uses[client_fd] += 1
        self._started[client_fd] = time.monotonic()
        t = Tunnel(client_fd, backend_fd, token, io, note)
        self._tunnels[client_fd] = t
        self._tunnels[backend_fd] = t
        for flow, first in ((t.up, to_backend), (t.down, to_client)):
            if first and client_fd in self._tunnels:  # a failed write ends the tunnel
                flow.feed(first)
                flow.nbytes += len(first)
                self._write(t, flow, first)
        tunnel = self._id(t)
        if client_fd in self._tunnels:
            self._update(t)
        return tunnel

    async def run(self) -> None:
        """Relay until cancelled (loop.run_epoll: one wakeup per quiet event)."""
        await run_epoll(
            self._epoll,
            self._dispatch,
            self._contain,
            self.process,
            self._next_wake,
            self._closes.sleep,
        )

    # -- keepalive -------------------------------------------------------------

    def process(self, now: float) -> None:
        """Timers: the pings of the round that fell due, the checks of
        written Pings, the closes of every wave that fell due, and the
        close_waits that ran out."""
        if self._keepalive.interval:
            self._ping_round(now)
        if self._closes:
            self._close_due(now)
        if not self._ping_checks.due(now):
            return
        timeout = self._keepalive.timeout
        for _, (t, sent, seen) in self._ping_checks.pop_due(now):
            if t.ping_sent != sent or not self._alive(t):  # answered, or ended
                continue
            if t.up.nbytes != seen:
                # The client sent bytes since: alive, though its Pong may not
                # come yet (inside a long frame of its own it may not answer,
                # RFC 6455 §5.4). Look again one timeout later.
                self._ping_checks.add(now + timeout, (t, sent, t.up.nbytes))
                continue
            self._finish(t, PING_TIMEOUT)

    def _ping_round(self, now: float) -> None:
        interval = self._keepalive.interval
        if now >= self._round.start + interval:
            tunnels = [t for fd, t in self._tunnels.items() if fd == t.client_fd]
            self._round = Spread(tunnels, now, interval)
        for t in self._round.pop_due(now):
            if self._alive(t):
                self._schedule_ping(t)

    def _close_due(self, now: float) -> None:
        for t, wave in self._closes.due_closes(now):
            if self._alive(t):
                self._begin_close(t, wave.code, wave.reason, wave.wait, now)
        for t in self._closes.due_waits(now):
            if self._alive(t):  # the peers did not finish the close handshake in time
                self._finish(t, STOPPED)

    def _next_wake(self, now: float) -> float | None:
        # Called once per loop round: the common case (no pings, no closes
        # under way) costs two checks.
        wake = self._ping_checks.next_due()
        if self._keepalive.interval:
            ping = self._round.next_due()
            if ping is None:
                ping = self._round.start + self._keepalive.interval  # the next round
            ping = max(ping, now + PING_BATCH)  # pings in batches, not a wakeup each
            wake = ping if wake is None else min(wake, ping)
        if self._closes:
            due = self._closes.next_due()
            if due is not None:
                wake = due if wake is None else min(wake, due)
        return wake

    # -- by tunnel id ------------------------------------------------------------

    def begin_close(self, tunnel: int, code: int, reason: bytes, wait: float | None = None) -> None:
        """Close the tunnel the WebSocket way (RFC 6455 §7): a Close frame with
        ``code`` to the client and one to the backend, each written at the
        next frame boundary of its direction (a frame in progress is finished
        first); from then on what either side sends is read and dropped,
        until its own Close (or FIN) comes; then both sockets are closed with
        a FIN, outcome DRAINED. A direction that already carries a Close, or
        whose destination was shut, gets none. A peer may never answer:
        ``wait`` seconds after the Close, the tunnel is ended anyway
        (outcome STOPPED); None: wait for as long as it takes (or
        :meth:`end`)."""
        t = self._tunnel(tunnel)
        if t is not None:
            self._begin_close(t, code, reason, wait, time.monotonic())

    def close_spread(
        self, tunnels: Sequence[int], span: float, code: int, reason: bytes, wait: float | None
    ) -> None:
        """:meth:`begin_close` each of ``tunnels`` in turn, evenly over
        ``span`` seconds (the first at once), so that their clients
        reconnect at a steady rate and not all at once."""
        alive = [t for t in map(self._tunnel, tunnels) if t is not None]
        if not alive:
            return
        now = time.monotonic()
        self._closes.spread(alive, now, span, code, reason, wait)
        self._close_due(now)

    def _begin_close(
        self, t: Tunnel, code: int, reason: bytes, wait: float | None, now: float
    ) -> None:
        if t.closing:
            return
        t.closing = True
        if wait is not None:
            self._closes.wait(now + wait, t)
        if t.ping_sent == PING_DUE:  # replaced by our Close below
            t.ping_sent = 0.0
            t.down.inject = None
        frames = (
            (t.down, close_frame(code, reason)),
            (t.up, close_frame(code, reason, os.urandom(4))),
        )
        for flow, frame in frames:
            if flow.state == SHUT or flow.close_code is not None:
                continue
            flow.inject = frame
            if flow.parked is None and flow.at_boundary:
                self._inject(t, flow)
                if not self._alive(t):
                    return
        self._check_closed(t)

    def ping(self, tunnel: int) -> bool:
        """Send the client a Ping as soon as both directions are between
        frames (at once, usually); its Pong is taken out of the stream to
        the backend. False (nothing done) while the last one is waiting or
        unanswered, or the tunnel is closing."""
        t = self._tunnel(tunnel)
        return t is not None and self._schedule_ping(t)

    def _schedule_ping(self, t: Tunnel) -> bool:
        if t.ping_sent or t.closing or t.down.state != OPEN:
            return False
        t.ping_sent = PING_DUE
        t.down.inject = self._ping  # free: only begin_close sets it otherwise
        if t.down.parked is None and self._may_inject(t, t.down):
            self._inject(t, t.down)
        return True

    def alive(self, tunnel: int) -> bool:
        return self._tunnel(tunnel) is not None

    def token(self, tunnel: int) -> Any:
        """The token the tunnel was added with; None once it ended."""
        t = self._tunnel(tunnel)
        return None if t is None else t.token

    def inspect(self, tunnel: int) -> TunnelView | None:
        t = self._tunnel(tunnel)
        if t is None:
            return None
        ping = "none" if not t.ping_sent else "due" if t.ping_sent == PING_DUE else "sent"
        return TunnelView(
            time.monotonic() - self._started[t.up.src],
            _flow_stats(t.up),
            _flow_stats(t.down),
            (len(t.up.parked or b""), len(t.down.parked or b"")),
            t.closing,
            ping,
            (t.up.at_boundary, t.down.at_boundary),
            len(t.held),
            t.note,
        )

    def end(self, tunnel: int, outcome: str = STOPPED) -> None:
        """Close the tunnel now, if it is still open."""
        t = self._tunnel(tunnel)
        if t is not None:
            self._finish(t, outcome)

    def close(self) -> None:
        """Close every tunnel's sockets and release the epoll set."""
        for t in [t for fd, t in self._tunnels.items() if fd == t.client_fd]:
            self._finish(t, STOPPED)
        self._epoll.close()
        os.close(self._wake_fd)

    def _alive(self, t: Tunnel) -> bool:
        return self._tunnels.get(t.up.src) is t

    def _contain(self, fd: int) -> None:
        """A bug of ours while handling ``fd`` costs its tunnel, never the
        worker's other tunnels: report it, then reset both sides (what was
        relayed may be cut anywhere)."""
        self._events.relay_error()
        t = self._tunnels.get(fd)
        if t is None:
            return
        try:
            self._finish(t, INTERNAL_ERROR)
        except Exception:  # the tunnel's state is broken: drop it by hand
            for fd in (t.up.src, t.down.src):
                if self._tunnels.get(fd) is t:
                    del self._tunnels[fd]
                # _finish may have closed it already; nothing was opened since
                # (one thread), so EBADF is the only other answer.
                with contextlib.suppress(OSError):
                    os.close(fd)
            # Its owner still hears of its end (its lease goes back), with
            # what can be trusted of its figures: none.
            empty = FlowStats(0, 0, None, 0, None)
            duration = time.monotonic() - self._started[t.up.src]
            stats = TunnelStats(empty, empty, duration, t.note)
            self._events.tunnel_closed(t.token, INTERNAL_ERROR, stats)

    # -- the per-event path -------------------------------------------------

    def _poke(self) -> None:
        os.eventfd_write(self._wake_fd, 1)

    def _dispatch(self, fd: int, ev: int) -> None:
        t = self._tunnels.get(fd)
        if t is None:  # ended earlier in this round, or the poke
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
            return
        src, into = (t.up, t.down) if fd == t.up.src else (t.down, t.up)
        # ``into`` is the flow whose destination is fd: flush what it parked.
        if into.parked is not None and ev & (_OUT | _ERR):
            self._flush(t, into)
            if fd not in self._tunnels:
                return
        if src.reading:
            if ev & (_IN | _ERR):
                self._pump(t, src)
        elif ev & select.EPOLLERR:
            # Paused or finished, and the socket failed: nothing more will
            # come from it, and nothing can be written to it.
            self._finish(t, CLIENT_RESET if src is t.up else BACKEND_RESET)

    def _pump(self, t: Tunnel, flow: Flow) -> None:
        """One read from the flow's source, written on to its destination."""
        try:
            n = (t.io.client if flow is t.up else t.io.backend).readv(flow.src, self._buffers)
        except BlockingIOError:
            return
        except OSError:
            self._finish(t, CLIENT_RESET if flow is t.up else BACKEND_RESET)
            return
        if n == 0:
            self._shut(t, flow)
            return
        chunk = self._view[:n]
        flow.nbytes += n
        if t.closing:
            self._pump_closing(t, flow, chunk)
        elif flow.inject is not None:
            self._pump_ping(t, flow, chunk)
        elif t.ping_sent and flow is t.up:
            if t.ping_sent == PING_DUE:
                self._pump_before_ping(t, flow, chunk)
            else:
                self._pump_pong(t, flow, chunk)
        else:
            flow.feed(chunk)
            self._write(t, flow, chunk)

    def _pump_ping(self, t: Tunnel, flow: Flow, chunk: memoryview) -> None:
        """Towards the client with our Ping waiting: the frame in progress
        first, then the Ping, then the rest. While the client is inside a
        frame of its own, the Ping waits for its end (:meth:`_pump_before_ping`)."""
        if not self._client_between_frames(t):
            flow.feed(chunk)
            self._write(t, flow, chunk)
            return
        k = self._write_to_boundary(t, flow, chunk)
        if k < 0:
            return
        if flow.parked is None:
            self._inject(t, flow)
            if not self._alive(t):
                return
        rest = chunk[k:]
        if rest:
            flow.feed(rest)
            self._send_more(t, flow, rest)

    def _pump_before_ping(self, t: Tunnel, flow: Flow, chunk: memoryview) -> None:
        """From the client while our Ping waits: if this read ends the
        client's frame, the Ping can go."""
        flow.feed(chunk)
        self._write(t, flow, chunk)
        down = t.down
        if self._alive(t) and down.parked is None and self._may_inject(t, down):
            self._inject(t, down)

    def _client_between_frames(self, t: Tunnel) -> bool:
        # t.held is the start of a client frame kept back while looking for
        # our Pong: the client is inside that frame.
        return t.up.at_boundary and not t.held

    def _may_inject(self, t: Tunnel, flow: Flow) -> bool:
        """Whether the frame waiting on ``flow`` may go now (nothing parked
        assumed): at a boundary of that direction, and a Ping only when the
        client is between frames too."""
        if not flow.at_boundary:
            return False
        return flow.inject is not self._ping or self._client_between_frames(t)

    def _pump_pong(self, t: Tunnel, flow: Flow, chunk: memoryview) -> None:
        """From the client while our Ping is unanswered: frame by frame,
        everything passes except the Pong that answers it. A frame whose
        header, or a Pong whose payload, is not all there yet is kept back
        (at most 139 bytes) until the next read completes it."""
        data: bytes | memoryview = chunk
        if t.held:
            data, t.held = t.held + bytes(chunk), b""
        n, pos, start = len(data), 0, 0
        ours = self.ping_payload
        while pos < n:
            if not flow.at_boundary:
                k = flow.feed_to_boundary(data[pos:])
                pos = n if k < 0 else pos + k
                continue
            frame = peek_frame(data, pos)
            if frame is None:  # a header cut short: wait for the rest
                t.held = bytes(data[pos:])
                n = pos
                break
            opcode, header, length = frame
            end = pos + header + length
            if opcode == PONG and length == len(ours):
                if end > n:  # perhaps ours: wait for its payload
                    t.held = bytes(data[pos:])
                    n = pos
                    break
                if unmasked_payload(data, pos, header, length) == ours:
                    self._send_more(t, flow, data[start:pos])
                    flow.feed(data[pos:end])  # counted, not passed on
                    t.ping_sent = 0.0
                    flow.feed(data[end:])
                    start = end
                    break
            flow.feed(data[pos : min(end, n)])
            pos = min(end, n)
        if self._alive(t) and n > start:
            self._send_more(t, flow, data[start:n])

    def _send_more(self, t: Tunnel, flow: Flow, data: bytes | memoryview) -> None:
        """Write ``data`` after what is parked, if anything is."""
        if not data:
            return
        if flow.parked is not None:
            flow.parked += bytes(data)
        else:
            self._write(t, flow, data)

    def _pump_closing(self, t: Tunnel, flow: Flow, chunk: memoryview) -> None:
        """A read from a tunnel being closed: pass bytes on up to the end of
        the frame in progress, then our Close; after it, drop them (counting
        frames still, to see the peer's Close)."""
        if flow.state == CLOSING:
            flow.feed(chunk)
        elif flow.inject is None:  # no Close of ours for this direction
            flow.feed(chunk)
            self._write(t, flow, chunk)
            return
        else:
            k = self._write_to_boundary(t, flow, chunk)
            if k < 0:
                return
            flow.feed(chunk[k:])  # the dropped rest
            if flow.parked is None:
                self._inject(t, flow)
                if not self._alive(t):
                    return
            else:
                flow.state = CLOSING  # _flush writes our Close after the parked bytes
        self._check_closed(t)

    def _write_to_boundary(self, t: Tunnel, flow: Flow, chunk: memoryview) -> int:
        """Pass ``chunk`` on up to the end of the frame in progress. Returns
        where in ``chunk`` that frame ended, or -1: no frame ends in it (all
        of it was passed on), or the tunnel ended."""
        k = flow.feed_to_boundary(chunk)
        if k < 0:
            self._write(t, flow, chunk)
            return -1
        if k:
            self._write(t, flow, chunk[:k])
            if not self._alive(t):
                return -1
        return k

    def _inject(self, t: Tunnel, flow: Flow) -> None:
        frame = flow.inject
        assert frame is not None
        flow.inject = None
        if frame is self._ping:
            # ping_timeout counts from now, not from when the Ping was due.
            now = t.ping_sent = time.monotonic()
            self._ping_checks.add(now + self._keepalive.timeout, (t, now, t.up.nbytes))
            self._write(t, flow, frame)
            return
        flow.state = CLOSING  # a Close: nothing is passed on after it
        self._write(t, flow, frame)

    def _check_closed(self, t: Tunnel) -> None:
        """A closing tunnel is done when our Close went out whole each way
        and each side answered with its Close or a FIN."""
        for flow in (t.up, t.down):
            if flow.inject is not None or flow.parked is not None:
                return
            if flow.state != SHUT and flow.close_code is None:
                return
        self._finish(t, DRAINED)

    def _write(self, t: Tunnel, flow: Flow, data: bytes | memoryview) -> None:
        try:
            written = (t.io.backend if flow is t.up else t.io.client).write(flow.dst, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self._finish(t, BACKEND_RESET if flow is t.up else CLIENT_RESET)
            return
        if written < len(data):
            flow.parked = bytes(data[written:])
            self._update(t)

    def _flush(self, t: Tunnel, flow: Flow) -> None:
        parked = flow.parked
        assert parked is not None
        flow.parked = None
        self._write(t, flow, parked)
        if flow.parked is not None or not self._alive(t):
            return
        if flow.inject is not None and (flow.state == CLOSING or self._may_inject(t, flow)):
            self._inject(t, flow)
            if not self._alive(t):
                return
        if t.closing:
            self._check_closed(t)
            if not self._alive(t):
                return
        self._update(t)

    def _shut(self, t: Tunnel, flow: Flow) -> None:
        """Pass the source's FIN on to the destination."""
        flow.state = SHUT
        flow.inject = None  # its destination is being closed: no frame of ours to write
        if flow is t.down and t.ping_sent == PING_DUE:
            t.ping_sent = 0.0
        if t.held and flow is t.up:  # an unfinished frame: the client's last bytes
            held, t.held = t.held, b""
            self._send_more(t, flow, held)
        try:
            (t.io.backend if flow is t.up else t.io.client).shutdown_write(flow.dst)
        except OSError:
            pass  # the destination is gone; its own events will end the tunnel
        if t.up.state == SHUT and t.down.state == SHUT:
            self._finish(t, DRAINED if t.closing else CLOSED)
        elif t.closing:
            self._check_closed(t)
            if self._alive(t):
                self._update(t)
        else:
            self._update(t)

    # -- registration -------------------------------------------------------

    def _update(self, t: Tunnel) -> None:
        """Register what each descriptor waits for now (see the module notes
        for why a descriptor waiting for nothing leaves the set)."""
        for src, other in ((t.up, t.down), (t.down, t.up)):
            mask = (_IN if src.reading else 0) | (_OUT if other.parked is not None else 0)
            if mask == src.mask:
                continue
            if src.mask == 0:
                self._epoll.register(src.src, mask)
            elif mask == 0:
                self._epoll.unregister(src.src)
            else:
                self._epoll.modify(src.src, mask)
            src.mask = mask

    def _finish(self, t: Tunnel, outcome: str) -> None:
        """Close both sockets; an abort is passed on as an abort. (No
        EPOLL_CTL_DEL first: closing a descriptor nobody else holds removes
        it from every epoll set, epoll(7) Q6.)"""
        for flow in (t.up, t.down):
            del self._tunnels[flow.src]
            flow.mask = 0
        io = t.io
        if outcome == CLIENT_RESET:
            io.backend.reset(t.backend_fd)
        elif outcome == BACKEND_RESET:
            io.client.reset(t.client_fd)
        elif outcome == INTERNAL_ERROR:
            io.client.reset(t.client_fd)
            io.backend.reset(t.backend_fd)
        io.client.close(t.client_fd)
        io.backend.close(t.backend_fd)
        duration = time.monotonic() - self._started[t.up.src]
        # A TLS client's record (engine/tls.py's TlsConnection.tls_info); None: plain.
        tls = getattr(io.client, "tls_info", None)
        stats = TunnelStats(_flow_stats(t.up), _flow_stats(t.down), duration, t.note, tls)
        self._events.tunnel_closed(t.token, outcome, stats)
