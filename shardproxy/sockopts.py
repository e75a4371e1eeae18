"""Socket options shardproxy sets on its TCP connections.

TCP keepalive (``[keepalive] tcp_*``) is set on the listen sockets, and
Linux copies it, with the rest of the TCP state, to every socket they
accept (tcp_create_openreq_child); upstream sockets get it when created.
Keepalive keeps NAT and firewall state of quiet websockets alive and finds
peers that vanished without a FIN or RST (tcp(7): TCP_KEEPIDLE,
TCP_KEEPINTVL, TCP_KEEPCNT).
"""

from __future__ import annotations

import socket

from .config import KeepaliveConfig


def set_tcp_keepalive(sock: socket.socket, cfg: KeepaliveConfig) -> None:
    if cfg.tcp_idle <= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(cfg.tcp_idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(cfg.tcp_interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cfg.tcp_count)
