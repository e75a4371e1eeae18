"""Which engine a worker runs, chosen once at import.

The compiled engine (``engine/_cengine.c``) is built by ``pip install``
where a compiler exists; ``SHARDPROXY_PURE=1`` refuses it. Where it was
built, workers relay their tunnels with it (``engine/crelay.py``), run
their handshakes on its core (``engine/chandshake.py``, for plain TCP
listeners) and parse HTTP heads with its parser
(:data:`PARSERS`).
:func:`describe` says which engine runs, in ``shardproxy version`` and in
the worker-ready event; ``engine/factory.py`` builds the chosen engines.
"""

from __future__ import annotations

import os
from types import ModuleType

from shardproxy.protocol import http1

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
# The HTTP head parsers the handshake engine uses: the C ones where built.
PARSERS = (
    http1.PARSERS
    if COMPILED is None
    else http1.HeadParsers(
        COMPILED.head_end,
        COMPILED.parse_request,
        COMPILED.parse_response,
        COMPILED.parse_upgrade,
        COMPILED.forwarded_head,
    )
)
# The engines the workers run: "compiled" (the C relay) or "python".
ENGINE = "python" if COMPILED is None else "compiled"


def describe() -> str:
    """One line: the engine that runs, and why."""
    if PURE:
        return "python (SHARDPROXY_PURE=1)"
    if COMPILED is None:
        return "python (the compiled module was not built)"
    return (
        "compiled (the relay, the handshakes' I/O and the HTTP head parser in C;"
        " a TLS listener runs the Python handshake engine)"
    )
