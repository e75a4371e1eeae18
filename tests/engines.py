"""Which engine a test runs: the Python reference or the compiled one.

tests/conftest.py's ``engine_kind`` fixture runs a test once per engine and sets
:data:`current`; the engine harnesses build their engines from it."""

from __future__ import annotations

from typing import Any

from shardproxy.engine import choice
from shardproxy.engine.handshake import HandshakeEngine
from shardproxy.engine.relay import RelayEngine
from shardproxy.protocol import http1

ENGINES = ("python", "compiled")


def relay_class(name: str) -> Any:
    if name == "python":
        return RelayEngine
    from shardproxy.engine.crelay import CompiledRelayEngine

    return CompiledRelayEngine


def handshake_class(name: str) -> Any:
    if name == "python":
        return HandshakeEngine
    from shardproxy.engine.chandshake import CompiledHandshakeEngine

    return CompiledHandshakeEngine


class _Current:
    name = "python"

    @property
    def relay(self) -> Any:
        return relay_class(self.name)

    @property
    def handshake(self) -> Any:
        return handshake_class(self.name)

    @property
    def parsers(self) -> http1.HeadParsers:
        """The HTTP head parsers the handshake engine is given."""
        return http1.PARSERS if self.name == "python" else choice.PARSERS


current = _Current()
