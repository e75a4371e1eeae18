"""The single-file build (scripts/build-zipapp) runs ``check``, ``plan`` and
``demo`` under the system's Python with nothing installed: no venv, an empty
environment, a fresh unpack directory."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port
from websockets.asyncio.client import connect

ROOT = REPO
EXAMPLE = ROOT / "deploy" / "shardproxy.example.toml"


def system_python() -> str | None:
    """A Python >= 3.11 of the host's own, outside every venv."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and Path(candidate).resolve() != Path(sys.executable):
            ok = subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                capture_output=True,
            )
            if ok.returncode == 0:
                return candidate
    return None


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The built file, and a bare environment to run it in."""
    python = system_python()
    if python is None:
        pytest.skip("no system Python >= 3.11 (/usr/bin/python3) to run the build with")
    bare = subprocess.run(
        [python, "-sE", "-c", "import trio"], capture_output=True, cwd="/", timeout=30
    )
    assert bare.returncode != 0, f"{python} imports trio by itself: it cannot prove the build"
    home = tmp_path_factory.mktemp("zipapp")
    target = home / "shardproxy.pyz"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-zipapp"), "--python", python, "--output", target],
        check=True,
        timeout=300,
        capture_output=True,
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHIV_ROOT": str(home / "unpacked")}
    return target, env


def run(build: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    target, env = build
    return subprocess.run(
        [str(target), *args], env=env, cwd="/", capture_output=True, text=True, timeout=120
    )


def test_the_build_is_one_executable_file_for_the_system_python(
    build: tuple[Path, dict[str, str]],
) -> None:
    target, _ = build
    assert os.access(target, os.X_OK)
    first_line = target.read_bytes().split(b"\n", 1)[0]
    assert first_line == f"#!{system_python()} -sE".encode()
    version = run(build, "version")
    assert version.returncode == 0 and version.stdout.startswith("shardproxy ")
    if shutil.which("gcc"):  # the build compiled the C engine: the zipapp carries and loads it
        assert (
            "engine: compiled (the relay, the handshakes' I/O and the HTTP head parser in C"
            in version.stdout
        ), version.stdout


def test_check_and_plan_run_from_the_build(build: tuple[Path, dict[str, str]]) -> None:
    check = run(build, "check", "-c", str(EXAMPLE))
    assert check.returncode == 0, check.stderr
    assert "[proxy]" in check.stdout
    plan = run(build, "plan", "-c", str(EXAMPLE), "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["total"]["tuples"] > 0
    broken = run(build, "check", "-c", "/nonexistent.toml")
    assert broken.returncode == 1 and "no such file" in broken.stderr


def paste(line: str, env: dict[str, str], typed: str) -> str:
    """Run a shell line, type into it, and return what it printed once it
    answered (or what it printed before the deadline)."""
    client = subprocess.Popen(
        ["bash", "-c", line], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(typed.encode())
    client.stdin.flush()
    out = b""
    deadline = time.monotonic() + 60
    try:
        while b"echo-" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([client.stdout], [], [], deadline - time.monotonic())
            chunk = os.read(client.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                break
            out += chunk
    finally:
        client.stdin.close()
        client.wait(30)
    return out.decode(errors="replace")


def test_demo_runs_from_the_build_and_its_client_line_works(
    build: tuple[Path, dict[str, str]],
) -> None:
    target, env = build
    port = free_port()
    demo = subprocess.Popen(
        [str(target), "demo", "--port", str(port)],
        env=env,
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stderr is not None
        deadline = time.monotonic() + 60
        client_line = ""
        while time.monotonic() < deadline and not client_line:
            line = demo.stderr.readline()
            assert line, "the demo exited before it was ready"
            if line.startswith("SHIV_ENTRY_POINT="):
                client_line = line.strip()
        assert client_line.endswith(f"{target} ws://127.0.0.1:{port}/")

        async def whoami() -> set[str]:
            names = set()
            for _ in range(4):  # the workers the build spawned relay to both backends
                async with connect(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send("whoami")
                    names.add(str(await ws.recv()))
            return names

        assert asyncio.run(whoami()) <= {"echo-1", "echo-2"}
        # The printed line, pasted into a shell with the build's bare environment.
        assert "echo-" in paste(client_line, env, "whoami\n")
    finally:
        demo.terminate()
        demo.wait(30)
    assert demo.returncode == 0
    assert shutil.which("shardproxy", path=env["PATH"]) is None  # nothing was installed
