"""Which engine a worker runs, chosen once at import.

The compiled engine (``engine/_cengine.c``) is built by ``pip install``
where a compiler exists; ``SHARDPROXY_PURE=1`` refuses it. Today it holds
the C frame tracker only (issue 14 builds the relay and handshake engines
on it), so every worker runs the Python engines whatever was built, and
:func:`describe` says so in ``shardproxy version`` and in the worker-ready
event.
"""

from __future__ import annotations

import os
from types import ModuleType

PURE = os.environ.get("SHARDPROXY_PURE", "") == "1"


def _load() -> ModuleType | None:
    if PURE:
        return None
    try:
        from shardproxy.engine import _cengine
    except ImportError:
        return None
    return _cengine


COMPILED: ModuleType | None = _load()
ENGINE = "python"  # the engines the workers run: "python" until the C ones are complete


def describe() -> str:
    """One line: the engine that runs, and why."""
    if PURE:
        return "python (SHARDPROXY_PURE=1)"
    if COMPILED is None:
        return "python (the compiled module was not built)"
    return "python (compiled module built: frame tracker only, the C engines are not complete)"
