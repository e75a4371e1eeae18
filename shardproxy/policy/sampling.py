"""Which events get written: access-log sampling and the error budget.

Pure decisions on counts and times given by the caller; nothing here logs.

- :class:`AccessSampler` writes a share ``rate`` of a route's access events,
  evenly and deterministically (an accumulated credit, not a coin toss): at
  0.25 exactly every fourth tunnel of the route is logged, so the counts an
  operator reads in ELK times ``1 / rate`` are the real counts.
- :class:`ErrorBudget` is a token bucket for events one connection can
  cause (a rejected request, a failed connect): ``burst`` may come at once,
  then ``rate`` per second. A flood of bad requests costs the disk at most
  ``rate`` lines per second per worker; what was left out is counted per
  action and reported (:meth:`ErrorBudget.take_suppressed`) so nothing
  vanishes without a trace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable


class AccessSampler:
    def __init__(self) -> None:
        self._credit: dict[Hashable, float] = {}

    def keep(self, key: Hashable, rate: float) -> bool:
        """Whether this event of ``key`` (a route) is written at ``rate``."""
        if rate >= 1.0:
            return True
        if rate <= 0.0:
            return False
        credit = self._credit.get(key, 1.0 - rate) + rate  # the first event is written
        if credit >= 1.0:
            self._credit[key] = credit - 1.0
            return True
        self._credit[key] = credit
        return False


class ErrorBudget:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate  # tokens per second; 0 = no limit
        self.burst = float(burst)
        self._tokens = self.burst
        self._last = -1.0
        self._suppressed: Counter[str] = Counter()

    def allow(self, action: str, now: float) -> bool:
        """Whether an event of ``action`` at time ``now`` may be written."""
        if self.rate <= 0:
            return True
        if self._last >= 0:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._suppressed[action] += 1
        return False

    def take_suppressed(self) -> Counter[str]:
        """The events left out since the last call, by action."""
        taken, self._suppressed = self._suppressed, Counter()
        return taken
