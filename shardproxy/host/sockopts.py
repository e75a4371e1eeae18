"""Socket options shardproxy sets on its TCP connections, and the ones the
address plan relies on (IP_BIND_ADDRESS_NO_PORT, IP_LOCAL_PORT_RANGE).

TCP keepalive (``[keepalive] tcp_*``) is set on the listen sockets, and
Linux copies it, with the rest of the TCP state, to every socket they
accept (tcp_create_openreq_child); upstream sockets get it when created.
Keepalive keeps NAT and firewall state of quiet websockets alive and finds
peers that vanished without a FIN or RST (tcp(7): TCP_KEEPIDLE,
TCP_KEEPINTVL, TCP_KEEPCNT).
"""

from __future__ import annotations

import socket
import struct

from shardproxy.config import KeepaliveConfig, PortRange

# Linux >= 6.3 (the numbers of include/uapi/linux/in.h, for Pythons that lack them)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE = getattr(socket, "IP_LOCAL_PORT_RANGE", 51)
AUTO_SOURCE = "auto"  # the label of the kernel-chosen source address (no bind address)


def port_range_option(ports: PortRange) -> bytes:
    """The IP_LOCAL_PORT_RANGE value, a native uint32: low 16 bits first port,
    high 16 last (packed: as an int it can exceed the C int setsockopt takes)."""
    return struct.pack("=I", ports.first | ports.last << 16)


SocketOption = tuple[int, int, int | bytes]  # (level, name, value) for setsockopt


def keepalive_options(cfg: KeepaliveConfig) -> list[SocketOption]:
    """The setsockopt calls that give a socket ``cfg``'s TCP keepalive."""
    if cfg.tcp_idle <= 0:
        return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]
    return [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(cfg.tcp_idle))),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(cfg.tcp_interval))),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cfg.tcp_count),
    ]


def set_tcp_keepalive(sock: socket.socket, cfg: KeepaliveConfig) -> None:
    for level, name, value in keepalive_options(cfg):
        sock.setsockopt(level, name, value)
