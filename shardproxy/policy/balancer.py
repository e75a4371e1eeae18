"""Pools, servers and the balancing algorithms, as one worker sees them.

Each worker balances on its own counts (like HAProxy threads without shared
state): least-connections compares the tunnels *this* worker holds per
server. With SO_REUSEPORT spreading clients evenly over workers, the sums come
out even too.

Algorithms are interchangeable objects behind one method::

    choose(servers, key, exclude) -> ServerState | None

``servers`` are the pool's servers, ``key`` the hash key of the request (bytes,
or None when the pool does not hash or the request lacks the key), ``exclude``
the servers already tried for this request. Within a server the endpoint
(port) with the fewest tunnels is used, which spreads tunnels over every port
the server listens on; an endpoint whose tuple space is full (engine/upstream.py)
is skipped for the next.

Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from shardproxy.config import Endpoint, HashKey, PoolConfig, ServerConfig


class EndpointState:
    """One backend ip:port and the tunnels this worker holds to it."""

    __slots__ = ("active", "endpoint", "server", "up")

    def __init__(self, endpoint: Endpoint, server: ServerState) -> None:
        self.endpoint = endpoint
        self.server = server
        self.active = 0
        self.up = True  # health checks (supervisor) drive it


class ServerState:
    __slots__ = ("active", "config", "drained", "endpoints", "up")

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.endpoints = tuple(EndpointState(ep, self) for ep in config.endpoints)
        self.active = 0
        self.up = True  # while any of its endpoints is up
        self.drained = False  # an operator's admin call: no new tunnels, existing ones kept

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def available(self) -> bool:
        """May it get new tunnels: up, and not drained by an operator."""
        return self.up and not self.drained

    @property
    def weight(self) -> int:
        return self.config.weight

    def endpoints_by_use(self) -> Sequence[EndpointState]:
        """The server's endpoints that are up, fewest tunnels first: the
        order to try them in."""
        if len(self.endpoints) == 1:
            return self.endpoints if self.endpoints[0].up else ()
        return sorted((e for e in self.endpoints if e.up), key=lambda e: e.active)

    def set_health(self, down: Collection[Endpoint]) -> list[EndpointState]:
        """Mark the endpoints in ``down`` down and the others up; the server
        is up while one of its endpoints is. Returns the endpoints that just
        went down."""
        went_down = []
        for e in self.endpoints:
            up = e.endpoint not in down
            if e.up and not up:
                went_down.append(e)
            e.up = up
        self.up = any(e.up for e in self.endpoints)
        return went_down


class Algorithm(Protocol):
    def choose(
        self,
        servers: Sequence[ServerState],
        key: bytes | None,
        exclude: Collection[ServerState],
    ) -> ServerState | None: ...


class RoundRobin:
    """Smooth weighted round robin (as nginx does it): weights 5,1,1 give
    a a b a c a a, not a a a a a b c."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def choose(
        self,
        servers: Sequence[ServerState],
        key: bytes | None,
        exclude: Collection[ServerState],
    ) -> ServerState | None:
        candidates = [s for s in servers if s.available and s not in exclude]
        if not candidates:
            return None
        total = 0
        best: ServerState | None = None
        for s in candidates:
            cur = self._current.get(s.name, 0) + s.weight
            self._current[s.name] = cur
            total += s.weight
            if best is None or cur > self._current[best.name]:
                best = s
        assert best is not None
        self._current[best.name] -= total
        return best


class LeastConn:
    """Fewest tunnels per unit of weight; ties go round the pool in turn so
    that a burst of new clients on an idle pool is spread, not piled on the
    first server."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self,
        servers: Sequence[ServerState],
        key: bytes | None,
        exclude: Collection[ServerState],
    ) -> ServerState | None:
        n = len(servers)
        best: ServerState | None = None
        best_load = math.inf
        self._turn = (self._turn + 1) % n if n else 0
        for i in range(n):
            s = servers[(self._turn + i) % n]
            if not s.available or s in exclude:
                continue
            load = s.active / s.weight
            if load < best_load:
                best, best_load = s, load
        return best


class RendezvousHash:
    """Weighted rendezvous (highest random weight) hashing.

    Every server gets a score from hash(key, server name); the highest wins.
    Removing a server moves only the keys it won, every worker and every
    shardproxy instance computes the same answer (blake2b, not Python's
    per-process ``hash``), and weights stay proportional (score =
    -weight / ln(u), Schindelhauer & Schomaker). A request without the key
    falls back to least-connections.
    """

    def __init__(self) -> None:
        self._fallback = LeastConn()

    def choose(
        self,
        servers: Sequence[ServerState],
        key: bytes | None,
        exclude: Collection[ServerState],
    ) -> ServerState | None:
        if key is None:
            return self._fallback.choose(servers, None, exclude)
        best: ServerState | None = None
        best_score = -math.inf
        for s in servers:
            if not s.available or s in exclude:
                continue
            score = -s.weight / math.log(_unit_interval(key, s.name))
            if score > best_score:
                best, best_score = s, score
        return best


def _unit_interval(key: bytes, name: str) -> float:
    digest = hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest()
    # Map to the open interval (0, 1) so that log() is finite and negative.
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 2)


def make_algorithm(balance: str) -> Algorithm:
    if balance == "round_robin":
        return RoundRobin()
    if balance == "hash":
        return RendezvousHash()
    return LeastConn()


class PoolState:
    """A pool's servers and its algorithm, in one worker."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.servers = tuple(ServerState(s) for s in config.servers)
        self.algorithm = make_algorithm(config.balance)

    @property
    def name(self) -> str:
        return self.config.name

    def choose(
        self, key: bytes | None, exclude: Collection[ServerState] = ()
    ) -> ServerState | None:
        return self.algorithm.choose(self.servers, key, exclude)


def acquire(endpoint: EndpointState) -> None:
    endpoint.active += 1
    endpoint.server.active += 1


def release(endpoint: EndpointState) -> None:
    endpoint.active -= 1
    endpoint.server.active -= 1


def extract_hash_key(
    key: HashKey | None,
    headers: Sequence[tuple[bytes, bytes]],
    target: bytes,
    client_ip: str,
) -> bytes | None:
    """The bytes to hash for this request, or None when the request lacks them.

    ``headers`` are (lower-case name, value) pairs as h11 gives them.
    """
    if key is None:
        return None
    if key.kind == "client_ip":
        return client_ip.encode()
    if key.kind == "header":
        wanted = key.name.encode()
        values = [v for n, v in headers if n == wanted]
        return b",".join(values) if values else None
    if key.kind == "cookie":
        # RFC 6265 §5.4: "name=value" pairs joined by "; ". Split them as
        # HAProxy's req.cook does; http.cookies.SimpleCookie is not used because
        # one cookie it dislikes (a space, a quote, a JSON value from another
        # app) makes it drop every cookie of the header, so stickiness would
        # silently depend on unrelated cookies.
        wanted = key.name.encode()
        for n, v in headers:
            if n != b"cookie":
                continue
            for pair in v.split(b";"):
                cookie, sep, cookie_value = pair.partition(b"=")
                if sep and cookie.strip() == wanted:
                    return cookie_value.strip()
        return None
    query = urlsplit(target.decode("latin-1")).query
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == key.name:
            return value.encode()
    return None
