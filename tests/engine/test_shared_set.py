"""The compiled handshake engine sharing the compiled relay's epoll set
and loop (one set per worker, as the workers run them): its events and
deadlines are served by the relay's loop, and the relay's tunnels go on."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from handshake_harness import Harness, accepting_backend, client, run
from peers import RawServer, read_head, read_until_closed, upgrade_head

from shardproxy.engine.api import Keepalive, TunnelStats, Upgraded
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


def _registered(epoll_fd: int) -> dict[int, int]:
    """The descriptors in an epoll set and their events' data (the kernel's
    view: /proc/self/fdinfo)."""
    found = {}
    with open(f"/proc/self/fdinfo/{epoll_fd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                fields = line.split()
                found[int(fields[1])] = int(fields[fields.index("data:") + 1], 16)
    return found


def test_a_handed_over_backend_stays_in_the_set_until_the_relay_takes_it_or_nobody_does() -> None:
    """At the hand-over the shared core leaves the backend's descriptor in
    the set, so that the relay modifies its registration instead of adding
    it again (one epoll_ctl fewer per handshake); one nobody took is taken
    out before the next round, so it cannot keep a level-triggered loop
    busy."""
    from shardproxy.engine.chandshake import CompiledHandshakeEngine
    from shardproxy.engine.crelay import CompiledRelayEngine

    ends = Ends()
    relay = CompiledRelayEngine(ends, Keepalive())
    epoll_fd = relay.epoll_fd()

    seen: list[dict[int, int]] = []  # the set at each hand-over, and after the relay's add

    async def test(h: Harness) -> None:
        record = h.events.established

        def established(u: Upgraded) -> None:  # as the worker does it: at once
            seen.append(_registered(epoll_fd))
            if not h.events.tunnels:  # the first: to the relay; the second: nobody
                relay.add(u.client_fd, u.backend_fd, None, u.to_backend, u.to_client)
                seen.append(_registered(epoll_fd))
            record(u)

        h.events.established = established  # type: ignore[method-assign]
        taken, left = client(h.port), client(h.port)
        taken.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 1, "the first tunnel")
        u = h.events.tunnels[0]
        assert seen[0][u.backend_fd] >> 32  # the core's data still: left in the set
        assert seen[1][u.backend_fd] == u.backend_fd  # the relay's now
        left.sendall(upgrade_head("/"))
        await h.events.until(lambda: len(h.events.tunnels) == 2, "the second tunnel")
        held = h.events.tunnels[1]  # which nobody took
        assert seen[2][held.backend_fd] >> 32
        other = client(h.port)
        other.sendall(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")  # one more round
        await h.events.until(lambda: len(h.events.refusals) == 1, "a refusal")
        assert held.backend_fd not in _registered(epoll_fd)  # taken out
        for fd in (held.client_fd, held.backend_fd):
            os.close(fd)
        h.events.tunnels.clear()  # closed here, or the relay's
        for c in (taken, left, other):
            c.close()
        with trio.fail_after(5):
            await ends.one_closed.wait()

    with RawServer(accepting_backend) as backend:
        run([backend.port], test, engine=CompiledHandshakeEngine, relay=relay)
    assert len(ends.closed) == 1
