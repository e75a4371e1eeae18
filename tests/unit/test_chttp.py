"""The compiled head parser (engine/_chttp.c) against the Python one
(protocol/http1.py), the reference: heads from a grammar of valid and
nearly valid parts, valid heads mutated, and arbitrary bytes give both the
same result, or the same HeadError with the same message."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardproxy.engine import choice
from shardproxy.protocol import http1

REQUIRED = os.environ.get("SHARDPROXY_BUILD_EXTENSION", "").lower() in ("1", "yes", "true")
compiled = choice.COMPILED

pytestmark = pytest.mark.skipif(
    compiled is None and not REQUIRED, reason="the compiled engine was not built here"
)

Parser = Callable[[object], object]


def outcome(parse: Parser, head: object) -> str:
    """What ``parse`` made of ``head``, as a repr: types count (bytes, not a
    bytearray; an int status), and so does the exception's exact class."""
    try:
        return repr(parse(head))
    except http1.HeadError as e:
        return f"{type(e).__qualname__}({e})"


def exact(head: bytes) -> ctypes.Array[ctypes.c_char]:
    """``head`` in a buffer of exactly its size: a bytes object has a NUL
    past its end, where a read one byte too far would go unseen by ASan
    (scripts/test-sanitized)."""
    return (ctypes.c_char * len(head)).from_buffer_copy(head)


def assert_same(head: bytes) -> None:
    assert compiled is not None
    for name in ("parse_request", "parse_response"):
        py = outcome(getattr(http1, name), head)
        assert outcome(getattr(compiled, name), exact(head)) == py, (name, head)


# -- the grammar --------------------------------------------------------------
# Every part of a head is drawn from its valid forms or, one time in `odds`
# (drawn per head: most heads are nearly valid, some are valid, some are
# wrecks), from the forms next to them; so both the start line's checks and
# every header line's are reached, and the first error can be anywhere.

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = bytes(range(0x21, 0x7F))
# The bytes every class boundary of http1.py's patterns turns on.
TRICKY = b" \t\r\n\x00\x01\x08\x0b\x1f\x7f\x80\xff!~:;,()\"/\\?=@[]{}<>'`|^_-."


def chunk(alphabet: bytes, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


def choose(values: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(values)


def one_off(good: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A valid form with one byte from TRICKY in it: one class boundary at a time."""
    return st.builds(lambda a, c, b: a + bytes([c]) + b, good, st.sampled_from(TRICKY), good)


def replaced(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` with one byte replaced by any other."""
    return st.builds(
        lambda i, c: valid[:i] + bytes([c]) + valid[i + 1 :],
        st.integers(0, len(valid) - 1),
        st.integers(0, 255),
    )


tokens = chunk(TCHAR, min_size=1)
nearly = chunk(TCHAR + TRICKY)  # a token, mostly, or not quite
targets = chunk(VCHAR + b"\x80\xfe\xff", min_size=1)
values = chunk(VCHAR + b"\x80\xff  \t", max_size=20)
reasons = choose([b"", b"OK", b"Switching Protocols", b"a\tb", b"\x80\xff"])
# (valid forms, forms next to them)
PARTS: dict[str, tuple[st.SearchStrategy[bytes], st.SearchStrategy[bytes]]] = {
    "method": (choose([b"GET", b"POST", b"M-SEARCH", b"get"]) | tokens, one_off(tokens) | nearly),
    "target": (
        choose([b"/", b"*", b"/chat?room=1", b"http://a.example/x", b"/\x80\xff"]) | targets,
        one_off(targets) | choose([b"", b"/a\x7f", b"/a b", b"/\t"]) | nearly,
    ),
    "version": (
        choose([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/0.0"]),
        replaced(b"HTTP/1.1")
        | choose([b"HTTP/1", b"HTTP/11.1", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.12", b""])
        | choose([b"HTTPS/1.1", b"HTTP/\xd9\xa3.1"])
        | chunk(b"HTTP/1.0 "),
    ),
    "status": (
        st.integers(0, 999).map(lambda i: b"%03d" % i),
        replaced(b"101")
        | choose([b"20", b"2000", b"", b"+01", b" 101", b"\xd9\xa3\xd9\xa3\xd9\xa3"])
        | chunk(b"0123456789 x", max_size=5),
    ),
    "reason": (reasons, one_off(reasons) | chunk(VCHAR + TRICKY)),
    "sep": (st.just(b" "), choose([b"", b"  ", b"\t"])),
    "eol": (st.just(b"\r\n"), choose([b"\n", b"\r", b"\r\r\n", b"\n\r", b""])),
    "name": (tokens, one_off(tokens) | nearly),
    "colon": (st.just(b":"), choose([b"", b"::", b" :", b"\t:"])),
    "ows": (choose([b"", b" ", b"\t", b"  ", b" \t "]), choose([b"\r", b"\x0b", b"\x00"])),
    "value": (values, one_off(values) | chunk(VCHAR + TRICKY, max_size=20)),
    # §2.2: parse_request drops leading empty lines (lstrip), parse_response does not
    "request lead": (choose([b"", b"\r\n"]), choose([b"\n", b"\r", b"\n\r\r\n", b" "])),
    "response lead": (st.just(b""), choose([b"\r\n", b"\n", b" "])),
    "tail": (st.just(b"\r\n"), choose([b"", b"\n", b"\r\n\r\n", b"x", b"\r\nxy"])),
}


@st.composite
def heads(draw: st.DrawFn, response: bool) -> bytes:
    odds = draw(st.sampled_from([3, 12, 12, 50, 1000]))

    def part(name: str) -> bytes:
        good, bad = PARTS[name]
        return draw(bad if draw(st.integers(1, odds)) == 1 else good)

    if response:
        start = part("response lead") + part("version") + part("sep") + part("status")
        start += part("sep") + part("reason")
    else:
        start = part("request lead") + part("method") + part("sep") + part("target")
        start += part("sep") + part("version")
    head = start + part("eol")
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(1, odds))
        if kind == 1:  # RFC 9112 §5.2: obs-fold
            line = draw(choose([b" ", b"\t"])) + part("value")
        elif kind == 2:
            line = draw(choose([b"", b"  "]) | nearly | chunk(VCHAR + TRICKY, 30, 60))
        else:
            line = part("name") + part("colon") + part("ows") + part("value") + part("ows")
        head += line + part("eol")
    return head + part("tail")


requests = heads(response=False)
responses = heads(response=True)


def valid_head(fields: list[tuple[bytes, bytes]], response: bool) -> bytes:
    start = b"HTTP/1.1 101 Switching Protocols" if response else b"GET /chat HTTP/1.1"
    return start + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"


valid_heads = st.builds(
    valid_head,
    st.lists(st.tuples(tokens, chunk(VCHAR, max_size=20)), max_size=6),
    st.booleans(),
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the differential tests -------------------------------------------------


@FAST
@given(requests)
def test_requests_from_the_grammar_give_both_the_same_answer(head: bytes) -> None:
    assert_same(head)


@FAST
@given(responses)
def test_responses_from_the_grammar_give_both_the_same_answer(head: bytes) -> None:
    assert_same(head)


@FAST
@given(valid_heads, st.data())
def test_mutated_heads_give_both_the_same_answer(head: bytes, data: st.DataObject) -> None:
    raw = bytearray(head)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        byte = data.draw(st.sampled_from(TRICKY) | st.integers(0, 255))
        if kind == "insert":
            raw[at:at] = bytes([byte])
        elif kind == "delete":
            del raw[at : at + data.draw(st.integers(1, 4))]
        elif at < len(raw):
            raw[at] = byte
    assert_same(bytes(raw))


@FAST
@given(st.binary(max_size=300) | chunk(b"GET /HTP1.0\r\n :\t\x00\x80", max_size=80))
def test_arbitrary_bytes_give_both_the_same_answer(head: bytes) -> None:
    assert_same(head)


@FAST
@given(
    chunk(b"\r\n\r\nx", max_size=30),
    st.none() | st.integers(-40, 40) | st.sampled_from([-(2**70), 2**70, True]),
)
def test_head_end_agrees(buffer: bytes, start: int | None) -> None:
    assert compiled is not None
    expected = http1.head_end(buffer, start)  # type: ignore[arg-type]
    assert compiled.head_end(exact(buffer), start) == expected
    assert compiled.head_end(bytearray(buffer), start=start) == expected


# -- explicit examples ----------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\n\r\n\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # lstrip takes any mix of CR and LF
        b"\r\n\r\n",
        b"",
        b"GET / HTTP/1.1X",  # no CRLF: head[:-1] is the start line
        b"GET /no/line/end HTTP/1.1\r",  # a CR last, and nothing after it to read
        b"GET / HTTP/1.1\r\n",  # the start line reaches into the last four bytes
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n",  # an empty line before the last four
        b"GET / HTTP/1.1\r\nHost: a\r\nXYZW",  # the last four are dropped, whatever they are
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",  # an empty value
        b"GET / HTTP/1.1\r\nHost: \t a b \t\r\n\r\n",  # OWS stripped, inner space kept
        b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n",  # DEL is a control
        b"GET / HTTP/1.1\r\nX: a\x80\xffb\r\n\r\n",  # obs-text is not
        b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n",  # a bare LF
        b"GET / HTTP/1.1\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\n\tfolded\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-\xff: y\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"'\"" * 30 + b"\r\n\r\n",  # repr quoting, cut at 40 bytes
        b"GET / HTTP/1.1\r\nX:y:z\r\n\r\n",  # partition at the first colon
        b"GET /\x80 HTTP/1.1\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 \r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 007\r\n\r\n",  # int("007")
        b"HTTP/1.1 200  two  spaces \r\n\r\n",  # the reason keeps them
        b"HTTP/1.1 200 O\tK\r\n\r\n",  # HTAB is no control here
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200",  # no CRLF: the last byte goes
        b"HTTP/1.1 2000",
        b"HTTP/1.1 200 no line end\r",
    ],
)
def test_edge_cases(head: bytes) -> None:
    assert_same(head)
    assert_same(head + b"trailing")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /chat HTTP/1.1\r\nHost: a.example\r\nX-Y: v w\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ],
)
def test_every_byte_in_every_place(head: bytes) -> None:
    """Every head one byte away from a valid one (each of the 256 inserted
    at, or put in place of, each offset): every class of every part, one
    boundary at a time, which random heads reach only by luck."""
    for at in range(len(head) + 1):
        for byte in range(256):
            assert_same(head[:at] + bytes([byte]) + head[at:])
            assert_same(head[:at] + bytes([byte]) + head[at + 1 :])


@pytest.mark.parametrize("count", [99, 100, 101, 1000])
def test_any_number_of_header_lines(count: int) -> None:
    """The C core holds 100 lines inline; past them the Python functions
    walk the lines again into room for all: no difference is visible."""
    assert compiled is not None
    fields = [(b"X-%d" % i, b"v%d" % i) for i in range(count)]
    for response in (False, True):
        head = valid_head(fields, response)
        assert_same(head)
        parse = compiled.parse_response if response else compiled.parse_request
        assert parse(head)[3] == fields


@pytest.mark.parametrize("bad", [5, 100, 150])
def test_an_invalid_line_past_the_bound_is_reported_as_python_does(bad: int) -> None:
    fields = [(b"X-%d" % i, b"v") for i in range(200)]
    for line in (b"no colon here", b" folded", b"X: a\x01b"):
        head = valid_head(fields, response=False).replace(b"X-%d: v\r\n" % bad, line + b"\r\n")
        assert_same(head)


def test_bytes_like_heads_give_bytes() -> None:
    """http1.py given a bytearray returns bytearrays; the C functions take
    any bytes-like object and return bytes, which compare equal."""
    assert compiled is not None
    head = b"GET /chat HTTP/1.1\r\nHost: a\r\n\r\n"
    expected = http1.parse_request(head)
    for data in (bytearray(head), memoryview(head)):
        got = compiled.parse_request(data)
        assert got == expected == http1.parse_request(bytearray(head))  # type: ignore[arg-type]
        assert repr(got) == repr(expected)
    assert compiled.parse_request(head=head) == expected
    assert compiled.head_end(buffer=head, start=3) == http1.head_end(head, start=3)


def test_the_error_is_http1s_own_class() -> None:
    assert compiled is not None
    with pytest.raises(http1.HeadError, match=r"^invalid header line b'oops'$"):
        compiled.parse_request(b"GET / HTTP/1.1\r\noops\r\n\r\n")
    with pytest.raises(TypeError):
        compiled.parse_request("GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(TypeError):
        compiled.head_end(b"", "0")


# -- the forwarded head ---------------------------------------------------------

_FORWARDED_NAMES = st.sampled_from(
    [
        b"X-Forwarded-For",
        b"x-forwarded-for",
        b"X-FORWARDED-PROTO",
        b"X-Forwarded-Port",
        b"x-forwarded-po",
    ]
)
header_pairs = st.lists(
    st.tuples(_FORWARDED_NAMES | st.binary(min_size=1, max_size=20), st.binary(max_size=30)),
    max_size=12,
)


@given(
    st.binary(min_size=1, max_size=10),
    st.binary(min_size=1, max_size=40),
    header_pairs,
    st.text(max_size=40),
    st.sampled_from(["http", "https", "wß"]),
    st.integers(-(2**70), 2**70),
)
def test_the_forwarded_head_is_the_references(
    method: bytes,
    target: bytes,
    pairs: list[tuple[bytes, bytes]],
    client_ip: str,
    proto: str,
    port: int,
) -> None:
    """The C builder gives http1.forwarded_head's bytes: every X-Forwarded-*
    field the client sent dropped (any case), its X-Forwarded-For values
    kept in order before the client's address, for any field bytes."""
    assert compiled is not None
    raw = tuple(pairs)
    args = (method, target, raw, client_ip, proto, port)
    assert compiled.forwarded_head(*args) == http1.forwarded_head(*args)


def test_the_forwarded_head_refuses_what_is_not_pairs_of_bytes() -> None:
    assert compiled is not None
    for raw in ([(b"a", "b")], [(b"a",)], [b"ab"], 3):
        with pytest.raises(TypeError):
            compiled.forwarded_head(b"GET", b"/", raw, "1.2.3.4", "http", 80)
