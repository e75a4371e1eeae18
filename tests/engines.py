"""Which engine a test runs: the Python reference or the compiled one.

tests/conftest.py's ``relay_engine`` fixture runs a test once per engine and sets
:data:`current`; the engine harnesses build their engines from it."""

from __future__ import annotations

from typing import Any

from shardproxy.engine.relay import RelayEngine

ENGINES = ("python", "compiled")


def relay_class(name: str) -> Any:
    if name == "python":
        return RelayEngine
    from shardproxy.engine.crelay import CompiledRelayEngine

    return CompiledRelayEngine


class _Current:
    name = "python"

    @property
    def relay(self) -> Any:
        return relay_class(self.name)


current = _Current()
