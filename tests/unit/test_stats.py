"""Aggregation of worker snapshots (sans-IO); the stats events of a running
proxy are in tests/e2e/test_stats_events.py."""

from __future__ import annotations

from typing import Any

from shardproxy.telemetry.stats import (
    BucketCounts,
    merge_histograms,
    nest,
    summary,
    total_counts,
    upstream_usage,
)


def snapshot(current: int, **counts: int) -> dict[str, Any]:
    return {"tunnels": current, "handshakes": 1, "capacity": 100, "counts": counts}


def test_nest_splits_dotted_names() -> None:
    assert nest({"tunnels": 3, "rejected.no_route": 2, "rejected.bad_key": 1}) == {
        "tunnels": 3,
        "rejected": {"bad_key": 1, "no_route": 2},
    }


def test_totals_include_retired_workers() -> None:
    snaps = [{"counts": {"tunnels": 2}}, {"counts": {"tunnels": 3, "bytes.up": 10}}]
    assert total_counts(snaps, {"tunnels": 5}) == {"tunnels": 10, "bytes.up": 10}


def test_summary_adds_workers_up() -> None:
    record = summary({1: snapshot(4, tunnels=9), 0: snapshot(2, tunnels=2)}, {"tunnels": 1})
    assert (record["tunnels"], record["handshakes"], record["capacity"]) == (6, 2, 200)
    assert [w["slot"] for w in record["workers"]] == [0, 1]
    assert record["totals"] == {"tunnels": 12}


def test_bucket_counts_and_their_merge() -> None:
    a, b = BucketCounts((0.1, 1.0)), BucketCounts((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):  # a bound belongs to its bucket (le)
        a.observe(v)
    b.observe(2.0)
    assert a.to_dict() == {"bounds": [0.1, 1.0], "counts": [2, 1, 1], "sum": 3.65}
    merged = merge_histograms([a.to_dict(), b.to_dict()])
    assert merged == {"bounds": [0.1, 1.0], "counts": [2, 1, 2], "sum": 5.65}
    assert merge_histograms([]) is None


def test_upstream_usage_is_summed_per_source_and_endpoint() -> None:
    def space(source: str, endpoint: str, used: int) -> dict[str, Any]:
        return {"source": source, "endpoint": endpoint, "used": used, "capacity": 50}

    w0 = {"upstream": [space("10.0.0.2", "10.0.1.5:80", 3), space("10.0.0.1", "10.0.1.5:80", 4)]}
    w1 = {"upstream": [space("10.0.0.1", "10.0.1.5:80", 50)]}
    assert upstream_usage([w0, w1, {}]) == [
        {"source": "10.0.0.1", "endpoint": "10.0.1.5:80", "used": 54, "capacity": 100},
        {"source": "10.0.0.2", "endpoint": "10.0.1.5:80", "used": 3, "capacity": 50},
    ]
    assert summary({0: {**snapshot(1), **w0}}, {})["upstream"] == upstream_usage([w0])
