"""``pip install`` on a machine without a C compiler (CC=/bin/false): the
install succeeds and the Python engines run, saying so; with
SHARDPROXY_BUILD_EXTENSION=yes the same install fails instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_no_compiler_means_the_python_engine_unless_the_build_is_required(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"  # a clean checkout: no build/ left from this tree
    subprocess.run(["git", "clone", "-q", str(REPO), str(source)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = [str(tmp_path / "venv" / "bin" / "pip"), "install", "-q", "--no-deps", "--no-cache-dir"]
    env = {k: v for k, v in os.environ.items() if k != "SHARDPROXY_BUILD_EXTENSION"}
    env["CC"] = "/bin/false"
    subprocess.run([*pip, str(source)], check=True, env=env, capture_output=True, timeout=300)
    describe = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "python"), "-c",
         "from shardproxy.engine import choice; print(choice.describe())"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert describe.stdout.strip() == "python (the compiled module was not built)"
    required = subprocess.run(
        [*pip, "--force-reinstall", str(source)],
        env={**env, "SHARDPROXY_BUILD_EXTENSION": "yes"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert required.returncode != 0, "a required build that cannot compile must fail"
