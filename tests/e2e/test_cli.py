"""The command line as an operator meets it: demo, version, and docs that
match the code."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO, free_port
from websockets.asyncio.client import connect

from shardproxy.control.addrplan import read_system_port_range

ROOT = REPO


def test_version_names_the_engine() -> None:
    from shardproxy import __version__

    def version(**env: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "shardproxy", "version"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        )
        return out.stdout.strip().splitlines()

    first, engine = version()
    assert first == f"shardproxy {__version__}"
    from shardproxy.engine.choice import COMPILED

    built = (
        "engine: compiled (the relay, the handshakes' I/O and the HTTP head parser in C;"
        " a TLS listener runs the Python handshake engine)"
    )
    assert engine == (built if COMPILED else "engine: python (the compiled module was not built)")
    assert version(SHARDPROXY_PURE="1")[1] == "engine: python (SHARDPROXY_PURE=1)"


def test_demo_serves_two_echo_backends_and_prints_a_pasteable_line() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardproxy", "demo", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(2)]
        command = lines[1].strip()
        assert command == f"{sys.executable} -m websockets ws://127.0.0.1:{port}/", lines

        async def whoami() -> set[str]:
            names = set()
            for _ in range(6):
                async with connect(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send("whoami")
                    names.add(str(await ws.recv()))
                    await ws.send("echo me")
                    assert await ws.recv() == "echo me"
            return names

        assert asyncio.run(asyncio.wait_for(whoami(), 30)) == {"echo-1", "echo-2"}

        # The printed client line works as pasted: websockets' interactive client.
        client = subprocess.run(
            command.split(),
            input="hello from a paste\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        # (With stdin at EOF it closes at once, so only the connection is checked.)
        assert f"Connected to ws://127.0.0.1:{port}/" in client.stdout, (
            client.stdout + client.stderr
        )
        assert client.returncode == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_demo_port_in_use_says_so() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "shardproxy", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = ROOT / "deploy" / "shardproxy.example.toml"
    out = subprocess.run(
        [sys.executable, "-m", "shardproxy", "check", "-c", str(example)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    effective = tomllib.loads(
        "\n".join(x for x in out.stdout.splitlines() if not x.startswith("#"))
    )
    readme = (ROOT / "README.md").read_text()
    example_text = example.read_text()
    keys = {*effective["proxy"], *effective["upstream"], *effective["log"]}
    keys |= set(effective["routes"][0])
    keys |= {k for pool in effective["pools"].values() for k in pool}
    keys |= {k for pool in effective["pools"].values() for s in pool["servers"] for k in s}
    keys |= {k for pool in effective["pools"].values() for k in pool.get("health", {})}
    keys |= set(effective["lifecycle"]) | set(effective["keepalive"]) | set(effective["admin"])
    for key in keys:
        assert re.search(rf"`{key}`", readme), f"README does not document {key}"
        example_has = rf"^\s*{key} =|[{{,] {key} =|^\[pools\.\w+\.{key}\]"
        assert re.search(example_has, example_text, re.M), f"example lacks {key}"


def test_readme_shows_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2
    assert commands[0].endswith("shardproxy demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"exec {commands[1]}" in ci


PLAN_TOML = """\
[proxy]
listen = ["127.0.0.1:18080"]
workers = 2

[upstream]
source_addresses = ["127.0.3.1", "127.0.3.2"]
port_range = "{ports}"

[[routes]]
pool = "p"

[pools.p]
servers = [{{ address = "127.0.0.1", ports = [19001, 19002] }}]
"""


def shardproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardproxy", *args], capture_output=True, text=True, timeout=60
    )


def _plan_config(tmp_path: Path, ports: str = "", **replace: str) -> str:
    """PLAN_TOML with 100 ports from the system range (or ``ports``)."""
    first = read_system_port_range()[0] + 1000
    text = PLAN_TOML.format(ports=ports or f"{first}-{first + 99}")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return str(path)


def test_plan_prints_the_arithmetic_and_json(tmp_path: Path) -> None:
    path = _plan_config(tmp_path)
    text = shardproxy("plan", "-c", path)
    assert text.returncode == 0, text.stderr
    assert "2 x 50 x 2 = 200" in text.stdout
    assert "binding limit is tuples" in text.stdout
    as_json = shardproxy("plan", "-c", path, "--json")
    plan = json.loads(as_json.stdout)
    assert plan["total"]["tuples"] == 400
    first = plan["port_range"]["first"]
    assert [(s["first"], s["last"]) for s in plan["slices"]] == [
        (first, first + 49),
        (first + 50, first + 99),
    ]
    assert plan["allocator"]["name"] in ("kernel", "userspace")


def test_check_refuses_a_source_address_this_host_does_not_have(tmp_path: Path) -> None:
    path = _plan_config(tmp_path, **{'"127.0.3.2"': '"192.0.2.1"'})
    for command in ("check", "plan", "run"):
        out = shardproxy(command, "-c", path)
        assert out.returncode == 1
        assert out.stderr.splitlines() == [
            f"shardproxy: {path}: upstream.source_addresses[1]: 192.0.2.1 cannot be used as "
            "a source address on this host (bind: Cannot assign requested address)"
        ]


def test_check_refuses_a_port_range_outside_the_system_range(tmp_path: Path) -> None:
    first, _ = read_system_port_range()
    path = _plan_config(tmp_path, ports=f"{first - 10}-{first + 10}")
    out = shardproxy("check", "-c", path)
    assert out.returncode == 1
    assert f"upstream.port_range: {first - 10}-{first + 10} is not inside the system range" in (
        out.stderr
    )


def test_run_says_so_when_the_log_file_cannot_be_opened(tmp_path: Path) -> None:
    path = _plan_config(tmp_path)
    with open(path, "a") as f:
        f.write('\n[log]\nfile = "/nonexistent-dir/shardproxy.log"\n')
    out = shardproxy("run", "-c", path)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"shardproxy: {path}: log.file: cannot open /nonexistent-dir/shardproxy.log: "
        "No such file or directory"
    )
