"""Both relays against each other, through real sockets: random frame
sequences (tests/unit/test_frames.py's ``streams``) cut at random byte
boundaries give the Python engine and the compiled one the same injection
points, the same bytes out and the same figures.

- A Close injected while the backend's stream is anywhere (begin_close after
  a random number of chunks went through): the client gets the same bytes,
  our Close at the same place, from both.
- Our Pong anywhere between the client's frames, cut anywhere: the backend
  gets the client's stream without it, from both (whatever the reads were).
"""

from __future__ import annotations

import os
import socket

import pytest
import trio
from engines import current
from framestreams import cut_points, split_at, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_relay import Harness, masked, recv_exactly

from shardproxy.engine.api import FlowStats
from shardproxy.engine.choice import COMPILED

pytestmark = pytest.mark.skipif(COMPILED is None, reason="the compiled engine was not built")

EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 16):
        out += chunk
    return bytes(out)


def with_engine(name: str, test: object) -> tuple[object, list[FlowStats]]:
    """Run ``test(harness)`` on a fresh engine called ``name``; its result
    and the figures of every tunnel that ended."""
    fds = len(os.listdir("/proc/self/fd"))
    current.name = name
    try:
        h = Harness()
    finally:
        current.name = "python"
    result: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.engine.run)
            result.append(await test(h))  # type: ignore[operator]
            nursery.cancel_scope.cancel()
        h.engine.close()

    trio.run(main)
    assert len(os.listdir("/proc/self/fd")) == fds, f"the {name} engine left descriptors open"
    return result[0], [s for _, _, stats in h.closed for s in (stats.up, stats.down)]


@EXAMPLES
@given(st.data())
def test_a_close_goes_in_at_the_same_place_on_both_engines(data: st.DataObject) -> None:
    stream = data.draw(streams())
    chunks = split_at(stream.data, data.draw(cut_points(stream)))
    chunks = [c for c in chunks if c]
    close_after = data.draw(st.integers(0, len(chunks)))

    async def test(h: Harness) -> bytes:
        client, backend, t = h.tunnel()
        for i, chunk in enumerate(chunks):
            if i == close_after:
                h.engine.begin_close(t, 1001, b"going away")
            await trio.to_thread.run_sync(backend.sendall, chunk)
            if i < close_after:  # read by the engine before the next: the injection point is fixed
                assert await trio.to_thread.run_sync(recv_exactly, client, len(chunk)) == chunk
        if close_after == len(chunks):
            h.engine.begin_close(t, 1001, b"going away")
        backend.shutdown(socket.SHUT_WR)  # passed on: the client reads to its end
        received = await trio.to_thread.run_sync(recv_all, client)
        h.engine.end(t)
        client.close()
        backend.close()
        return received

    python = with_engine("python", test)
    compiled = with_engine("compiled", test)
    assert python[0] == compiled[0]
    # The figures of the backend's direction (bytes, messages, close code, error).
    assert [(s.bytes, s.messages, s.close_code, s.frame_error) for s in python[1]] == [
        (s.bytes, s.messages, s.close_code, s.frame_error) for s in compiled[1]
    ]


@EXAMPLES
@given(st.data())
def test_our_pong_anywhere_cut_anywhere_is_taken_out_by_both(data: st.DataObject) -> None:
    stream = data.draw(streams())
    before = stream.data[: data.draw(st.sampled_from([0, *stream.frame_ends]))]
    after = stream.data[len(before) :]
    cuts = data.draw(st.lists(st.integers(0, len(stream.data) + 40), max_size=20))

    async def test(h: Harness) -> bytes:
        client, backend, t = h.tunnel()
        assert h.engine.ping(t)
        ping = bytes([0x89, len(h.engine.ping_payload)]) + h.engine.ping_payload
        assert await trio.to_thread.run_sync(recv_exactly, client, len(ping)) == ping
        sent = before + masked(0xA, h.engine.ping_payload) + after
        for chunk in split_at(sent, [c for c in cuts if c <= len(sent)]):
            await trio.to_thread.run_sync(client.sendall, chunk)
        client.shutdown(socket.SHUT_WR)
        received = await trio.to_thread.run_sync(recv_all, backend)
        h.engine.end(t)
        client.close()
        backend.close()
        return received

    for name in ("python", "compiled"):
        received, figures = with_engine(name, test)
        assert received == stream.data, name
        assert figures[0].messages == stream.messages, name
