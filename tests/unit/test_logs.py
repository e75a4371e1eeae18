"""The ECS renderer gives the documents ecs-logging's formatter gives."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import ecs_logging
import pytest

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


def test_a_nested_event_is_the_document_the_logger_writes() -> None:
    """logs.emit_nested (the access event's path past structlog) writes what
    log.info writes for the same fields, the static ones merged in; below
    the configured level it writes nothing."""
    stream = io.StringIO()
    logs.configure("info", {"shardproxy.worker": 3}, stream=stream)

    def fields() -> dict[str, Any]:
        return {
            "client": {"ip": "127.0.0.1", "port": 5},
            "shardproxy": {"outcome": "closed", "bytes": {"up": 1, "down": 2}},
            "event": {"action": "tunnel-closed", "category": ("network",)},
            "user_agent": {"original": "ünïcode ✓"},
        }

    dotted = fields()
    for name, value in dotted.pop("event").items():  # structlog's own argument is "event"
        dotted[f"event.{name}"] = value
    logs.get_logger().info("tunnel closed", **dotted)
    logs.emit_nested("tunnel closed", fields())
    logs.emit_nested("not written", fields(), level="debug")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    by_logger, nested = (json.loads(line) for line in lines)
    by_logger.pop("@timestamp"), nested.pop("@timestamp")
    assert nested == by_logger
    assert nested["shardproxy"]["worker"] == 3 and nested["observer"]["product"] == "shardproxy"


def _configure_recording() -> list[str]:
    """Logging to a stream that records each write it gets, as one item."""
    writes: list[str] = []

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    logs.configure("info", stream=Stream())
    return writes


def test_a_batch_writes_its_lines_at_its_end_in_order_once() -> None:
    """logs.batched: nothing reaches the stream until the outermost batch
    ends, then every line in the order written (structlog's and the
    nested access path's alike), in one write; an exception ends it too."""
    writes = _configure_recording()
    with logs.batched:
        logs.get_logger().info("first")
        with logs.batched:
            logs.emit_nested("second", {"event": {"action": "x"}})
        logs.get_logger().warning("third")
        assert writes == []
    assert len(writes) == 1
    assert [json.loads(line)["message"] for line in writes[0].splitlines()] == [
        "first",
        "second",
        "third",
    ]
    with pytest.raises(RuntimeError), logs.batched:
        logs.get_logger().info("fourth")
        raise RuntimeError("the round failed")
    assert json.loads(writes[-1])["message"] == "fourth"
    logs.get_logger().info("fifth")  # no batch: at once
    assert json.loads(writes[-1])["message"] == "fifth"


def test_a_batch_goes_out_in_writes_a_pipe_keeps_whole() -> None:
    """Workers share a pipe: each write of a batch is whole lines of at most
    PIPE_BUF bytes (pipe(7): such a write is never interleaved), and a line
    longer than that goes alone."""
    writes = _configure_recording()
    with logs.batched:
        for i in range(40):
            logs.emit_nested(f"line {i}", {"labels": {"pad": "x" * (300 if i != 7 else 5000)}})
    assert len(writes) > 1
    for w in writes:
        assert w.endswith("\n") and (len(w.encode()) <= logs.ATOMIC_WRITE or w.count("\n") == 1)
    lines = "".join(writes).splitlines()
    assert [json.loads(line)["message"] for line in lines] == [f"line {i}" for i in range(40)]


def test_another_threads_line_does_not_wait_for_a_batch() -> None:
    writes = _configure_recording()
    with logs.batched:
        logs.emit_nested("held", {})
        other = threading.Thread(target=logs.emit_nested, args=("from a thread", {}))
        other.start()
        other.join()
        assert [json.loads(w)["message"] for w in writes] == ["from a thread"]
    assert json.loads(writes[-1])["message"] == "held"
