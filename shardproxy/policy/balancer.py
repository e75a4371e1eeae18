"""The balancing algorithms, and the hash key a request is balanced on.

Each worker balances on its own counts (like HAProxy threads without shared
state): least-connections compares the tunnels *this* worker holds per
server. With SO_REUSEPORT spreading clients evenly over workers, the sums come
out even too.

Algorithms are interchangeable objects behind one method::

    choose(servers, key, exclude, now) -> server | None

``servers`` are the pool's servers (policy/registry.py), ``key`` the hash key
of the request (bytes, or None when the pool does not hash or the request
lacks the key), ``exclude`` the servers already tried for this request,
``now`` the time each server's weight is taken at (a server may be ramping
up to its weight). Within a server the endpoint (port) with the fewest
tunnels is used, which spreads tunnels over every port the server listens
on; an endpoint whose tuple space is full (engine/upstream.py) is skipped
for the next.

Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit

from shardproxy.config import HashKey


class Candidate(Protocol):
    """What an algorithm sees of a server (policy/registry.py's ServerState)."""

    @property
    def name(self) -> str: ...

    @property
    def available(self) -> bool: ...

    @property
    def active(self) -> int: ...

    def weight_at(self, now: float) -> float: ...


S = TypeVar("S", bound=Candidate)


class Algorithm(Protocol):
    def choose(
        self, servers: Sequence[S], key: bytes | None, exclude: Collection[S], now: float
    ) -> S | None: ...

    def forget(self, server: Candidate) -> None:
        """``server`` left the pool: drop what is kept about it."""


class RoundRobin:
    """Smooth weighted round robin (as nginx does it): weights 5,1,1 give
    a a b a c a a, not a a a a a b c."""

    def __init__(self) -> None:
        self._current: dict[Candidate, float] = {}

    def choose(
        self, servers: Sequence[S], key: bytes | None, exclude: Collection[S], now: float
    ) -> S | None:
        candidates = [s for s in servers if s.available and s not in exclude]
        if not candidates:
            return None
        total = 0.0
        best: S | None = None
        for s in candidates:
            weight = s.weight_at(now)
            cur = self._current.get(s, 0.0) + weight
            self._current[s] = cur
            total += weight
            if best is None or cur > self._current[best]:
                best = s
        assert best is not None
        self._current[best] -= total
        return best

    def forget(self, server: Candidate) -> None:
        self._current.pop(server, None)


class LeastConn:
    """Fewest tunnels per unit of weight; ties go round the pool in turn so
    that a burst of new clients on an idle pool is spread, not piled on the
    first server."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self, servers: Sequence[S], key: bytes | None, exclude: Collection[S], now: float
    ) -> S | None:
        n = len(servers)
        if n == 1:  # a pool of one: no loads to compare
            only = servers[0]
            return only if only.available and only not in exclude else None
        best: S | None = None
        best_load = math.inf
        self._turn = (self._turn + 1) % n if n else 0
        for i in range(n):
            s = servers[(self._turn + i) % n]
            if not s.available or s in exclude:
                continue
            load = s.active / s.weight_at(now)
            if load < best_load:
                best, best_load = s, load
        return best

    def forget(self, server: Candidate) -> None:
        pass


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
        self, servers: Sequence[S], key: bytes | None, exclude: Collection[S], now: float
    ) -> S | None:
        if key is None:
            return self._fallback.choose(servers, None, exclude, now)
        best: S | None = None
        best_score = -math.inf
        for s in servers:
            if not s.available or s in exclude:
                continue
            score = -s.weight_at(now) / math.log(_unit_interval(key, s.name))
            if score > best_score:
                best, best_score = s, score
        return best

    def forget(self, server: Candidate) -> None:
        pass


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


def extract_hash_key(
    key: HashKey | None,
    headers: Sequence[tuple[bytes, bytes]],
    target: bytes,
    client_ip: str,
    client_cert: str = "",
) -> bytes | None:
    """The bytes to hash for this request, or None when the request lacks them.

    ``headers`` are (lower-case name, value) pairs as h11 gives them;
    ``client_cert``: the SHA-256 of the client's TLS certificate, "" for none.
    """
    if key is None:
        return None
    if key.kind == "client_ip":
        return client_ip.encode()
    if key.kind == "client_cert":
        return client_cert.encode() if client_cert else None
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
