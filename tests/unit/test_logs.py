"""The ECS renderer gives the documents ecs-logging's formatter gives."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ecs_logging
import pytest
from conftest import free_port, toml_config
from peers import WsBackend, parse_json_lines
from websockets.asyncio.client import connect

from shardproxy.telemetry import logs


def _nested(doc: dict[str, Any]) -> dict[str, Any]:
    """Dotted top-level keys nested, so both shapes ECS allows compare equal."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        *parents, leaf = key.split(".") if key != "@timestamp" else [key]
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return out


EVENTS = [
    {"event": "tunnel closed", "event.action": "tunnel-closed", "client.ip": "127.0.0.1",
     "client.port": 5, "shardproxy.bytes.up": 10, "shardproxy.bytes.down": 0,
     "shardproxy.close.client_code": None, "event.category": ["network", "web"]},
    {"event": "plain message"},
    {"event": "ünïcode ✓", "url.path": "/chät", "http.response.status_code": 404},
]  # fmt: skip


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("level", ["info", "warning", "error", "debug"])
def test_same_document_as_ecs_logging(event: dict[str, Any], level: str) -> None:
    ours = json.loads(logs.ecs_json(None, level, dict(event)))
    theirs = json.loads(ecs_logging.StructlogFormatter()(None, level, dict(event)))
    ours_ts, theirs_ts = ours.pop("@timestamp"), theirs.pop("@timestamp")
    assert ours.pop("ecs") == {"version": logs.ECS_VERSION}  # theirs stamps 1.6.0
    theirs.pop("ecs.version")
    assert len(ours_ts) == len(theirs_ts) == len("2026-11-26T13:08:22.746Z")
    assert ours_ts.endswith("Z") and ours_ts[10] == "T"
    assert _nested(ours) == _nested(theirs)
    assert list(ours)[:2] == ["log.level", "message"]  # ECS: these lead the line


def test_configured_logger_writes_one_line_per_event_with_static_fields() -> None:
    stream = io.StringIO()
    logs.configure("info", {"shardproxy.worker": 3}, stream=stream)
    log = logs.get_logger()
    log.debug("filtered out")
    log.info("hello", **{"event.action": "greet"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", **{"event.action": "fail"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "hello" and first["shardproxy"]["worker"] == 3
    assert first["process"]["pid"] > 0
    assert second["log.level"] == "error"
    assert "ValueError: boom" in second["error"]["stack_trace"]


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
