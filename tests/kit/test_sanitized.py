"""The compiled engine's tests under ASan and UBSan (scripts/test-sanitized):
an out-of-bounds access or undefined behaviour in engine/_cengine.c fails
here even where the result looked right."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_the_compiled_engine_is_clean_under_the_sanitizers() -> None:
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "test-sanitized")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
