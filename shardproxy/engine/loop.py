"""The one loop and the timer structures both engines run on.

An engine is an epoll set plus timers on one clock (``time.monotonic``,
passed in as ``now``). :func:`run_epoll` drives it from a single trio task:
it sleeps in trio until the epoll descriptor is readable (trio's own epoll
reports a nested epoll fd readable when any of its descriptors is ready) or
the engine's next timer is due (:class:`Timers`, items at given times, and
:class:`Spread`, items evenly over a span; :class:`Closes`, a relay's
WebSocket closes under way), then takes what is ready, events before
timers (a worker that is behind must not time out a read whose event is
already waiting), and keeps polling with a plain checkpoint between busy
rounds (no re-arming of trio's wait, one syscall fewer per round); after a
quiet round it sleeps again, so a single event costs one wakeup.

Error handling: an exception while dispatching one descriptor's event is a
bug of ours; ``contain(fd)`` is called inside the ``except`` (so the trace
can be logged) and must end only what that descriptor belongs to.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from shardproxy.telemetry import logs

MAX_EVENTS = 1024
BUSY_ROUND = 8  # events in a round that make the next one a poll, not a sleep

T = TypeVar("T")


class Timers(Generic[T]):
    """Items due at given times: a heap, in time order (ties in the order
    added). An item cannot be cancelled: whoever takes it checks whether it
    still stands (and :meth:`compact` drops those that do not, when they
    pile up)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, item: T) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), item))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> bool:
        """Whether anything is due at ``now`` (cheaper than starting :meth:`pop_due`)."""
        return bool(self._heap) and self._heap[0][0] <= now

    def pop_due(self, now: float) -> Iterator[tuple[float, T]]:
        """(when, item) of every item due at ``now``, earliest first; items
        added meanwhile for ``now`` or before come too."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, item = heapq.heappop(heap)
            yield when, item

    def compact(self, keep: Callable[[float, T], bool]) -> None:
        self._heap = [e for e in self._heap if keep(e[0], e[2])]
        heapq.heapify(self._heap)


class Spread(Generic[T]):
    """Items to act on evenly over ``span`` seconds from ``start``: the
    i-th of n is due at ``start + span * i / n`` (the first at once), so
    that what they cause (clients reconnecting after a Close, Pongs coming
    back) comes at a steady rate rather than all at once. Held as one list
    and a position, not as n timers."""

    __slots__ = ("_items", "_next", "span", "start")

    def __init__(self, items: Sequence[T], start: float, span: float) -> None:
        self._items = items
        self.start = start
        self.span = span
        self._next = 0

    @property
    def done(self) -> bool:
        return self._next >= len(self._items)

    def next_due(self) -> float | None:
        """When the next item is due; None once every one was taken."""
        n = len(self._items)
        return None if self._next >= n else self.start + self.span * self._next / n

    def pop_due(self, now: float) -> Iterator[T]:
        items, n = self._items, len(self._items)
        while self._next < n and self.start + self.span * self._next / n <= now:
            item = items[self._next]
            self._next += 1
            yield item


class Sleep:
    """A loop's sleep until its descriptor is readable or its next timer is
    due, which a timer set meanwhile by another task (a drain's close wave,
    a close's wait) brings forward with :meth:`wake_by`: without it the
    loop would sleep past that timer until some descriptor woke it.

    A sleep with a timer is a cancel scope whose deadline can be brought
    forward. A sleep without one has no scope (a scope doubles what a trio
    wakeup costs, and most rounds have no timer): ``poke``, the engine's,
    makes its descriptor readable instead (an eventfd in its epoll set),
    and the loop looks at its timers again."""

    __slots__ = ("_scope", "bare", "poke")

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        # Asleep without a timer: the loops set it around their bare wait
        # themselves (no coroutine call on that path, the common one; left
        # True by a cancellation, it costs one needless poke at most).
        self.bare = False
        self.poke: Callable[[], None] | None = None

    async def until(self, fd: int, wake: float) -> None:
        """Until ``fd`` is readable or ``wake`` (time.monotonic())."""
        deadline = trio.current_time() + max(0.0, wake - time.monotonic())
        with trio.move_on_at(deadline) as scope:
            self._scope = scope
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                self._scope = None

    def wake_by(self, when: float) -> None:
        """Wake the sleeping loop at ``when`` (time.monotonic()) at the latest."""
        scope = self._scope
        if scope is not None:
            deadline = trio.current_time() + max(0.0, when - time.monotonic())
            scope.deadline = min(scope.deadline, deadline)
        elif self.bare and self.poke is not None:
            self.poke()


async def run_epoll(
    epoll: select.epoll,
    dispatch: Callable[[int, int], None],
    contain: Callable[[int], None],
    process: Callable[[float], None],
    next_wake: Callable[[float], float | None],
    sleep: Sleep | None = None,
) -> None:
    """Serve ``epoll`` until cancelled: ``dispatch(fd, events)`` per ready
    descriptor, ``process(now)`` after each round (timers), sleeping until
    ``next_wake(now)`` (None: until an event; ``sleep``: a Sleep that other
    tasks may wake earlier)."""
    poll = epoll.poll
    epoll_fd = epoll.fileno()
    sleep = sleep or Sleep()
    wait_readable = trio.lowlevel.wait_readable
    while True:
        wake = next_wake(time.monotonic())
        if wake is None:
            sleep.bare = True
            await wait_readable(epoll_fd)
            sleep.bare = False
        else:
            await sleep.until(epoll_fd, wake)
        while True:
            events = poll(0, MAX_EVENTS)
            with logs.batched:  # the round's events in one write
                for fd, ev in events:
                    try:
                        dispatch(fd, ev)
                    except Exception:
                        contain(fd)
                process(time.monotonic())
            if len(events) < BUSY_ROUND:
                break
            await trio.lowlevel.checkpoint()


@dataclass(frozen=True, slots=True)
class CloseWave(Generic[T]):
    """Tunnels to close over a span, and how (TunnelEngine.close_spread)."""

    tunnels: Spread[T]
    code: int
    reason: bytes
    wait: float | None


class Closes(Generic[T]):
    """A relay's WebSocket closes under way: waves spread over a span
    (drains, servers gone) and the bound of each closing tunnel's wait.
    The relay checks that a tunnel it is handed still stands."""

    __slots__ = ("_waits", "_waves", "sleep")

    def __init__(self) -> None:
        self._waves: list[CloseWave[T]] = []
        self._waits: Timers[T] = Timers()
        self.sleep = Sleep()  # the relay's loop sleeps in it: a close set now wakes it

    def __bool__(self) -> bool:
        return bool(self._waves or self._waits._heap)

    def spread(
        self,
        tunnels: Sequence[T],
        now: float,
        span: float,
        code: int,
        reason: bytes,
        wait: float | None,
    ) -> None:
        if tunnels:
            wave = Spread(tunnels, now, span)
            self._waves.append(CloseWave(wave, code, reason, wait))
            due = wave.next_due()
            if due is not None:
                self.sleep.wake_by(due)

    def wait(self, when: float, tunnel: T) -> None:
        """End ``tunnel`` at ``when`` if it is still closing then."""
        self._waits.add(when, tunnel)
        self.sleep.wake_by(when)

    def due_closes(self, now: float) -> Iterator[tuple[T, CloseWave[T]]]:
        """The tunnels of every wave that fell due, each with its wave."""
        for wave in self._waves:
            for tunnel in wave.tunnels.pop_due(now):
                yield tunnel, wave
        self._waves = [wave for wave in self._waves if not wave.tunnels.done]

    def due_waits(self, now: float) -> Iterator[T]:
        """The closing tunnels whose wait ran out."""
        if self._waits.due(now):
            for _, tunnel in self._waits.pop_due(now):
                yield tunnel

    def next_due(self) -> float | None:
        times = [self._waits.next_due(), *(w.tunnels.next_due() for w in self._waves)]
        return min((when for when in times if when is not None), default=None)
