"""The compiled relay's loop waiting in C with trio's epoll set inside its
own (engine/trio_host.py): trio's tasks, timers, I/O and threads still get
their turn while the relay serves, and where trio's internals are not as
known the relay waits inside trio instead."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from shardproxy.engine.api import Keepalive, TunnelStats
from shardproxy.engine.choice import COMPILED
from shardproxy.engine.transport import PLAIN_PAIR
from shardproxy.engine.trio_host import TrioLoop


def test_the_installed_trio_has_what_the_relay_reads() -> None:
    """If this fails after a trio upgrade, the compiled relay has fallen
    back to waiting inside trio: engine/trio_host.py needs a look."""

    async def main() -> None:
        loop = TrioLoop.current()
        assert loop is not None
        assert os.readlink(f"/proc/self/fd/{loop.fd}") == "anon_inode:[eventpoll]"
        async with loop:
            assert not loop.runnable()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 0)
                assert loop.runnable()  # the task just started
                with trio.move_on_after(30):
                    now = time.monotonic()
                    due = loop.next_deadline(now)
                    assert due is not None and 29 < due - now <= 30

    trio.run(main)


def test_no_loop_outside_trio_or_with_a_test_clock() -> None:
    assert TrioLoop.current() is None

    async def main() -> None:
        assert TrioLoop.current() is None

    trio.run(main, clock=trio.testing.MockClock())


class Ends:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def tunnel_closed(self, token: Any, outcome: str, stats: TunnelStats) -> None:
        self.closed.append(outcome)

    def relay_error(self) -> None:
        raise AssertionError("relay error")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        proxy_side, _ = server.accept()
    peer.settimeout(10)
    return peer, proxy_side


def echo_through(relay: Any) -> tuple[socket.socket, socket.socket]:
    """A tunnel in ``relay``: its (client, backend) peers."""
    client, a = tcp_pair()
    backend, b = tcp_pair()
    relay.add(a.detach(), b.detach(), "t", b"", b"", PLAIN_PAIR)
    return client, backend


async def through(client: socket.socket, backend: socket.socket, data: bytes) -> None:
    """``data`` from the client reaches the backend (blocking peers in a thread)."""

    def relay_once() -> bytes:
        client.sendall(data)
        got = b""
        while len(got) < len(data):
            got += backend.recv(len(data) - len(got))
        return got

    assert await trio.to_thread.run_sync(relay_once) == data


Sock = socket.socket
Test = Callable[[Any, Sock, Sock, trio.Nursery], Awaitable[None]]


def with_a_tunnel(test: Test, clock: trio.abc.Clock | None = None) -> None:
    """``test(relay, client, backend, nursery)`` with a compiled relay
    running one tunnel in a trio loop (on ``clock``); the relay's loop
    is ended by a cancel, and must be out of C then."""
    from shardproxy.engine.crelay import CompiledRelayEngine

    relay = CompiledRelayEngine(Ends(), Keepalive())
    client, backend = echo_through(relay)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await test(relay, client, backend, nursery)
            nursery.cancel_scope.cancel()  # ends the relay's loop, wherever it waits
        assert not relay.hosting
        relay.close()

    trio.run(main, clock=clock)
    client.close()
    backend.close()


compiled_only = pytest.mark.skipif(COMPILED is None, reason="the compiled engine was not built")


@compiled_only
def test_trio_tasks_timers_io_and_threads_run_while_the_relay_waits_in_c() -> None:
    async def test(
        relay: Any, client: socket.socket, backend: socket.socket, nursery: trio.Nursery
    ) -> None:
        with trio.fail_after(10):  # every wait below is for a trio turn, none for time
            await through(client, backend, b"first")
            assert relay.hosting
            await trio.sleep(0.05)  # a timer of trio's, while the relay is idle in C
            a, b = trio.socket.socketpair()  # trio's own I/O
            with a, b:
                await a.send(b"x")
                assert await b.recv(1) == b"x"
            ready, seen = trio.Event(), trio.Event()

            async def waiter() -> None:
                await ready.wait()
                seen.set()

            nursery.start_soon(waiter)
            await trio.lowlevel.checkpoint()
            ready.set()  # a task made runnable by another
            await seen.wait()
            await through(client, backend, b"still relaying")

    with_a_tunnel(test)


@compiled_only
def test_wait_all_tasks_blocked_sees_the_relay_idle() -> None:
    """trio.testing.wait_all_tasks_blocked needs the relay's task blocked in
    trio: the loop leaves C for good when a task waits for that."""

    async def test(
        relay: Any, client: socket.socket, backend: socket.socket, _: trio.Nursery
    ) -> None:
        with trio.fail_after(10):
            await through(client, backend, b"hosted")
            assert relay.hosting
            await trio.testing.wait_all_tasks_blocked()
            assert not relay.hosting
            await through(client, backend, b"in trio")

    with_a_tunnel(test)


@compiled_only
def test_with_a_test_clock_the_relay_waits_inside_trio() -> None:
    async def test(
        relay: Any, client: socket.socket, backend: socket.socket, _: trio.Nursery
    ) -> None:
        await through(client, backend, b"relayed")
        assert not relay.hosting

    with_a_tunnel(test, clock=trio.testing.MockClock())
