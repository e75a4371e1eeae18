"""deploy/examples/*.toml: every example passes `shardproxy check` and
`shardproxy plan` on this host, and beyond-64k.toml does what its name says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

ROOT = REPO
EXAMPLES_DIR = ROOT / "deploy" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.toml"))
EXPECTED = {
    "single-backend.toml",
    "chat-and-notifications.toml",
    "beyond-64k.toml",
    "behind-cloud-lb.toml",
}


def shardproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def plan(path: Path) -> dict[str, Any]:
    out = shardproxy("plan", "-c", str(path), "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_the_examples_are_there_and_listed_in_the_deploy_readme() -> None:
    assert len(EXAMPLES) >= 4
    assert {p.name for p in EXAMPLES} >= EXPECTED
    readme = (ROOT / "deploy" / "README.md").read_text()
    for path in EXAMPLES:
        assert f"examples/{path.name}" in readme


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_starts_with_when_to_use_it(path: Path) -> None:
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    assert len(head) >= 3 and "Use it when" in "\n".join(head)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_accepts_the_example(path: Path) -> None:
    out = shardproxy("check", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert f"{path}: OK" in out.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_plan_describes_the_example(path: Path) -> None:
    result = plan(path)
    assert result["endpoints"]
    assert result["total"]["tuples"] > 0
    assert len(result["slices"]) == result["workers"]


def test_beyond_64k_holds_more_than_64k_per_endpoint() -> None:
    result = plan(EXAMPLES_DIR / "beyond-64k.toml")
    endpoints = len(result["endpoints"])
    assert endpoints > 1
    assert len(result["sources"]) > 1
    assert result["total"]["tuples"] > 64_000 * endpoints
