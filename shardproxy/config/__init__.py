"""TOML configuration → frozen, validated objects.

Everything an operator can write is checked here, once; nothing downstream
reads raw dicts or re-validates. Every error is one line naming the file, the
key and the reason, e.g.::

    shardproxy.toml: pools.chat.servers[1].ports[0]: must be a port number 1-65535, got 70000

The model (frozen dataclasses, and the effective config written back out) is
``config/model.py``; parsing and checking, ``config/parse.py``; this package
re-exports both, so ``from shardproxy.config import Config`` is the way in.

The same parser serves ``check``, ``run``, ``demo`` and the workers: the
supervisor sends each worker :meth:`Config.to_dict` (the effective config, all
defaults filled in) and the worker parses it again with :func:`from_mapping`.
"""

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
    Allocator,
    BackendTls,
    Balance,
    CertificateFiles,
    Config,
    ConfigError,
    Endpoint,
    HashKey,
    HashKind,
    HealthConfig,
    HealthKind,
    IPNetwork,
    KeepaliveConfig,
    LifecycleConfig,
    LogConfig,
    OnServerDown,
    PoolConfig,
    PortRange,
    ProxyConfig,
    RouteConfig,
    ServerConfig,
    TlsProfile,
    TlsVersion,
    UpstreamConfig,
    VerifyClient,
    format_duration,
)
from shardproxy.config.parse import (
    available_cpus,
    from_mapping,
    load,
    parse_duration,
    parse_host_port,
    parse_port_range,
)

__all__ = [
    "ALLOCATORS",
    "BALANCES",
    "HEALTH_KINDS",
    "LOG_LEVELS",
    "ON_SERVER_DOWN",
    "TLS_VERSIONS",
    "VERIFY_CLIENT",
    "AdminConfig",
    "Allocator",
    "BackendTls",
    "Balance",
    "CertificateFiles",
    "Config",
    "ConfigError",
    "Endpoint",
    "HashKey",
    "HashKind",
    "HealthConfig",
    "HealthKind",
    "IPNetwork",
    "KeepaliveConfig",
    "LifecycleConfig",
    "LogConfig",
    "OnServerDown",
    "PoolConfig",
    "PortRange",
    "ProxyConfig",
    "RouteConfig",
    "ServerConfig",
    "TlsProfile",
    "TlsVersion",
    "UpstreamConfig",
    "VerifyClient",
    "available_cpus",
    "certs",
    "format_duration",
    "from_mapping",
    "load",
    "parse_duration",
    "parse_host_port",
    "parse_port_range",
]
