"""The compiled relay: :class:`CompiledRelayEngine`, a
:class:`~shardproxy.engine.api.TunnelEngine` over the C core in
``engine/_cengine.c`` (``Relay``).

The C core does the per-event work of ``engine/relay.py`` with the same
semantics (reads, writes, parking, frame tracking, Close and Ping injection
at frame boundaries, our Pong taken out, FIN and RST passed on, the
keepalive's pings and checks); each tunnel is a C struct. Where trio's
internals are as known, the relay's loop waits in C with trio's epoll set
inside its own, and yields to trio only when trio has something to do
(engine/trio_host.py); elsewhere it waits inside trio. This module keeps
what is rare and what needs Python: that loop, the Close
frames' construction, close waves and their waits (loop.Closes), and the
hand-over of ended tunnels to :class:`~shardproxy.engine.api.TunnelEvents`,
which the core records during a call and this module delivers after it, in
a batch. The ordinary ends of tunnels added with a summary form
(api.TunnelEngine.summarize) the core counts per token instead, and
writes their access lines from the form in C: those ends cost no Python
call each (a handshake's tunnel-closed event was 5 to 7 µs of Python).

Transports: the core moves bytes with the system calls themselves, so it
takes the tunnels whose two sides are plain TCP (``PLAIN_PAIR``); a tunnel
with any other transport goes to a Python :class:`RelayEngine` inside this
one, and its id carries :data:`_PYTHON_ID` so that the two id spaces never
meet. Both run in the same trio task's nursery.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from shardproxy.engine.api import (
    OUTCOMES,
    PING_STATES,
    STOPPED,
    EndSummary,
    FlowStats,
    Keepalive,
    TunnelEvents,
    TunnelStats,
    TunnelView,
)
from shardproxy.engine.choice import COMPILED
from shardproxy.engine.loop import BUSY_ROUND, Closes
from shardproxy.engine.relay import RelayEngine
from shardproxy.engine.transport import PLAIN_PAIR, Transports
from shardproxy.engine.trio_host import TrioLoop
from shardproxy.protocol.frames import close_frame
from shardproxy.telemetry import logs

if TYPE_CHECKING:
    from shardproxy.engine._cengine import Relay

_OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}
# Ids of the tunnels of the Python engine inside (the core's ids stay below 2**63).
_PYTHON_ID = 1 << 63


class SharedSet(Protocol):
    """An engine whose descriptors are in this relay's epoll set
    (:meth:`CompiledRelayEngine.attach`: the compiled handshake engine):
    the relay's loop polls for it and runs its timers."""

    @property
    def core(self) -> Any: ...  # the C object Relay.attach takes

    def deliver(self) -> None:
        """Act on what the last poll recorded."""

    def process(self, now: float) -> None: ...

    def next_wake(self) -> float | None: ...


class CompiledRelayEngine:
    """The relay engine of one worker, compiled: the same contract as
    :class:`~shardproxy.engine.relay.RelayEngine` (see engine/api.py)."""

    def __init__(self, events: TunnelEvents, keepalive: Keepalive | None = None) -> None:
        if COMPILED is None:
            raise RuntimeError("the compiled engine was not built (engine/choice.py)")
        self._events = events
        keepalive = keepalive or Keepalive()
        self.ping_payload = b"shardproxy:" + os.urandom(8).hex().encode()
        self._core: Relay = COMPILED.Relay(
            OUTCOMES, keepalive.interval, keepalive.timeout, self.ping_payload
        )
        self._python = RelayEngine(events, keepalive)  # for transports other than plain
        self._closes: Closes[int] = Closes()
        self._closes.sleep.poke = self._core.poke  # wakes a sleep with no timer (loop.Sleep)
        self._internal_errors = 0
        self._shared: SharedSet | None = None
        self.hosting = False  # the loop waits in C, trio's set inside the core's

    def attach(self, other: SharedSet) -> None:
        """``other`` registers its descriptors in this relay's epoll set
        (made with :meth:`epoll_fd`): one set and one loop for the worker,
        so a round serves handshakes and tunnels alike."""
        self._core.attach(other.core)
        self._shared = other

    def epoll_fd(self) -> int:
        return int(self._core.fileno())

    def __len__(self) -> int:
        return len(self._core) + len(self._python)

    # -- the TunnelEngine interface ------------------------------------------

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
        if io is not PLAIN_PAIR:
            tunnel = self._python.add(client_fd, backend_fd, token, to_backend, to_client, io, note)
            return tunnel | _PYTHON_ID
        try:
            return int(
                self._core.add(client_fd, backend_fd, token, to_backend, to_client, note, summary)
            )
        finally:
            self._deliver()

    def summarize(self, bounds: tuple[float, ...], bad_codes: tuple[int, ...]) -> bool:
        """The core summarizes (api.TunnelEngine.summarize): ends that
        cost no Python call each, and access lines written in C
        (_cengine.c's sp_ends); the Python engine inside, for other
        transports, tells each end alone."""
        self._core.summarize(bounds, bad_codes)
        return True

    def begin_close(self, tunnel: int, code: int, reason: bytes, wait: float | None = None) -> None:
        if tunnel & _PYTHON_ID:
            self._python.begin_close(tunnel ^ _PYTHON_ID, code, reason, wait)
            return
        self._begin_close(tunnel, code, reason, wait, time.monotonic())

    def _begin_close(
        self, tunnel: int, code: int, reason: bytes, wait: float | None, now: float
    ) -> None:
        alive, closing = self._core.state(tunnel)
        if not alive or closing:
            return
        to_client = close_frame(code, reason)
        to_backend = close_frame(code, reason, os.urandom(4))
        try:
            self._core.begin_close(tunnel, to_client, to_backend)
        finally:
            self._deliver()
        if wait is not None and self._core.state(tunnel)[0]:
            self._closes.wait(now + wait, tunnel)

    def close_spread(
        self, tunnels: Sequence[int], span: float, code: int, reason: bytes, wait: float | None
    ) -> None:
        ours = [t for t in tunnels if not t & _PYTHON_ID and self._core.state(t)[0]]
        theirs = [t ^ _PYTHON_ID for t in tunnels if t & _PYTHON_ID]
        if theirs:
            self._python.close_spread(theirs, span, code, reason, wait)
        if ours:
            now = time.monotonic()
            self._closes.spread(ours, now, span, code, reason, wait)
            self._close_due(now)

    def ping(self, tunnel: int) -> bool:
        if tunnel & _PYTHON_ID:
            return self._python.ping(tunnel ^ _PYTHON_ID)
        try:
            return bool(self._core.ping(tunnel))
        finally:
            self._deliver()

    def end(self, tunnel: int, outcome: str = STOPPED) -> None:
        if tunnel & _PYTHON_ID:
            self._python.end(tunnel ^ _PYTHON_ID, outcome)
            return
        try:
            self._core.end(tunnel, _OUTCOME_INDEX[outcome])
        finally:
            self._deliver()

    def alive(self, tunnel: int) -> bool:
        if tunnel & _PYTHON_ID:
            return self._python.alive(tunnel ^ _PYTHON_ID)
        return bool(self._core.state(tunnel)[0])

    def token(self, tunnel: int) -> Any:
        if tunnel & _PYTHON_ID:
            return self._python.token(tunnel ^ _PYTHON_ID)
        return self._core.token(tunnel)

    def inspect(self, tunnel: int) -> TunnelView | None:
        if tunnel & _PYTHON_ID:
            return self._python.inspect(tunnel ^ _PYTHON_ID)
        seen = self._core.inspect(tunnel)
        if seen is None:
            return None
        seconds, up, down, parked_up, parked_down, closing, ping, up_at, down_at, held, note = seen
        return TunnelView(
            seconds,
            FlowStats(*up),
            FlowStats(*down),
            (parked_up, parked_down),
            bool(closing),
            PING_STATES[ping],
            (bool(up_at), bool(down_at)),
            held,
            note,
        )

    def tunnels(self, tokens: Collection[Any] | None = None) -> list[tuple[int, Any]]:
        wanted = None if tokens is None else tuple(tokens)
        theirs = [(t | _PYTHON_ID, token) for t, token in self._python.tunnels(wanted)]
        return self._core.tunnels(wanted) + theirs

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._python.run)
            await self._run()

    def close(self) -> None:
        try:
            self._core.close()
        finally:
            self._deliver()
            self._python.close()

    # -- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        trio_loop = TrioLoop.current()
        if trio_loop is not None:
            async with trio_loop:
                await self._run_hosting(trio_loop)  # returns if trio must see the task blocked
        await self._run_in_trio()

    async def _run_hosting(self, trio_loop: TrioLoop) -> None:
        """The loop, waiting in C with trio's epoll set inside the core's
        (engine/trio_host.py says why and how): ``Relay.serve`` serves
        rounds until a tunnel ended, a handshake has an event, a timer is
        due or trio has I/O; the task yields to trio only when trio has
        something to do (I/O, a deadline, a runnable task)."""
        core = self._core
        core.host(trio_loop.fd)
        self.hosting = True
        try:
            while not trio_loop.watched():
                now = time.monotonic()
                wake = self._next_wake(now)
                theirs = None
                try:
                    if trio_loop.runnable():
                        core.poll()
                        to_trio = True
                    else:
                        theirs = trio_loop.next_deadline(now)
                        sooner = theirs is not None and (wake is None or theirs < wake)
                        core.wake_at(theirs if sooner else wake)
                        to_trio = core.serve()
                finally:
                    with logs.batched:  # the round's access events in one write
                        self._deliver_all()
                now = time.monotonic()
                if wake is not None and now >= wake:
                    self.process(now)
                if to_trio or (theirs is not None and now >= theirs) or trio_loop.runnable():
                    await trio.lowlevel.checkpoint()
        finally:
            self.hosting = False
            core.unhost()

    async def _run_in_trio(self) -> None:
        """loop.run_epoll's rhythm: sleep in trio until the core's epoll set
        is readable, then poll rounds until one is quiet. The core's timer
        descriptor (``Relay.wake_at``) makes the set readable when the next
        timer is due, so the sleep is always a bare ``wait_readable``: no
        cancel scope, which would double what a wake-up costs. A timer that
        another task sets meanwhile pokes the set (loop.Sleep)."""
        core = self._core
        epoll_fd = core.fileno()
        sleep = self._closes.sleep
        wait_readable = trio.lowlevel.wait_readable
        while True:
            wake = self._next_wake(time.monotonic())
            core.wake_at(wake)
            sleep.bare = True
            await wait_readable(epoll_fd)
            sleep.bare = False
            wake = self._sooner_close(wake)  # one set while asleep
            while True:
                try:
                    handled = core.poll()
                finally:
                    with logs.batched:
                        self._deliver_all()
                # Timers only once due: a timer set during this round (a
                # Ping's check) is due later than ``wake`` anyway. Not so
                # the shared engine's: every round arms handshake deadlines,
                # and a loop that stays busy must still see them fall due.
                now = time.monotonic()
                if self._shared is not None:
                    theirs = self._shared.next_wake()
                    if theirs is not None and (wake is None or theirs < wake):
                        wake = theirs
                if wake is not None and now >= wake:
                    self.process(now)
                    wake = self._next_wake(now)
                if handled < BUSY_ROUND:
                    break
                await trio.lowlevel.checkpoint()
                wake = self._sooner_close(wake)  # one set meanwhile

    def process(self, now: float) -> None:
        """The timers: the keepalive's (in the core), the close waves that
        fell due and the close waits that ran out."""
        try:
            self._core.process(now)
        finally:
            self._deliver()
        if self._closes:
            self._close_due(now)
        if self._shared is not None:
            self._shared.process(now)

    def _close_due(self, now: float) -> None:
        for tunnel, wave in self._closes.due_closes(now):
            self._begin_close(tunnel, wave.code, wave.reason, wave.wait, now)
        for tunnel in self._closes.due_waits(now):
            if self._core.state(tunnel)[0]:  # the peers did not finish the close handshake in time
                self.end(tunnel, STOPPED)

    def _sooner_close(self, wake: float | None) -> float | None:
        """``wake``, or the next close's time if that is sooner (``wake``
        itself is not computed again: the core's keepalive wake is never
        sooner than a batch from now, so recomputing it on waking would
        put it off for ever)."""
        due = self._closes.next_due() if self._closes else None
        if due is None:
            return wake
        return due if wake is None else min(wake, due)

    def _next_wake(self, now: float) -> float | None:
        wake: float | None = self._core.next_wake(now)
        if self._shared is not None:
            theirs = self._shared.next_wake()
            if theirs is not None:
                wake = theirs if wake is None else min(wake, theirs)
        if self._closes:
            due = self._closes.next_due()
            if due is not None:
                wake = due if wake is None else min(wake, due)
        return wake

    def _deliver_all(self) -> None:
        """The ended tunnels, then the shared engine's events (both return
        at once when there is nothing)."""
        self._deliver()
        if self._shared is not None:
            self._shared.deliver()

    def _deliver(self) -> None:
        """Hand the tunnels that ended during the last call to the events,
        and report an allocation that failed as a contained bug."""
        core = self._core
        if not core.ended:
            return
        errors = core.internal_errors
        if errors != self._internal_errors:
            self._internal_errors = errors
            try:
                raise MemoryError("the compiled relay could not allocate for a tunnel")
            except MemoryError:
                self._events.relay_error()
        events = self._events
        while core.ended:
            # The summarized ends' lines first: they ended before the
            # events below were called.
            for chunk in core.take_lines():
                logs.write_line(chunk)
            for token, *figures in core.take_summaries():
                events.tunnels_closed(token, EndSummary._make(figures))
            for token, outcome, up, down, duration, note in core.take_closed():
                stats = TunnelStats(FlowStats(*up), FlowStats(*down), duration, note)
                events.tunnel_closed(token, outcome, stats)
            # and again for those the events' calls ended
