"""The handshake engine's questions, answered by policy: which route a
request takes, which server of its pool to try next, and whether that pool
wants a PROXY header instead of X-Forwarded-*. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shardproxy.config import RouteConfig
from shardproxy.policy import balancer
from shardproxy.policy.registry import PoolRegistry, ServerState
from shardproxy.policy.routing import Router
from shardproxy.protocol.upgrade import UpgradeRequest


class Decisions:
    def __init__(self, router: Router, pools: Mapping[str, PoolRegistry]) -> None:
        self.router = router
        self.pools = pools

    def route(self, request: UpgradeRequest) -> RouteConfig | None:
        return self.router.match(request.host, request.path)

    def next_server(
        self,
        route: RouteConfig,
        request: UpgradeRequest,
        client_ip: str,
        tried: Sequence[ServerState],
        now: float,
        client_cert: str = "",
    ) -> ServerState | None:
        """The next server of the route's pool to connect to, none of
        ``tried`` (every server once), with the weights at ``now``; None
        when none is left. ``client_cert``: the SHA-256 of the client's
        TLS certificate, "" for none (hash_key = "client_cert")."""
        pool = self.pools[route.pool]
        key = balancer.extract_hash_key(
            pool.config.hash_key, request.headers, request.target, client_ip, client_cert
        )
        return pool.choose(key, tried, now=now)

    def sends_proxy_header(self, route: RouteConfig) -> bool:
        return bool(self.pools[route.pool].config.send_proxy)
