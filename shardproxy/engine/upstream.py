"""Connecting upstream through one worker's slice of the address plan.

A worker owns one slice of the port range (control/addrplan.py). For every (source
address, backend endpoint) pair it keeps a :class:`TupleSpace`: how many of
its connections use that pair, out of how many the slice allows. A connect
takes a source address in rotation per endpoint, skipping pairs that are
full; when the kernel says a pair is full (``EADDRNOTAVAIL``) it moves on to
the next source address, and when every source address is full for that
endpoint it raises :class:`Exhausted`, and the caller tries the next endpoint
or server, then answers 503.

Two allocators give the same behaviour:

- ``kernel`` (Linux >= 6.3): every socket gets ``IP_LOCAL_PORT_RANGE`` = the
  slice and ``IP_BIND_ADDRESS_NO_PORT``, binds ``(source, 0)`` and connect()
  picks a port of the slice that keeps the 4-tuple unique. One port serves
  every endpoint; the kernel does the bookkeeping, this module only counts.
- ``userspace``: each pair has its own free list of the slice's ports; the
  socket sets ``SO_REUSEADDR`` (so one port may be bound again for another
  endpoint: Linux allows it between sockets that all set it and none
  listens) and binds ``(source, port)`` explicitly. A port the kernel refuses
  (``EADDRINUSE`` from a foreign socket, ``EADDRNOTAVAIL`` from a connection
  still in TIME_WAIT) goes to the back of the list and the next is tried, a
  few times at most.

Free lists hand ports out in order and take them back at the end (FIFO), so
a port returns into use as late as possible, after its TIME_WAIT if any; a
list holds only the ports given back, the never-used rest is a cursor.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from shardproxy.config import Endpoint, KeepaliveConfig, PortRange
from shardproxy.engine import choice
from shardproxy.host.sockopts import (
    AUTO_SOURCE,
    IP_BIND_ADDRESS_NO_PORT,
    IP_LOCAL_PORT_RANGE,
    SocketOption,
    keepalive_options,
    port_range_option,
    set_tcp_keepalive,
)

_Attempt = TypeVar("_Attempt")
PORT_TRIES = 8  # userspace: ports tried per pair before the pair counts as full for now
_FULL = {errno.EADDRNOTAVAIL, errno.EADDRINUSE}


class Exhausted(Exception):
    """No source address has a free tuple left for this endpoint."""


class TupleSpace:
    """The tuples one worker may use from one source address to one endpoint."""

    __slots__ = (
        "_free",
        "_next",
        "address",
        "capacity",
        "endpoint",
        "excluded",
        "ports",
        "returns_ports",
        "seen_address",
        "source",
        "used",
    )

    def __init__(
        self,
        source: str,
        endpoint: Endpoint,
        ports: PortRange,
        excluded: frozenset[int],
        returns_ports: bool = False,
    ) -> None:
        self.source = source  # a configured address, or AUTO_SOURCE
        # The address bound: None lets the kernel choose (the socket's route).
        self.address: str | None = None if source == AUTO_SOURCE else source
        # The address connections really come from (for logs): the kernel's
        # choice is learned from the first connection, it follows the route.
        self.seen_address = self.address
        self.endpoint = endpoint
        self.ports = ports
        self.excluded = excluded  # ports of the slice not to use (listen, reserved)
        self.capacity = len(ports) - sum(1 for p in excluded if p in ports)
        self.used = 0
        self._next = ports.first  # ports from here to ports.last were never handed out
        self._free: deque[int] = deque()
        self.returns_ports = returns_ports  # userspace: a released port goes back on the list

    @property
    def full(self) -> bool:
        return self.used >= self.capacity

    def take_port(self) -> int:
        """A port of the slice not used towards this endpoint (userspace)."""
        port = self._next
        while port in self.excluded:
            port += 1
        if port <= self.ports.last:
            self._next = port + 1
            return port
        if self._free:  # every port was handed out once: the longest-returned first
            return self._free.popleft()
        raise Exhausted

    def give_port(self, port: int) -> None:
        self._free.append(port)

    def release(self, port: int, count: int = 1) -> None:
        """A connection from this space ended (``port``: what
        :meth:`Upstream.connect` returned with it); or ``count`` of them,
        with the same port (0: the kernel chose theirs)."""
        if count != 1 and port:
            raise ValueError("a port is given back by one connection")
        self.used -= count
        if port and self.returns_ports:
            self.give_port(port)

    def snapshot(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "endpoint": str(self.endpoint),
            "used": self.used,
            "capacity": self.capacity,
        }


class _Towards:
    """An endpoint's tuple spaces, whose turn it is, and what
    ``connect_tcp`` is given for it (family, host, port)."""

    __slots__ = ("connect", "spaces", "turn")

    def __init__(self, spaces: list[TupleSpace], connect: tuple[int, str, int]) -> None:
        self.spaces = spaces
        self.turn = 0
        self.connect = connect


_OBJECTS_KEPT = 4096  # Upstream._by_object's bound


class Upstream:
    """One worker's upstream side: its port slice, its source addresses and
    the tuple spaces they make with every backend endpoint: those given at
    start, and any other the first time it is connected to (servers that
    come and go)."""

    def __init__(
        self,
        ports: PortRange,
        sources: Iterable[str],
        endpoints: Iterable[Endpoint],
        allocator: str,
        excluded: Iterable[int] = (),
        keepalive: KeepaliveConfig | None = None,
    ) -> None:
        if allocator not in ("kernel", "userspace"):
            raise ValueError(f"unknown port allocator {allocator!r}")
        self.ports = ports
        self.allocator = allocator
        self.keepalive = keepalive
        self._range_option = port_range_option(ports)
        # What _kernel sets, in its order, for connect_tcp.
        options: list[SocketOption] = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        if keepalive is not None and keepalive.tcp_idle > 0:
            options += keepalive_options(keepalive)
        options.append((socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, self._range_option))
        self._options = tuple(options)
        self._bound_options = (*options, (socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1))
        self._sources = tuple(sources) or (AUTO_SOURCE,)
        self._excluded = frozenset(excluded)
        self._spaces: dict[Endpoint, _Towards] = {}
        # The same, by the endpoint object's identity: a connect's lookup
        # needs no hash of the endpoint nor a comparison with an equal one
        # (the registry's endpoints are other objects than the plan's).
        self._by_object: dict[int, tuple[Endpoint, _Towards]] = {}
        self._attempt_fd = self._kernel_fd if allocator == "kernel" else self._userspace_fd
        for endpoint in endpoints:
            self._towards(endpoint)

    def _towards(self, endpoint: Endpoint) -> _Towards:
        """The tuple spaces towards ``endpoint``, one per source address of
        its family, made the first time they are asked for."""
        known = self._by_object.get(id(endpoint))
        if known is not None and known[0] is endpoint:
            return known[1]
        towards = self._spaces.get(endpoint)
        if towards is None:
            family = _family(endpoint.host)
            towards = self._spaces[endpoint] = _Towards(
                [
                    TupleSpace(
                        s, endpoint, self.ports, self._excluded, self.allocator == "userspace"
                    )
                    for s in self._sources
                    if s == AUTO_SOURCE or _family(s) == family
                ],
                (socket.AF_INET6 if family == 6 else socket.AF_INET, endpoint.host, endpoint.port),
            )
        if len(self._by_object) >= _OBJECTS_KEPT:  # endpoints that came and went
            self._by_object.clear()
        self._by_object[id(endpoint)] = (endpoint, towards)
        return towards

    def connect(self, endpoint: Endpoint) -> tuple[socket.socket, TupleSpace, int]:
        """Start a non-blocking connect to ``endpoint`` from the next source
        address with room: (socket, its tuple space, the port to give back
        with :meth:`TupleSpace.release`, 0 when the kernel chose it). Raises
        :class:`Exhausted` when no source address has room and ``OSError``
        when the connect fails otherwise (refused at once, say)."""
        return self._connect_from(
            endpoint, self._kernel if self.allocator == "kernel" else self._userspace
        )

    def connect_fd(self, endpoint: Endpoint) -> tuple[int, TupleSpace, int]:
        """:meth:`connect`, the socket a bare descriptor (the compiled
        handshake engine's): with the kernel allocator and the compiled
        module, made by its ``connect_tcp`` in one call, no socket object."""
        return self._connect_from(endpoint, self._attempt_fd)

    def _connect_from(
        self, endpoint: Endpoint, attempt: Callable[[TupleSpace], _Attempt | None]
    ) -> _Attempt:
        """The next source address's space with room, in turn, and
        ``attempt`` on it until one succeeds."""
        towards = self._towards(endpoint)
        spaces = towards.spaces
        n = len(spaces)
        if not n:  # no source address of the endpoint's family
            raise Exhausted
        turn = towards.turn
        towards.turn = (turn + 1) % n
        for i in range(n):
            space = spaces[(turn + i) % n]
            if space.full:
                continue
            made = attempt(space)
            if made is not None:
                space.used += 1
                return made
        raise Exhausted

    def snapshot(self) -> list[dict[str, Any]]:
        return [space.snapshot() for towards in self._spaces.values() for space in towards.spaces]

    def _socket(self, endpoint: Endpoint) -> socket.socket:
        family = socket.AF_INET6 if _family(endpoint.host) == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive is not None and self.keepalive.tcp_idle > 0:
                set_tcp_keepalive(sock, self.keepalive)
        except OSError:
            sock.close()
            raise
        return sock

    def _kernel(self, space: TupleSpace) -> tuple[socket.socket, TupleSpace, int] | None:
        sock = self._socket(space.endpoint)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, self._range_option)
            if space.address is not None:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((space.address, 0))
            _connect(sock, space.endpoint)
        except OSError as e:
            sock.close()
            if e.errno in _FULL:
                return None  # this source address is full for this endpoint in our slice
            raise
        return sock, space, 0

    def _kernel_fd(self, space: TupleSpace) -> tuple[int, TupleSpace, int] | None:
        compiled = choice.COMPILED
        if compiled is not None:
            family, host, port = self._towards(space.endpoint).connect
            options = self._bound_options if space.address is not None else self._options
            try:
                fd = compiled.connect_tcp(family, space.address, host, port, options)
            except ValueError:
                pass  # an address inet_pton does not read (a scope id): the socket module does
            except OSError as e:
                if e.errno in _FULL:
                    return None
                raise
            else:
                return fd, space, 0
        made = self._kernel(space)
        return None if made is None else (made[0].detach(), space, 0)

    def _userspace_fd(self, space: TupleSpace) -> tuple[int, TupleSpace, int] | None:
        made = self._userspace(space)
        return None if made is None else (made[0].detach(), made[1], made[2])

    def _userspace(self, space: TupleSpace) -> tuple[socket.socket, TupleSpace, int] | None:
        address = space.address or ("::" if _family(space.endpoint.host) == 6 else "0.0.0.0")
        for _ in range(PORT_TRIES):
            try:
                port = space.take_port()
            except Exhausted:
                return None
            sock = self._socket(space.endpoint)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                _connect(sock, space.endpoint)
            except OSError as e:
                sock.close()
                space.give_port(port)
                if e.errno in _FULL:
                    continue  # taken by a foreign socket or in TIME_WAIT: try the next port
                raise
            return sock, space, port
        return None


def _connect(sock: socket.socket, endpoint: Endpoint) -> None:
    err = sock.connect_ex((endpoint.host, endpoint.port))
    if err not in (0, errno.EINPROGRESS):
        raise OSError(err, os.strerror(err))


def _family(host: str) -> int:
    return 6 if ":" in host else 4
