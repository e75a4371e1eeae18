"""The control channel between the supervisor and one worker.

One ``socketpair`` per worker carries newline-delimited JSON objects, the
typed messages of control/messages.py (what each says is there).

A worker whose control socket reaches EOF has lost its supervisor and exits,
so that no orphan keeps serving with nobody to restart or stop it.
"""

from __future__ import annotations

import trio

from shardproxy.control.messages import Message, decode, encode

MAX_MESSAGE = 16 << 20


class Channel:
    """A channel of typed messages (JSON lines) over one trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: Message) -> None:
        data = memoryview(encode(message))
        async with self._send_lock:
            while data:
                sent = await self._sock.send(data)
                data = data[sent:]

    async def receive(self) -> Message | None:
        """The next message, or None at EOF (ValueError: not one of ours)."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE:
                raise ValueError("control message too long")
            chunk = await self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return decode(line)

    def close(self) -> None:
        self._sock.close()
