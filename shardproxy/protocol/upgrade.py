"""The WebSocket opening handshake as a proxy sees it, sans-IO.

Two readers, on the strict head parser of :mod:`shardproxy.http1`:

- :class:`RequestReader` takes the client's bytes and yields an
  :class:`UpgradeRequest` once a complete, valid upgrade request head has
  arrived (RFC 6455 §4.2.1), or raises :class:`Reject` carrying the HTTP status
  to answer. Bytes that came after the head are kept in ``trailing``: they
  belong to the tunnel (a client may send its first frame right behind the
  head) and must reach the backend.
- :class:`ResponseReader` takes the backend's bytes after the forwarded head
  and yields the response head; after a 101 its ``trailing`` holds the first
  tunnel bytes from the backend. A non-101 answer is passed back with its body
  re-framed as close-delimited, since the connection ends after it (h11
  frames that body: chunked, length or close-delimited).

Who is at fault decides the error: the client's mistakes are :class:`Reject`
with a 4xx; the backend's are :class:`BackendError`, which the worker answers
with 502 or 504. Nothing here imports trio or touches a socket.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import urlsplit

import h11

from shardproxy.protocol import http1
from shardproxy.protocol.errors import NEED_DATA, BackendError, NeedData, Reject


class UpgradeRequest(NamedTuple):
    """A valid upgrade request (a named tuple: made once per handshake,
    see engine/api.py's FlowStats)."""

    method: bytes
    target: bytes
    raw_headers: tuple[tuple[bytes, bytes], ...]  # as sent, original case
    headers: tuple[tuple[bytes, bytes], ...]  # lower-case names, for lookups
    host: str  # lower-case, port stripped
    path: str  # target without the query

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def user_agent(self) -> str | None:
        value = self.header(b"user-agent")
        return None if value is None else value.decode("latin-1")

    def forwarded_ip(self) -> str | None:
        """The left-most X-Forwarded-For address: the client the chain says
        the request came from (a claim: anyone can write this header), or
        None when there is none or it is not an IP address."""
        value = self.header(b"x-forwarded-for")
        return None if value is None else _forwarded_ip(value)

    def user_agent_and_forwarded_ip(self) -> tuple[str | None, str | None]:
        """:meth:`user_agent` and :meth:`forwarded_ip` in one pass over the
        headers (a tunnel's placement takes both)."""
        agent = forwarded = None
        for n, v in self.headers:
            if n == b"user-agent":
                if agent is None:
                    agent = v
            elif n == b"x-forwarded-for" and forwarded is None:
                forwarded = v
        return (
            None if agent is None else agent.decode("latin-1"),
            None if forwarded is None else _forwarded_ip(forwarded),
        )


def _forwarded_ip(value: bytes) -> str | None:
    first = value.split(b",", 1)[0].strip().decode("latin-1")
    try:
        return str(ipaddress.ip_address(first))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    head: bytes  # the bytes to send to the client


def _tokens(value: bytes | None) -> set[bytes]:
    if value is None:
        return set()
    if b"," not in value:  # the usual one-token value
        return {value.strip().lower()}
    return {t.strip().lower() for t in value.split(b",")}


def _joined(by_name: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    """Every ``name`` field's value, as one comma-separated list (RFC 9110 §5.3)."""
    values = by_name.get(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


class RequestReader:
    """Reads one upgrade request head under a size limit."""

    def __init__(self, max_header_bytes: int, parsers: http1.HeadParsers = http1.PARSERS) -> None:
        self._max = max_header_bytes
        self._parsers = parsers
        self._buffer = b""
        self._received = 0
        self.trailing = b""

    @property
    def received(self) -> int:
        """Bytes fed so far (0 means the client sent nothing)."""
        return self._received

    def feed(self, data: bytes) -> UpgradeRequest | NeedData:
        """Feed bytes; ``b""`` means the client closed its side."""
        if not data:
            raise _client_closed()
        self._received += len(data)
        # Look for the end of the head only where it can be: in the new
        # bytes, or straddling the old ones' last 3.
        start = max(0, len(self._buffer) - 3)
        buffer = self._buffer = self._buffer + data if self._buffer else data
        end = self._parsers.head_end(buffer, start)
        if end < 0:
            if len(buffer) > self._max:
                raise Reject(431, "header_too_large", "request head is too large")
            return NEED_DATA
        if end > self._max:
            raise Reject(431, "header_too_large", "request head is too large")
        fast = self._parsers.parse_upgrade(buffer, end)
        if fast is not None:  # validate_upgrade's answer, found in C (http1.HeadParsers)
            self.trailing = buffer[end:]
            return UpgradeRequest(*fast)
        try:
            method, target, version, fields = self._parsers.parse_request(buffer[:end])
        except http1.HeadError as e:
            raise Reject(400, "bad_request", f"malformed request: {e}") from None
        try:
            request = validate_upgrade(method, target, version, fields)
        except Reject as e:
            e.request = _as_seen(method, target, fields)
            raise
        self.trailing = buffer[end:]
        return request


def _client_closed() -> Reject:
    return Reject(400, "client_closed", "connection closed before the head was complete")


def _as_seen(method: bytes, target: bytes, fields: http1.Headers) -> UpgradeRequest | None:
    """A head that parsed but is no upgrade, as far as the log needs it."""
    try:
        path = _path(target)
    except ValueError:  # urlsplit refuses e.g. "http://[x"
        return None
    headers = tuple((n.lower(), v) for n, v in fields)
    return UpgradeRequest(method, target, tuple(fields), headers, host="", path=path)


def validate_upgrade(
    method: bytes, target: bytes, version: bytes, fields: http1.Headers
) -> UpgradeRequest:
    """RFC 6455 §4.2.1: what the server must find in an opening handshake."""
    if version not in (b"1.0", b"1.1"):
        raise Reject(505, "bad_request", "HTTP version not supported")
    lowered: list[tuple[bytes, bytes]] = []
    by_name: dict[bytes, list[bytes]] = {}
    for n, value in fields:  # once per handshake: one pass, no setdefault lists
        name = n.lower()
        lowered.append((name, value))
        values = by_name.get(name)
        if values is None:
            by_name[name] = [value]
        else:
            values.append(value)
    headers = tuple(lowered)
    hosts = by_name.get(b"host", [])
    if len(hosts) > 1 or (version == b"1.1" and not hosts):
        # RFC 9112 §3.2: exactly one Host in an HTTP/1.1 request.
        raise Reject(400, "bad_request", "malformed request: exactly one Host header is required")
    if b"websocket" not in _tokens(_joined(by_name, b"upgrade")):
        raise Reject(
            426,
            "not_upgrade",
            "this endpoint only accepts WebSocket upgrades",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if method != b"GET":
        raise Reject(400, "bad_request", "a WebSocket upgrade must use GET")
    if version != b"1.1":
        raise Reject(400, "bad_request", "a WebSocket upgrade needs HTTP/1.1")
    if b"transfer-encoding" in by_name or any(
        v.strip() != b"0" for v in by_name.get(b"content-length", [])
    ):
        raise Reject(400, "bad_request", "an upgrade request must not have a body")
    if b"upgrade" not in _tokens(_joined(by_name, b"connection")):
        raise Reject(400, "bad_request", "Connection header must contain 'upgrade'")
    versions = by_name.get(b"sec-websocket-version", [])
    if not versions:
        raise Reject(400, "bad_version", "missing Sec-WebSocket-Version")
    if versions != [b"13"]:
        raise Reject(
            426,
            "bad_version",
            "unsupported Sec-WebSocket-Version (only 13)",
            (("Sec-WebSocket-Version", "13"),),
        )
    keys = by_name.get(b"sec-websocket-key", [])
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise Reject(400, "bad_key", "Sec-WebSocket-Key must be 16 bytes in base64")
    return UpgradeRequest(
        method=method,
        target=target,
        raw_headers=tuple(fields),
        headers=headers,
        host=_host_name(hosts[0]),
        path=_path(target),
    )


def _path(target: bytes) -> str:
    """The path of an origin-form (``/a?b``) or absolute-form
    (``http://host/a?b``, RFC 9112 §3.2.2) request target, without the query."""
    text = target.decode("latin-1")
    if not text.startswith("/"):
        text = urlsplit(text).path or "/"
    return text.split("?", 1)[0]


def _valid_key(value: bytes) -> bool:
    # §4.1: "a randomly selected 16-byte value that has been base64-encoded"
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _host_name(value: bytes) -> str:
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def forward_head(
    request: UpgradeRequest,
    client_ip: str,
    proto: str,
    listen_port: int,
    parsers: http1.HeadParsers = http1.PARSERS,
) -> bytes:
    """The request head to send upstream: the client's, plus X-Forwarded-*
    (http1.forwarded_head: X-Forwarded-For appended to, -Proto and -Port
    those of the listener, whatever the client claimed)."""
    return parsers.forwarded_head(
        request.method, request.target, request.raw_headers, client_ip, proto, listen_port
    )


def request_head(request: UpgradeRequest) -> bytes:
    """The request head as the client sent it (with ``send_proxy`` the
    backend learns the client from the PROXY header instead)."""
    return _head(request, [n + b": " + v for n, v in request.raw_headers])


def _head(request: UpgradeRequest, fields: list[bytes]) -> bytes:
    """The request line and ``fields`` ("Name: value" lines) as a head."""
    start = request.method + b" " + request.target + b" HTTP/1.1"
    return b"\r\n".join([start, *fields]) + b"\r\n\r\n"


_HOP_BY_HOP = (b"connection", b"keep-alive", b"transfer-encoding", b"content-length")


class ResponseReader:
    """Reads the backend's answer to a forwarded upgrade request."""

    def __init__(
        self,
        request: UpgradeRequest,
        max_header_bytes: int,
        parsers: http1.HeadParsers = http1.PARSERS,
    ) -> None:
        self._request = request
        self._max = max_header_bytes
        self._parsers = parsers
        self._buffer = b""
        self._consumed = 0  # bytes of interim (1xx) heads already skipped
        self._body: h11.Connection | None = None
        self.trailing = b""

    def feed(self, data: bytes) -> ResponseHead | NeedData:
        """Feed bytes; ``b""`` means the backend closed its side."""
        if not data:
            raise BackendError("backend closed before its response head")
        start = max(0, len(self._buffer) - 3)
        self._buffer = self._buffer + data if self._buffer else data
        while True:
            buffer = self._buffer
            end = self._parsers.head_end(buffer, start)
            if end < 0 or self._consumed + end > self._max:
                if self._consumed + len(buffer) > self._max:
                    raise BackendError("response head is too large")
                return NEED_DATA
            head = buffer[:end]
            try:
                _version, status, reason, fields = self._parsers.parse_response(head)
            except http1.HeadError as e:
                raise BackendError(f"malformed response: {e}") from None
            if status == 101:
                self.trailing = buffer[end:]
                return ResponseHead(101, head)  # passed on as it came
            if status >= 200:
                return ResponseHead(status, self._final(head, status, reason, fields, buffer[end:]))
            # Other 1xx (e.g. 100 Continue): skip it, the real answer follows.
            self._buffer = buffer[end:]
            self._consumed += end
            start = 0

    def _final(
        self, head: bytes, status: int, reason: bytes, fields: http1.Headers, rest: bytes
    ) -> bytes:
        """A final non-101 answer: h11 takes over to frame its body."""
        self._body = conn = h11.Connection(h11.CLIENT)
        conn.send(
            h11.Request(
                method=self._request.method,
                target=self._request.target,
                headers=list(self._request.headers),
            )
        )
        conn.send(h11.EndOfMessage())
        conn.receive_data(head + rest)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise BackendError(f"malformed response: {e}") from None
        assert isinstance(event, h11.Response), event
        reason = reason or _PHRASES.get(status, b"")
        lines = [b"HTTP/1.1 %d " % status + reason]
        lines += [n + b": " + v for n, v in fields if n.lower() not in _HOP_BY_HOP]
        # The body is passed on close-delimited and the connection ends.
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def body(self, data: bytes | None) -> tuple[bytes, bool]:
        """After a non-101 head: feed bytes, get (body bytes to pass on, done).

        ``None`` feeds nothing: call it first, for body bytes that came with
        the head. As in :meth:`feed`, ``b""`` means the backend closed its
        side (which ends a close-delimited body).
        """
        conn = self._body
        assert conn is not None, "body() comes after a final non-101 head"
        if data is not None:
            conn.receive_data(data)
        out = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise BackendError(f"malformed response body: {e}") from None
            if isinstance(event, h11.Data):
                out += event.data
            elif event is h11.NEED_DATA:
                return bytes(out), False
            else:  # EndOfMessage, ConnectionClosed
                return bytes(out), True


_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def error_response(status: int, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 answer from the proxy itself; the connection closes after it."""
    body = (detail + "\n").encode()
    connection = [v for k, v in headers if k.lower() == "connection"] + ["close"]
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        f"Connection: {', '.join(connection)}",
        *(f"{k}: {v}" for k, v in headers if k.lower() != "connection"),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
