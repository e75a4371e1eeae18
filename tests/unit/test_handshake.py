"""Tests for shardproxy.handshake: the upgrade request and response, sans-IO.

Every parser is fed three ways (the h11 habit): the whole buffer at once, one
byte at a time, and with trailing data behind the head, which must come out
byte-exact in ``trailing``. Wire-level output is checked by parsing it back
with h11, an independent implementation of HTTP/1.1.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence

import h11
import pytest
from wsproto.frame_protocol import FrameProtocol

from shardproxy.protocol.upgrade import (
    NEED_DATA,
    BackendError,
    Reject,
    RequestReader,
    ResponseHead,
    ResponseReader,
    UpgradeRequest,
    error_response,
    forward_head,
)

KEY = base64.b64encode(bytes(range(16)))
LIMIT = 16384
MODES = ("whole", "bytewise", "trailing")

# What a client may send right behind its head: a masked text frame.
CLIENT_FRAME = FrameProtocol(client=True, extensions=[]).send_data("hello", fin=True)
# What a backend may send right behind its 101: an unmasked text frame.
SERVER_FRAME = FrameProtocol(client=False, extensions=[]).send_data("welcome", fin=True)

Header = tuple[bytes, bytes]

BASE_HEADERS: tuple[Header, ...] = (
    (b"Host", b"Chat.Example.COM:8080"),
    (b"User-Agent", b"test/1.0"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
    (b"X-Custom-CASE", b"Kept"),
)


def head(
    *,
    request_line: bytes = b"GET /chat/room?user=7&x=1 HTTP/1.1",
    drop: Sequence[bytes] = (),
    replace: dict[bytes, bytes] | None = None,
    add: Sequence[Header] = (),
) -> bytes:
    """An upgrade request head; header names in ``drop``/``replace`` are lower-case."""
    replace = replace or {}
    lines = [request_line]
    for name, value in BASE_HEADERS:
        low = name.lower()
        if low in drop:
            continue
        lines.append(name + b": " + replace.get(low, value))
    lines += [n + b": " + v for n, v in add]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunks(data: bytes, mode: str, after: bytes) -> Iterator[bytes]:
    """``data`` as the peer might send it: whole, byte by byte, or with ``after`` behind."""
    if mode == "whole":
        yield data
    elif mode == "bytewise":
        for i in range(len(data)):
            yield data[i : i + 1]
    else:
        yield data + after


def read_request(data: bytes, mode: str, limit: int = LIMIT) -> UpgradeRequest:
    reader = RequestReader(limit)
    parts = list(chunks(data, mode, CLIENT_FRAME))
    for part in parts[:-1]:
        assert reader.feed(part) is NEED_DATA
    result = reader.feed(parts[-1])
    assert isinstance(result, UpgradeRequest)
    assert reader.trailing == (CLIENT_FRAME if mode == "trailing" else b"")
    assert reader.received == len(data) + len(reader.trailing)
    return result


def rejected(data: bytes, mode: str, limit: int = LIMIT) -> Reject:
    reader = RequestReader(limit)
    with pytest.raises(Reject) as info:
        for part in chunks(data, mode, CLIENT_FRAME):
            assert reader.feed(part) is NEED_DATA
    return info.value


# -- RequestReader: valid upgrades ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_valid_upgrade(mode: str) -> None:
    r = read_request(head(), mode)
    assert r.method == b"GET"
    assert r.target == b"/chat/room?user=7&x=1"
    assert r.path == "/chat/room"
    assert r.host == "chat.example.com"
    assert r.raw_headers == BASE_HEADERS
    assert r.headers == tuple((n.lower(), v) for n, v in BASE_HEADERS)
    assert r.header(b"sec-websocket-key") == KEY
    assert r.header(b"x-custom-case") == b"Kept"
    assert r.header(b"cookie") is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"example.com", "example.com"),
        (b"EXAMPLE.com:443", "example.com"),
        (b"127.0.0.1:8080", "127.0.0.1"),
        (b"[::1]:8080", "::1"),
        (b"[::1]", "::1"),
        (b"[2001:DB8::1]:443", "2001:db8::1"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_host_is_lower_cased_without_port(host: bytes, expected: str, mode: str) -> None:
    assert read_request(head(replace={b"host": host}), mode).host == expected


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/", "/"),
        (b"/ws", "/ws"),
        (b"/ws?", "/ws"),
        (b"/a/b?c=d?e", "/a/b"),
        (b"/%41", "/%41"),
        # absolute-form, RFC 9112 §3.2.2
        (b"http://chat.example.com/room?x=1", "/room"),
        (b"http://chat.example.com", "/"),
    ],
)
def test_path_is_the_target_without_query(target: bytes, path: str) -> None:
    r = read_request(head(request_line=b"GET " + target + b" HTTP/1.1"), "whole")
    assert (r.target, r.path) == (target, path)


@pytest.mark.parametrize(
    "replace",
    [
        {b"connection": b"keep-alive, Upgrade"},
        {b"connection": b"UPGRADE"},
        {b"connection": b"upgrade,keep-alive"},
        {b"upgrade": b"WebSocket"},
        {b"upgrade": b"h2c, websocket"},
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_token_lists_are_case_insensitive(replace: dict[bytes, bytes], mode: str) -> None:
    assert read_request(head(replace=replace), mode).host == "chat.example.com"


def test_connection_tokens_may_be_split_over_several_headers() -> None:
    data = head(replace={b"connection": b"keep-alive"}, add=[(b"Connection", b"Upgrade")])
    assert read_request(data, "whole").path == "/chat/room"


def test_content_length_zero_is_no_body() -> None:
    assert read_request(head(add=[(b"Content-Length", b"0")]), "whole").path == "/chat/room"


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_trailing_frame_after_a_head_that_trickled_in(mode: str) -> None:
    data = head()
    reader = RequestReader(LIMIT)
    for part in chunks(data[:-1], mode, b""):
        assert reader.feed(part) is NEED_DATA
    result = reader.feed(data[-1:] + CLIENT_FRAME + CLIENT_FRAME)
    assert isinstance(result, UpgradeRequest)
    assert reader.trailing == CLIENT_FRAME + CLIENT_FRAME


def test_trailing_data_does_not_count_against_the_head_limit() -> None:
    data = head()
    bulk = FrameProtocol(client=True, extensions=[]).send_data(b"x" * 100_000, fin=True)
    reader = RequestReader(1024)
    assert isinstance(reader.feed(data + bulk), UpgradeRequest)
    assert reader.trailing == bulk


# -- RequestReader: size limit --------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid upgrade head of exactly ``size`` bytes."""
    base = head(add=[(b"X-Pad", b"")])
    data = head(add=[(b"X-Pad", b"p" * (size - len(base)))])
    assert len(data) == size
    return data


@pytest.mark.parametrize("mode", MODES)
def test_head_at_the_limit_is_accepted(mode: str) -> None:
    assert read_request(padded(1024), mode, limit=1024).host == "chat.example.com"


@pytest.mark.parametrize("mode", MODES)
def test_head_over_the_limit_is_431(mode: str) -> None:
    for data in (padded(1025), padded(5000)):
        r = rejected(data, mode, limit=1024)
        assert (r.status, r.reason) == (431, "header_too_large")


def test_head_over_the_limit_is_431_before_it_ends() -> None:
    # A client that never finishes its head is cut off once it passes the limit.
    reader = RequestReader(1024)
    reader.feed(b"GET / HTTP/1.1\r\nX-Pad: ")
    with pytest.raises(Reject) as info:
        for _ in range(100):
            assert reader.feed(b"p" * 100) is NEED_DATA
    assert info.value.status == 431
    assert reader.received <= 1024 + 100


# -- RequestReader: the client's mistakes ---------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        head(add=[(b"Bad Header", b"x")]),
        head(add=[(b"NoColon", b"")]).replace(b"NoColon: ", b"NoColon"),
        head(drop=[b"host"]),  # HTTP/1.1 requires Host
        head(add=[(b"Host", b"other.example.com")]),  # RFC 7230 §5.4: only one Host
        head(add=[(b"Content-Length", b"5"), (b"Content-Length", b"6")]),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_malformed_request_is_400(data: bytes, mode: str) -> None:
    r = rejected(data, mode)
    assert (r.status, r.reason) == (400, "bad_request")
    assert r.detail


@pytest.mark.parametrize("sent", [b"", b"G", b"GET / HTTP/1.1\r\nHost: a\r\n", head()[:-1]])
def test_client_closing_before_the_head_is_complete(sent: bytes) -> None:
    reader = RequestReader(LIMIT)
    for part in chunks(sent, "bytewise", b""):
        assert reader.feed(part) is NEED_DATA
    assert reader.received == len(sent)
    with pytest.raises(Reject) as info:
        reader.feed(b"")
    assert (info.value.status, info.value.reason) == (400, "client_closed")


@pytest.mark.parametrize("mode", MODES)
def test_plain_get_is_426_with_upgrade_header(mode: str) -> None:
    for data in (
        head(drop=[b"upgrade", b"connection"]),
        head(drop=[b"upgrade"]),
        head(replace={b"upgrade": b"h2c"}),
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ):
        r = rejected(data, mode)
        assert (r.status, r.reason) == (426, "not_upgrade")
        assert ("Upgrade", "websocket") in r.headers


@pytest.mark.parametrize("mode", MODES)
def test_post_upgrade_is_400(mode: str) -> None:
    r = rejected(head(request_line=b"POST /chat HTTP/1.1"), mode)
    assert r.status == 400


@pytest.mark.parametrize("mode", MODES)
def test_http_1_0_is_400(mode: str) -> None:
    for data in (
        head(request_line=b"GET /chat HTTP/1.0"),
        head(request_line=b"GET /chat HTTP/1.0", drop=[b"host"]),
    ):
        assert rejected(data, mode).status == 400


@pytest.mark.parametrize(
    "data",
    [
        head(drop=[b"connection"]),
        head(replace={b"connection": b"keep-alive"}),
        head(replace={b"connection": b"upgraded"}),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_missing_connection_upgrade_is_400(data: bytes, mode: str) -> None:
    assert rejected(data, mode).status == 400


@pytest.mark.parametrize("mode", MODES)
def test_missing_version_is_400(mode: str) -> None:
    r = rejected(head(drop=[b"sec-websocket-version"]), mode)
    assert (r.status, r.reason) == (400, "bad_version")


@pytest.mark.parametrize("version", [b"8", b"12", b"14", b"13, 8", b"thirteen"])
@pytest.mark.parametrize("mode", MODES)
def test_other_version_is_426_naming_13(version: bytes, mode: str) -> None:
    r = rejected(head(replace={b"sec-websocket-version": version}), mode)
    assert (r.status, r.reason) == (426, "bad_version")
    assert r.headers == (("Sec-WebSocket-Version", "13"),)


@pytest.mark.parametrize(
    "data",
    [
        head(drop=[b"sec-websocket-key"]),
        head(add=[(b"Sec-WebSocket-Key", KEY)]),  # duplicated
        head(add=[(b"Sec-WebSocket-Key", base64.b64encode(b"y" * 16))]),
        head(replace={b"sec-websocket-key": b"not base64 at all!!"}),
        head(replace={b"sec-websocket-key": KEY[:8] + b"!" + KEY[8:]}),  # 16 bytes if lenient
        head(replace={b"sec-websocket-key": KEY[:8] + b" " + KEY[8:]}),
        head(replace={b"sec-websocket-key": KEY.rstrip(b"=")}),  # unpadded
        head(replace={b"sec-websocket-key": base64.b64encode(b"x" * 15)}),
        head(replace={b"sec-websocket-key": base64.b64encode(b"x" * 17)}),
        head(replace={b"sec-websocket-key": base64.b64encode(b"x" * 32)}),
        head(replace={b"sec-websocket-key": b""}),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_bad_key_is_400(data: bytes, mode: str) -> None:
    r = rejected(data, mode)
    assert (r.status, r.reason) == (400, "bad_key")


@pytest.mark.parametrize(
    "data",
    [
        head(add=[(b"Content-Length", b"5")]) + b"hello",
        head(add=[(b"Content-Length", b"5")]),  # the body has not even arrived
        head(add=[(b"Transfer-Encoding", b"chunked")]) + b"5\r\nhello\r\n0\r\n\r\n",
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_request_with_a_body_is_400(data: bytes, mode: str) -> None:
    r = rejected(data, mode)
    assert (r.status, r.reason) == (400, "bad_request")
    assert "body" in r.detail


# -- forward_head ---------------------------------------------------------------------------


def parse_request(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert conn.next_event() == h11.EndOfMessage()
    assert conn.next_event() is h11.PAUSED  # the whole head, nothing after it
    return event


def forwarded_values(event: h11.Request, name: bytes) -> list[bytes]:
    return [v for n, v in event.headers if n == name]


def test_forward_head_keeps_the_request_and_adds_x_forwarded() -> None:
    r = read_request(head(), "whole")
    out = forward_head(r, "10.0.0.1", "http", 8080)
    assert out.startswith(b"GET /chat/room?user=7&x=1 HTTP/1.1\r\n")
    event = parse_request(out)
    assert (event.method, event.target, event.http_version) == (
        b"GET",
        b"/chat/room?user=7&x=1",
        b"1.1",
    )
    raw = event.headers.raw_items()
    assert raw[: len(BASE_HEADERS)] == list(BASE_HEADERS)  # original case and order
    assert raw[len(BASE_HEADERS) :] == [
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Port", b"8080"),
    ]
    # And the backend sees a valid upgrade request with the same meaning.
    again = read_request(out, "whole")
    assert (again.host, again.path, again.target) == (r.host, r.path, r.target)


def test_forward_head_appends_to_x_forwarded_for() -> None:
    r = read_request(head(add=[(b"X-Forwarded-For", b"1.2.3.4")]), "whole")
    event = parse_request(forward_head(r, "10.0.0.1", "http", 80))
    assert forwarded_values(event, b"x-forwarded-for") == [b"1.2.3.4, 10.0.0.1"]

    r = read_request(
        head(add=[(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"X-FORWARDED-FOR", b"3.3.3.3")]),
        "whole",
    )
    event = parse_request(forward_head(r, "2001:db8::9", "https", 443))
    assert forwarded_values(event, b"x-forwarded-for") == [
        b"1.1.1.1, 2.2.2.2, 3.3.3.3, 2001:db8::9"
    ]


def test_forward_head_replaces_client_supplied_proto_and_port() -> None:
    spoofed = [
        (b"X-Forwarded-Proto", b"https"),
        (b"x-forwarded-port", b"443"),
        (b"X-Forwarded-Proto", b"gopher"),
    ]
    r = read_request(head(add=spoofed), "whole")
    event = parse_request(forward_head(r, "10.0.0.1", "http", 8080))
    assert forwarded_values(event, b"x-forwarded-proto") == [b"http"]
    assert forwarded_values(event, b"x-forwarded-port") == [b"8080"]
    # Everything else is passed on untouched.
    others = [(n, v) for n, v in event.headers.raw_items() if not n.lower().startswith(b"x-fo")]
    assert others == list(BASE_HEADERS)


# -- ResponseReader ------------------------------------------------------------------------

ACCEPT = base64.b64encode(b"a" * 20)
RESPONSE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n"
    b"X-Backend: chat-3\r\n"
    b"set-cookie: sid=abc\r\n"
    b"\r\n"
)


def response_reader(limit: int = LIMIT) -> ResponseReader:
    return ResponseReader(read_request(head(), "whole"), limit)


def read_response(reader: ResponseReader, data: bytes, mode: str, after: bytes) -> ResponseHead:
    parts = list(chunks(data, mode, after))
    for part in parts[:-1]:
        assert reader.feed(part) is NEED_DATA
    result = reader.feed(parts[-1])
    assert isinstance(result, ResponseHead)
    return result


def parse_response(data: bytes) -> tuple[h11.Response | h11.InformationalResponse, bytes]:
    """Parse a head (and close-delimited body) as the upgrading client will."""
    conn = h11.Connection(h11.CLIENT)
    upgrade = [("Host", "a"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    conn.send(h11.Request(method="GET", target="/", headers=upgrade))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    body = b""
    if isinstance(event, h11.Response):
        conn.receive_data(b"")
        while not isinstance(e := conn.next_event(), h11.EndOfMessage):
            assert isinstance(e, h11.Data)
            body += e.data
    return event, body


@pytest.mark.parametrize("mode", MODES)
def test_101_passes_the_backends_head(mode: str) -> None:
    reader = response_reader()
    got = read_response(reader, RESPONSE_101, mode, SERVER_FRAME)
    assert got.status == 101
    assert got.head == RESPONSE_101
    event, _ = parse_response(got.head)
    assert event.status_code == 101
    assert event.headers.raw_items() == [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", ACCEPT),
        (b"X-Backend", b"chat-3"),
        (b"set-cookie", b"sid=abc"),
    ]
    assert reader.trailing == (SERVER_FRAME if mode == "trailing" else b"")


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_101_trailing_after_a_head_that_trickled_in(mode: str) -> None:
    reader = response_reader()
    for part in chunks(RESPONSE_101[:-1], mode, b""):
        assert reader.feed(part) is NEED_DATA
    got = reader.feed(RESPONSE_101[-1:] + SERVER_FRAME * 3)
    assert isinstance(got, ResponseHead) and got.status == 101
    assert reader.trailing == SERVER_FRAME * 3


@pytest.mark.parametrize("mode", MODES)
def test_100_continue_before_the_101_is_skipped(mode: str) -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + RESPONSE_101
    reader = response_reader()
    got = read_response(reader, data, mode, SERVER_FRAME)
    assert got.status == 101
    assert got.head == RESPONSE_101
    assert reader.trailing == (SERVER_FRAME if mode == "trailing" else b"")


FORBIDDEN_CL = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 9\r\n"
    b"Connection: keep-alive\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"X-Reason: nope\r\n"
    b"\r\n"
)
FORBIDDEN_CHUNKED = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Content-Type: text/plain\r\n"
    b"X-Reason: nope\r\n"
    b"\r\n"
)
BODY = b"forbidden"
CHUNKED_BODY = b"4\r\nforb\r\n5;ext=1\r\nidden\r\n0\r\nTrailer: x\r\n\r\n"


def collect_body(reader: ResponseReader, data: bytes, mode: str) -> bytes:
    """Feed the body bytes; ``done`` must come with the last byte and not before."""
    out = b""
    parts = list(chunks(data, mode, b""))
    for i, part in enumerate(parts):
        got, done = reader.body(part)
        out += got
        assert done is (i == len(parts) - 1)
    return out


@pytest.mark.parametrize(
    ("response", "body"), [(FORBIDDEN_CL, BODY), (FORBIDDEN_CHUNKED, CHUNKED_BODY)]
)
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_non_101_is_passed_back_close_delimited(response: bytes, body: bytes, mode: str) -> None:
    reader = response_reader()
    got = read_response(reader, response, mode, b"")
    assert got.status == 403
    names = [n.lower() for n, _ in parse_response(got.head)[0].headers.raw_items()]
    assert b"content-length" not in names
    assert b"transfer-encoding" not in names
    assert b"keep-alive" not in names
    assert names.count(b"connection") == 1
    assert b"Connection: close\r\n" in got.head
    assert b"X-Reason: nope\r\n" in got.head
    assert b"Content-Type: text/plain\r\n" in got.head
    decoded = collect_body(reader, body, mode)
    assert decoded == BODY
    # What the client receives is a valid response with the same body.
    event, client_body = parse_response(got.head + decoded)
    assert (event.status_code, client_body) == (403, BODY)


@pytest.mark.parametrize(
    ("response", "body"), [(FORBIDDEN_CL, BODY), (FORBIDDEN_CHUNKED, CHUNKED_BODY)]
)
def test_body_bytes_that_came_with_the_head_are_not_lost(response: bytes, body: bytes) -> None:
    reader = response_reader()
    got = reader.feed(response + body[:3])
    assert isinstance(got, ResponseHead) and got.status == 403
    assert reader.body(body[3:]) == (BODY, True)


def test_close_delimited_body_ends_when_the_backend_closes() -> None:
    reader = response_reader()
    got = reader.feed(b"HTTP/1.0 500 Internal Server Error\r\n\r\npart one, ")
    assert isinstance(got, ResponseHead) and got.status == 500
    assert got.head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert reader.body(b"part two") == (b"part one, part two", False)
    assert reader.body(b"") == (b"", True)


def test_content_length_body_cut_short_is_a_backend_error() -> None:
    reader = response_reader()
    assert isinstance(reader.feed(FORBIDDEN_CL), ResponseHead)
    assert reader.body(b"forb") == (b"forb", False)
    with pytest.raises(BackendError):
        reader.body(b"")


def test_response_without_body() -> None:
    reader = response_reader()
    got = reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert isinstance(got, ResponseHead)
    assert got.status == 204
    assert reader.body(b"") == (b"", True)


@pytest.mark.parametrize(
    ("status_line", "status", "phrase"),
    [
        (b"HTTP/1.1 403", 403, b"Forbidden"),  # missing reason: filled in
        (b"HTTP/1.1 403 ", 403, b"Forbidden"),
        (b"HTTP/1.1 403 Go Away", 403, b"Go Away"),  # the backend's reason kept
        (b"HTTP/1.1 599", 599, b""),  # unknown code, no reason
        (b"HTTP/1.1 599 Network Timeout", 599, b"Network Timeout"),
    ],
)
def test_status_line_is_rebuilt_validly(status_line: bytes, status: int, phrase: bytes) -> None:
    reader = response_reader()
    got = reader.feed(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(got, ResponseHead)
    assert got.status == status
    event, _ = parse_response(got.head)
    assert (event.status_code, event.reason) == (status, phrase)


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_malformed_response_is_a_backend_error(data: bytes, mode: str) -> None:
    reader = response_reader()
    with pytest.raises(BackendError):
        for part in chunks(data, mode, SERVER_FRAME):
            assert reader.feed(part) is NEED_DATA


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 10", RESPONSE_101[:-2]])
def test_backend_closing_before_its_head_is_a_backend_error(sent: bytes) -> None:
    reader = response_reader()
    if sent:
        assert reader.feed(sent) is NEED_DATA
    with pytest.raises(BackendError):
        reader.feed(b"")


@pytest.mark.parametrize("mode", MODES)
def test_response_head_over_the_limit_is_a_backend_error(mode: str) -> None:
    big = RESPONSE_101.replace(b"X-Backend: chat-3", b"X-Backend: " + b"b" * 2000)
    reader = response_reader(limit=1024)
    with pytest.raises(BackendError):
        for part in chunks(big, mode, SERVER_FRAME):
            assert reader.feed(part) is NEED_DATA
    # The same limit leaves room for a normal head and any amount of tunnel data.
    reader = response_reader(limit=1024)
    assert isinstance(reader.feed(RESPONSE_101 + SERVER_FRAME * 500), ResponseHead)
    assert reader.trailing == SERVER_FRAME * 500


# -- error_response --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail", "headers"),
    [
        (400, "malformed request", ()),
        (404, "no route for host 'a' path '/x'", ()),
        (426, "upgrade only", (("Upgrade", "websocket"), ("Connection", "Upgrade"))),
        (431, "request head is too large", ()),
        (502, "backend failed — ünïcode", ()),
        (503, "busy", (("Retry-After", "1"),)),
        (504, "", ()),
    ],
)
def test_error_response_is_valid_http(
    status: int, detail: str, headers: tuple[tuple[str, str], ...]
) -> None:
    data = error_response(status, detail, headers)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    body = conn.next_event()
    assert isinstance(body, h11.Data)
    assert conn.next_event() == h11.EndOfMessage()  # Content-Length ended it exactly
    assert body.data == (detail + "\n").encode()
    got = dict(response.headers.raw_items())
    assert int(got[b"Content-Length"]) == len(body.data)
    head_lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    connection = {
        t.strip().lower()
        for n, v in response.headers.raw_items()
        if n.lower() == b"connection"
        for t in v.split(b",")
    }
    for name, value in headers:
        if name.lower() == "connection":  # one Connection header, tokens merged
            assert value.lower().encode() in connection
        else:
            assert f"{name}: {value}".encode() in head_lines
    assert b"close" in connection
    assert conn.their_state is h11.MUST_CLOSE


def test_reject_becomes_a_valid_answer() -> None:
    r = rejected(head(replace={b"sec-websocket-version": b"8"}), "whole")
    data = error_response(r.status, r.detail, r.headers)
    event, body = parse_response(data)
    assert event.status_code == 426
    assert (b"sec-websocket-version", b"13") in list(event.headers)
    assert body == (r.detail + "\n").encode()
