"""The typed stats snapshot: it survives the wire as itself, counts add up,
and the totals operators read keep the nested shape they had when counts
were dotted names (``{"rejected": {"no_route": 2}}``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.telemetry.snapshot import (
    HANDSHAKE_BOUNDS,
    LABELLED,
    SINGLE,
    Counts,
    Histogram,
    SpaceUsage,
    Tally,
    WorkerSnapshot,
)
from shardproxy.telemetry.stats import Retired, summary

labels = st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=12)
small = st.integers(0, 10**12)
by_label = st.dictionaries(labels, small, max_size=4)
counts = st.builds(
    Counts,
    **{name: small for name in SINGLE},
    **{name: by_label for name in LABELLED},
    bad_stream=st.dictionaries(
        st.tuples(st.sampled_from(["client", "backend"]), st.sampled_from([1002, 1007])), small
    ),
)
histograms = st.builds(
    lambda n, total: Histogram(HANDSHAKE_BOUNDS, tuple(n), total),
    st.lists(small, min_size=len(HANDSHAKE_BOUNDS) + 1, max_size=len(HANDSHAKE_BOUNDS) + 1),
    st.floats(0, 1e9),
)
snapshots = st.builds(
    WorkerSnapshot,
    slot=st.integers(0, 64),
    generation=st.integers(1, 100),
    tunnels=small,
    handshakes=small,
    capacity=small,
    counts=counts,
    upstream=st.lists(
        st.builds(SpaceUsage, st.sampled_from(["auto", "10.0.0.1"]), labels, small, small)
    ).map(tuple),
    handshake_seconds=histograms,
    routes=st.dictionaries(labels, small, max_size=3),
    servers=st.dictionaries(st.tuples(labels, labels), small, max_size=3),
)


def dotted(c: Counts) -> dict[str, int]:
    """The counts as the worker used to keep them, by dotted name."""
    flat = {".".join(SINGLE[name]): getattr(c, name) for name in SINGLE if getattr(c, name)}
    for name in LABELLED:
        flat.update({f"{name}.{label}": n for label, n in getattr(c, name).items()})
    flat.update({f"bad_stream.{side}.{code}": n for (side, code), n in c.bad_stream.items()})
    return flat


def nest(flat: Mapping[str, int]) -> dict[str, Any]:
    """How /stats nested dotted names (the reference for Counts.totals)."""
    out: dict[str, Any] = {}
    for key in sorted(flat):
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = flat[key]
    return out


@given(snapshots)
def test_a_snapshot_survives_the_wire_as_itself(snapshot: WorkerSnapshot) -> None:
    wire = json.loads(json.dumps(snapshot.to_json()))
    assert WorkerSnapshot.from_json(wire) == snapshot


@given(counts)
def test_totals_keep_the_shape_of_the_dotted_names(c: Counts) -> None:
    totals = c.totals()
    assert totals == nest(dotted(c))
    assert json.dumps(totals) == json.dumps(nest(dotted(c)))  # key order too


@given(counts, counts, counts)
def test_counts_add_like_counters_of_dotted_names(a: Counts, b: Counts, c: Counts) -> None:
    assert (a + b) + c == a + (b + c)
    assert a + Counts() == a
    flat = dotted(a)
    for key, n in dotted(b).items():
        flat[key] = flat.get(key, 0) + n
    assert (a + b).totals() == nest(flat)


def test_a_tally_counts_into_typed_fields() -> None:
    tally = Tally()
    tally.tunnels += 2
    tally.rejected["no_route"] += 1
    tally.bytes["up"] += 0  # a tunnel that sent nothing up: the direction is there, at 0
    tally.bad_stream[("client", 1002)] += 1
    tally.connect_failed += 1
    frozen = tally.freeze()
    tally.rejected["no_route"] += 1  # the snapshot is a copy
    assert frozen.totals() == {
        "bad_stream": {"client": {"1002": 1}},
        "bytes": {"up": 0},
        "rejected": {"no_route": 1},
        "tunnels": 2,
        "upstream": {"connect_failed": 1},
    }


def test_retired_workers_count_in_the_summary() -> None:
    retired = Retired()
    h = Histogram(HANDSHAKE_BOUNDS, (1,) + (0,) * len(HANDSHAKE_BOUNDS), 0.0005)
    retired.add(WorkerSnapshot(0, 1, 0, 0, 0, Counts(tunnels=3), handshake_seconds=h))
    retired.add(WorkerSnapshot(1, 1, 0, 0, 0, Counts(closed={"closed": 2}), handshake_seconds=h))
    assert retired.histograms["handshake_seconds"] == h + h
    live = WorkerSnapshot(0, 2, 1, 0, 10, Counts(tunnels=1, closed={"closed": 1}))
    assert summary({7: live}, retired)["totals"] == {"closed": {"closed": 3}, "tunnels": 4}


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(extra=1),
        lambda d: d.pop("routes"),
        lambda d: d["counts"].update(closed_total=1),
        lambda d: d["counts"].pop("bad_stream"),
        lambda d: d["upstream"].append({"source": "auto"}),
        lambda d: d["handshake_seconds"].update(counts=[1]),
    ],
)
def test_a_snapshot_with_unknown_or_missing_fields_is_refused(change: Any) -> None:
    data = WorkerSnapshot(0, 1, 0, 0, 0).to_json()
    change(data)
    with pytest.raises(ValueError):
        WorkerSnapshot.from_json(data)


def test_histograms_of_other_bounds_do_not_add() -> None:
    with pytest.raises(ValueError):
        Histogram.empty((1.0,)) + Histogram.empty((2.0,))
