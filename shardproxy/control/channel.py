"""The control channel between the supervisor and one worker.

One ``socketpair`` per worker carries newline-delimited JSON objects, the
typed messages of control/messages.py (what each says is there).

Requests: :meth:`Channel.request` sends a message in a ``Request`` with a
fresh id and waits for the ``Reply`` with that id. The one task that reads
the channel (the loop around :meth:`Channel.receive`) hands each reply to
the request waiting for it, through a memory channel of one; so a request
never reads the socket itself, and any number of them can wait at once,
their replies coming in any order.

Error handling: a reply to an id nobody asked is a ValueError of
:meth:`Channel.receive` (the other end is confused); a reply to a request
that gave up (cancelled, timed out) is dropped. When the reading ends (EOF,
a bad line, the reader cancelled), the waiting requests fail with
:class:`ChannelClosed` rather than wait for what can no longer come.

A worker whose control socket reaches EOF has lost its supervisor and exits,
so that no orphan keeps serving with nobody to restart or stop it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import trio

from shardproxy.control.messages import Envelope, Message, Reply, Request, decode, encode

MAX_MESSAGE = 16 << 20


class ChannelClosed(Exception):
    """The channel stopped being read before the reply came."""


class Channel:
    """A channel of typed messages (JSON lines) over one trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[Message]] = {}
        self._abandoned: set[int] = set()  # ids of requests that gave up
        self._ended = False

    async def send(self, message: Message) -> None:
        await self._send(message)

    async def request(self, message: Message) -> Message:
        """Send ``message`` and return the other end's reply to it
        (:class:`ChannelClosed` if the channel ends first)."""
        if self._ended:
            raise ChannelClosed("the channel has ended")
        request_id = next(self._ids)
        give, take = trio.open_memory_channel[Message](1)
        self._waiting[request_id] = give
        try:
            await self._send(Request(request_id, message))
            with take:
                return await take.receive()
        except trio.EndOfChannel:
            raise ChannelClosed(f"no reply to request {request_id}: the channel ended") from None
        finally:
            if self._waiting.pop(request_id, None) is not None:
                self._abandoned.add(request_id)  # its reply may still come

    async def reply(self, request: Request, message: Message) -> None:
        await self._send(Reply(request.id, message))

    async def receive(self) -> Message | Request | None:
        """The next message or request, or None at EOF (ValueError: not one
        of ours, or a reply to no request). Replies go to their requests."""
        try:
            while True:
                line = await self._line()
                if line is None:
                    self._ended = True
                    self._fail_waiting()
                    return None
                received = decode(line)
                if not isinstance(received, Reply):
                    return received
                self._hand_over(received)
        except trio.Cancelled:  # nobody reads now: no reply can come
            self._fail_waiting()
            raise
        except BaseException:  # broken: no reply can come any more
            self._ended = True
            self._fail_waiting()
            raise

    def close(self) -> None:
        self._sock.close()

    async def _send(self, message: Message | Envelope) -> None:
        data = memoryview(encode(message))
        async with self._send_lock:
            while data:
                sent = await self._sock.send(data)
                data = data[sent:]

    async def _line(self) -> bytes | None:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE:
                raise ValueError("control message too long")
            chunk = await self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    def _hand_over(self, reply: Reply) -> None:
        waiting = self._waiting.pop(reply.id, None)
        if waiting is None:
            if reply.id not in self._abandoned:
                raise ValueError(f"a reply to request {reply.id}, which was never sent")
            self._abandoned.discard(reply.id)
            return
        waiting.send_nowait(reply.message)  # room for one: never blocks
        waiting.close()

    def _fail_waiting(self) -> None:
        for waiting in self._waiting.values():
            waiting.close()  # their take.receive() raises EndOfChannel
        self._waiting.clear()


async def request_all(
    channels: Mapping[str, Channel], message: Message, timeout: float
) -> tuple[dict[str, Message], list[str]]:
    """``message`` as a request on every channel at once: the replies by
    channel name, and the names of those that did not answer within
    ``timeout`` seconds (sorted). A channel that ends or breaks meanwhile
    is in neither: its other end is gone."""
    answers: dict[str, Message] = {}
    unanswered: list[str] = []

    async def ask(name: str, channel: Channel) -> None:
        with trio.move_on_after(timeout):
            try:
                answers[name] = await channel.request(message)
            except (ChannelClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return
        unanswered.append(name)

    async with trio.open_nursery() as nursery:
        for name, channel in channels.items():
            nursery.start_soon(ask, name, channel)
    return answers, sorted(unanswered)
