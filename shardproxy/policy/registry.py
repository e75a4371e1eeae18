"""The runtime server registry of a pool, as one worker sees it.

A pool's servers are not fixed for a generation's life: a
:class:`PoolRegistry` adds, removes and reweights servers while the worker
runs, and each server's weight is a function of time (:meth:`ServerState.
weight_at`), so that a server can ramp up to its weight instead of taking
a reconnect wave at once. Today the registry is filled from the
configuration file and driven by health checks and the operator's drain;
DNS discovery, slow start and rebalancing drive the same calls next.

What a server and an endpoint count here is this worker's tunnels (each
worker balances on its own counts, see policy/balancer.py). A removed server
leaves the registry at once (no new tunnel goes to it) while the tunnels
that still hold it keep it alive until they end; a server added back under
the same name is a new one with its own counts. Upstream tuple spaces
towards a new endpoint are made on its first connect (engine/upstream.py).

Pure: no I/O, no clock (``now`` is the caller's, time.monotonic in a worker).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence

from shardproxy.config import Endpoint, PoolConfig, ServerConfig
from shardproxy.policy.balancer import make_algorithm

# A ramping server's share never falls below this fraction of its weight,
# so that a pool whose every server just came up still serves (HAProxy's
# slowstart starts from a weight of 1% too).
MIN_RAMP_SHARE = 0.01


class EndpointState:
    """One backend ip:port and the tunnels this worker holds to it."""

    __slots__ = ("active", "endpoint", "server", "up")

    def __init__(self, endpoint: Endpoint, server: ServerState) -> None:
        self.endpoint = endpoint
        self.server = server
        self.active = 0
        self.up = True  # health checks (supervisor) drive it

    def acquire(self) -> None:
        self.active += 1
        self.server.active += 1

    def release(self, count: int = 1) -> None:
        self.active -= count
        self.server.active -= count


class ServerState:
    """One server of a pool: its endpoints, health, admin state and weight."""

    __slots__ = (
        "_ramp",
        "_ramp_start",
        "active",
        "config",
        "drained",
        "endpoints",
        "removed",
        "up",
        "weight",
    )

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.endpoints = tuple(EndpointState(ep, self) for ep in config.endpoints)
        self.active = 0
        self.up = True  # while any of its endpoints is up
        self.drained = False  # an operator's admin call: no new tunnels, existing ones kept
        self.removed = False  # left its pool; its tunnels may still hold it
        self.weight: float = config.weight  # the weight it ramps to
        self._ramp_start = 0.0
        self._ramp = 0.0  # seconds; 0: at its weight

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def available(self) -> bool:
        """May it get new tunnels: up, in its pool, and not drained by an operator."""
        return self.up and not self.drained and not self.removed

    def weight_at(self, now: float) -> float:
        """The weight balancing uses at ``now``: :attr:`weight`, or a share
        of it growing linearly while a ramp runs (at least MIN_RAMP_SHARE)."""
        if not self._ramp:
            return self.weight
        elapsed = now - self._ramp_start
        if elapsed >= self._ramp:
            self._ramp = 0.0
            return self.weight
        return self.weight * max(elapsed / self._ramp, MIN_RAMP_SHARE)

    def ramp(self, now: float, seconds: float) -> None:
        """Grow from MIN_RAMP_SHARE of the weight to all of it over
        ``seconds`` from ``now`` (0: at once)."""
        self._ramp_start, self._ramp = now, seconds

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


class PoolRegistry:
    """A pool's servers, in the order balancing goes round them, and its
    algorithm."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.algorithm = make_algorithm(config.balance)
        self._servers: dict[str, ServerState] = {}
        self.servers: tuple[ServerState, ...] = ()
        for server in config.servers:
            self.add(server)

    @property
    def name(self) -> str:
        return self.config.name

    def __getitem__(self, name: str) -> ServerState:
        return self._servers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def add(self, config: ServerConfig, now: float = 0.0, ramp: float = 0.0) -> ServerState:
        """A new server, ramping to its weight over ``ramp`` seconds from
        ``now``. ValueError if the pool has a server of that name."""
        if config.name in self._servers:
            raise ValueError(f"pool {self.name!r} has a server {config.name!r} already")
        server = ServerState(config)
        server.ramp(now, ramp)
        self._servers[config.name] = server
        self.servers = (*self.servers, server)
        return server

    def remove(self, name: str) -> ServerState:
        """Take the server out: no new tunnels; the ones it has keep it.
        KeyError if there is none of that name."""
        server = self._servers.pop(name)
        server.removed = True
        self.servers = tuple(s for s in self.servers if s is not server)
        self.algorithm.forget(server)
        return server

    def reweight(self, name: str, weight: float, now: float = 0.0, ramp: float = 0.0) -> None:
        """Set a server's weight, reached over ``ramp`` seconds from ``now``."""
        if weight <= 0:
            raise ValueError(f"a weight must be positive, not {weight!r}")
        server = self._servers[name]
        server.weight = weight
        server.ramp(now, ramp)

    def endpoints(self) -> Iterator[EndpointState]:
        for server in self.servers:
            yield from server.endpoints

    def set_health(self, down: Collection[Endpoint]) -> list[EndpointState]:
        """Apply the set of endpoints down now; the endpoints that just went down."""
        went_down: list[EndpointState] = []
        for server in self.servers:
            went_down += server.set_health(down)
        return went_down

    def set_drained(self, names: Iterable[str]) -> None:
        """The servers an operator drained (every other one is not)."""
        drained = set(names)
        for server in self.servers:
            server.drained = server.name in drained

    def choose(
        self, key: bytes | None, exclude: Collection[ServerState] = (), *, now: float
    ) -> ServerState | None:
        return self.algorithm.choose(self.servers, key, exclude, now)
