"""The compiled handshake engine sharing the compiled relay's epoll set
and loop (one set per worker, as the workers run them): its events and
deadlines are served by the relay's loop, and the relay's tunnels go on."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from handshake_harness import Harness, accepting_backend, client, run
from peers import RawServer, read_head, read_until_closed, upgrade_head

from shardproxy.engine.api import Keepalive, TunnelStats
from shardproxy.engine.choice import COMPILED

pytestmark = pytest.mark.skipif(COMPILED is None, reason="the compiled engine was not built")


class Ends:
    """The relay's TunnelEvents."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.one_closed = trio.Event()

    def tunnel_closed(self, token: Any, outcome: str, stats: TunnelStats) -> None:
        self.closed.append(outcome)
        self.one_closed.set()

    def relay_error(self) -> None:
        raise AssertionError("relay error")


def test_handshakes_and_tunnels_in_one_set_and_one_loop() -> None:
    from shardproxy.engine.chandshake import CompiledHandshakeEngine
    from shardproxy.engine.crelay import CompiledRelayEngine

    ends = Ends()
    relay = CompiledRelayEngine(ends, Keepalive())

    async def test(h: Harness) -> None:
        ok, bad, slow = client(h.port), client(h.port), client(h.port)
        ok.sendall(upgrade_head("/"))
        bad.sendall(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")
        slow.sendall(b"GET / HTTP/1.1\r\n")  # and stops: a deadline of the shared loop
        await h.events.until(
            lambda: len(h.events.tunnels) == 1 and len(h.events.refusals) == 2,
            "a tunnel and two refusals",
        )
        assert sorted(r.status for r in h.events.refusals) == [400, 408]
        (u,) = h.events.tunnels
        # The tunnel goes to the relay that shares the set, as a worker does it.
        relay.add(u.client_fd, u.backend_fd, None, u.to_backend, u.to_client)
        h.events.tunnels.clear()
        assert (await trio.to_thread.run_sync(read_head, ok)).startswith(b"HTTP/1.1 101")
        ok.sendall(b"\x81\x82abcd" + bytes(a ^ b for a, b in zip(b"hi", b"ab", strict=True)))
        for c, status in ((bad, b"400"), (slow, b"408")):
            assert (await trio.to_thread.run_sync(read_until_closed, c)).startswith(
                b"HTTP/1.1 " + status
            )
            c.close()
        with trio.fail_after(5):  # the backend reads a byte of the frame and closes
            await ends.one_closed.wait()
        ok.close()

    with RawServer(accepting_backend) as backend:
        run([backend.port], test, engine=CompiledHandshakeEngine, relay=relay)
    assert len(ends.closed) == 1
