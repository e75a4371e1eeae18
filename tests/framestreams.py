"""Random WebSocket frame streams for property tests, built by wsproto (an
independent implementation), and random ways to cut them: shared by the
frame tracker's tests (tests/unit) and the relays' (tests/engine)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


@dataclass
class Stream:
    data: bytes
    frame_ends: list[int]
    messages: int
    close_code: int | None


# Lengths across the 7-bit / 16-bit / 64-bit encodings of RFC 6455 §5.2.
SIZES = st.one_of(
    st.integers(0, 300),
    st.sampled_from([0, 1, 2, 125, 126, 127, 1000, 65535, 65536]),
)
CLOSE_CODES = st.one_of(
    st.none(),
    st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1011]),
    st.integers(3000, 4999),
)


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    proto = FrameProtocol(client=draw(st.booleans()), extensions=[])
    out = bytearray()
    ends: list[int] = []
    big_frames = 0

    def emit(frame: bytearray) -> None:
        out.extend(frame)
        ends.append(len(out))

    def maybe_control() -> None:
        # RFC 6455 §5.4: control frames may come between fragments.
        for _ in range(draw(st.integers(0, 2))):
            payload = b"c" * draw(st.sampled_from([0, 1, 125]))
            emit(proto.ping(payload) if draw(st.booleans()) else proto.pong(payload))

    messages = draw(st.integers(0, 5))
    for _ in range(messages):
        text = draw(st.booleans())
        fragments = draw(st.integers(1, 3))
        maybe_control()
        for i in range(fragments):
            size = draw(SIZES)
            if size > 65535:
                big_frames += 1
                size = size if big_frames == 1 else 300  # keep the test fast
            filler = draw(st.integers(0, 255))  # payloads that look like headers
            payload: str | bytes = chr(filler & 0x7F) * size if text else bytes([filler]) * size
            emit(proto.send_data(payload, fin=i == fragments - 1))
            if i < fragments - 1:
                maybe_control()
    maybe_control()
    code: int | None = None
    if draw(st.booleans()):
        sent = draw(CLOSE_CODES)
        reason = draw(st.text(max_size=10)) if sent is not None else None
        emit(proto.close(sent, reason))
        code = 1005 if sent is None else sent
    return Stream(bytes(out), ends, messages, code)


def cut_points(stream: Stream) -> st.SearchStrategy[list[int]]:
    n = len(stream.data)
    near_frame_ends = st.builds(
        lambda end, delta: min(max(end + delta, 0), n),
        st.sampled_from(stream.frame_ends or [0]),
        st.integers(-16, 16),
    )
    return st.lists(st.one_of(st.integers(0, n), near_frame_ends), max_size=30)
