"""The admin HTTP listener, served by the supervisor (``[admin] listen``).

Endpoints (JSON answers)::

    GET  /healthz                          200 while serving, 503 once a drain began
    GET  /metrics                          Prometheus text format (telemetry/metrics.py)
    GET  /stats                            the same figures as JSON, per worker
    GET  /servers                          every pool's servers: health and admin state
    POST /servers/POOL/SERVER/drain        no new tunnels for it; its tunnels stay
    POST /servers/POOL/SERVER/ready        back in rotation

A drain or ready is answered once every running worker acknowledged it
(control/channel.py's requests): 200 with ``applied``, how many workers
did, so that no new tunnel goes to a drained server after the answer. A
worker that does not answer within a few seconds is named in
``unanswered`` and the answer is 202; it never holds the call longer.

With ``[admin] token`` set, every request but ``GET /healthz`` needs
``Authorization: Bearer TOKEN`` (else 401): load balancers' and keepalived's
health checks mostly cannot send a header, and /healthz tells nothing but
whether to send traffic here (HAProxy's ``monitor-uri`` is open the same way).

One request per connection; h11 parses it, and a request head over 8 KiB,
or not complete within 5 s, is answered 431 or closed.

Resource handling: one trio task per admin connection, for its one request.
Error handling: a bad request gets its 4xx; an error in a handler gets 500
and a log event, and never reaches the supervisor.
"""

from __future__ import annotations

import hmac
import json
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

import h11
import trio

MAX_HEAD = 8192
REQUEST_TIMEOUT = 5.0

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (method, path) → (status, a JSON-able body, or bytes already rendered)
Handler = Callable[[str, str], Awaitable[tuple[int, Any]]]


async def serve_admin(sock: socket.socket, token: str, handler: Handler, log: Any) -> None:
    """Serve on ``sock``, a bound and listening socket, until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await trio.serve_listeners(partial(_connection, token, handler, log), [listener])


async def _connection(token: str, handler: Handler, log: Any, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    async with stream:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await _read_request(conn, stream)
                if request is None:
                    return
                status, body = await _answer(token, handler, log, request)
                await _respond(conn, stream, status, body)
        except h11.RemoteProtocolError as e:
            await _respond(conn, stream, e.error_status_hint, {"error": str(e)})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            if not data and conn.their_state is h11.IDLE:
                return None  # connected and left without a request
            continue
        if isinstance(event, h11.Request):
            return event
        return None


async def _answer(token: str, handler: Handler, log: Any, request: h11.Request) -> tuple[int, Any]:
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    if token and not (request.method == b"GET" and path == "/healthz"):
        headers = dict(request.headers)
        expected = b"Bearer " + token.encode()
        if not hmac.compare_digest(headers.get(b"authorization", b""), expected):
            return 401, {"error": "missing or wrong bearer token"}
    try:
        return await handler(request.method.decode("ascii", "replace"), path)
    except Exception:
        log.exception("admin request failed", **{"event.action": "admin-error"})
        return 500, {"error": "internal error"}


async def _respond(conn: h11.Connection, stream: trio.SocketStream, status: int, body: Any) -> None:
    if conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
        return  # (IDLE: the request was unreadable, h11 still lets us answer it)
    if isinstance(body, bytes):  # already rendered (/metrics)
        data, content_type = body, METRICS_CONTENT_TYPE
    else:
        data, content_type = json.dumps(body).encode() + b"\n", "application/json"
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(data))),
        ("connection", "close"),
    ]
    if status == 401:
        headers.append(("www-authenticate", "Bearer"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=data)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


# -- the route table -----------------------------------------------------------

AdminHandler = Callable[[dict[str, str]], Awaitable[tuple[int, Any]]]


class AdminRoutes:
    """The admin listener's route table: (method, pattern, handler), a
    pattern's ``{name}`` segments captured (percent-decoded) and passed to
    the handler. A path no pattern matches is 404; a matched path with
    another method, 405 naming the one to use."""

    def __init__(self, routes: list[tuple[str, str, AdminHandler]]) -> None:
        self._routes = [(method, pattern.strip("/").split("/"), h) for method, pattern, h in routes]

    async def __call__(self, method: str, path: str) -> tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        allowed = []
        for route_method, pattern, handler in self._routes:
            captured = _match(pattern, parts)
            if captured is None:
                continue
            if method == route_method:
                return await handler(captured)
            allowed.append(route_method)
        if allowed:
            return 405, {"error": f"use {' or '.join(sorted(set(allowed)))}"}
        return 404, {"error": f"no such resource: {path}"}


def _match(pattern: list[str], parts: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    captured = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            captured[want[1:-1]] = got
        elif want != got:
            return None
    return captured
