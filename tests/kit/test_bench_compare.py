"""The comparison harness (bench/compare.py, bench/charts.py): one quick
``python -m bench all --compare shardproxy,haproxy,nginx`` writes a JSON file
with every target x scenario (figures, versions, failures), a Markdown file
with a table per scenario and the shardproxy ÷ best peer column, and two
valid PNG charts. HAProxy and nginx must be installed
(``scripts/install-bench-peers``, which ``scripts/test`` runs); a missing one
fails the test. No timing, rate, CPU or memory figure is asserted
(benchmarks are not tests)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))

from bench import compare
from bench.peers import find_binary
from bench.procs import BenchError

TARGETS = ("shardproxy", "haproxy", "nginx")
SCENARIOS = ("idle", "pingpong", "handshake", "spike")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# the figure each table must show, for every target
KEY_FIGURES = {
    "idle": "user_memory_per_tunnel_bytes",
    "pingpong": "target_cpu_us_per_round_trip",
    "handshake": "target_cpu_us_per_handshake",
    "spike": "upgraded_pct",
}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    for binary in ("haproxy", "nginx"):
        try:
            find_binary(binary)
        except BenchError:
            pytest.fail(f"{binary} is not installed: run scripts/install-bench-peers")
    out = tmp_path_factory.mktemp("compare")
    argv = ["all", "--compare", ",".join(TARGETS), "--quick", "--results-dir", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    files = sorted(out.glob("compare-*.json"))
    assert len(files) == 1, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    doc = json.loads(files[0].read_text())
    return {"doc": doc, "proc": proc, "json": files[0], "dir": out, "argv": argv}


def test_every_target_and_scenario_recorded(comparison: dict[str, Any]) -> None:
    doc, proc = comparison["doc"], comparison["proc"]
    assert doc["kind"] == "compare" and doc["quick"] is True
    assert doc["targets"] == list(TARGETS)
    assert doc["scenarios"] == list(SCENARIOS)
    assert doc["command"] == "python -m bench " + " ".join(comparison["argv"])
    for field in ("cores", "memory_bytes", "kernel", "python"):
        assert doc["machine"][field]
    for t in TARGETS:
        assert doc["versions"][t]["version"], doc["versions"][t]
    assert "commit" in doc["versions"]["shardproxy"]
    for t in ("haproxy", "nginx"):
        assert doc["versions"][t]["package_version"]
    for s in SCENARIOS:
        assert set(doc["runs"][s]) == set(TARGETS)
        for t in TARGETS:
            run = doc["runs"][s][t]
            detail = (s, t, run["error"], run["failures"])
            assert run["error"] is None, detail
            assert run["version"] and run["version"]["version"], detail
            assert run["failures"]["total"] == 0, detail
            assert run["ok"] is True, detail
            assert run["figures"][KEY_FIGURES[s]] is not None, detail
            assert (REPO / run["result_file"]).exists(), detail  # an absolute path stays one
    # the quick sizes were used, with BENCH.md's worker counts
    p = doc["parameters"]
    assert (p["idle"]["tunnels"], p["idle"]["workers"]) == (200, 1)
    assert (p["pingpong"]["tunnels"], p["pingpong"]["duration"], p["pingpong"]["size"]) == (
        4,
        1.0,
        64,
    )
    assert (p["handshake"]["clients"], p["spike"]["clients"], p["spike"]["workers"]) == (
        200,
        300,
        4,
    )
    # the memory curve: [tunnels, RSS delta] from [0, 0] to every tunnel opened
    for t in TARGETS:
        curve = doc["runs"]["idle"][t]["figures"]["rss_curve"]
        assert curve[0] == [0, 0] and curve[-1][0] == 200, curve
        assert all(len(point) == 2 for point in curve)
    # shardproxy ÷ the best peer, for every figure of every table
    for s in SCENARIOS:
        for key, r in doc["ratios"][s].items():
            assert r is not None, (s, key)
            assert r["best_peer"] in ("haproxy", "nginx")
    assert doc["ok"] is True
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_markdown_tables(comparison: dict[str, Any]) -> None:
    doc, proc = comparison["doc"], comparison["proc"]
    md_path = comparison["dir"] / Path(doc["files"]["markdown"]).name
    text = md_path.read_text()
    assert text.strip() in proc.stdout  # printed as well
    head = "| figure | better | shardproxy | haproxy | nginx | shardproxy ÷ best peer |"
    assert text.count(head) == len(SCENARIOS)
    for s in SCENARIOS:
        assert f"### {s}:" in text
    for label in (
        "user memory per idle tunnel",
        "proxy CPU per round trip",
        "round trip p99.9",
        "proxy CPU per handshake",
        "handshakes/s",
        "upgraded",
        "failures by kind",
    ):
        assert label in text, label
    assert " vs haproxy " in text or " vs nginx " in text  # ratio cells
    assert "haproxy 2." in text and "nginx 1." in text  # versions in the header
    assert "Machine: " in text and "Command: `python -m bench all" in text


def test_charts_are_pngs(comparison: dict[str, Any]) -> None:
    doc = comparison["doc"]
    for name in ("memory", "latency"):
        rel = doc["files"]["charts"][name]
        assert isinstance(rel, str), (name, rel)
        path = comparison["dir"] / Path(rel).name
        assert path == comparison["json"].with_name(f"compare-{doc['stamp']}-{name}.png")
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, (name, len(data))


def test_ratio_picks_the_best_peer() -> None:
    def runs(**values: float | None) -> dict[str, dict[str, Any]]:
        return {t: {"error": None, "ok": False, "figures": {"x": v}} for t, v in values.items()}

    lower = compare.Row("x", "x", "us", "lower")
    higher = compare.Row("x", "x", "rate", "higher")
    r = compare.ratio(runs(shardproxy=10.0, haproxy=20.0, nginx=40.0), lower)
    assert r is not None and (r["best_peer"], r["ratio"]) == ("haproxy", 0.5)
    r = compare.ratio(runs(shardproxy=10.0, haproxy=20.0, nginx=40.0), higher)
    assert r is not None and (r["best_peer"], r["ratio"]) == ("nginx", 0.25)
    # a peer without the figure, or whose run errored, is not the best peer
    r = compare.ratio(runs(shardproxy=10.0, haproxy=None, nginx=40.0), lower)
    assert r is not None and r["best_peer"] == "nginx"
    failed = runs(shardproxy=10.0, haproxy=1.0, nginx=40.0)
    failed["haproxy"]["error"] = "haproxy not found"
    r = compare.ratio(failed, lower)
    assert r is not None and r["best_peer"] == "nginx"
    # a clean peer beats one that failed clients; with none clean, the rest count
    partial = runs(shardproxy=10.0, haproxy=1.0, nginx=40.0)
    partial["nginx"]["ok"] = True
    r = compare.ratio(partial, lower)
    assert r is not None and (r["best_peer"], r["peer_clean"]) == ("nginx", True)
    partial["nginx"]["ok"] = False
    r = compare.ratio(partial, lower)
    assert r is not None and (r["best_peer"], r["peer_clean"]) == ("haproxy", False)
    assert compare.ratio(runs(shardproxy=10.0, direct=1.0), lower) is None
    assert compare.ratio(runs(shardproxy=None, haproxy=1.0), lower) is None


def test_target_list() -> None:
    assert compare.target_list("shardproxy, nginx,shardproxy,direct") == [
        "shardproxy",
        "nginx",
        "direct",
    ]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown target"):
        compare.target_list("shardproxy,envoy")


def test_beyond64k_is_not_in_all() -> None:
    """beyond64k takes minutes per target: ``all`` leaves it out, and it
    runs on its own with ``--compare``."""
    from bench.__main__ import parser

    assert "beyond64k" not in compare.SCENARIO_ORDER
    assert set(compare.FULL) == set(compare.QUICK) == set(compare.SCENARIO_ORDER)
    args = parser().parse_args(["beyond64k", "--compare", "shardproxy,haproxy"])
    assert (args.compare, args.tunnels, args.hold, args.sample) == (
        ["shardproxy", "haproxy"],
        150_000,
        60.0,
        1000,
    )
    assert args.workers is None  # as many as the descriptor limit requires


def test_beyond64k_table_shows_each_plan() -> None:
    def run(target: str, held: int, ok: bool) -> dict[str, Any]:
        figures: dict[str, Any] = {"requested": 150_000, "opened": held, "held_at_once": held}
        figures["arithmetic"] = f"{target}'s arithmetic"
        fails = {"total": 150_000 - held, "by_kind": {"gave-up": 150_000 - held}}
        return {"ok": ok, "error": None, "figures": figures, "failures": fails}

    runs = {"shardproxy": run("shardproxy", 150_000, True), "haproxy": run("haproxy", 9_968, False)}
    ratios = {row.key: compare.ratio(runs, row) for row in compare.ROWS["beyond64k"]}
    head = ["figure", "better", "shardproxy", "haproxy", "shardproxy ÷ best peer"]
    text = "\n".join(
        compare._table("beyond64k", runs, ["shardproxy", "haproxy"], ratios, head, True)
    )
    assert "| **tunnels held** | higher | 150,000 | 9,968 | 15.05 vs haproxy† ✓ |" in text
    assert "| opened | higher | 150,000 / 150,000 | 9,968 / 150,000 |  |" in text
    assert "- shardproxy plan: shardproxy's arithmetic" in text
    assert "- haproxy plan: haproxy's arithmetic" in text
