"""The compiled frame tracker (engine/_cengine.c) against the Python one
(protocol/frames.py), the reference: random and mutated frame sequences cut
at random byte boundaries give both the same boundaries, message counts,
close codes, errors and injection points (feed_to_boundary)."""

from __future__ import annotations

import os
import socket

import pytest
from framestreams import cut_points, split_at, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardproxy.engine import choice
from shardproxy.protocol.frames import FrameTracker

REQUIRED = os.environ.get("SHARDPROXY_BUILD_EXTENSION", "").lower() in ("1", "yes", "true")
compiled = choice.COMPILED

pytestmark = pytest.mark.skipif(
    compiled is None and not REQUIRED, reason="the compiled engine was not built here"
)


def test_the_extension_was_built_where_it_is_required() -> None:
    # CI sets SHARDPROXY_BUILD_EXTENSION=yes: no silent fallback there.
    assert compiled is not None, "SHARDPROXY_BUILD_EXTENSION=yes but _cengine does not import"
    assert compiled.TRACKER_BYTES <= 48  # two per tunnel: the C relay's budget
    expected = os.environ.get("SHARDPROXY_EXPECT_CENGINE")  # scripts/test-sanitized's build
    if expected:
        assert compiled.__file__ == expected


def state(t: object) -> tuple[object, ...]:
    return (t.messages, t.close_code, t.error, t.at_boundary)  # type: ignore[attr-defined]


def both() -> tuple[FrameTracker, object]:
    assert compiled is not None
    return FrameTracker(), compiled.FrameTracker()


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_stream_cut_anywhere_gives_both_the_same_state(data: st.DataObject) -> None:
    stream = data.draw(streams())
    py, c = both()
    for chunk in split_at(stream.data, data.draw(cut_points(stream))):
        py.feed(chunk)
        c.feed(memoryview(bytearray(chunk)))  # type: ignore[attr-defined]
        assert state(py) == state(c)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_streams_fail_the_same_way(data: st.DataObject) -> None:
    raw = bytearray(data.draw(streams()).data)
    for _ in range(data.draw(st.integers(1, 4))):  # a few bytes anywhere, headers included
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw += data.draw(st.binary(max_size=40))
    py, c = both()
    for chunk in split_at(bytes(raw), data.draw(st.lists(st.integers(0, len(raw)), max_size=20))):
        py.feed(chunk)
        c.feed(chunk)  # type: ignore[attr-defined]
        assert state(py) == state(c)


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
def test_garbage_gives_both_the_same_verdict(raw: bytes, cuts: list[int]) -> None:
    py, c = both()
    for chunk in split_at(raw, [min(x, len(raw)) for x in cuts]):
        py.feed(chunk)
        c.feed(chunk)  # type: ignore[attr-defined]
        assert state(py) == state(c)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_injection_points_agree(data: st.DataObject) -> None:
    """The relay asks feed_to_boundary where its own frame may go: both
    trackers must name the same byte, chunk after chunk."""
    stream = data.draw(streams())
    py, c = both()
    for chunk in split_at(stream.data, data.draw(cut_points(stream))):
        if data.draw(st.booleans()):
            k = py.feed_to_boundary(chunk)
            assert c.feed_to_boundary(chunk) == k  # type: ignore[attr-defined]
            assert state(py) == state(c)
            if k >= 0:  # the rest of the chunk follows our frame
                py.feed(chunk[k:])
                c.feed(chunk[k:])  # type: ignore[attr-defined]
        else:
            py.feed(chunk)
            c.feed(chunk)  # type: ignore[attr-defined]
        assert state(py) == state(c)


def test_the_longest_headers_and_lengths() -> None:
    """64-bit lengths (the MSB refused), a masked Close cut in every place,
    and a payload length that ends exactly at a chunk's end."""
    cases = [
        bytes([0x82, 127]) + (1 << 63).to_bytes(8, "big"),
        bytes([0x82, 0xFF]) + (70000).to_bytes(8, "big") + b"mask",
        bytes([0x88, 0x82]) + b"\x01\x02\x03\x04" + bytes([0x03 ^ 1, 0xE8 ^ 2]),
        bytes([0x88, 0x81]) + b"\x01\x02\x03\x04" + b"x",
        bytes([0x09, 0x00]),  # a fragmented Ping
        bytes([0x89, 126, 0, 200]),  # a Ping over 125 bytes
        bytes([0x00, 0x00]),  # a continuation outside a message
        bytes([0x01, 0x00, 0x82, 0x00]),  # a new message inside one
    ]
    for raw in cases:
        for cut in range(len(raw) + 1):
            py, c = both()
            for chunk in (raw[:cut], raw[cut:]):
                py.feed(chunk)
                c.feed(chunk)  # type: ignore[attr-defined]
                assert state(py) == state(c), (raw, cut)


def test_the_relays_ping_payload_is_bounded_by_what_it_can_hold_back() -> None:
    # A Pong of ours cut short is held back whole: header and payload must
    # fit the tunnel's 64-byte buffer, so the payload may take 50 bytes.
    assert compiled is not None
    outcomes = tuple("abcdefg")
    compiled.Relay(outcomes, 0.0, 10.0, b"p" * 50).close()
    with pytest.raises(ValueError):
        compiled.Relay(outcomes, 0.0, 10.0, b"p" * 51)


def test_summarized_ends_lines_come_in_chunks_of_whole_lines_up_to_pipe_buf() -> None:
    """The relay's access lines (Relay.take_lines) come in chunks of whole
    lines of at most PIPE_BUF bytes, a longer line alone (logs.batched's
    rule: workers share a pipe, and only such writes are never interleaved);
    a form is () or 14 segments, and only after summarize."""
    assert compiled is not None
    relay = compiled.Relay(tuple("abcdefg"), 0.0, 10.0, b"p")
    note = compiled.pack_note("10.0.0.1", 1, 2)[0]
    sizes = [100] * 30 + [5000] + [100] * 3  # bytes of text per line, about
    pairs = [socket.socketpair() for _ in sizes]
    try:
        with pytest.raises(ValueError):  # before summarize
            relay.add(pairs[0][0].fileno(), pairs[0][1].fileno(), "t", b"", b"", note, ())
        relay.summarize((1.0,), (1002,))
        for bad in ((b"x",) * 13, (b"x",) * 13 + ("x",), [b"x"] * 14):
            with pytest.raises(ValueError):
                relay.add(pairs[0][0].fileno(), pairs[0][1].fileno(), "t", b"", b"", note, bad)
        client_fds = []
        for i, ((a, b), size) in enumerate(zip(pairs, sizes, strict=True)):
            form = (b"%d:" % i + b"x" * size,) + (b"|",) * 12 + (b"\n",)
            client_fds.append(a.fileno())
            relay.add(a.detach(), b.detach(), "t", b"", b"", note, form)
        relay.close()  # every tunnel ends, STOPPED (ordinary), in the order of their client fds
        chunks = relay.take_lines()
        ((token, n, outcomes, *_),) = relay.take_summaries()
        assert (token, n, outcomes[3]) == ("t", len(sizes), len(sizes))
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert b"".join(chunks).count(b"\n") == len(sizes)
    starts = [int(line.split(b":", 1)[0]) for c in chunks for line in c.splitlines()]
    ended = sorted(range(len(sizes)), key=lambda i: client_fds[i])
    assert starts == ended  # in the order they ended, none lost
    for c in chunks:
        assert c.endswith(b"\n")
        assert len(c) <= 4096 or c.count(b"\n") == 1
    assert len(chunks) >= 3 and any(len(c) > 4096 for c in chunks)
    assert relay.take_lines() == [] and relay.take_summaries() == []
