"""The in-process harness of the handshake engine tests: one engine on a
fresh listen socket in front of given backend ports, its events recorded
(tests/engine/test_handshake_engine.py, test_handshake_differential.py)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from engines import current
from peers import read_head, websocket_accept

from shardproxy.config import PortRange, from_mapping
from shardproxy.control.addrplan import read_system_port_range
from shardproxy.engine.api import Upgraded
from shardproxy.engine.transport import Transport
from shardproxy.engine.upstream import Upstream
from shardproxy.policy.admission import Admission, AdmissionLease
from shardproxy.policy.decisions import Decisions
from shardproxy.policy.registry import EndpointState, PoolRegistry, ServerState
from shardproxy.policy.routing import Router
from shardproxy.protocol.errors import Reject
from shardproxy.protocol.upgrade import UpgradeRequest

HEADER_TIMEOUT = 0.3
RESPONSE_TIMEOUT = 0.3


class Harness:
    """One handshake engine on a fresh listen socket, in front of ``ports``
    (one server each, round robin)."""

    def __init__(
        self,
        ports: list[int],
        transports: Sequence[Transport] = (),
        proxied: bool = False,
        engine: Any = None,
        relay: Any = None,
    ) -> None:
        """``proxied``: the listener takes PROXY headers from 127.0.0.1;
        ``engine``: the handshake engine class (engines.current's if None);
        ``relay``: a compiled relay whose epoll set and loop it shares."""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        listen: dict[str, Any] = {"address": f"127.0.0.1:{self.port}", "accept_proxy": proxied}
        servers = [
            {"name": f"s{i}", "address": "127.0.0.1", "ports": [p]} for i, p in enumerate(ports)
        ]
        cfg = from_mapping(
            {
                "proxy": {
                    "listen": [listen],
                    "trusted_proxies": ["127.0.0.1/32"] if proxied else [],
                    "header_timeout": f"{int(HEADER_TIMEOUT * 1000)}ms",
                    "response_timeout": f"{int(RESPONSE_TIMEOUT * 1000)}ms",
                    "connect_timeout": "1s",
                },
                "routes": [{"pool": "p"}],
                "pools": {"p": {"balance": "round_robin", "servers": servers}},
            }
        )
        self.events = Recorder()
        first, last = read_system_port_range()
        upstream = Upstream(PortRange(first, last), (), cfg.endpoints(), "kernel")
        pools = self.pools = {p.name: PoolRegistry(p) for p in cfg.pools}
        self.upstream = upstream
        self.admission = Admission(100)
        self.engine = (engine or current.handshake)(
            cfg.proxy,
            [self.listener],
            self.admission,
            upstream,
            Decisions(Router(cfg.routes), pools),
            self.events,
            transports,
            current.parsers,
            **({} if relay is None else {"relay": relay}),
        )
        self.relay = relay

    def close(self) -> None:
        for u in self.events.tunnels:
            socket.socket(fileno=u.client_fd).close()
            socket.socket(fileno=u.backend_fd).close()
        self.engine.close()


class Recorder:
    """The engine's HandshakeEvents, recorded, with a way to await them."""

    def __init__(self) -> None:
        self.tunnels: list[Upgraded] = []
        self.refusals: list[Reject] = []
        self.connect_failures: list[str] = []
        self.client_failures: list[OSError] = []
        self.accept_errors: list[OSError] = []
        self._changed = trio.Event()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def established(self, tunnel: Upgraded) -> None:
        self.tunnels.append(tunnel)
        self._note()

    def rejected(
        self, lease: AdmissionLease, request: UpgradeRequest | None, r: Reject, seconds: float
    ) -> None:
        self.refusals.append(r)
        self._note()

    def handshake_failed(self, lease: AdmissionLease, e: OSError) -> None:
        self.client_failures.append(e)
        self._note()

    def connect_failed(
        self, pool: str, server: ServerState, endpoint: EndpointState, reason: str
    ) -> None:
        self.connect_failures.append(server.name)
        self._note()

    def accept_error(self, e: OSError) -> None:
        self.accept_errors.append(e)
        self._note()

    def internal_error(self) -> None:
        raise AssertionError("internal error in the handshake engine")

    async def until(self, done: Callable[[], bool], what: str) -> None:
        with trio.fail_after(5):  # one handshake's outcome, with room
            while not done():
                await self._changed.wait()
        assert done(), what


def run(
    ports: list[int],
    test: Callable[[Harness], Awaitable[None]],
    transports: Sequence[Transport] = (),
    proxied: bool = False,
    engine: Any = None,
    accept_errors: bool = False,
    relay: Any = None,
) -> Harness:
    """Run ``test`` against a fresh engine; ``accept_errors``: the test
    makes accept fail (any other test fails on one)."""
    h = Harness(ports, transports, proxied, engine, relay)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.engine.run)
            if relay is not None:
                nursery.start_soon(relay.run)
            await test(h)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        h.close()
        if relay is not None:
            relay.close()
    assert accept_errors or not h.events.accept_errors, h.events.accept_errors
    return h


def client(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def accepting_backend(conn: socket.socket) -> None:
    answer_101(conn, read_head(conn))


def answer_101(conn: socket.socket, head: bytes) -> None:
    """Accept the upgrade whose request ``head`` was read from ``conn``."""
    key = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    ]
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + websocket_accept(key[0]) + b"\r\n\r\n"
    )
    conn.recv(1)  # holds the tunnel until the test closes it


def silent_backend(conn: socket.socket) -> None:
    read_head(conn)
    conn.recv(1)  # never answers
