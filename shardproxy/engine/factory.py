"""The engines of a worker, as engine/choice.py chose them at import."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from shardproxy.config import ProxyConfig
from shardproxy.engine import choice
from shardproxy.engine.api import HandshakeEvents, Handshakes, Keepalive, TunnelEngine, TunnelEvents
from shardproxy.engine.handshake import HandshakeEngine
from shardproxy.engine.relay import RelayEngine
from shardproxy.engine.tls import TlsServer
from shardproxy.engine.transport import Transport
from shardproxy.engine.upstream import Upstream
from shardproxy.policy.admission import Admission
from shardproxy.policy.decisions import Decisions


def relay_engine(events: TunnelEvents, keepalive: Keepalive) -> TunnelEngine:
    """The compiled relay where it was built (and not refused), else the Python one."""
    if choice.ENGINE == "compiled":
        from shardproxy.engine.crelay import CompiledRelayEngine

        return CompiledRelayEngine(events, keepalive)
    return RelayEngine(events, keepalive)


def handshake_engine(
    proxy: ProxyConfig,
    listeners: list[socket.socket],
    admission: Admission,
    upstream: Upstream,
    decisions: Decisions,
    events: HandshakeEvents,
    transports: Sequence[Transport | TlsServer] = (),
    relay: TunnelEngine | None = None,
) -> Handshakes:
    """The compiled handshake engine where it was built and takes these
    listeners and pools (plain TCP: engine/chandshake.py's serves), else
    the Python one (TLS). A compiled engine shares the epoll set and the loop of ``relay``
    when that is the compiled relay: one set per worker."""
    args = (proxy, listeners, admission, upstream, decisions, events, transports)
    if choice.ENGINE == "compiled":
        from shardproxy.engine import chandshake
        from shardproxy.engine.crelay import CompiledRelayEngine

        if chandshake.serves(transports, decisions):
            shared = relay if isinstance(relay, CompiledRelayEngine) else None
            return chandshake.CompiledHandshakeEngine(*args, relay=shared)
    return HandshakeEngine(*args)
