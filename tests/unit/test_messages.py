"""The control messages: every one survives the wire as itself, and
anything else is refused."""

from __future__ import annotations

import pytest

from shardproxy.control.messages import (
    Drained,
    Health,
    Message,
    Ready,
    Retire,
    Start,
    Stats,
    UpstreamSlice,
    decode,
    encode,
)
from shardproxy.telemetry.snapshot import Counts, WorkerSnapshot

MESSAGES: list[Message] = [
    Start(
        1, 2, {"proxy": {"workers": 2}}, "/etc/x.toml", UpstreamSlice(1024, 2047, "kernel", (1100,))
    ),
    Health(("10.0.0.1:80", "[::1]:81")),
    Health(()),
    Drained((("chat", "a"), ("chat", "b"))),
    Retire((0, 2), None),
    Retire((), 30.0),
    Ready(0, 1234, 9968),
    Stats(
        WorkerSnapshot(0, 1, 3, 0, 100, Counts(closed={"closed": 1}), routes={"*/": 3}),
        {"10.0.0.1:80": 2},
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_as_itself(message: Message) -> None:
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
    ],
)
def test_anything_else_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode(line)
