"""Aggregating the workers' stats snapshots, sans-IO.

Each worker sends a snapshot every second (see ``control/channel.py``): its current
tunnels and handshakes, its capacity, ``upstream`` (tuple space used and
capacity per source address and backend endpoint) and ``counts``, a flat mapping of
totals since it started (``"tunnels"``, ``"rejected.no_route"``,
``"closed.client_reset"``, ``"bytes.up"``…; bytes and messages are added when
a tunnel ends). A worker that exits takes its counts with it, so the
supervisor folds its last snapshot into ``retired`` and totals stay monotonic
across restarts, as counters must.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

# Upper bounds (seconds) of the histogram buckets, with +Inf after the last.
HANDSHAKE_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TUNNEL_BOUNDS = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)


class BucketCounts:
    """A histogram a worker fills: how many observations fell in each bucket
    (not cumulative; the last bucket is +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def merge_histograms(histograms: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The sum of histograms with the same bounds (None if there are none)."""
    merged: dict[str, Any] | None = None
    for h in histograms:
        if merged is None:
            merged = {"bounds": list(h["bounds"]), "counts": list(h["counts"]), "sum": h["sum"]}
            continue
        merged["counts"] = [a + b for a, b in zip(merged["counts"], h["counts"], strict=True)]
        merged["sum"] += h["sum"]
    return merged


def total_counts(
    snapshots: Iterable[Mapping[str, Any]], retired: Mapping[str, int]
) -> Counter[str]:
    totals: Counter[str] = Counter(retired)
    for snapshot in snapshots:
        totals.update(snapshot.get("counts", {}))
    return totals


def nest(flat: Mapping[str, int]) -> dict[str, Any]:
    """``{"rejected.no_route": 2}`` → ``{"rejected": {"no_route": 2}}``."""
    out: dict[str, Any] = {}
    for key in sorted(flat):
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = flat[key]
    return out


def summary(
    snapshots: Mapping[int, Mapping[str, Any]], retired: Mapping[str, int]
) -> dict[str, Any]:
    """One record of the whole instance: current figures and totals.
    ``snapshots`` are the workers' latest, by any key (the supervisor uses
    their pids: after a reload two generations share slot numbers)."""
    workers = sorted(
        (
            {
                "slot": s.get("slot", key),
                "generation": s.get("generation", 1),
                "tunnels": s["tunnels"],
                "handshakes": s["handshakes"],
                "capacity": s["capacity"],
                "opened": s.get("counts", {}).get("tunnels", 0),
            }
            for key, s in snapshots.items()
        ),
        key=lambda w: (w["generation"], w["slot"]),
    )
    return {
        "upstream": upstream_usage(snapshots.values()),
        "tunnels": sum(w["tunnels"] for w in workers),
        "handshakes": sum(w["handshakes"] for w in workers),
        "capacity": sum(w["capacity"] for w in workers),
        "workers": workers,
        "totals": nest(total_counts(snapshots.values(), retired)),
    }


def upstream_usage(snapshots: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tuple space used and capacity per (source address, backend endpoint),
    summed over the workers (each owns a disjoint port slice, so capacities add)."""
    used: Counter[tuple[str, str]] = Counter()
    capacity: Counter[tuple[str, str]] = Counter()
    for snapshot in snapshots:
        for space in snapshot.get("upstream", ()):
            key = (space["source"], space["endpoint"])
            used[key] += space["used"]
            capacity[key] += space["capacity"]
    return [
        {"source": pair[0], "endpoint": pair[1], "used": used[pair], "capacity": capacity[pair]}
        for pair in sorted(capacity)
    ]
