"""The head parser against h11 (an independent implementation of RFC 9112):
on valid heads they agree field for field; on invalid ones ours refuses."""

from __future__ import annotations

import h11
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shardproxy.protocol import http1

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=TCHAR, min_size=1, max_size=20).map(str.encode)
# Field values: visible ASCII and spaces inside, no leading/trailing whitespace.
values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
    str.encode
) | st.builds(
    lambda a, b: a + b" " + b,
    st.text(alphabet="abc=;,", min_size=1, max_size=5).map(str.encode),
    st.text(alphabet="xyz/", min_size=1, max_size=5).map(str.encode),
)
targets = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60
).map(lambda t: b"/" + t.encode())
fields = st.lists(st.tuples(tokens, values), max_size=12)


def h11_request(head: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


@given(method=tokens, target=targets, extra=fields)
def test_requests_agree_with_h11(
    method: bytes, target: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    # A second Host header makes the request invalid (RFC 9112 §3.2): h11
    # refuses it, and the upgrade layer does (tests/test_handshake.py).
    assume(all(n.lower() != b"host" for n, _ in extra))
    headers = [(b"Host", b"example.com"), *extra]
    head = method + b" " + target + b" HTTP/1.1\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    try:
        event = h11_request(head)
    except h11.RemoteProtocolError:
        # h11 also checks framing headers (Content-Length, Transfer-Encoding);
        # those are the handshake layer's business here, not the parser's.
        assume_framing = any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in extra
        )
        assert assume_framing
        return
    ours = http1.parse_request(head)
    assert ours[:3] == (event.method, event.target, event.http_version)
    assert ours[3] == [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()]


@given(
    status=st.integers(100, 599),
    reason=st.sampled_from([b"", b"OK", b"Switching Protocols"]),
    extra=fields,
)
def test_valid_responses_parse(
    status: int, reason: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    head = b"HTTP/1.1 %d " % status + reason + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in extra) + b"\r\n"
    version, code, phrase, parsed = http1.parse_response(head)
    assert (version, code, phrase) == (b"1.1", status, reason)
    assert parsed == [(n, v.strip(b" \t")) for n, v in extra]


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",  # RFC 9112 §5.1: no space before the colon
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",  # NUL in a value
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",  # CR in a value
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",  # two spaces
        b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
        b"GET / HTTP/1\r\nHost: a\r\n\r\n",
        b"GE(T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty name\r\n\r\n",
    ],
)
def test_invalid_requests_are_refused_like_h11_does(head: bytes) -> None:
    with pytest.raises(http1.HeadError):
        http1.parse_request(head)
    with pytest.raises(h11.RemoteProtocolError):
        h11_request(head)


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  # §5.2: obs-fold
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",  # a bare LF
    ],
)
def test_stricter_than_h11_where_rfc_9112_allows(head: bytes) -> None:
    """h11 unfolds obs-fold and takes a bare LF; RFC 9112 lets a server refuse
    both (§5.2, §2.2), and a proxy should: two parsers reading one message
    differently is how request smuggling starts."""
    with pytest.raises(http1.HeadError):
        http1.parse_request(head)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/x 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
    ],
)
def test_invalid_responses_are_refused(head: bytes) -> None:
    with pytest.raises(http1.HeadError):
        http1.parse_response(head)


def test_leading_empty_lines_before_a_request_are_ignored() -> None:
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line first.
    assert http1.parse_request(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")[1] == b"/"


def test_head_end_finds_the_empty_line_across_a_resumed_search() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"
    assert http1.head_end(data) == len(data) - 4
    assert http1.head_end(data[:-5]) == -1
    assert http1.head_end(data, start=len(data) - 8) == len(data) - 4  # as a reader resumes
