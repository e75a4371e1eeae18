"""The upgrade request's fast path in C (engine/_chttp.c's parse_upgrade)
against the reference, protocol/upgrade.py's parse_request +
validate_upgrade: whenever C answers, the reference accepts the head and
finds the same request; and C answers for the heads real clients send.
Heads come from a grammar of upgrade requests whose every field is drawn
from valid and nearly valid forms, from mutations, and from arbitrary
bytes."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardproxy.engine import choice
from shardproxy.protocol import http1
from shardproxy.protocol.errors import Reject
from shardproxy.protocol.upgrade import RequestReader, UpgradeRequest, validate_upgrade

REQUIRED = os.environ.get("SHARDPROXY_BUILD_EXTENSION", "").lower() in ("1", "yes", "true")
compiled = choice.COMPILED

pytestmark = pytest.mark.skipif(
    compiled is None and not REQUIRED, reason="the compiled engine was not built here"
)


def reference(head: bytes) -> UpgradeRequest | None:
    try:
        return validate_upgrade(*http1.parse_request(head))
    except (Reject, http1.HeadError):
        return None


def fast(buffer: bytes, end: int) -> UpgradeRequest | None:
    assert compiled is not None
    fields = compiled.parse_upgrade(buffer, end)
    return None if fields is None else UpgradeRequest(*fields)


def assert_never_looser(head: bytes, trailing: bytes = b"") -> UpgradeRequest | None:
    got = fast(head + trailing, len(head))
    if got is not None:
        assert got == reference(head), head
    return got


KEY = base64.b64encode(b"0123456789abcdef")

# (name, valid values, values next to them): what validate_upgrade looks at.
FIELDS: dict[bytes, tuple[list[bytes], list[bytes]]] = {
    b"Host": (
        [b"example.com", b"Example.COM:8080", b"a.b", b"127.0.0.1:80", b"x y"],
        [b"[::1]:80", b"a:b:c", b"", b"\xe9x.example", b"a\tb", b"h" * 300, b"A:"],
    ),
    b"Upgrade": (
        [b"websocket", b"WebSocket", b"h2c, websocket", b" websocket ,"],
        [b"websocketx", b"web socket", b"h2c", b",", b""],
    ),
    b"Connection": (
        [b"Upgrade", b"keep-alive, Upgrade", b"upgrade"],
        [b"upgradex", b"keep-alive", b"up grade", b""],
    ),
    b"Sec-WebSocket-Version": ([b"13"], [b"8", b"13, 8", b"13 ", b"013", b""]),
    b"Sec-WebSocket-Key": (
        [KEY, b"AAAAAAAAAAAAAAAAAAAAAB==", base64.b64encode(os.urandom(16))],
        [
            base64.b64encode(b"x" * 15),
            base64.b64encode(b"x" * 17),
            KEY.rstrip(b"="),
            KEY[:-3] + b"===",
            KEY[:10] + b"!" + KEY[11:],
            KEY[:10] + b" " + KEY[11:],
            b"=" + KEY[1:],
        ],
    ),
    b"Content-Length": ([], [b"0", b"5", b" 0"]),
    b"Transfer-Encoding": ([], [b"chunked"]),
    b"User-Agent": ([b"bench", b"Mozilla/5.0 (X11)"], [b"\x80\xff"]),
    b"Origin": ([b"https://app.example"], [b"null"]),
    b"X-Forwarded-For": ([b"198.18.0.7, 10.0.0.1"], [b"nonsense"]),
}


def cases(name: bytes) -> st.SearchStrategy[bytes]:
    """The name as sent: its own case, lower, upper, or mixed."""
    return st.sampled_from(
        [name, name.lower(), name.upper(), bytes(c ^ 0x20 if c > 0x60 else c for c in name)]
    )


@st.composite
def upgrade_heads(draw: st.DrawFn) -> bytes:
    odds = draw(st.sampled_from([2, 6, 30, 1000]))

    def pick(good: list[bytes], bad: list[bytes]) -> bytes:
        if not good or (bad and draw(st.integers(1, odds)) == 1):
            return draw(st.sampled_from(bad))
        return draw(st.sampled_from(good))

    method = pick([b"GET"], [b"get", b"POST", b"GETX"])
    target = pick([b"/", b"/chat?room=1", b"/a/b", b"/\x80\xff?q"], [b"http://a.example/x", b"*"])
    version = pick([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0"])
    lines = []
    for name, (good, bad) in FIELDS.items():
        odd = draw(st.integers(1, odds)) == 1
        copies = (draw(st.sampled_from([0, 2, 3])) if good else 1) if odd else int(bool(good))
        for _ in range(copies):
            sep = draw(st.sampled_from([b" ", b"", b"\t"]))
            lines.append(draw(cases(name)) + b":" + sep + pick(good, bad))
    lines = draw(st.permutations(lines))
    return (
        method
        + b" "
        + target
        + b" "
        + version
        + b"\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + b"\r\n"
    )


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(upgrade_heads(), st.sampled_from([b"", b"\x81\x80abcd", b"GET / HTTP/1.1\r\n\r\n"]))
def test_c_answers_only_for_heads_the_reference_accepts_and_as_it_does(
    head: bytes, trailing: bytes
) -> None:
    assert_never_looser(head, trailing)


@FAST
@given(upgrade_heads(), st.data())
def test_mutated_heads_too(head: bytes, data: st.DataObject) -> None:
    raw = bytearray(head)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        byte = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            raw[at] = byte
        else:
            raw.insert(at, byte)
    assert_never_looser(bytes(raw))


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_too(head: bytes) -> None:
    assert_never_looser(head)


# What clients send (a real client's head, as captured; the key is theirs).
REAL_HEADS = {
    "bench.loadgen": b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1:30111\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
    "websockets": b"GET /echo HTTP/1.1\r\nHost: localhost:8765\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; "
    b"client_max_window_bits\r\nUser-Agent: Python/3.11 websockets/13.1\r\n\r\n",
    "node ws": b"GET / HTTP/1.1\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    b"TEtj3d8QOq7MZ8vZ5u1+tg==\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"Host: 127.0.0.1:8080\r\n\r\n",
    "chromium": b"GET /socket?v=2 HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux "
    b"x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 "
    b"Safari/537.36\r\nUpgrade: websocket\r\nOrigin: https://app.example.com\r\n"
    b"Sec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: 5fHq1GpXyVbmDpS2AUyJCQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
}


@pytest.mark.parametrize("client", sorted(REAL_HEADS))
def test_c_answers_for_what_clients_send(client: str) -> None:
    head = REAL_HEADS[client]
    got = assert_never_looser(head)
    assert got is not None and got == reference(head)


def test_the_reader_takes_the_fast_path_and_keeps_the_tunnels_first_bytes() -> None:
    def not_here(head: bytes) -> tuple[bytes, bytes, bytes, http1.Headers]:
        raise AssertionError("the reference path was taken")

    head = REAL_HEADS["websockets"]
    reader = RequestReader(16384, choice.PARSERS._replace(parse_request=not_here))
    assert reader.feed(head + b"\x81\x80abcd") == reference(head)
    assert reader.trailing == b"\x81\x80abcd"
