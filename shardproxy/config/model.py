"""The configuration's model: frozen dataclasses (what the rest of
shardproxy reads), and :meth:`Config.to_dict`, the effective configuration
written back out (``shardproxy check`` prints it as TOML; the supervisor
sends it to every worker, which parses it again). Parsing and checking are
in ``config/parse.py``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

Balance = Literal["round_robin", "least_conn", "hash"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HashKind = Literal["header", "cookie", "query", "client_ip", "client_cert"]

Allocator = Literal["auto", "kernel", "userspace"]

BALANCES: tuple[Balance, ...] = ("round_robin", "least_conn", "hash")
ALLOCATORS: tuple[Allocator, ...] = ("auto", "kernel", "userspace")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is the one-line explanation."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + reason)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ip:port a connection can go to (a backend port, or a listen address)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HashKey:
    kind: HashKind
    name: str = ""  # header, cookie or query parameter name; "" for client_ip

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    address: str
    ports: tuple[int, ...]
    weight: int

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(self.address, port) for port in self.ports)


HealthKind = Literal["tcp", "http", "websocket"]
HEALTH_KINDS: tuple[HealthKind, ...] = ("tcp", "http", "websocket")
OnServerDown = Literal["keep", "close"]
ON_SERVER_DOWN: tuple[OnServerDown, ...] = ("keep", "close")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active checks of every endpoint of a pool, run by the supervisor."""

    kind: HealthKind
    path: str  # http and websocket
    expect: int  # http: the status that means healthy
    interval: float
    timeout: float
    rise: int  # consecutive successes that bring a down endpoint up
    fall: int  # consecutive failures (checks or refused connects) that take it down
    on_server_down: OnServerDown  # what happens to tunnels of a server that goes down


TlsVersion = Literal["1.2", "1.3"]
TLS_VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
VerifyClient = Literal["none", "optional", "required"]
VERIFY_CLIENT: tuple[VerifyClient, ...] = ("none", "optional", "required")


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """One certificate of a TLS profile: its PEM chain (the leaf first),
    its key, and the names (SNI) it answers for: the ones listed, else
    every DNS name of the certificate (its subjectAltNames, or its CN
    when it has none). Names are lower-case; "*.example.com" is a
    wildcard of one label, as in RFC 6125 §6.4.3."""

    cert: str
    key: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsProfile:
    """``[tls.NAME]``: how a listener that names it terminates TLS."""

    name: str
    certificates: tuple[CertificateFiles, ...]  # chosen by SNI; the first is the default
    min_version: TlsVersion = "1.2"
    ciphers: str = ""  # TLS 1.2 suites, an OpenSSL string; "" = OpenSSL's default
    session_tickets: int = 2  # tickets per handshake; 0 = none
    strict_sni: bool = False  # an unknown (or absent) name gets the unrecognized_name alert
    client_ca: str = ""  # PEM bundle the client certificates are verified against
    verify_client: VerifyClient = "none"


@dataclass(frozen=True, slots=True)
class BackendTls:
    """``[pools.NAME.tls]``: TLS towards the pool's servers (wss://)."""

    verify: bool = True
    ca_file: str = ""  # "" = the system's store
    server_name: str = ""  # SNI and the name checked; "" = the server's address
    cert: str = ""  # a client certificate to present (PEM), with its key
    key: str = ""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    balance: Balance
    hash_key: HashKey | None
    servers: tuple[ServerConfig, ...]
    health: HealthConfig | None = None
    send_proxy: str = ""  # "v2": a PROXY protocol v2 header to the backends, no X-Forwarded-*
    tls: BackendTls | None = None  # None: plain TCP to the servers


@dataclass(frozen=True, slots=True)
class RouteConfig:
    host: str  # "*", "example.com" or "*.example.com"; lower-case, no port
    path_prefix: str
    pool: str
    access_sample: float = 1.0  # share of this route's tunnels that get an access event
    # A worker counts tunnels by route twice per tunnel: the hash is made once.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        key = (self.host, self.path_prefix, self.pool, self.access_sample)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: tuple[Endpoint, ...]
    workers: int
    header_timeout: float
    max_header_bytes: int
    connect_timeout: float
    response_timeout: float
    max_connections: int | None  # per worker; None = derived from RLIMIT_NOFILE
    max_handshakes: int  # per worker, in progress at once; the rest wait in the accept queue
    accept_proxy: frozenset[Endpoint] = frozenset()  # listeners that read a PROXY header
    trusted_proxies: tuple[IPNetwork, ...] = ()  # who may send one
    tls_listeners: tuple[tuple[Endpoint, str], ...] = ()  # listener → the [tls.NAME] it names

    def tls_profile_of(self, listener: Endpoint) -> str | None:
        """The TLS profile ``listener`` terminates with; None: plain TCP."""
        for endpoint, profile in self.tls_listeners:
            if endpoint == listener:
                return profile
        return None


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How upstream connections get their source address and port (see control/addrplan.py)."""

    source_addresses: tuple[str, ...]  # () = the kernel chooses
    port_range: PortRange | None  # None = "auto", the system's ip_local_port_range
    port_allocator: Allocator


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    drain_timeout: float  # a drain ends by then, whatever is left is closed
    close_spread: float  # tunnels get their Close 1001 evenly over this window
    close_wait: float  # how long each side has to answer our Close
    reload_drain_after: float | None  # old workers drain this long after a reload; None = never
    drain_delay: float = 0.0  # /healthz says 503 this long before a drain starts


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    tcp_idle: float  # seconds of silence before TCP keepalive probes; 0 = none
    tcp_interval: float  # between probes
    tcp_count: int  # unanswered probes before the connection is dropped
    ping_interval: float  # WebSocket Pings from the proxy to each client; 0 = none
    ping_timeout: float  # how long a client has to answer with its Pong


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Endpoint | None  # None: no admin listener
    token: str  # "" = no authentication


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    stats_interval: float  # seconds between "stats" events; 0 = none
    access: bool  # one tunnel-closed event per tunnel
    file: str = ""  # "" = stdout; else every process appends to this file
    error_rate: int = 20  # per-connection error events per second per worker; 0 = no limit
    error_burst: int = 100  # how many may come at once before error_rate applies


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxyConfig
    upstream: UpstreamConfig
    lifecycle: LifecycleConfig
    keepalive: KeepaliveConfig
    admin: AdminConfig
    log: LogConfig
    routes: tuple[RouteConfig, ...]
    pools: tuple[PoolConfig, ...]
    tls: tuple[TlsProfile, ...] = ()
    source: str = field(default="<config>", compare=False)

    def tls_profile(self, name: str) -> TlsProfile:
        for profile in self.tls:
            if profile.name == name:
                return profile
        raise KeyError(name)

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every backend ip:port of every pool, once each, in config order."""
        seen: dict[Endpoint, None] = {}
        for pool in self.pools:
            for server in pool.servers:
                seen.update(dict.fromkeys(server.endpoints))
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as TOML-shaped data (defaults filled in)."""
        p, u = self.proxy, self.upstream
        return {
            "proxy": {
                "listen": [_listen_entry(p, e) for e in p.listen],
                "trusted_proxies": [str(n) for n in p.trusted_proxies],
                "workers": p.workers,
                "header_timeout": format_duration(p.header_timeout),
                "max_header_bytes": p.max_header_bytes,
                "connect_timeout": format_duration(p.connect_timeout),
                "response_timeout": format_duration(p.response_timeout),
                "max_connections": "auto" if p.max_connections is None else p.max_connections,
                "max_handshakes": p.max_handshakes,
            },
            "upstream": {
                "source_addresses": list(u.source_addresses),
                "port_range": "auto" if u.port_range is None else str(u.port_range),
                "port_allocator": u.port_allocator,
            },
            "lifecycle": {
                "drain_timeout": format_duration(self.lifecycle.drain_timeout),
                "close_spread": format_duration(self.lifecycle.close_spread),
                "close_wait": format_duration(self.lifecycle.close_wait),
                "reload_drain_after": "never"
                if self.lifecycle.reload_drain_after is None
                else format_duration(self.lifecycle.reload_drain_after),
                "drain_delay": format_duration(self.lifecycle.drain_delay),
            },
            "keepalive": {
                "tcp_idle": format_duration(self.keepalive.tcp_idle),
                "tcp_interval": format_duration(self.keepalive.tcp_interval),
                "tcp_count": self.keepalive.tcp_count,
                "ping_interval": format_duration(self.keepalive.ping_interval),
                "ping_timeout": format_duration(self.keepalive.ping_timeout),
            },
            "admin": {
                "listen": "" if self.admin.listen is None else str(self.admin.listen),
                "token": self.admin.token,
            },
            "log": {
                "level": self.log.level,
                "stats_interval": format_duration(self.log.stats_interval),
                "access": self.log.access,
                "file": self.log.file,
                "error_rate": self.log.error_rate,
                "error_burst": self.log.error_burst,
            },
            "routes": [
                {
                    "host": r.host,
                    "path_prefix": r.path_prefix,
                    "pool": r.pool,
                    "access_sample": r.access_sample,
                }
                for r in self.routes
            ],
            "pools": {
                pool.name: {
                    "balance": pool.balance,
                    **({"hash_key": str(pool.hash_key)} if pool.hash_key else {}),
                    **({"health": _health_dict(pool.health)} if pool.health else {}),
                    **({"send_proxy": pool.send_proxy} if pool.send_proxy else {}),
                    **({"tls": _backend_tls_dict(pool.tls)} if pool.tls else {}),
                    "servers": [
                        {
                            "name": s.name,
                            "address": s.address,
                            "ports": list(s.ports),
                            "weight": s.weight,
                        }
                        for s in pool.servers
                    ],
                }
                for pool in self.pools
            },
            **({"tls": {t.name: _tls_dict(t) for t in self.tls}} if self.tls else {}),
        }


def format_duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    if ms % 3_600_000 == 0 and ms:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0 and ms:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def _listen_entry(p: ProxyConfig, e: Endpoint) -> str | dict[str, Any]:
    tls = p.tls_profile_of(e)
    if e not in p.accept_proxy and tls is None:
        return str(e)
    entry: dict[str, Any] = {"address": str(e)}
    if e in p.accept_proxy:
        entry["accept_proxy"] = True
    if tls is not None:
        entry["tls"] = tls
    return entry


def _tls_dict(t: TlsProfile) -> dict[str, Any]:
    return {
        "certificates": [
            {"cert": c.cert, "key": c.key, "names": list(c.names)} for c in t.certificates
        ],
        "min_version": t.min_version,
        "ciphers": t.ciphers,
        "session_tickets": t.session_tickets,
        "strict_sni": t.strict_sni,
        **({"client_ca": t.client_ca} if t.client_ca else {}),
        "verify_client": t.verify_client,
    }


def _backend_tls_dict(t: BackendTls) -> dict[str, Any]:
    out: dict[str, Any] = {"verify": t.verify, "server_name": t.server_name}
    if t.ca_file:
        out["ca_file"] = t.ca_file
    if t.cert:
        out["cert"], out["key"] = t.cert, t.key
    return out


def _health_dict(h: HealthConfig) -> dict[str, Any]:
    return {
        "kind": h.kind,
        "path": h.path,
        "expect": h.expect,
        "interval": format_duration(h.interval),
        "timeout": format_duration(h.timeout),
        "rise": h.rise,
        "fall": h.fall,
        "on_server_down": h.on_server_down,
    }
