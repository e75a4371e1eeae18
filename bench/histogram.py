"""Latency histograms that stay small whatever the number of samples.

The load generator records one sample per handshake or round trip; keeping a
Python float per sample would cost more than the thing measured, and
percentiles must merge across generator processes. So: fixed log-linear
buckets in one ``array('q')``, merged by adding counts.
"""

from __future__ import annotations

from array import array
from typing import Any


class Histogram:
    """Latencies in integer microseconds, in log-linear buckets: exact below
    256 µs, then 128 buckets per power of two (≤ 0.8 % relative error), up to
    2**40 µs. One fixed ``array('q')`` whatever the number of samples; two
    histograms merge by adding counts; the JSON form is sparse."""

    SIZE = 128 * 34

    def __init__(self) -> None:
        self.counts = array("q", bytes(8 * self.SIZE))
        self.n = 0
        self.max = 0

    def add(self, us: int) -> None:
        shift = us.bit_length() - 8
        i = us if shift <= 0 else (shift << 7) + (us >> shift)
        self.counts[i if i < self.SIZE else self.SIZE - 1] += 1
        self.n += 1
        if us > self.max:
            self.max = us

    @staticmethod
    def value(i: int) -> float:
        """The middle of bucket ``i``, in µs."""
        if i < 256:
            return float(i)
        shift = (i >> 7) - 1
        return ((i - (shift << 7)) << shift) + (1 << shift) / 2

    def merge(self, other: Histogram) -> None:
        for i, k in enumerate(other.counts):
            if k:
                self.counts[i] += k
        self.n += other.n
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0-100), in µs; None when empty."""
        if not self.n:
            return None
        rank = max(1, -(-self.n * q // 100))  # ceil, at least the first sample
        seen = 0
        for i, k in enumerate(self.counts):
            seen += k
            if seen >= rank:
                return min(self.value(i), float(self.max))
        return float(self.max)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "max": self.max,
            "buckets": {str(i): k for i, k in enumerate(self.counts) if k},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Histogram:
        h = cls()
        for i, k in d["buckets"].items():
            h.counts[int(i)] = k
        h.n, h.max = d["n"], d["max"]
        return h
