"""Tests for shardproxy.frames.

Frames come from wsproto, an independent implementation, wherever it can make
them; a small local builder covers the malformed frames wsproto refuses to
write. Every stream is fed whole, in arbitrary chunks and one byte at a time,
and all three must agree (the h11 habit).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from conftest import REPO
from framestreams import cut_points, split_at, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from shardproxy.protocol.frames import FrameTracker

FRAMES_PY = REPO / "shardproxy" / "protocol" / "frames.py"

Snapshot = tuple[int, int | None, bool, str | None]


def snapshot(tracker: FrameTracker) -> Snapshot:
    return (tracker.messages, tracker.close_code, tracker.at_boundary, tracker.error)


def feed_chunks(chunks: Iterable[bytes | bytearray | memoryview]) -> FrameTracker:
    tracker = FrameTracker()
    for chunk in chunks:
        tracker.feed(chunk)
    return tracker


def bytewise(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + 1] for i in range(len(data))]


def raw_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    """Build a frame by hand (RFC 6455 §5.2), including ones wsproto refuses."""
    head = bytearray([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if mask is not None:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


# ---------------------------------------------------------------------------
# Module hygiene


def test_frames_module_does_no_io() -> None:
    # Load the file on its own, not through the package __init__, so that only
    # frames.py itself is judged.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('frames', {str(FRAMES_PY)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.FrameTracker().feed(b'\\x81\\x00')\n"
        "bad = {'trio', 'socket', 'selectors', 'asyncio', 'ssl'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_frames_module_imports_nothing_but_future() -> None:
    tree = ast.parse(FRAMES_PY.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported == {"__future__"}


def test_tracker_is_small() -> None:
    tracker = FrameTracker()
    assert not hasattr(tracker, "__dict__")
    assert len(FrameTracker.__slots__) <= 7
    assert snapshot(tracker) == (0, None, True, None)


# ---------------------------------------------------------------------------
# Well-formed streams from wsproto


def test_wsproto_conversation_both_directions() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="example.com", target="/")))
    assert any(isinstance(e, Request) for e in server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())

    upstream = client.send(Message(data="hello"))
    upstream += client.send(Message(data=b"part 1", message_finished=False))
    upstream += client.send(Ping(payload=b"are you there"))
    upstream += client.send(Message(data=b"part 2", message_finished=False))
    upstream += client.send(Message(data=b"x" * 70_000))
    upstream += client.send(CloseConnection(code=4001, reason="bye"))

    downstream = server.send(Message(data="hi"))
    downstream += server.send(Pong(payload=b"yes"))
    downstream += server.send(CloseConnection(code=1001))

    for stream, expected in [(upstream, (2, 4001)), (downstream, (1, 1001))]:
        for chunks in (
            [stream],
            split_at(stream, [3, 40, 41, 70_010]),
            bytewise(stream),
        ):
            assert snapshot(feed_chunks(chunks)) == (*expected, True, None)


def test_rsv_bits_from_permessage_deflate_are_not_errors() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    request = Request(host="example.com", target="/", extensions=[PerMessageDeflate()])
    server.receive_data(client.send(request))
    list(server.events())
    accept = AcceptConnection(extensions=[PerMessageDeflate()])
    client.receive_data(server.send(accept))
    list(client.events())

    stream = client.send(Message(data="compress me " * 50)) + client.send(Message(data=b"a"))
    assert stream[0] & 0x40, "wsproto should have set RSV1"
    assert snapshot(feed_chunks([stream])) == (2, None, True, None)


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70_000])
def test_length_encodings(client: bool, size: int) -> None:
    # 7-bit, 16-bit and 64-bit lengths (RFC 6455 §5.2), masked or not.
    proto = FrameProtocol(client=client, extensions=[])
    frame = bytes(proto.send_data(b"\x82" * size))
    header = len(frame) - size
    tracker = FrameTracker()
    tracker.feed(frame[:header])
    assert tracker.at_boundary is (size == 0)
    tracker.feed(frame[header:])
    assert snapshot(tracker) == (1, None, True, None)


def test_at_boundary_only_between_frames() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    frames = [
        bytes(proto.send_data(b"a" * 300, fin=False)),  # 16-bit length, masked
        bytes(proto.ping(b"p")),
        bytes(proto.send_data(b"b" * 5)),
        bytes(proto.close(1000)),
    ]
    tracker = FrameTracker()
    for frame in frames:
        for i in range(len(frame) - 1):
            tracker.feed(frame[i : i + 1])
            assert not tracker.at_boundary, (frame[:2], i)
        tracker.feed(frame[-1:])
        assert tracker.at_boundary
    assert snapshot(tracker) == (1, 1000, True, None)


def test_several_frames_in_one_chunk_then_split_header() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    stream = b"".join(bytes(proto.send_data(b"m" * i)) for i in (1, 2, 200, 3))
    tracker = FrameTracker()
    tracker.feed(stream[:-10])  # ends inside the last frame's 6-byte header
    assert not tracker.at_boundary
    assert tracker.messages == 3
    tracker.feed(stream[-10:])
    assert snapshot(tracker) == (4, None, True, None)


# ---------------------------------------------------------------------------
# Close codes


@pytest.mark.parametrize("client", [True, False])
def test_close_code_split_anywhere(client: bool) -> None:
    close = bytes(FrameProtocol(client=client, extensions=[]).close(4321, "later"))
    code_end = (6 if client else 2) + 2  # header, then the 2 code bytes
    for cut in range(len(close) + 1):
        tracker = FrameTracker()
        tracker.feed(close[:cut])
        assert tracker.close_code == (4321 if cut >= code_end else None), cut
        tracker.feed(close[cut:])
        assert snapshot(tracker) == (0, 4321, True, None), cut
    assert snapshot(feed_chunks(bytewise(close))) == (0, 4321, True, None)


@pytest.mark.parametrize("client", [True, False])
def test_empty_close_is_1005(client: bool) -> None:
    close = bytes(FrameProtocol(client=client, extensions=[]).close())
    assert len(close) == (6 if client else 2)
    assert feed_chunks(bytewise(close)).close_code == 1005
    assert feed_chunks([close]).close_code == 1005


def test_only_first_close_counts() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    assert feed_chunks([proto.close(1000), proto.close(4000)]).close_code == 1000
    assert feed_chunks([proto.close(), proto.close(4000)]).close_code == 1005
    tracker = feed_chunks([proto.close(1001), raw_frame(0x8, b"\x07")])
    assert snapshot(tracker) == (0, 1001, True, None)


def test_close_code_unmasked_with_a_nontrivial_key() -> None:
    close = raw_frame(0x8, (1002).to_bytes(2, "big"), mask=b"\xa5\x5a\xff\x01")
    assert close[6:8] != (1002).to_bytes(2, "big")
    assert feed_chunks(split_at(close, [7])).close_code == 1002


# ---------------------------------------------------------------------------
# Protocol violations

ERROR_CASES = {
    **{f"opcode {op}": raw_frame(op, b"abc") for op in [*range(3, 8), *range(11, 16)]},
    "ping with FIN=0": raw_frame(0x9, b"p", fin=False),
    "close with FIN=0": raw_frame(0x8, b"\x03\xe8", fin=False),
    "ping over 125": raw_frame(0x9, b"p" * 126, mask=b"abcd"),
    "pong over 125": raw_frame(0xA, b"p" * 200),
    "64-bit length MSB": bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"mask",
    "lone continuation": raw_frame(0x0, b"x"),
    "continuation after finished message": raw_frame(0x1, b"x") + raw_frame(0x0, b"y"),
    "text inside fragmented message": raw_frame(0x1, b"a", fin=False) + raw_frame(0x1, b"b"),
    "binary inside fragmented message": raw_frame(0x2, b"a", fin=False)
    + raw_frame(0x9)
    + raw_frame(0x2, b"b"),
    "close with 1 byte": raw_frame(0x8, b"\x03", mask=b"abcd"),
}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_protocol_errors(name: str) -> None:
    stream = ERROR_CASES[name]
    whole = feed_chunks([stream])
    assert whole.error
    assert not whole.at_boundary
    assert snapshot(feed_chunks(bytewise(stream))) == snapshot(whole)
    assert snapshot(feed_chunks(split_at(stream, [1]))) == snapshot(whole)
    before = snapshot(whole)
    # Feeding on is a no-op, whatever comes.
    whole.feed(raw_frame(0x1, b"ok") + raw_frame(0x8, b"\x03\xe8"))
    whole.feed(b"\xff" * 100)
    whole.feed(memoryview(b""))
    assert snapshot(whole) == before
    if name == "close with 1 byte":
        assert whole.error == "close payload of 1 byte"
        assert whole.close_code is None


def test_rsv_bits_and_mask_direction_are_not_checked() -> None:
    stream = raw_frame(0x1, b"a", rsv=0b111) + raw_frame(0x2, b"b", mask=b"1234")
    stream += raw_frame(0x9, rsv=0b100)
    assert snapshot(feed_chunks([stream])) == (2, None, True, None)


# ---------------------------------------------------------------------------
# Buffers


def test_no_reference_to_fed_buffer_is_kept() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    stream = b"".join(
        [
            bytes(proto.send_data(b"q" * 300, fin=False)),
            bytes(proto.ping()),
            bytes(proto.send_data(b"r" * 3)),
            bytes(proto.close(4444)),
        ]
    )
    expected = snapshot(feed_chunks([stream]))
    assert expected == (1, 4444, True, None)
    for size in (1, 2, 3, 5, 7):  # straddle every header in many ways
        shared = bytearray(16)  # the engine's reused receive buffer
        tracker = FrameTracker()
        for start in range(0, len(stream), size):
            chunk = stream[start : start + size]
            shared[: len(chunk)] = chunk
            tracker.feed(memoryview(shared)[: len(chunk)])
            shared[:] = b"\xff" * len(shared)  # would read as reserved opcodes
        assert snapshot(tracker) == expected, size

        tracker = FrameTracker()
        for start in range(0, len(stream), size):
            owned = bytearray(stream[start : start + size])
            tracker.feed(owned)
            owned[:] = b"\x0f" * len(owned)
        assert snapshot(tracker) == expected, size


def test_memoryviews_of_other_formats_count_octets() -> None:
    stream = raw_frame(0x2, b"\x01\x02\x03\x04") + raw_frame(0x8, b"\x0b\xb8")  # 3000
    assert len(stream) == 10
    as_chars = memoryview(stream).cast("c")
    words = array("H")
    words.frombytes(stream)
    chunkings: list[list[Any]] = [  # memoryview[bytes] among them
        [as_chars],
        [memoryview(words)],
        [as_chars[:4], memoryview(words)[2:]],
        [as_chars[:7], as_chars[7:]],  # between the close code's bytes
    ]
    for chunks in chunkings:
        assert snapshot(feed_chunks(chunks)) == (1, 3000, True, None)


# ---------------------------------------------------------------------------
# Property: any well-formed stream, any chunking


BYTEWISE_LIMIT = 8192  # bytes of a stream fed one at a time


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_chunking_gives_the_same_result(data: st.DataObject) -> None:
    stream = data.draw(streams())
    expected = (stream.messages, stream.close_code, True, None)

    assert snapshot(feed_chunks([stream.data])) == expected

    cuts = data.draw(cut_points(stream))
    tracker = FrameTracker()
    ends = set(stream.frame_ends) | {0}
    for start, chunk in _with_offsets(split_at(stream.data, cuts)):
        tracker.feed(bytearray(chunk))
        assert tracker.at_boundary is (start + len(chunk) in ends)
    assert snapshot(tracker) == expected

    if len(stream.data) > BYTEWISE_LIMIT:
        return  # the cuts above reach every header of it; a byte at a time would take seconds
    tracker = FrameTracker()
    for i, byte in enumerate(bytewise(stream.data), 1):
        tracker.feed(byte)
        assert tracker.at_boundary is (i in ends)
    assert snapshot(tracker) == expected


def _with_offsets(chunks: Sequence[bytes]) -> Iterable[tuple[int, bytes]]:
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_feed_to_boundary_stops_at_the_first_frame_end(data: st.DataObject) -> None:
    stream = data.draw(streams())
    cuts = data.draw(cut_points(stream))
    ends = sorted(set(stream.frame_ends) | {0})
    tracker = FrameTracker()
    for start, chunk in _with_offsets(split_at(stream.data, cuts)):
        first_end = next((e for e in ends if e >= start), None)
        k = tracker.feed_to_boundary(chunk)
        if first_end is not None and first_end <= start + len(chunk):
            assert k == first_end - start
            assert tracker.at_boundary
            tracker.feed(chunk[k:])
        else:
            assert k == -1
    assert snapshot(tracker) == (stream.messages, stream.close_code, True, None)


def test_feed_to_boundary_inside_a_split_header_and_after_an_error() -> None:
    frame = raw_frame(0x2, b"x" * 300, mask=b"abcd")  # 2 + 2 + 4 header bytes
    tracker = FrameTracker()
    tracker.feed(frame[:3])
    assert tracker.feed_to_boundary(frame[3:10]) == -1  # header done, payload goes on
    assert tracker.feed_to_boundary(frame[10:] + b"\x82\x00") == len(frame) - 10
    assert tracker.messages == 1
    broken = FrameTracker()
    broken.feed(raw_frame(0x3))
    assert broken.error is not None
    assert broken.feed_to_boundary(b"\x82\x00") == -1
