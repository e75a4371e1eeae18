"""Aggregating the workers' stats snapshots, sans-IO.

Each worker sends a :class:`~shardproxy.telemetry.snapshot.WorkerSnapshot`
every second (see ``control/channel.py``): its current tunnels and
handshakes, its capacity, its tuple spaces (used and capacity per source
address and backend endpoint) and its counts since it started (bytes and
messages are added when a tunnel ends). A worker that exits takes its counts
with it, so the supervisor folds its last snapshot into :class:`Retired` and
totals stay monotonic across restarts, as counters must.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from shardproxy.telemetry.snapshot import Counts, Histogram, WorkerSnapshot


class Retired:
    """What the workers that exited had counted, from their last snapshots."""

    def __init__(self) -> None:
        self.counts = Counts()
        self.histograms: dict[str, Histogram] = {}

    def add(self, last: WorkerSnapshot) -> None:
        self.counts += last.counts
        for name, h in last.histograms().items():
            old = self.histograms.get(name)
            self.histograms[name] = h if old is None else old + h


def total_counts(snapshots: Iterable[WorkerSnapshot], retired: Retired) -> Counts:
    totals = retired.counts
    for snapshot in snapshots:
        totals += snapshot.counts
    return totals


def summary(snapshots: Mapping[int, WorkerSnapshot], retired: Retired) -> dict[str, Any]:
    """One record of the whole instance: current figures and totals.
    ``snapshots`` are the workers' latest, by any key (the supervisor uses
    their pids: after a reload two generations share slot numbers)."""
    workers = sorted(
        (
            {
                "slot": s.slot,
                "generation": s.generation,
                "tunnels": s.tunnels,
                "handshakes": s.handshakes,
                "capacity": s.capacity,
                "opened": s.counts.tunnels,
            }
            for s in snapshots.values()
        ),
        key=lambda w: (w["generation"], w["slot"]),
    )
    return {
        "upstream": upstream_usage(snapshots.values()),
        "tunnels": sum(w["tunnels"] for w in workers),
        "handshakes": sum(w["handshakes"] for w in workers),
        "capacity": sum(w["capacity"] for w in workers),
        "workers": workers,
        "totals": total_counts(snapshots.values(), retired).totals(),
    }


def upstream_usage(snapshots: Iterable[WorkerSnapshot]) -> list[dict[str, Any]]:
    """Tuple space used and capacity per (source address, backend endpoint),
    summed over the workers (each owns a disjoint port slice, so capacities add)."""
    used: Counter[tuple[str, str]] = Counter()
    capacity: Counter[tuple[str, str]] = Counter()
    for snapshot in snapshots:
        for space in snapshot.upstream:
            key = (space.source, space.endpoint)
            used[key] += space.used
            capacity[key] += space.capacity
    return [
        {"source": pair[0], "endpoint": pair[1], "used": used[pair], "capacity": capacity[pair]}
        for pair in sorted(capacity)
    ]
