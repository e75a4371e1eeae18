"""TOML (or an already-loaded mapping) → the model's frozen objects
(``config/model.py``), checked once: every error is a :class:`ConfigError`
naming the file, the key and the reason."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from shardproxy.config import certs
from shardproxy.config.model import (
    ALLOCATORS,
    BALANCES,
    HEALTH_KINDS,
    LOG_LEVELS,
    ON_SERVER_DOWN,
    TLS_VERSIONS,
    VERIFY_CLIENT,
    AdminConfig,
    BackendTls,
    CertificateFiles,
    Config,
    ConfigError,
    Endpoint,
    HashKey,
    HealthConfig,
    IPNetwork,
    KeepaliveConfig,
    LifecycleConfig,
    LogConfig,
    PoolConfig,
    PortRange,
    ProxyConfig,
    RouteConfig,
    ServerConfig,
    TlsProfile,
    UpstreamConfig,
)


def load(path: str) -> Config:
    """Read and validate a TOML file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (TOML must be UTF-8): {e.reason}") from None
    return from_mapping(data, path)


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    return _Parser(source).config(data)


# -- scalar parsers ---------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def parse_duration(text: str) -> float:
    """``"250ms"`` → 0.25, ``"10s"`` → 10.0, ``"2m"`` → 120.0, ``"1h"`` → 3600.0.

    Durations have millisecond resolution, computed exactly (Decimal), so that
    :func:`format_duration` gives back the same value: workers re-parse the
    effective config the supervisor formatted.
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f'must be a duration like "250ms", "10s", "2m" or "1h", got {text!r}')
    ms = Decimal(m.group(1)) * _UNIT_MS[m.group(2)]
    if ms != ms.to_integral_value():
        raise ValueError(f"must be a whole number of milliseconds, got {text!r}")
    return int(ms) / 1000


def parse_host_port(text: str) -> Endpoint:
    """``"0.0.0.0:8080"``, ``"[::]:8080"`` → Endpoint; the host must be an IP literal."""
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if not m:
        raise ValueError(f'must be "ip:port" (IPv6 as "[ip]:port"), got {text!r}')
    host, port = _check_ip(m.group(1)), int(m.group(2))  # canonical, so duplicates show
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    return Endpoint(host, port)


def parse_port_range(text: str) -> PortRange:
    """``"32768-60999"`` → PortRange(32768, 60999)."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f'must be "auto" or "FIRST-LAST" such as "1024-65535", got {text!r}')
    first, last = int(m.group(1)), int(m.group(2))
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"must be FIRST-LAST with 1 <= FIRST <= LAST <= 65535, got {text!r}")
    return PortRange(first, last)


def _parse_network(text: str) -> IPNetwork:
    """``"10.0.0.0/8"``, ``"192.0.2.7"`` (one address) or an IPv6 network."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"must be an address or a network (CIDR), got {text!r}") from None


def _check_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            f"must be an IP address, got {text!r} (host names are not resolved)"
        ) from None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- the parser -------------------------------------------------------------

_PROXY_DEFAULTS: dict[str, Any] = {
    "listen": ["0.0.0.0:8080"],
    "workers": "auto",
    "header_timeout": "10s",
    "max_header_bytes": 16384,
    "connect_timeout": "3s",
    "response_timeout": "10s",
    "max_connections": "auto",
    "max_handshakes": 1024,
    "trusted_proxies": [],
}


class _Parser:
    """Walks the raw TOML data; every check names its key path on failure."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def table(self, value: Any, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a table, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                hint = ", ".join(sorted(allowed))
                raise self.fail(_join(key, name), f"unknown key (allowed here: {hint})")
        return value

    def check(self, key: str, fn: Any, value: Any) -> Any:
        try:
            return fn(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_kind(value)}")
        return value

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def network(self, value: Any, key: str) -> IPNetwork:
        network: IPNetwork = self.check(key, _parse_network, self.string(value, key))
        return network

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_kind(value)}")
        return value

    def fraction(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number from 0 to 1, got {_kind(value)}")
        if not 0 <= value <= 1:
            raise self.fail(key, f"must be from 0 to 1, got {value}")
        return float(value)

    def duration(self, value: Any, key: str, *, positive: bool = True) -> float:
        seconds: float = self.check(key, parse_duration, self.string(value, key))
        if positive and seconds <= 0:
            raise self.fail(key, "must be greater than zero")
        return seconds

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array, got {_kind(value)}")
        return value

    def config(self, data: Mapping[str, Any]) -> Config:
        top = self.table(
            data,
            "",
            {
                "proxy",
                "upstream",
                "lifecycle",
                "keepalive",
                "admin",
                "log",
                "routes",
                "pools",
                "tls",
            },
        )
        tls = self.tls_profiles(top.get("tls", {}))
        proxy = self.proxy(top.get("proxy", {}), {p.name for p in tls})
        upstream = self.upstream(top.get("upstream", {}), proxy)
        lifecycle = self.lifecycle(top.get("lifecycle", {}))
        keepalive = self.keepalive(top.get("keepalive", {}))
        admin = self.admin(top.get("admin", {}), proxy)
        log = self.log(top.get("log", {}))
        pools = self.pools(top.get("pools"))
        routes = self.routes(top.get("routes"), {p.name for p in pools})
        self.check_families(upstream, pools)
        return Config(
            proxy=proxy,
            upstream=upstream,
            lifecycle=lifecycle,
            keepalive=keepalive,
            admin=admin,
            log=log,
            routes=routes,
            pools=pools,
            tls=tls,
            source=self.source,
        )

    # -- TLS ------------------------------------------------------------------

    def path(self, value: Any, key: str) -> str:
        """A file's path, relative ones to the config file's directory."""
        text = self.string(value, key)
        if not text:
            raise self.fail(key, "must name a file")
        if os.path.isabs(text):
            return text
        base = os.path.dirname(os.path.abspath(self.source)) if os.path.isfile(self.source) else ""
        return os.path.abspath(os.path.join(base, text))

    def ca_bundle(self, value: Any, key: str) -> str:
        path = self.path(value, key)
        try:
            certs.inspect_bundle(path)
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        return path

    def tls_profiles(self, value: Any) -> tuple[TlsProfile, ...]:
        profiles = self.table(value, "tls", set(value) if isinstance(value, Mapping) else set())
        return tuple(self.tls_profile(name, raw) for name, raw in profiles.items())

    def tls_profile(self, name: str, value: Any) -> TlsProfile:
        key = f"tls.{name}"
        raw = self.table(
            value,
            key,
            {
                "certificates",
                "min_version",
                "ciphers",
                "session_tickets",
                "strict_sni",
                "client_ca",
                "verify_client",
            },
        )
        listed = self.array(raw.get("certificates", []), f"{key}.certificates")
        if not listed:
            raise self.fail(f"{key}.certificates", "needs at least one { cert, key }")
        files = tuple(
            self.certificate(item, f"{key}.certificates[{i}]") for i, item in enumerate(listed)
        )
        version = self.string(raw.get("min_version", "1.2"), f"{key}.min_version")
        if version not in TLS_VERSIONS:
            raise self.fail(f"{key}.min_version", f'must be "1.2" or "1.3", got {version!r}')
        # OpenSSL's verdict on the cipher string is host/tls.py's trial (sans-IO here).
        ciphers = self.string(raw.get("ciphers", ""), f"{key}.ciphers")
        verify = self.string(raw.get("verify_client", "none"), f"{key}.verify_client")
        if verify not in VERIFY_CLIENT:
            raise self.fail(
                f"{key}.verify_client", f"must be one of {', '.join(VERIFY_CLIENT)}, got {verify!r}"
            )
        client_ca = ""
        if raw.get("client_ca", ""):
            client_ca = self.ca_bundle(raw["client_ca"], f"{key}.client_ca")
        elif verify != "none":
            raise self.fail(f"{key}.client_ca", f'is required with verify_client = "{verify}"')
        return TlsProfile(
            name=name,
            certificates=files,
            min_version=version,
            ciphers=ciphers,
            session_tickets=self.integer(
                raw.get("session_tickets", 2), f"{key}.session_tickets", 0, 10
            ),
            strict_sni=self.boolean(raw.get("strict_sni", False), f"{key}.strict_sni"),
            client_ca=client_ca,
            verify_client=verify,
        )

    def certificate(self, value: Any, key: str) -> CertificateFiles:
        """``{ cert, key, names? }``: the pair is loaded and checked now
        (a broken file refuses the start or the reload); the names are
        the ones listed, each a name of the certificate, else all of its."""
        raw = self.table(value, key, {"cert", "key", "names"})
        for part in ("cert", "key"):
            if part not in raw:
                raise self.fail(f"{key}.{part}", "is required (a PEM file)")
        cert, private = self.path(raw["cert"], f"{key}.cert"), self.path(raw["key"], f"{key}.key")
        try:
            info = certs.inspect_pair(cert, private)
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        if "names" not in raw:
            if not info.names:
                raise self.fail(key, f"{cert} has no DNS name (subjectAltName or CN)")
            return CertificateFiles(cert, private, info.names)
        names = []
        for i, item in enumerate(self.array(raw["names"], f"{key}.names")):
            name = self.string(item, f"{key}.names[{i}]").lower()
            if not certs.covers(info.names, name):
                raise self.fail(
                    f"{key}.names[{i}]",
                    f"{name} is not a name of {cert} (its names: {', '.join(info.names)})",
                )
            names.append(name)
        if not names:
            raise self.fail(f"{key}.names", "needs at least one name (or leave it out: all)")
        return CertificateFiles(cert, private, tuple(names))

    def backend_tls(self, value: Any, key: str) -> BackendTls:
        raw = self.table(value, key, {"verify", "ca_file", "server_name", "cert", "key"})
        verify = self.boolean(raw.get("verify", True), f"{key}.verify")
        ca_file = self.ca_bundle(raw["ca_file"], f"{key}.ca_file") if raw.get("ca_file") else ""
        server_name = self.string(raw.get("server_name", ""), f"{key}.server_name")
        cert = private = ""
        given = {part for part in ("cert", "key") if raw.get(part, "") != ""}  # "": none
        if len(given) == 1:
            (present,) = given
            missing = "key" if present == "cert" else "cert"
            raise self.fail(
                f"{key}.{missing}", f"is required with {present} (a client certificate is both)"
            )
        if given:
            cert, private = (
                self.path(raw["cert"], f"{key}.cert"),
                self.path(raw["key"], f"{key}.key"),
            )
            try:
                certs.inspect_pair(cert, private)
            except ValueError as e:
                raise self.fail(key, str(e)) from None
        return BackendTls(verify, ca_file, server_name, cert, private)

    def proxy(self, value: Any, tls_profiles: Collection[str] = ()) -> ProxyConfig:
        raw = {**_PROXY_DEFAULTS, **self.table(value, "proxy", set(_PROXY_DEFAULTS))}
        listen_raw = self.array(raw["listen"], "proxy.listen")
        if not listen_raw:
            raise self.fail("proxy.listen", "needs at least one address")
        entries = [
            self.listen_entry(v, f"proxy.listen[{i}]", tls_profiles)
            for i, v in enumerate(listen_raw)
        ]
        listen = tuple(ep for ep, _, _ in entries)
        accept_proxy = frozenset(ep for ep, proxied, _ in entries if proxied)
        tls_listeners = tuple((ep, tls) for ep, _, tls in entries if tls)
        trusted_raw = self.array(raw["trusted_proxies"], "proxy.trusted_proxies")
        trusted = tuple(
            self.network(v, f"proxy.trusted_proxies[{i}]") for i, v in enumerate(trusted_raw)
        )
        if accept_proxy and not trusted:
            raise self.fail(
                "proxy.trusted_proxies",
                "is required with accept_proxy: the addresses of the load balancers "
                'allowed to send PROXY headers, e.g. ["10.0.0.0/16"]',
            )
        for i, ep in enumerate(listen):
            if ep in listen[:i]:
                raise self.fail(f"proxy.listen[{i}]", f"{ep} is listed twice")
        workers = raw["workers"]
        if workers == "auto":
            workers = available_cpus()
        else:
            workers = self.integer(workers, "proxy.workers", 1, 1024)
        max_conn = raw["max_connections"]
        if max_conn != "auto":
            max_conn = self.integer(max_conn, "proxy.max_connections", 1, 10_000_000)
        return ProxyConfig(
            listen=listen,
            workers=workers,
            header_timeout=self.duration(raw["header_timeout"], "proxy.header_timeout"),
            max_header_bytes=self.integer(
                raw["max_header_bytes"], "proxy.max_header_bytes", 1024, 1 << 20
            ),
            connect_timeout=self.duration(raw["connect_timeout"], "proxy.connect_timeout"),
            response_timeout=self.duration(raw["response_timeout"], "proxy.response_timeout"),
            max_connections=None if max_conn == "auto" else max_conn,
            max_handshakes=self.integer(
                raw["max_handshakes"], "proxy.max_handshakes", 1, 1_000_000
            ),
            accept_proxy=accept_proxy,
            trusted_proxies=trusted,
            tls_listeners=tls_listeners,
        )

    def listen_entry(
        self, value: Any, key: str, tls_profiles: Collection[str]
    ) -> tuple[Endpoint, bool, str]:
        """``"ip:port"``, or ``{ address = "ip:port", accept_proxy = true,
        tls = "NAME" }``: the address, whether it reads PROXY headers, the
        TLS profile ("" for none)."""
        if isinstance(value, Mapping):
            raw = self.table(value, key, {"address", "accept_proxy", "tls"})
            if "address" not in raw:
                raise self.fail(f"{key}.address", "is required")
            address = self.string(raw["address"], f"{key}.address")
            proxied = self.boolean(raw.get("accept_proxy", False), f"{key}.accept_proxy")
            tls = self.string(raw.get("tls", ""), f"{key}.tls")
            if tls and tls not in tls_profiles:
                known = ", ".join(sorted(tls_profiles)) or "none defined"
                raise self.fail(f"{key}.tls", f"no [tls.{tls}] profile (profiles: {known})")
            return self.check(f"{key}.address", parse_host_port, address), proxied, tls
        if not isinstance(value, str):
            raise self.fail(key, f'must be "ip:port" or a table with address, got {_kind(value)}')
        return self.check(key, parse_host_port, value), False, ""

    def upstream(self, value: Any, proxy: ProxyConfig) -> UpstreamConfig:
        raw = self.table(value, "upstream", {"source_addresses", "port_range", "port_allocator"})
        sources: list[str] = []
        listed = self.array(raw.get("source_addresses", []), "upstream.source_addresses")
        for i, value in enumerate(listed):
            key = f"upstream.source_addresses[{i}]"
            source = self.check(key, _check_ip, self.string(value, key))
            if source in sources:
                raise self.fail(key, f"{source} is listed twice")
            if ipaddress.ip_address(source).is_unspecified:
                raise self.fail(
                    key, f"{source} is no source address; an empty list lets the kernel choose"
                )
            sources.append(source)
        text = self.string(raw.get("port_range", "auto"), "upstream.port_range")
        ports = (
            None if text == "auto" else self.check("upstream.port_range", parse_port_range, text)
        )
        if ports is not None:
            if len(ports) < proxy.workers:
                raise self.fail(
                    "upstream.port_range",
                    f"{len(ports)} ports cannot be cut into {proxy.workers} slices, one per worker",
                )
        allocator = self.string(raw.get("port_allocator", "auto"), "upstream.port_allocator")
        if allocator not in ALLOCATORS:
            raise self.fail(
                "upstream.port_allocator",
                f"must be one of {', '.join(ALLOCATORS)}, got {allocator!r}",
            )
        return UpstreamConfig(tuple(sources), ports, allocator)

    def check_families(self, upstream: UpstreamConfig, pools: tuple[PoolConfig, ...]) -> None:
        """With explicit source addresses, every backend needs one of its family."""
        if not upstream.source_addresses:
            return
        families = {ipaddress.ip_address(a).version for a in upstream.source_addresses}
        for pool in pools:
            for i, server in enumerate(pool.servers):
                version = ipaddress.ip_address(server.address).version
                if version not in families:
                    raise self.fail(
                        f"pools.{pool.name}.servers[{i}].address",
                        f"IPv{version} backend {server.address}, but upstream.source_addresses "
                        f"has no IPv{version} address to connect from",
                    )

    def lifecycle(self, value: Any) -> LifecycleConfig:
        raw = self.table(
            value,
            "lifecycle",
            {"drain_timeout", "close_spread", "close_wait", "reload_drain_after", "drain_delay"},
        )
        after = raw.get("reload_drain_after", "never")
        if after != "never":
            after = self.duration(after, "lifecycle.reload_drain_after", positive=False)
        return LifecycleConfig(
            drain_timeout=self.duration(raw.get("drain_timeout", "60s"), "lifecycle.drain_timeout"),
            close_spread=self.duration(
                raw.get("close_spread", "30s"), "lifecycle.close_spread", positive=False
            ),
            close_wait=self.duration(raw.get("close_wait", "5s"), "lifecycle.close_wait"),
            reload_drain_after=None if after == "never" else after,
            drain_delay=self.duration(
                raw.get("drain_delay", "0s"), "lifecycle.drain_delay", positive=False
            ),
        )

    def keepalive(self, value: Any) -> KeepaliveConfig:
        defaults = {
            "tcp_idle": "60s",
            "tcp_interval": "10s",
            "tcp_count": 6,
            "ping_interval": "0s",
            "ping_timeout": "10s",
        }
        raw = {**defaults, **self.table(value, "keepalive", set(defaults))}
        return KeepaliveConfig(
            tcp_idle=self.duration(raw["tcp_idle"], "keepalive.tcp_idle", positive=False),
            tcp_interval=self.duration(raw["tcp_interval"], "keepalive.tcp_interval"),
            tcp_count=self.integer(raw["tcp_count"], "keepalive.tcp_count", 1, 127),
            ping_interval=self.duration(
                raw["ping_interval"], "keepalive.ping_interval", positive=False
            ),
            ping_timeout=self.duration(raw["ping_timeout"], "keepalive.ping_timeout"),
        )

    def admin(self, value: Any, proxy: ProxyConfig) -> AdminConfig:
        raw = self.table(value, "admin", {"listen", "token"})
        text = self.string(raw.get("listen", ""), "admin.listen")
        listen = self.check("admin.listen", parse_host_port, text) if text else None
        if listen is not None and listen in proxy.listen:
            raise self.fail("admin.listen", f"{listen} is also in proxy.listen")
        token = self.string(raw.get("token", ""), "admin.token")
        return AdminConfig(listen=listen, token=token)

    def log(self, value: Any) -> LogConfig:
        raw = self.table(
            value,
            "log",
            {"level", "stats_interval", "access", "file", "error_rate", "error_burst"},
        )
        level = self.string(raw.get("level", "info"), "log.level")
        if level not in LOG_LEVELS:
            raise self.fail("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        interval = self.duration(
            raw.get("stats_interval", "60s"), "log.stats_interval", positive=False
        )
        access = self.boolean(raw.get("access", True), "log.access")
        file = self.string(raw.get("file", ""), "log.file")
        if file and not os.path.isabs(file):
            raise self.fail(
                "log.file", f"must be an absolute path (or empty for stdout), got {file!r}"
            )
        return LogConfig(
            level=level,
            stats_interval=interval,
            access=access,
            file=file,
            error_rate=self.integer(raw.get("error_rate", 20), "log.error_rate", 0, 1_000_000),
            error_burst=self.integer(raw.get("error_burst", 100), "log.error_burst", 1, 1_000_000),
        )

    def routes(self, value: Any, pool_names: set[str]) -> tuple[RouteConfig, ...]:
        if value is None:
            raise self.fail("routes", "at least one [[routes]] entry is required")
        routes = []
        for i, item in enumerate(self.array(value, "routes")):
            key = f"routes[{i}]"
            raw = self.table(item, key, {"host", "path_prefix", "pool", "access_sample"})
            host = self.string(raw.get("host", "*"), f"{key}.host").lower()
            if not re.fullmatch(r"\*|(\*\.)?[a-z0-9_.-]+", host) or ":" in host:
                raise self.fail(
                    f"{key}.host", f'must be "*", a host name or "*.domain", got {host!r}'
                )
            prefix = self.string(raw.get("path_prefix", "/"), f"{key}.path_prefix")
            if not prefix.startswith("/"):
                raise self.fail(f"{key}.path_prefix", f'must start with "/", got {prefix!r}')
            if "pool" not in raw:
                raise self.fail(f"{key}.pool", "is required")
            pool = self.string(raw["pool"], f"{key}.pool")
            if pool not in pool_names:
                known = ", ".join(sorted(pool_names)) or "none defined"
                raise self.fail(f"{key}.pool", f"no pool named {pool!r} (pools: {known})")
            sample = self.fraction(raw.get("access_sample", 1.0), f"{key}.access_sample")
            routes.append(RouteConfig(host, prefix, pool, sample))
        if not routes:
            raise self.fail("routes", "at least one [[routes]] entry is required")
        return tuple(routes)

    def pools(self, value: Any) -> tuple[PoolConfig, ...]:
        value = {} if value is None else value
        pools = self.table(value, "pools", set(value) if isinstance(value, Mapping) else set())
        if not pools:
            raise self.fail("pools", "at least one pool is required ([pools.NAME])")
        return tuple(self.pool(name, raw) for name, raw in pools.items())

    def pool(self, name: str, value: Any) -> PoolConfig:
        key = f"pools.{name}"
        raw = self.table(
            value, key, {"balance", "hash_key", "servers", "health", "send_proxy", "tls"}
        )
        send_proxy = self.string(raw.get("send_proxy", ""), f"{key}.send_proxy")
        if send_proxy not in ("", "v2"):
            raise self.fail(f"{key}.send_proxy", f'must be "v2" or "" (none), got {send_proxy!r}')
        balance = self.string(raw.get("balance", "least_conn"), f"{key}.balance")
        if balance not in BALANCES:
            raise self.fail(
                f"{key}.balance", f"must be one of {', '.join(BALANCES)}, got {balance!r}"
            )
        hash_key = None
        if "hash_key" in raw:
            if balance != "hash":
                raise self.fail(f"{key}.hash_key", 'only applies with balance = "hash"')
            text = self.string(raw["hash_key"], f"{key}.hash_key")
            hash_key = self.check(f"{key}.hash_key", _parse_hash_key, text)
        elif balance == "hash":
            raise self.fail(
                f"{key}.hash_key",
                'is required with balance = "hash" '
                "(header:NAME, cookie:NAME, query:NAME, client_ip or client_cert)",
            )
        servers_raw = self.array(raw.get("servers", []), f"{key}.servers")
        if not servers_raw:
            raise self.fail(f"{key}.servers", "needs at least one server")
        servers = tuple(
            self.server(item, f"{key}.servers[{i}]") for i, item in enumerate(servers_raw)
        )
        seen: set[str] = set()
        for i, s in enumerate(servers):
            if s.name in seen:
                raise self.fail(f"{key}.servers[{i}].name", f"{s.name!r} is used twice")
            seen.add(s.name)
        health = self.health(raw["health"], f"{key}.health") if "health" in raw else None
        tls = self.backend_tls(raw["tls"], f"{key}.tls") if "tls" in raw else None
        return PoolConfig(name, balance, hash_key, servers, health, send_proxy, tls)

    def health(self, value: Any, key: str) -> HealthConfig:
        raw = self.table(value, key, set(_HEALTH_DEFAULTS) | {"kind"})
        if "kind" not in raw:
            raise self.fail(f"{key}.kind", f"is required ({', '.join(HEALTH_KINDS)})")
        kind = self.string(raw["kind"], f"{key}.kind")
        if kind not in HEALTH_KINDS:
            raise self.fail(
                f"{key}.kind", f"must be one of {', '.join(HEALTH_KINDS)}, got {kind!r}"
            )
        raw = {**_HEALTH_DEFAULTS, **raw}
        path = self.string(raw["path"], f"{key}.path")
        if not path.startswith("/"):
            raise self.fail(f"{key}.path", f'must start with "/", got {path!r}')
        on_down = self.string(raw["on_server_down"], f"{key}.on_server_down")
        if on_down not in ON_SERVER_DOWN:
            raise self.fail(f"{key}.on_server_down", f"must be keep or close, got {on_down!r}")
        health = HealthConfig(
            kind=kind,
            path=path,
            expect=self.integer(raw["expect"], f"{key}.expect", 100, 599),
            interval=self.duration(raw["interval"], f"{key}.interval"),
            timeout=self.duration(raw["timeout"], f"{key}.timeout"),
            rise=self.integer(raw["rise"], f"{key}.rise", 1, 100),
            fall=self.integer(raw["fall"], f"{key}.fall", 1, 100),
            on_server_down=on_down,
        )
        if health.timeout > health.interval:
            raise self.fail(f"{key}.timeout", "must not be longer than the interval")
        return health

    def server(self, value: Any, key: str) -> ServerConfig:
        raw = self.table(value, key, {"name", "address", "ports", "weight"})
        if "address" not in raw:
            raise self.fail(f"{key}.address", "is required")
        address = self.check(
            f"{key}.address", _check_ip, self.string(raw["address"], f"{key}.address")
        )
        if "ports" not in raw:
            raise self.fail(f"{key}.ports", "is required (a list such as [8080, 8081])")
        ports = tuple(
            self.integer(p, f"{key}.ports[{i}]", 1, 65535)
            for i, p in enumerate(self.array(raw["ports"], f"{key}.ports"))
        )
        if not ports:
            raise self.fail(f"{key}.ports", "needs at least one port")
        if len(set(ports)) != len(ports):
            raise self.fail(f"{key}.ports", "lists a port twice")
        weight = self.integer(raw.get("weight", 1), f"{key}.weight", 1, 1000)
        default_name = f"[{address}]" if ":" in address else address
        name = self.string(raw.get("name", default_name), f"{key}.name")
        return ServerConfig(name=name, address=address, ports=ports, weight=weight)


_HEALTH_DEFAULTS: dict[str, Any] = {
    "path": "/",
    "expect": 200,
    "interval": "2s",
    "timeout": "1s",
    "rise": 2,
    "fall": 3,
    "on_server_down": "keep",
}


def _parse_hash_key(text: str) -> HashKey:
    if text in ("client_ip", "client_cert"):
        return HashKey(text)  # type: ignore[arg-type]
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("header", "cookie", "query") or not name:
        raise ValueError(
            f"must be header:NAME, cookie:NAME, query:NAME, client_ip or client_cert, got {text!r}"
        )
    if kind == "header":
        name = name.lower()
    return HashKey(kind, name)  # type: ignore[arg-type]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__
