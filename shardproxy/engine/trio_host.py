"""trio's run loop as the compiled relay sees it when the relay does the
waiting: :class:`TrioLoop`.

trio runs its tasks around a blocking ``epoll_wait`` on a set of its own.
A worker whose handshakes and tunnels are all in the compiled relay's set
paid, per wake-up, trio's wait, its re-arming of the relay's descriptor and
a pass through its scheduler: 2.3 µs of user time per 64 B round trip,
against nginx's 0.9 and the C core's own 0.3. The relay's loop
(``CompiledRelayEngine._run_hosting``) inverts the nesting: trio's epoll
descriptor goes into the relay's set, level-triggered, and the relay waits
in C (``Relay.serve``, the GIL released) until trio has I/O, trio's next
deadline passes (the relay's timer, ``Relay.wake_at``), or the relay has
something for Python. The relay's task yields to trio (a checkpoint) only
then, or when a task is runnable. Measured with ``python -m bench pingpong
--compare shardproxy,nginx --tunnels 50 --size 64 --workers 1``: 0.5-0.6 µs
of user time per round trip (BENCHMARKS.md).

Which trio tasks are runnable the relay learns as trio intends, with an
instrument (``task_scheduled``, ``before_task_step``): trio's run queue
is not enough, since the rest of the batch that trio is running has left
it. What trio does not export the relay reads: its epoll object, its
deadlines, and whether a task waits in ``wait_all_tasks_blocked``.
:meth:`TrioLoop.current` gives None when those are not there (another trio
than the one this was written against, a test clock, guest mode), and the
relay then waits inside trio as before. ``tests/engine/test_trio_host.py``
fails when the installed trio lacks them, so an upgrade that breaks this
is seen, not a silent slowdown.
"""

from __future__ import annotations

import math
from typing import Any

import trio


class TrioLoop(trio.abc.Instrument):
    """The running trio loop's epoll descriptor, deadlines and runnable
    tasks, for a task that waits for trio (``async with``: the tasks are
    followed from then on)."""

    __slots__ = ("_clock", "_deadlines", "_runner", "_scheduled", "fd")

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._deadlines = runner.deadlines
        self._clock: trio.abc.Clock = runner.clock
        self._scheduled: set[trio.lowlevel.Task] = set()
        self.fd: int = runner.io_manager._epoll.fileno()

    @classmethod
    def current(cls) -> TrioLoop | None:
        """The running loop, or None where its internals are not as known
        (or no trio loop runs in this thread)."""
        try:
            from trio._core import _run

            runner = _run.GLOBAL_RUN_CONTEXT.runner
            known = (
                type(runner.clock) is _run.SystemClock  # a MockClock jumps: not real time
                and not runner.is_guest
                and callable(runner.deadlines.next_deadline)
                and hasattr(runner, "waiting_for_idle")
            )
            return cls(runner) if known else None
        except (ImportError, AttributeError, RuntimeError, ValueError):
            return None

    async def __aenter__(self) -> TrioLoop:
        trio.lowlevel.add_instrument(self)
        # Tasks scheduled before the instrument came are in trio's run queue
        # or in its batch under way: two checkpoints, and every task that
        # runs before this one again was scheduled under the instrument.
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc: object) -> None:
        trio.lowlevel.remove_instrument(self)
        self._scheduled.clear()

    # trio.abc.Instrument
    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self._scheduled.add(task)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._scheduled.discard(task)

    def runnable(self) -> bool:
        """Whether another trio task is ready to run."""
        return bool(self._scheduled)

    def watched(self) -> bool:
        """Whether a task waits in ``wait_all_tasks_blocked``: trio must
        then see the relay's task blocked in trio when it is idle."""
        return bool(self._runner.waiting_for_idle)

    def next_deadline(self, now: float) -> float | None:
        """trio's next deadline as a ``time.monotonic()`` time (``now``),
        or None."""
        deadline: float = self._deadlines.next_deadline()
        if deadline == math.inf:
            return None
        return now + (deadline - self._clock.current_time())
