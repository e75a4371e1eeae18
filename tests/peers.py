"""Real, independent peers for the integration tests.

- :class:`WsBackend`: a backend built on the ``websockets`` library, in a
  thread with its own asyncio loop. Its behaviour depends on the request path:

  ``/echo`` (and anything else)  echo every message, same type
  ``/greet``    send "hello from backend" right after the 101, then echo
  ``/headers``  send the request headers as JSON, then echo
  ``/flood``    send 64 messages of 1 MiB, then "done"; ``flood_sent`` counts them
  ``/close/N``  close with code N after the first message
  ``/health``   a plain HTTP answer: 200 while ``healthy``, else 503

  Every close code the backend received from a client is recorded in
  ``close_codes``.
- :class:`RawServer`: a TCP server that runs a plain function per connection,
  for backends that misbehave on purpose.
- :class:`WsprotoBackend`: a backend on wsproto (on a :class:`RawServer`)
  that echoes text, answers Pings and records every Pong it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.events import Request as WsRequest

FLOOD_MESSAGES = 64
FLOOD_SIZE = 1 << 20


class WsBackend:
    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.port = port  # 0: any free port
        self.tls = tls  # a server context: wss://
        self.close_codes: list[int | None] = []
        self._closed = threading.Condition()  # notified as each connection's code is recorded
        self.peers: list[tuple[str, int]] = []
        self.paths: list[str] = []  # of every websocket connection, in order
        self.flood_sent = 0
        self.healthy = True
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WsBackend:
        self._thread.start()
        assert self._ready.wait(10), "backend did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        # A connection still being handled (a health check's, closed by the
        # checker mid-way) ends here, in the loop, and not when its
        # coroutine is collected without one (an "exception ignored").
        self._loop.run_until_complete(self._end_handlers())
        self._loop.close()

    @staticmethod
    async def _end_handlers() -> None:
        left = asyncio.all_tasks() - {asyncio.current_task()}
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        # A deep accept queue: the proxy opens upstream connections as fast as
        # clients arrive, and asyncio's default backlog of 100 overflows.
        async with serve(
            self._handler,
            "127.0.0.1",
            self.port,
            max_size=None,
            ping_interval=None,
            backlog=4096,
            process_request=self._health,
            ssl=self.tls,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def _health(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != "/health":
            return None
        if self.healthy:
            return connection.respond(HTTPStatus.OK, "ok\n")
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "unhealthy\n")

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else "/"
        self.peers.append(ws.remote_address[:2])
        self.paths.append(path)
        try:
            if path == "/greet":
                await ws.send("hello from backend")
            elif path == "/headers":
                assert ws.request is not None
                await ws.send(json.dumps([list(h) for h in ws.request.headers.raw_items()]))
            elif path == "/flood":
                for _ in range(FLOOD_MESSAGES):
                    await ws.send(b"x" * FLOOD_SIZE)
                    self.flood_sent += 1
                await ws.send("done")
            elif path.startswith("/close/"):
                await ws.recv()
                await ws.close(int(path.rsplit("/", 1)[1]), "backend closes")
                return
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            with self._closed:
                self.close_codes.append(ws.close_code)
                self._closed.notify_all()

    def wait_close_code(self, code: int, timeout: float = 10.0) -> bool:
        """Whether a connection ended with ``code`` within ``timeout``: the
        backend records it when its side is done, which may be after the
        client's side is."""
        with self._closed:
            return self._closed.wait_for(lambda: code in self.close_codes, timeout)


class RawServer:
    """Accepts TCP connections and runs ``behaviour(conn)`` for each, in a thread."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.behaviour(conn)


class WsprotoBackend:
    """A backend on wsproto that echoes text, answers Pings, counts the Pongs
    it receives, and can ping the client itself (``ping_first``)."""

    def __init__(self, ping_first: bool = False) -> None:
        self.ping_first = ping_first
        self.pongs: list[bytes] = []
        self.ended = threading.Event()
        self.server = RawServer(self._serve)

    def __enter__(self) -> WsprotoBackend:
        self.server.__enter__()
        self.port = self.server.port
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def _serve(self, conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        conn.settimeout(30)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, WsRequest):
                        conn.sendall(ws.send(AcceptConnection()))
                        if self.ping_first:
                            conn.sendall(ws.send(Ping(b"backend ping")))
                    elif isinstance(event, TextMessage):
                        conn.sendall(ws.send(Message(data=event.data)))
                    elif isinstance(event, Ping):
                        conn.sendall(ws.send(event.response()))
                    elif isinstance(event, Pong):
                        self.pongs.append(bytes(event.payload))
                    elif isinstance(event, CloseConnection):
                        conn.sendall(ws.send(event.response()))
                        return
        except OSError:
            pass
        finally:
            self.ended.set()


def read_head(conn: socket.socket, limit: float = 10.0) -> bytes:
    conn.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_until_closed(conn: socket.socket, limit: float = 10.0) -> bytes:
    conn.settimeout(limit)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 nobody listens on (connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose listener's accept queue is full, so that
    the kernel drops a new SYN: a connect to it stays in progress (until
    its timeout), as to a backend host that is down."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # room for one connection not yet accepted
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(2):  # the one it has room for, and one its SYN queue holds
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


class WsClient:
    """A blocking WebSocket client on a plain socket, driven by wsproto."""

    def __init__(
        self,
        port: int,
        path: str = "/echo",
        host: str = "127.0.0.1",
        *,
        address: str = "127.0.0.1",
        source: str = "",
        preamble: bytes = b"",
        tls: ssl.SSLContext | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        """Connect to ``address:port`` (from ``source``, if given), send
        ``preamble`` (a PROXY header), then upgrade; with ``tls``, over
        TLS with SNI ``host`` (after the preamble)."""
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock = socket.create_connection(
            (address, port), timeout=10, source_address=(source, 0) if source else None
        )
        if tls is not None:
            if preamble:
                self.sock.sendall(preamble)
                preamble = b""
            self.sock = tls.wrap_socket(self.sock, server_hostname=host, session=session)
        self.sock.sendall(preamble + self.ws.send(Request(host=host, target=path)))
        events = self._events()
        assert isinstance(events[0], AcceptConnection), events
        self.pending = events[1:]

    def _events(self) -> list[Any]:
        while True:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            events = list(self.ws.events())
            if events or not data:
                return events

    def echo(self, text: str) -> str:
        from wsproto.events import Message

        self.sock.sendall(self.ws.send(Message(data=text)))
        return self.receive()

    def receive(self) -> str:
        """The next text message."""
        from wsproto.events import TextMessage

        parts = []
        while True:
            for event in self.pending or self._events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        self.pending = []
                        return "".join(parts)
                else:
                    raise AssertionError(f"unexpected {event!r}")
            self.pending = []

    def close(self) -> None:
        self.sock.close()


def websocket_accept(key: bytes) -> bytes:
    """RFC 6455 §4.2.2: the server's proof that it read the key."""
    import base64
    import hashlib

    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key.strip() + guid).digest())


def upgrade_head(path: str = "/echo", host: str = "127.0.0.1", extra: str = "") -> bytes:
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()
