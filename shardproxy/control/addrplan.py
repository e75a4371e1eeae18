"""The address plan: source addresses x port slices x backend endpoints.

An upstream TCP connection is the 4-tuple (source ip, source port, backend ip,
backend port), so one worker can hold at most::

    source addresses x ports in its slice x backend endpoints

upstream connections (DESIGN.md, "Why 64k is a wall"). The port range (the
system's ``net.ipv4.ip_local_port_range`` or ``[upstream] port_range``) is cut
into one disjoint slice per worker slot, so two workers never compete for a
tuple and each can count its own.

The arithmetic (:func:`cut_slices`, :func:`make_plan`) is pure. The few facts
that need the host are gathered at the edge, in :func:`inspect_host`: the
system port range, whether the kernel can confine connect() to a slice, which
source addresses this host can bind, the descriptor limit and the memory.

Kernel facts relied on:

- ``IP_LOCAL_PORT_RANGE`` (Linux ≥ 6.3) narrows, per socket, the range that
  connect() picks an ephemeral port from; it never widens the system range,
  so a slice outside the system range is an error here, not a surprise later.
- ``IP_BIND_ADDRESS_NO_PORT`` defers the port choice of ``bind((ip, 0))`` to
  connect(), which then needs only the whole 4-tuple to be unique: one port
  serves every backend endpoint.
- connect() skips the ports of ``net.ipv4.ip_local_reserved_ports`` and
  ports that another socket bound explicitly (a listener, say). The plan
  leaves out the reserved ports and the proxy's own listen ports that fall
  in the range (the userspace allocator skips them too); listeners of other
  programs inside the range cost capacity the plan cannot see.
"""

from __future__ import annotations

import errno
import resource
import socket
from dataclasses import dataclass
from typing import Any

import psutil

from shardproxy.config import Config, ConfigError, Endpoint, PortRange
from shardproxy.host.rlimits import FD_RESERVE, fd_capacity
from shardproxy.host.sockopts import (
    AUTO_SOURCE,
    IP_BIND_ADDRESS_NO_PORT,
    IP_LOCAL_PORT_RANGE,
    port_range_option,
)

SYSTEM_PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
RESERVED_PORTS_FILE = "/proc/sys/net/ipv4/ip_local_reserved_ports"

# Memory of one tunnel: the kernel's two sockets (BENCH.md: about 8.5 KB
# when idle) and our objects (BENCHMARKS.md, idle scenario: 666 B).
KERNEL_BYTES_PER_TUNNEL = 8704
USER_BYTES_PER_TUNNEL = 700


def cut_slices(ports: PortRange, workers: int) -> tuple[PortRange, ...]:
    """Cut ``ports`` into ``workers`` contiguous, disjoint slices whose sizes
    differ by at most one port, in slot order."""
    if not 1 <= workers <= len(ports):
        raise ValueError(f"cannot cut {len(ports)} ports into {workers} slices")
    size, extra = divmod(len(ports), workers)
    slices, first = [], ports.first
    for slot in range(workers):
        last = first + size - 1 + (1 if slot < extra else 0)
        slices.append(PortRange(first, last))
        first = last + 1
    return tuple(slices)


@dataclass(frozen=True, slots=True)
class Host:
    """What this machine allows, as :func:`inspect_host` found it."""

    port_range: PortRange  # net.ipv4.ip_local_port_range
    reserved_ports: frozenset[int]  # net.ipv4.ip_local_reserved_ports
    kernel_allocator: bool  # IP_LOCAL_PORT_RANGE is supported
    kernel_reason: str
    unbindable: tuple[tuple[str, str], ...]  # (source address, why) that cannot be bound
    nofile: int  # RLIMIT_NOFILE hard limit
    memory: int  # bytes of RAM


@dataclass(frozen=True, slots=True)
class Limits:
    """Tunnels one worker (or all of them) can hold, by what limits them."""

    tuples: int
    descriptors: int
    memory: int
    max_connections: int | None

    @property
    def limit(self) -> int:
        return min(self.tuples, self.descriptors, self.memory, *self._configured())

    @property
    def binding(self) -> str:
        """Which figure is the smallest: what an operator must raise first."""
        figures = {"tuples": self.tuples, "descriptors": self.descriptors, "memory": self.memory}
        if self.max_connections is not None:
            figures["max_connections"] = self.max_connections
        return min(figures, key=lambda k: figures[k])

    def _configured(self) -> tuple[int, ...]:
        return () if self.max_connections is None else (self.max_connections,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tuples": self.tuples,
            "descriptors": self.descriptors,
            "memory": self.memory,
            "max_connections": self.max_connections,
            "limit": self.limit,
            "binding": self.binding,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    sources: tuple[str, ...]  # (AUTO_SOURCE,) when the kernel chooses
    endpoints: tuple[Endpoint, ...]
    port_range: PortRange
    port_range_from: str  # "config" or "system"
    excluded: tuple[int, ...]  # ports of the range no upstream connection may use
    slices: tuple[PortRange, ...]  # slices[slot]
    allocator: str  # "kernel" or "userspace"
    allocator_reason: str
    per_worker: tuple[Limits, ...]
    total: Limits
    bytes_per_tunnel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": len(self.slices),
            "sources": list(self.sources),
            "endpoints": [str(e) for e in self.endpoints],
            "port_range": {
                "first": self.port_range.first,
                "last": self.port_range.last,
                "ports": len(self.port_range),
                "from": self.port_range_from,
                "excluded": list(self.excluded),
            },
            "allocator": {"name": self.allocator, "reason": self.allocator_reason},
            "bytes_per_tunnel": self.bytes_per_tunnel,
            "slices": [
                {
                    "slot": slot,
                    "first": ports.first,
                    "last": ports.last,
                    "ports": len(ports),
                    "usable_ports": self.usable(ports),
                    **limits.to_dict(),
                }
                for slot, (ports, limits) in enumerate(
                    zip(self.slices, self.per_worker, strict=True)
                )
            ],
            "total": self.total.to_dict(),
        }

    def usable(self, ports: PortRange) -> int:
        return _usable(ports, self.excluded)

    def excluded_in(self, ports: PortRange) -> list[int]:
        return [p for p in self.excluded if p in ports]


def make_plan(cfg: Config, host: Host) -> Plan:
    """The address plan of ``cfg`` on ``host``; :class:`ConfigError` names
    the key at fault when the host cannot carry it out."""
    up = cfg.upstream
    for address, why in host.unbindable:
        index = up.source_addresses.index(address)
        raise ConfigError(
            cfg.source,
            f"upstream.source_addresses[{index}]",
            f"{address} cannot be used as a source address on this host ({why})",
        )
    ports, origin = (
        (host.port_range, "system") if up.port_range is None else (up.port_range, "config")
    )
    if origin == "config" and not (
        host.port_range.first <= ports.first and ports.last <= host.port_range.last
    ):
        raise ConfigError(
            cfg.source,
            "upstream.port_range",
            f"{ports} is not inside the system range {host.port_range} "
            f"(net.ipv4.ip_local_port_range; the kernel narrows it, never widens it: "
            f"widen the system range first, see deploy/)",
        )
    workers = cfg.proxy.workers
    if len(ports) < workers:
        raise ConfigError(
            cfg.source,
            "upstream.port_range",
            f"{len(ports)} ports ({ports}) cannot be cut into {workers} slices, one per worker",
        )
    allocator, reason = choose_allocator(cfg, host)
    slices = cut_slices(ports, workers)
    own = {listen.port for listen in cfg.proxy.listen}
    excluded = tuple(sorted(p for p in own | host.reserved_ports if p in ports))
    sources = up.source_addresses or (AUTO_SOURCE,)
    endpoints = cfg.endpoints()
    per_tunnel = KERNEL_BYTES_PER_TUNNEL + USER_BYTES_PER_TUNNEL
    descriptors = fd_capacity(host.nofile)
    by_memory = host.memory // per_tunnel
    per_worker = tuple(
        Limits(
            tuples=len(sources) * _usable(s, excluded) * len(endpoints),
            descriptors=descriptors,
            memory=by_memory // workers,
            max_connections=cfg.proxy.max_connections,
        )
        for s in slices
    )
    max_conn = cfg.proxy.max_connections
    total = Limits(
        tuples=sum(w.tuples for w in per_worker),
        descriptors=descriptors * workers,
        memory=by_memory,
        max_connections=None if max_conn is None else max_conn * workers,
    )
    return Plan(
        sources,
        endpoints,
        ports,
        origin,
        excluded,
        slices,
        allocator,
        reason,
        per_worker,
        total,
        per_tunnel,
    )


def _usable(ports: PortRange, excluded: tuple[int, ...]) -> int:
    return len(ports) - sum(1 for p in excluded if p in ports)


def choose_allocator(cfg: Config, host: Host) -> tuple[str, str]:
    wanted = cfg.upstream.port_allocator
    if wanted == "userspace":
        return "userspace", "port_allocator = userspace in the config"
    if host.kernel_allocator:
        why = "port_allocator = kernel in the config" if wanted == "kernel" else "auto: "
        return "kernel", why + ("" if wanted == "kernel" else host.kernel_reason)
    if wanted == "kernel":
        raise ConfigError(
            cfg.source,
            "upstream.port_allocator",
            f"kernel allocator unavailable: {host.kernel_reason}; use auto or userspace",
        )
    return "userspace", f"auto: {host.kernel_reason}"


# -- the host ---------------------------------------------------------------


def inspect_host(cfg: Config) -> Host:
    """Gather the facts :func:`make_plan` needs from this machine."""
    first, last = read_system_port_range()
    supported, reason = probe_kernel_allocator()
    unbindable = []
    for address in cfg.upstream.source_addresses:
        why = test_bind(address)
        if why is not None:
            unbindable.append((address, why))
    return Host(
        port_range=PortRange(first, last),
        reserved_ports=read_reserved_ports(),
        kernel_allocator=supported,
        kernel_reason=reason,
        unbindable=tuple(unbindable),
        nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        memory=int(psutil.virtual_memory().total),
    )


def build(cfg: Config) -> Plan:
    return make_plan(cfg, inspect_host(cfg))


def read_system_port_range(path: str = SYSTEM_PORT_RANGE_FILE) -> tuple[int, int]:
    try:
        with open(path) as f:
            first, last = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default, for systems without the file
    return first, last


def read_reserved_ports(path: str = RESERVED_PORTS_FILE) -> frozenset[int]:
    """``net.ipv4.ip_local_reserved_ports``: "8080,9000-9002" → {8080, 9000, 9001, 9002}."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return frozenset()
    ports: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        ports.update(range(int(first), int(last or first) + 1))
    return frozenset(ports)


def probe_kernel_allocator() -> tuple[bool, str]:
    """Can connect() be confined to a slice (IP_LOCAL_PORT_RANGE)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.setsockopt(
                socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, port_range_option(PortRange(1024, 65535))
            )
        except OSError as e:
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
                return False, f"this kernel lacks IP_LOCAL_PORT_RANGE (Linux >= 6.3): {e.strerror}"
            return False, f"IP_LOCAL_PORT_RANGE failed: {e.strerror}"
    return True, "this kernel has IP_LOCAL_PORT_RANGE"


def test_bind(address: str) -> str | None:
    """None if this host can connect from ``address``, else why not. A real
    bind decides (every 127.x.y.z is local on Linux, for instance);
    IP_BIND_ADDRESS_NO_PORT keeps it from taking a port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((address, 0))
        except OSError as e:
            return f"bind: {e.strerror}"
    return None


# -- text -------------------------------------------------------------------


def describe(plan: Plan) -> str:
    """The arithmetic, for ``shardproxy plan``."""
    n_src, n_ep = len(plan.sources), len(plan.endpoints)
    lines = [
        f"port range   {plan.port_range} ({len(plan.port_range)} ports, "
        f"from the {plan.port_range_from}), "
        f"cut into {len(plan.slices)} slices, one per worker",
        f"allocator    {plan.allocator} ({plan.allocator_reason})",
        f"sources      {n_src}: {', '.join(plan.sources)}",
        f"endpoints    {n_ep}: {', '.join(map(str, plan.endpoints))}",
        *(
            [f"excluded     {', '.join(map(str, plan.excluded))} (listen and reserved ports)"]
            if plan.excluded
            else []
        ),
        "",
        _row(
            "worker",
            "ports",
            "sources x ports x endpoints = tuples",
            "descriptors",
            "memory",
            "limit (binding)",
        ),
    ]
    for slot, (ports, w) in enumerate(zip(plan.slices, plan.per_worker, strict=True)):
        lines.append(
            _row(str(slot), str(ports), _product(n_src, plan.usable(ports), n_ep, w), *_figures(w))
        )
    t = plan.total
    lines += [
        _row(
            "total",
            str(plan.port_range),
            _product(n_src, plan.usable(plan.port_range), n_ep, t),
            *_figures(t),
        ),
        "",
        "tuples: upstream connections the address plan allows;",
        f"descriptors: RLIMIT_NOFILE allows (limit - {FD_RESERVE}) / 2 tunnels per worker;",
        "memory: RAM / "
        f"{plan.bytes_per_tunnel:,} B per tunnel (kernel ~{KERNEL_BYTES_PER_TUNNEL:,} B "
        f"+ shardproxy ~{USER_BYTES_PER_TUNNEL} B).",
        f"This instance can hold {t.limit:,} tunnels; the binding limit is {t.binding}.",
    ]
    return "\n".join(lines)


def _row(*cells: str) -> str:
    widths = (8, 14, 40, 14, 14)
    return "".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + cells[-1]


def _product(sources: int, ports: int, endpoints: int, limits: Limits) -> str:
    return f"{sources} x {ports:,} x {endpoints} = {limits.tuples:,}"


def _figures(limits: Limits) -> tuple[str, str, str]:
    return (
        f"{limits.descriptors:,}",
        f"{limits.memory:,}",
        f"{limits.limit:,} ({limits.binding})",
    )
