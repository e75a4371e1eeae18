"""What a worker reports every second, as types.

A worker counts into a :class:`Tally` and fills two :class:`BucketCounts`
as events happen (an attribute or a Counter keyed by a plain value each
time: no name is formatted per event). Once a second it freezes them into a
:class:`WorkerSnapshot`: its figures now, its :class:`Counts` since it
started, its tuple space per (source address, endpoint) and its histograms.
On the control channel (control/messages.py) each travels as ``to_json()``
and comes back with ``from_json()``, which refuses a field it does not know.

:class:`Counts` and :class:`Histogram` add up (``+``): over the workers, and
with the last snapshots of workers that exited (telemetry/stats.py), so that
totals never go back. :meth:`Counts.totals` is how operators see them in
/stats and the ``stats`` event: ``{"rejected": {"no_route": 2}, ...}``.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

# Upper bounds (seconds) of the histogram buckets, with +Inf after the last.
HANDSHAKE_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TUNNEL_BOUNDS = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)

K = TypeVar("K")

# The counts that are one number, and where each sits in Counts.totals.
SINGLE = {
    "tunnels": ("tunnels",),
    "handshake_failed": ("handshake_failed",),
    "connect_failed": ("upstream", "connect_failed"),
    "ping_timeout": ("ping_timeout",),
    "internal_error": ("internal_error",),
}
# The counts by one label (a reason, an outcome, a direction, an action).
LABELLED = (
    "rejected",
    "closed",
    "frame_error",
    "log_suppressed",
    "bytes",
    "messages",
    "tls_failed",
)


def _fields(data: Any, cls: type[Any]) -> dict[str, Any]:
    """``data`` if it is an object with exactly the fields of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or set(data) != names:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{cls.__name__} with fields {got}, not {sorted(names)}")
    return data


def _add(a: Mapping[K, int], b: Mapping[K, int]) -> dict[K, int]:
    out = dict(a)
    for key, n in b.items():
        out[key] = out.get(key, 0) + n
    return out


@dataclass(frozen=True, slots=True)
class Counts:
    """A worker's totals since it started (or a sum of them)."""

    tunnels: int = 0  # established: the 101 passed on
    handshake_failed: int = 0  # client connections lost during the handshake
    connect_failed: int = 0  # upstream connects refused or timed out
    ping_timeout: int = 0  # tunnels whose client did not answer a ping
    internal_error: int = 0  # connections ended by an error of ours
    rejected: Mapping[str, int] = field(default_factory=dict)  # by reason
    closed: Mapping[str, int] = field(default_factory=dict)  # tunnels ended, by outcome
    frame_error: Mapping[str, int] = field(default_factory=dict)  # by direction
    log_suppressed: Mapping[str, int] = field(default_factory=dict)  # by event.action
    bytes: Mapping[str, int] = field(default_factory=dict)  # of ended tunnels, by direction
    messages: Mapping[str, int] = field(default_factory=dict)  # of ended tunnels, by direction
    tls_failed: Mapping[str, int] = field(default_factory=dict)  # TLS handshakes, by reason
    # Tunnels a side closed with 1002 or 1007, by (side, close code).
    bad_stream: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def __add__(self, other: Counts) -> Counts:
        summed: dict[str, Any] = {n: getattr(self, n) + getattr(other, n) for n in SINGLE}
        for name in (*LABELLED, "bad_stream"):
            summed[name] = _add(getattr(self, name), getattr(other, name))
        return Counts(**summed)

    def totals(self) -> dict[str, Any]:
        """As operators see them (/stats ``totals``): nested by kind and
        label, keys sorted; a count never made is left out."""
        out: dict[str, Any] = {}
        for name, path in SINGLE.items():
            if n := getattr(self, name):
                node = out
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = n
        for name in LABELLED:
            if by_label := getattr(self, name):
                out[name] = dict(by_label)
        for (side, code), n in self.bad_stream.items():
            out.setdefault("bad_stream", {}).setdefault(side, {})[str(code)] = n
        return _sorted(out)

    def to_json(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name) for name in SINGLE},
            **{name: dict(getattr(self, name)) for name in LABELLED},
            "bad_stream": [[side, code, n] for (side, code), n in self.bad_stream.items()],
        }

    @classmethod
    def from_json(cls, data: Any) -> Counts:
        data = _fields(data, cls)
        counts: dict[str, Any] = {name: int(data[name]) for name in SINGLE}
        for name in LABELLED:
            counts[name] = {str(label): int(n) for label, n in data[name].items()}
        counts["bad_stream"] = {
            (str(side), int(code)): int(n) for side, code, n in data["bad_stream"]
        }
        return cls(**counts)


def _sorted(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(tree.items())}


class Tally:
    """The counts a worker keeps, one event at a time (see :class:`Counts`
    for what each is); :meth:`freeze` copies them for a snapshot."""

    __slots__ = (*SINGLE, *LABELLED, "bad_stream")

    def __init__(self) -> None:
        self.tunnels = 0
        self.handshake_failed = 0
        self.connect_failed = 0
        self.ping_timeout = 0
        self.internal_error = 0
        self.rejected: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.frame_error: Counter[str] = Counter()
        self.log_suppressed: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.tls_failed: Counter[str] = Counter()
        self.bad_stream: Counter[tuple[str, int]] = Counter()

    def freeze(self) -> Counts:
        counts: dict[str, Any] = {name: getattr(self, name) for name in SINGLE}
        for name in (*LABELLED, "bad_stream"):
            counts[name] = dict(getattr(self, name))
        return Counts(**counts)


@dataclass(frozen=True, slots=True)
class Histogram:
    """How many observations fell in each bucket (not cumulative; the last
    bucket is +Inf), and their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, (0,) * (len(bounds) + 1), 0.0)

    def __add__(self, other: Histogram) -> Histogram:
        if self.bounds != other.bounds:
            raise ValueError(f"histograms with bounds {self.bounds} and {other.bounds}")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(self.bounds, counts, self.sum + other.sum)

    def to_json(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_json(cls, data: Any) -> Histogram:
        data = _fields(data, cls)
        bounds = tuple(float(b) for b in data["bounds"])
        counts = tuple(int(n) for n in data["counts"])
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"a histogram of {len(bounds)} bounds with {len(counts)} buckets")
        return cls(bounds, counts, float(data["sum"]))


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram | None:
    """The sum of histograms with the same bounds (None if there are none)."""
    merged: Histogram | None = None
    for h in histograms:
        merged = h if merged is None else merged + h
    return merged


class BucketCounts:
    """A histogram a worker fills; :meth:`freeze` copies it for a snapshot."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, counts: Sequence[int], total: float) -> None:
        """Values observed elsewhere: their counts per bucket of these
        bounds (bisect_left, as :meth:`observe`) and their sum."""
        if len(counts) != len(self.counts):
            raise ValueError(f"{len(counts)} buckets for a histogram of {len(self.counts)}")
        mine = self.counts
        for i, n in enumerate(counts):
            if n:
                mine[i] += n
        self.sum += total

    def freeze(self) -> Histogram:
        return Histogram(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True, slots=True)
class SpaceUsage:
    """One tuple space of a worker: upstream connections used now, and how
    many its port slice allows, from ``source`` to ``endpoint``."""

    source: str  # a source address, or "auto" (the kernel's choice)
    endpoint: str  # "ip:port"
    used: int
    capacity: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SpaceUsage:
        data = _fields(data, cls)
        return cls(
            str(data["source"]), str(data["endpoint"]), int(data["used"]), int(data["capacity"])
        )


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker's report: its figures now, and its totals since it started."""

    slot: int
    generation: int
    tunnels: int  # open now
    handshakes: int  # between accept and the 101 (or its answer) now
    capacity: int  # connections it may hold
    counts: Counts = Counts()
    upstream: tuple[SpaceUsage, ...] = ()
    # accept → 101 passed on, and 101 → closed
    handshake_seconds: Histogram = field(default_factory=partial(Histogram.empty, HANDSHAKE_BOUNDS))
    tunnel_seconds: Histogram = field(default_factory=partial(Histogram.empty, TUNNEL_BOUNDS))
    routes: Mapping[str, int] = field(default_factory=dict)  # route name → tunnels open now
    # (pool, server) → upstream connections now (tunnels and connects under way)
    servers: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def histograms(self) -> dict[str, Histogram]:
        return {"handshake_seconds": self.handshake_seconds, "tunnel_seconds": self.tunnel_seconds}

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "generation": self.generation,
            "tunnels": self.tunnels,
            "handshakes": self.handshakes,
            "capacity": self.capacity,
            "counts": self.counts.to_json(),
            "upstream": [space.to_json() for space in self.upstream],
            **{name: h.to_json() for name, h in self.histograms().items()},
            "routes": dict(self.routes),
            "servers": [[pool, server, n] for (pool, server), n in self.servers.items()],
        }

    @classmethod
    def from_json(cls, data: Any) -> WorkerSnapshot:
        data = _fields(data, cls)
        return cls(
            slot=int(data["slot"]),
            generation=int(data["generation"]),
            tunnels=int(data["tunnels"]),
            handshakes=int(data["handshakes"]),
            capacity=int(data["capacity"]),
            counts=Counts.from_json(data["counts"]),
            upstream=tuple(SpaceUsage.from_json(space) for space in data["upstream"]),
            handshake_seconds=Histogram.from_json(data["handshake_seconds"]),
            tunnel_seconds=Histogram.from_json(data["tunnel_seconds"]),
            routes={str(route): int(n) for route, n in data["routes"].items()},
            servers={(str(pool), str(server)): int(n) for pool, server, n in data["servers"]},
        )
