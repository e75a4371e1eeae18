"""Smoke test of the benchmark harness: a tiny ``idle`` run completes and
writes a well-formed result. No timing or memory figure is asserted
(benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(REPO))
from bench.idle import KEYS  # noqa: E402


def test_idle_50_tunnels(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "idle", "--tunnels", "50", "--workers", "1",
         "--warmup", "20", "--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    files = list(tmp_path.glob("idle-*.json"))
    assert len(files) == 1, (proc.stdout, proc.stderr)
    result = json.loads(files[0].read_text())

    assert set(KEYS) <= set(result), set(KEYS) - set(result)
    assert result["error"] is None, result["error"]
    assert result["scenario"] == "idle"
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
