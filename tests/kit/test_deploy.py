"""The deploy kit agrees with the code: the systemd unit gives a drain the
time it may take, reloads and reopens logs with the right signals."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO

from shardproxy.config import from_mapping
from shardproxy.control.supervisor import STOP_GRACE

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "shardproxy.service"


def unit_settings() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def test_the_unit_waits_for_a_whole_drain_and_uses_our_signals() -> None:
    unit = unit_settings()
    defaults = from_mapping(
        {
            "routes": [{"pool": "p"}],
            "pools": {"p": {"servers": [{"address": "10.0.0.1", "ports": [80]}]}},
        }
    ).lifecycle
    stop = defaults.drain_delay + defaults.drain_timeout + STOP_GRACE
    assert int(unit["TimeoutStopSec"]) > stop
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["ExecStart"].endswith("run -c /etc/shardproxy/shardproxy.toml")
    assert unit["ExecStartPre"].endswith("check -c /etc/shardproxy/shardproxy.toml")
    assert int(unit["LimitNOFILE"]) >= 65536
    # It runs the single-file build (scripts/build-zipapp), which unpacks
    # into SHIV_ROOT: a directory systemd creates for the service's user.
    assert unit["ExecStart"].startswith("/usr/local/bin/shardproxy ")
    assert unit["Environment"] == f"SHIV_ROOT=/var/cache/{unit['CacheDirectory']}"
    assert "install -m 755 dist/shardproxy.pyz /usr/local/bin/shardproxy" in UNIT.read_text()
    assert "SIGUSR1" in (DEPLOY / "logrotate" / "shardproxy").read_text()


def test_systemd_accepts_the_unit() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    out = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    complaints = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and not re.search(r"/usr/local/bin/shardproxy is not executable", line)
    ]
    assert complaints == []
