"""The engines of a worker, as engine/choice.py chose them at import."""

from __future__ import annotations

from shardproxy.engine import choice
from shardproxy.engine.api import Keepalive, TunnelEngine, TunnelEvents
from shardproxy.engine.relay import RelayEngine


def relay_engine(events: TunnelEvents, keepalive: Keepalive) -> TunnelEngine:
    """The compiled relay where it was built (and not refused), else the Python one."""
    if choice.ENGINE == "compiled":
        from shardproxy.engine.crelay import CompiledRelayEngine

        return CompiledRelayEngine(events, keepalive)
    return RelayEngine(events, keepalive)
