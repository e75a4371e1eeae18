"""The built-in WebSocket echo backend that ``shardproxy demo`` starts.

A small but real RFC 6455 server (trio + h11 + wsproto), run as
``python -m shardproxy.demo.echo --host 127.0.0.1 --port 9001 --name echo-1``.
Each connection is served in three steps:

1. **HTTP request** (RFC 7230). The request head is parsed with h11. A ``GET``
   carrying ``Upgrade: websocket`` goes on to the handshake; any other request
   gets ``200 OK`` with the body ``shardproxy echo backend <name>\\n`` and the
   connection is closed, so the backend doubles as a health-check target and
   answers ``curl``. A malformed request gets the status h11 suggests (400 or
   431).
2. **Handshake** (RFC 6455 section 4.2). Any path is accepted. wsproto checks
   the upgrade headers (a bad one is answered with its 400/426 hint). Offered
   subprotocols are honoured by selecting none (section 4.2.2 allows that),
   and no extensions are negotiated. Bytes the client sent right behind the
   request head are passed on to the frame layer, not lost.
3. **Echo.** Every data message is sent back with its type (text stays text,
   binary stays binary). Pieces are echoed as they arrive, with
   ``message_finished`` mirrored, so memory stays bounded by a read (64 KiB)
   whatever the message size; the fragmentation seen by the client may differ
   from what it sent, the message does not (section 5.4 allows re-fragmenting).
   Pings are answered with Pongs (section 5.5.2). A Close is answered with a
   Close carrying the same code and reason, then the TCP connection is closed
   (section 7.1.1: the server closes TCP first).

**whoami**: a text message that is exactly ``whoami`` is answered with the
backend's name (e.g. ``echo-1``) instead of being echoed, so demo users can
see which backend the balancer picked. A text message is held back only while
it is still a prefix of ``whoami`` (at most six characters), so this works
even if the word arrives fragmented.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

log = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
# A client that connects and never completes its request must not hold a task
# and a descriptor forever; an open WebSocket, on the other hand, may idle.
HANDSHAKE_TIMEOUT = 10.0
WHOAMI = "whoami"


async def serve_echo(
    host: str,
    port: int,
    name: str,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on (host, port) (port 0 = pick a free one) and serve forever.

    Calls ``task_status.started((host, bound_port))`` once listening; the host
    is returned as given. If ``host`` resolves to several addresses, one
    listener is opened per address and the port of the first is reported
    (with port 0 each listener gets its own port).

    Resource handling:
        Every connection is a task in the nursery of ``trio.serve_listeners``,
        which runs inside this call, so cancelling ``serve_echo`` closes the
        listeners and every connection. Each connection owns one
        ``trio.SocketStream`` (``TCP_NODELAY`` is set by trio) and closes it
        when its task ends. Memory per connection is bounded by one 64 KiB read
        plus its echo, and by h11's limit on the request head. A client has
        ``HANDSHAKE_TIMEOUT`` seconds to complete its request.

    Error handling:
        Errors while binding propagate to the caller. At accept,
        ``trio.serve_listeners`` sleeps 100 ms on EMFILE/ENFILE/ENOMEM/ENOBUFS
        instead of spinning. A misbehaving client (garbage, a vanished peer, a
        protocol violation) only ends its own connection: HTTP errors are
        answered with a 4xx status, frame errors with the close code wsproto
        picks (1002, 1007, ...), and anything unexpected is logged; nothing a
        client does escapes its task.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port: int = listeners[0].socket.getsockname()[1]
    log.info("echo backend %s listening on %s:%d", name, host, bound_port)
    task_status.started((host, bound_port))

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_connection(stream, name)

    await trio.serve_listeners(handler, listeners)


async def _handle_connection(stream: trio.SocketStream, name: str) -> None:
    """Serve one client, closing its socket however it ends; never raises."""
    try:
        async with stream:
            await _serve_connection(stream, name)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("%s: client went away: %r", name, exc)
    except Exception:
        # A bug here must cost one connection, not the backend.
        log.exception("%s: connection failed", name)


async def _serve_connection(stream: trio.SocketStream, name: str) -> None:
    http = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        try:
            request = await _read_request(stream, http)
        except h11.RemoteProtocolError as exc:
            await stream.send_all(_http_response(http, exc.error_status_hint, b""))
            return
    if request is None:  # timed out, or the client left before a request
        return
    if not _is_websocket_upgrade(request):
        body = f"shardproxy echo backend {name}\n".encode()
        await stream.send_all(_http_response(http, 200, body, head=request.method == b"HEAD"))
        return

    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(list(request.headers), request.target)
    except RemoteProtocolError as exc:
        if exc.event_hint is not None:
            await stream.send_all(ws.send(exc.event_hint))
        return
    for _ in ws.events():
        pass  # the Request event we just fed in; there is nothing to choose
    await stream.send_all(ws.send(AcceptConnection()))
    # h11 stopped at the end of the request; what it holds beyond the head
    # is already WebSocket data.
    tail, _closed = http.trailing_data
    await _echo(stream, ws, _Echoer(name), tail)


async def _read_request(stream: trio.SocketStream, http: h11.Connection) -> h11.Request | None:
    """Read up to and including the request's end; None if the client left first.

    Raises h11.RemoteProtocolError on a malformed request.
    """
    request: h11.Request | None = None
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(await stream.receive_some(RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: a request body, which this backend ignores.


def _is_websocket_upgrade(request: h11.Request) -> bool:
    # RFC 6455 section 4.1: the opening handshake is a GET with
    # "Upgrade: websocket"; wsproto validates the rest of it.
    if request.method != b"GET":
        return False
    return any(
        name == b"upgrade" and b"websocket" in value.lower() for name, value in request.headers
    )


def _http_response(http: h11.Connection, status: int, body: bytes, *, head: bool = False) -> bytes:
    """Serialise a complete response that ends the connection."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    reason = HTTPStatus(status).phrase.encode()
    data = http.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    if body and not head:
        data += http.send(h11.Data(data=body)) or b""
    data += http.send(h11.EndOfMessage()) or b""
    return data


async def _echo(stream: trio.SocketStream, ws: WSConnection, echoer: _Echoer, tail: bytes) -> None:
    """Run the frame layer until either side closes."""
    data: bytes | None = tail
    while True:
        ws.receive_data(data)
        out = bytearray()
        for event in ws.events():
            for reply in echoer.replies(event, ws.state):
                out += ws.send(reply)
            if ws.state is not ConnectionState.OPEN:
                break
        if out:
            await stream.send_all(out)
        if ws.state is not ConnectionState.OPEN:
            return
        # b"" from the socket is EOF, which wsproto wants as None (and then
        # reports as a CloseConnection with code 1006).
        data = await stream.receive_some(RECEIVE_SIZE) or None


@dataclass
class _Echoer:
    """What to answer to each WebSocket event; no I/O.

    ``held`` is the text withheld at the start of a text message while it may
    still turn out to be ``whoami``; None while streaming a message through.
    """

    name: str
    held: str | None = ""

    def replies(self, event: Event, state: ConnectionState) -> list[Event]:
        if isinstance(event, TextMessage):
            return self._text(event)
        if isinstance(event, BytesMessage):
            return [BytesMessage(data=event.data, message_finished=event.message_finished)]
        if isinstance(event, Ping):
            return [event.response()]
        if isinstance(event, CloseConnection):
            return _close_reply(event, state)
        return []  # Pong: nothing to answer

    def _text(self, event: TextMessage) -> list[Event]:
        finished = event.message_finished
        if self.held is None:  # middle of a message being streamed
            if finished:
                self.held = ""
            return [TextMessage(data=event.data, message_finished=finished)]
        text = self.held + event.data
        if finished:
            self.held = ""
            return [TextMessage(data=self.name if text == WHOAMI else text)]
        if WHOAMI.startswith(text):
            self.held = text
            return []
        self.held = None
        return [TextMessage(data=text, message_finished=False)]


def _close_reply(event: CloseConnection, state: ConnectionState) -> list[Event]:
    if state is ConnectionState.REMOTE_CLOSING:
        # The client closed: echo its code and reason (RFC 6455 section 5.5.1).
        return [event.response()]
    if state is ConnectionState.OPEN:
        # wsproto turned a frame error into this event: send it as our Close.
        return [CloseConnection(code=event.code, reason=event.reason)]
    return []  # CLOSED: the TCP connection dropped (1006); nobody to tell


def main(argv: list[str] | None = None) -> None:
    """Run one echo backend until interrupted.

    ``python -m shardproxy.demo.echo --host 127.0.0.1 --port 9001 --name echo-1``
    prints one line, ``<name> listening on <host>:<port>``, to stdout once
    listening (``--port 0`` picks a free port; read it from that line).
    """
    parser = argparse.ArgumentParser(
        prog="python -m shardproxy.demo.echo", description="WebSocket echo backend"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--name", default="echo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        trio.run(_run, args.host, args.port, args.name)


async def _run(host: str, port: int, name: str) -> None:
    async with trio.open_nursery() as nursery:
        bound_host, bound_port = await nursery.start(serve_echo, host, port, name)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"{name} listening on {shown}:{bound_port}", flush=True)


if __name__ == "__main__":
    main()
