"""Messages between the supervisor and its workers.

One ``socketpair`` per worker carries newline-delimited JSON objects, each with
a ``type``:

supervisor → worker
    ``{"type": "start", "slot": N, "config": {...}, "upstream": {...}}``:
    first message; the effective configuration (:meth:`Config.to_dict`) and
    the slot's port slice and allocator (control/addrplan.py).
    ``{"type": "health", "down": ["ip:port", ...]}``: the backend endpoints
    that are down now, whenever that changes (and after start, if any).
    ``{"type": "drained", "servers": [["pool", "server"], ...]}``: the
    servers an operator drained (control/admin.py): no new tunnels for them.
    ``{"type": "retire", "sweep": [i, ...], "drain_after": s | null}``: a
    reload replaced this worker's generation (control/supervisor.py).
worker → supervisor
    ``{"type": "ready", "slot": N, "pid": P, "capacity": C}``: accepting now;
    C is how many connections its descriptor limit allows.
    ``{"type": "stats", "slot": N, ...}``: a snapshot, every second, with
    ``passive_failures``: connects refused or timed out per endpoint since
    the last one (the supervisor counts them as failed health checks).

A worker whose control socket reaches EOF has lost its supervisor and exits,
so that no orphan keeps serving with nobody to restart or stop it.
"""

from __future__ import annotations

import json
from typing import Any

import trio

MAX_MESSAGE = 16 << 20


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Channel:
    """A JSON-lines channel over one trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = memoryview(encode(message))
        async with self._send_lock:
            while data:
                sent = await self._sock.send(data)
                data = data[sent:]

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at EOF."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE:
                raise ValueError("control message too long")
            chunk = await self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        self._sock.close()
