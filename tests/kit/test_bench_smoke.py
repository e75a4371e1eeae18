"""Smoke tests of the benchmark harness: a tiny run of every scenario against
shardproxy completes and writes a well-formed result, with consistent counts
and no failure. No timing, rate, CPU or memory figure is asserted
(benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO

sys.path.insert(0, str(REPO))

from bench.idle import KEYS

# Every load scenario's result carries these (bench/scenario.py).
COMMON = (
    "scenario", "ok", "error", "command", "started_at", "target", "target_version", "workers",
    "parameters", "machine", "figures", "failures", "cpu", "loadgens", "timings", "shutdown",
    "files",
)  # fmt: skip


def run_bench(
    tmp_path: Path, *args: str
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    files = list(tmp_path.glob(f"{args[0]}-*.json"))
    assert len(files) == 1, (proc.stdout, proc.stderr)
    return json.loads(files[0].read_text()), proc


def check_common(r: dict[str, Any], proc: subprocess.CompletedProcess[str], scenario: str) -> None:
    assert set(COMMON) <= set(r), set(COMMON) - set(r)
    assert r["error"] is None, r["error"]
    assert r["scenario"] == scenario
    assert r["target"] == "shardproxy"
    assert r["target_version"]["version"]
    assert r["command"].startswith(f"python -m bench {scenario}")
    assert r["failures"] == {"total": 0, "by_kind": {}, "reasons": {}}
    target = r["cpu"]["groups"]["target"]
    assert target["processes"] == r["workers"] + 1  # supervisor + workers
    assert target["gone"] == []
    assert r["cpu"]["groups"]["loadgen"]["processes"] == r["parameters"]["loadgen_processes"]
    assert r["shutdown"]["exit_code"] == 0
    for field in ("cores", "memory_bytes", "kernel", "python"):
        assert r["machine"][field]
    assert r["ok"] is True
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| figure | value |" in proc.stdout


def check_latency(lat: dict[str, Any], n: int) -> None:
    assert lat["n"] == n
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]


def test_idle_50_tunnels(tmp_path: Path) -> None:
    result, proc = run_bench(
        tmp_path, "idle", "--tunnels", "50", "--workers", "1", "--warmup", "20"
    )

    assert set(KEYS) <= set(result), set(KEYS) - set(result)
    assert result["error"] is None, result["error"]
    assert result["scenario"] == "idle"
    assert result["target"] == "shardproxy"
    assert result["tunnels_requested"] == 50
    assert result["tunnels_opened"] == 50
    assert result["failures"] == 0
    assert result["dropped"] == 0
    assert result["sample_echo"] == {"requested": 50, "ok": 50, "failed": 0}
    for key in ("rss_before", "rss_after"):
        snap = result[key]
        assert snap["rss"] > 0
        roles = {p["role"] for p in snap["processes"]}
        assert roles == {"supervisor", "worker-0"}, roles
    assert isinstance(result["user_memory_per_tunnel_bytes"], int | float)
    assert isinstance(result["worker_rss_per_tunnel_bytes"], int | float)
    assert result["fds_after"] - result["fds_before"] >= 100  # 2 per tunnel
    assert result["shutdown"]["exit_code"] == 0
    for field in ("cores", "memory_bytes", "kernel", "python"):
        assert result["machine"][field]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "user memory per tunnel" in proc.stdout


def test_pingpong_4_tunnels(tmp_path: Path) -> None:
    r, proc = run_bench(tmp_path, "pingpong", "-k", "4", "--duration", "1", "--warmup", "0.2")
    check_common(r, proc, "pingpong")
    f = r["figures"]
    assert f["tunnels"] == 4 and f["tunnels_lost"] == 0
    assert f["round_trips"] > 0
    assert f["round_trips"] == sum(g["round_trips"] for g in r["loadgens"])
    assert f["target_cpu_us_per_round_trip"] is not None
    split = f["target_user_us_per_round_trip"] + f["target_kernel_us_per_round_trip"]
    assert abs(split - f["target_cpu_us_per_round_trip"]) < 0.05  # the two shares make the whole
    check_latency(f["latency_us"], f["round_trips"])
    assert r["parameters"]["size_bytes"] == 64
    assert r["target_log"]["tunnel_outcomes"] == {"closed": 4}


def test_handshake_50_clients(tmp_path: Path) -> None:
    r, proc = run_bench(tmp_path, "handshake", "-n", "50", "--concurrency", "10")
    check_common(r, proc, "handshake")
    f = r["figures"]
    assert f["requested"] == f["handshakes"] == f["closed_clean"] == 50
    assert f["target_cpu_us_per_handshake"] is not None
    check_latency(f["latency_us"], 50)
    # every tunnel ended cleanly at the proxy, none counted twice
    assert r["target_log"]["tunnel_outcomes"] == {"closed": 50}
    assert r["target_log"]["rejected"] == {}


def test_spike_200_clients(tmp_path: Path) -> None:
    r, proc = run_bench(tmp_path, "spike", "-n", "200", "--workers", "2", "--sample", "20")
    check_common(r, proc, "spike")
    f = r["figures"]
    assert f["requested"] == f["upgraded"] == f["held_at_once"] == 200
    assert f["upgraded_pct"] == 100.0
    assert f["dropped_while_held"] == 0
    assert f["sample_echo"] == {"requested": 20, "ok": 20, "failed": 0}
    assert f["target_fds"] >= 400  # 2 per tunnel, all held at once
    check_latency(f["latency_us"], 200)
    assert r["target_log"]["tunnel_outcomes"] == {"closed": 200}
    assert r["target_log"]["rejected"] == {}


def test_beyond64k_200_tunnels(tmp_path: Path) -> None:
    r, proc = run_bench(
        tmp_path, "beyond64k", "-n", "200", "--workers", "2", "--upstream-sources", "2",
        "--hold", "1", "--sample", "20", "--per-loadgen", "100",
    )  # fmt: skip
    check_common(r, proc, "beyond64k")
    f, p = r["figures"], r["parameters"]
    assert f["requested"] == f["opened"] == f["held_at_once"] == 200
    assert f["dropped_while_held"] == 0
    assert f["sample_echo"] == {"requested": 20, "ok": 20, "failed": 0}
    assert f["target_fds"] >= 400  # 2 per tunnel, all held at once
    sources = ["127.64.0.1", "127.64.0.2"]
    assert p["upstream_sources"] == sources
    config = (REPO / r["files"]["config"]).read_text()
    assert 'source_addresses = ["127.64.0.1", "127.64.0.2"]' in config
    # the proxy's own arithmetic for the generated config
    plan = r["plan"]
    assert "error" not in plan, plan
    assert plan["workers"] == 2 and plan["sources"] == sources
    assert plan["endpoints"] == [f"127.0.0.1:{p['backend_port']}"]
    assert len(plan["slices"]) == 2
    assert plan["total"]["limit"] >= 200 and f["plan_allows_all"] is True
    assert f["arithmetic"].startswith("2 source addresses x ")
    # the kernel's view: every upstream connection comes from a configured source
    conns = f["backend_connections"]
    assert conns["total"] == 200 and set(conns["by_source"]) <= set(sources), conns
    for key in ("user_memory_per_tunnel_bytes", "tcp_mem_per_tunnel_bytes", "open_s"):
        assert isinstance(f[key], int | float), key
    assert f["tcp_inuse_after"] > f["tcp_inuse_before"] >= 0
    assert r["target_log"]["tunnel_outcomes"] == {"closed": 200}
    assert "tunnels held" in proc.stdout
