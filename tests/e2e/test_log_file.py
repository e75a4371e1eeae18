"""``[log] file`` of a running proxy: every process appends to it, and
SIGUSR1 reopens it (logrotate)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, toml_config
from peers import WsBackend, parse_json_lines
from websockets.asyncio.client import connect


def test_log_file_is_reopened_on_sigusr1(tmp_path: Path) -> None:
    with WsBackend() as backend:
        port = free_port()
        log = tmp_path / "shardproxy.log"
        config = tmp_path / "shardproxy.toml"
        config.write_text(
            toml_config([backend.port], port=port, extra=f'\n[log]\nfile = "{log}"\n')
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardproxy", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:

            def actions(path: Path) -> list[str]:
                text = path.read_text() if path.exists() else ""
                return [e["event"]["action"] for e in parse_json_lines(text)]

            def wait(path: Path, action: str, count: int = 1) -> None:
                deadline = time.monotonic() + 20
                while actions(path).count(action) < count:
                    assert time.monotonic() < deadline, f"no {action} in {path}"
                    time.sleep(0.05)

            async def one_tunnel() -> None:
                async with connect(f"ws://127.0.0.1:{port}/echo", ping_interval=None) as ws:
                    await ws.send("hi")
                    assert await ws.recv() == "hi"

            wait(log, "worker-ready", 4)  # each worker's own and the supervisor's
            asyncio.run(one_tunnel())
            wait(log, "tunnel-closed")
            rotated = tmp_path / "shardproxy.log.1"
            log.rename(rotated)  # logrotate
            proc.send_signal(signal.SIGUSR1)
            wait(log, "log-reopened")
            time.sleep(0.3)  # the workers got their SIGUSR1 too
            asyncio.run(one_tunnel())
            wait(log, "tunnel-closed")
            assert actions(rotated).count("tunnel-closed") == 1
            assert actions(log).count("tunnel-closed") == 1
            assert proc.poll() is None  # nobody died of the signal
        finally:
            proc.send_signal(signal.SIGQUIT)
            out, _ = proc.communicate(timeout=20)
        assert out == b""  # nothing went to stdout
