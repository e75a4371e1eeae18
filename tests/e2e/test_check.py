"""``shardproxy check -c FILE`` as a process: the effective config on
stdout, or one line naming the file, the key and the reason."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from configs import GOOD_TOML, write

from shardproxy import config
from shardproxy.config import from_mapping

# -- `shardproxy check` ----------------------------------------------------------


def run_check(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardproxy", "check", "-c", path],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_prints_the_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    body = "".join(line for line in result.stdout.splitlines(True) if not line.startswith("#"))
    printed = tomllib.loads(body)
    expected = config.load(path)
    assert from_mapping(printed) == expected
    assert printed == expected.to_dict()
    assert printed["proxy"]["workers"] == 3
    assert printed["proxy"]["header_timeout"] == "1500ms"
    assert printed["proxy"]["max_header_bytes"] == 16384  # a default, filled in


def _check_fails(tmp_path: Path, text: str | None, *fragments: str) -> str:
    path = str(tmp_path / "bad.toml") if text is None else write(tmp_path, text, "bad.toml")
    result = run_check(path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert path in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_check_missing_file(tmp_path: Path) -> None:
    _check_fails(tmp_path, None, "no such file")


def test_check_syntax_error(tmp_path: Path) -> None:
    _check_fails(tmp_path, "[proxy\nworkers = 2\n", "TOML syntax error", "line 1")


def test_check_unknown_key(tmp_path: Path) -> None:
    text = GOOD_TOML.replace('level = "debug"', 'level = "debug"\nformat = "json"')
    _check_fails(tmp_path, text, "log.format: unknown key")


def test_check_bad_value(tmp_path: Path) -> None:
    text = GOOD_TOML.replace("ports = [8080] }", "ports = [8080, 99999] }")
    _check_fails(tmp_path, text, "pools.chat.servers[1].ports[1]:", "99999")
