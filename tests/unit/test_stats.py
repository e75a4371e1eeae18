"""Aggregation of worker snapshots (sans-IO); the stats events of a running
proxy are in tests/e2e/test_stats_events.py."""

from __future__ import annotations

from shardproxy.telemetry.snapshot import (
    BucketCounts,
    Counts,
    Histogram,
    SpaceUsage,
    WorkerSnapshot,
    merge_histograms,
)
from shardproxy.telemetry.stats import Retired, summary, total_counts, upstream_usage


def snapshot(current: int, slot: int = 0, **counts: int) -> WorkerSnapshot:
    return WorkerSnapshot(slot, 1, current, 1, 100, Counts(**counts))


def retired(**counts: int) -> Retired:
    r = Retired()
    r.add(snapshot(0, **counts))
    return r


def test_totals_nest_by_kind() -> None:
    counts = Counts(tunnels=3, rejected={"no_route": 2, "bad_key": 1})
    assert counts.totals() == {"tunnels": 3, "rejected": {"bad_key": 1, "no_route": 2}}


def test_totals_include_retired_workers() -> None:
    snaps = [snapshot(0, tunnels=2), WorkerSnapshot(1, 1, 0, 0, 0, Counts(3, bytes={"up": 10}))]
    assert total_counts(snaps, retired(tunnels=5)) == Counts(tunnels=10, bytes={"up": 10})


def test_summary_adds_workers_up() -> None:
    record = summary(
        {1: snapshot(4, 1, tunnels=9), 0: snapshot(2, 0, tunnels=2)}, retired(tunnels=1)
    )
    assert (record["tunnels"], record["handshakes"], record["capacity"]) == (6, 2, 200)
    assert [w["slot"] for w in record["workers"]] == [0, 1]
    assert record["totals"] == {"tunnels": 12}


def test_bucket_counts_and_their_merge() -> None:
    a, b = BucketCounts((0.1, 1.0)), BucketCounts((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):  # a bound belongs to its bucket (le)
        a.observe(v)
    b.observe(2.0)
    assert a.freeze().to_json() == {"bounds": [0.1, 1.0], "counts": [2, 1, 1], "sum": 3.65}
    merged = merge_histograms([a.freeze(), b.freeze()])
    assert merged == Histogram((0.1, 1.0), (2, 1, 2), 5.65)
    assert merge_histograms([]) is None


def test_upstream_usage_is_summed_per_source_and_endpoint() -> None:
    def space(source: str, endpoint: str, used: int) -> SpaceUsage:
        return SpaceUsage(source, endpoint, used, 50)

    w0 = WorkerSnapshot(
        0,
        1,
        1,
        1,
        100,
        upstream=(space("10.0.0.2", "10.0.1.5:80", 3), space("10.0.0.1", "10.0.1.5:80", 4)),
    )
    w1 = WorkerSnapshot(1, 1, 0, 0, 100, upstream=(space("10.0.0.1", "10.0.1.5:80", 50),))
    assert upstream_usage([w0, w1, snapshot(0)]) == [
        {"source": "10.0.0.1", "endpoint": "10.0.1.5:80", "used": 54, "capacity": 100},
        {"source": "10.0.0.2", "endpoint": "10.0.1.5:80", "used": 3, "capacity": 50},
    ]
    assert summary({0: w0}, Retired())["upstream"] == upstream_usage([w0])
