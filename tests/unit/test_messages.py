"""The control messages: every one survives the wire as itself, and
anything else is refused."""

from __future__ import annotations

import pytest

from shardproxy.control.messages import (
    Ack,
    Drained,
    Envelope,
    Health,
    Message,
    Ready,
    Reply,
    Request,
    Retire,
    Start,
    Stats,
    UpstreamSlice,
    decode,
    encode,
)
from shardproxy.telemetry.snapshot import Counts, WorkerSnapshot

MESSAGES: list[Message | Envelope] = [
    Start(
        1, 2, {"proxy": {"workers": 2}}, "/etc/x.toml", UpstreamSlice(1024, 2047, "kernel", (1100,))
    ),
    Health(("10.0.0.1:80", "[::1]:81")),
    Health(()),
    Drained((("chat", "a"), ("chat", "b"))),
    Retire((0, 2), None),
    Retire((), 30.0),
    Ready(0, 1234, 9968),
    Ack(),
    Request(7, Drained((("chat", "a"),))),
    Reply(7, Ack()),
    Stats(
        WorkerSnapshot(0, 1, 3, 0, 100, Counts(closed={"closed": 1}), routes={"*/": 3}),
        {"10.0.0.1:80": 2},
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_as_itself(message: Message | Envelope) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line[:-1]) == message


@pytest.mark.parametrize(
    "line",
    [
        b'{"type": "nonsense"}',
        b'{"down": []}',
        b"[1, 2]",
        b'{"type": "health", "down": [], "extra": 1}',
        b'{"type": "ready", "slot": 0, "pid": 1}',
        b"not json",
        b'{"type": "request", "id": 1, "message": {"type": "request", "id": 2, "message": {}}}',
        b'{"type": "reply", "id": 1, "message": {"type": "ack"}, "extra": 1}',
        b'{"type": "reply", "id": "1", "message": {"type": "ack"}}',
        b'{"type": "request", "id": 1, "message": {"type": "ack", "why": "no"}}',
    ],
)
def test_anything_else_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode(line)
