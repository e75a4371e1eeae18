"""HTTP/1.x message heads, parsed strictly and fast, sans-IO.

The handshake path parses two heads per tunnel (the client's request and the
backend's 101). h11 does it correctly but generically, at about 40 µs a head;
that alone was more than the CPU budget of a whole proxied handshake. A head
is small and its grammar simple (RFC 9112 §2-§5), so this module parses it
with ``bytes`` methods and three precompiled patterns, and is just as strict
about what matters to a proxy:

- the start line has exactly three parts separated by single spaces (§3, §4);
- field names are tokens with no whitespace before the colon (§5.1: a server
  MUST reject such a message with 400, it is a smuggling vector);
- obsolete line folding is rejected (§5.2), as are control characters in
  field values (§5: CR, LF and NUL are invalid; RFC 9110 §5.5);
- lines end with CRLF; a bare LF is a control character and rejected.

h11 remains the parser of non-101 answers' bodies (chunked and friends), a
rare path that is not worth a second framing implementation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible characters only: the request-target has no spaces or controls.
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
# Field values: controls other than HTAB are not allowed (RFC 9110 §5.5).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_STATUS = re.compile(rb"[0-9]{3}")

END: Final = b"\r\n\r\n"

Headers = list[tuple[bytes, bytes]]  # (name as sent, value), in order


class HeadError(ValueError):
    """The head is not valid HTTP/1.x; the message says what is wrong."""


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the empty line ending the head, or -1 if not there yet."""
    i = buffer.find(END, start)
    return -1 if i < 0 else i + 4


def parse_request(head: bytes) -> tuple[bytes, bytes, bytes, Headers]:
    """``head`` up to and including its empty line → (method, target, version, headers).

    Version is ``b"1.1"``-style. Raises :class:`HeadError`.
    """
    # §2.2: a server SHOULD ignore at least one empty line before the request line.
    head = head.lstrip(b"\r\n")
    line_end = head.find(b"\r\n")
    parts = head[:line_end].split(b" ")
    if len(parts) != 3:
        raise HeadError("request line is not 'method target version'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HeadError("invalid method")
    if not _TARGET.fullmatch(target):
        raise HeadError("invalid request target")
    if not _VERSION.fullmatch(version):
        raise HeadError("invalid HTTP version")
    return method, target, version[5:], _fields(head, line_end)


def parse_response(head: bytes) -> tuple[bytes, int, bytes, Headers]:
    """``head`` → (version, status, reason, headers). Raises :class:`HeadError`."""
    line_end = head.find(b"\r\n")
    version, _, rest = head[:line_end].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if not _VERSION.fullmatch(version):
        raise HeadError("invalid HTTP version in the status line")
    if not _STATUS.fullmatch(status):
        raise HeadError("invalid status code")
    if _CTL.search(reason):
        raise HeadError("invalid reason phrase")
    return version[5:], int(status), reason, _fields(head, line_end)


def _fields(head: bytes, line_end: int) -> Headers:
    fields: Headers = []
    body = head[line_end + 2 : -4]
    if not body:
        return fields
    for line in body.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            if line[:1] in (b" ", b"\t"):
                raise HeadError("obsolete line folding is not allowed")
            raise HeadError(f"invalid header line {line[:40]!r}")
        value = value.strip(b" \t")
        if _CTL.search(value):
            raise HeadError(f"invalid character in header {name.decode('latin-1')}")
        fields.append((name, value))
    return fields


# An upgrade request as protocol/upgrade.py's UpgradeRequest takes it: method,
# target, raw headers, lower-cased headers, host, path.
_Pairs = tuple[tuple[bytes, bytes], ...]
UpgradeFields = tuple[bytes, bytes, _Pairs, _Pairs, str, str]


def no_fast_upgrade(buffer: bytes, end: int) -> UpgradeFields | None:
    """HeadParsers.parse_upgrade of this module: None, so that every head
    takes :func:`parse_request` and ``upgrade.validate_upgrade``."""
    return None


_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port")


def forwarded_head(
    method: bytes,
    target: bytes,
    raw_headers: Sequence[tuple[bytes, bytes]],
    client_ip: str,
    proto: str,
    port: int,
) -> bytes:
    """A request head for the backend: the request line (as HTTP/1.1) and
    ``raw_headers``, with X-Forwarded-For appended to (the chain grows by
    one hop, as nginx's $proxy_add_x_forwarded_for does) and
    X-Forwarded-Proto and -Port replaced by the listener's."""
    prior = [v for n, v in raw_headers if n.lower() == b"x-forwarded-for"]
    fields = [n + b": " + v for n, v in raw_headers if n.lower() not in _FORWARDED]
    fields.append(b"X-Forwarded-For: " + b", ".join([*prior, client_ip.encode()]))
    fields.append(b"X-Forwarded-Proto: " + proto.encode())
    fields.append(b"X-Forwarded-Port: " + str(port).encode())
    return b"\r\n".join([method + b" " + target + b" HTTP/1.1", *fields]) + b"\r\n\r\n"


class HeadParsers(NamedTuple):
    """The functions of this module as a set, so that a caller can be
    handed another implementation of them: the compiled engine has one in C
    (``engine/_chttp.c``) that gives the same results and raises the same
    :class:`HeadError` for any bytes (tests/unit/test_chttp.py).

    ``parse_upgrade(buffer, end)`` is a fast path for the common upgrade
    request: the fields of ``buffer[:end]`` when ``upgrade.validate_upgrade``
    would accept it, or None, and then the reference path decides. The C
    one answers for the usual head; this module's answers None.

    ``forwarded_head`` builds the head the backend gets (:func:`forwarded_head`);
    the C one gives the same bytes (tests/unit/test_chttp.py)."""

    head_end: Callable[[bytes, int], int]
    parse_request: Callable[[bytes], tuple[bytes, bytes, bytes, Headers]]
    parse_response: Callable[[bytes], tuple[bytes, int, bytes, Headers]]
    parse_upgrade: Callable[[bytes, int], UpgradeFields | None] = no_fast_upgrade
    forwarded_head: Callable[
        [bytes, bytes, Sequence[tuple[bytes, bytes]], str, str, int], bytes
    ] = forwarded_head


PARSERS: Final = HeadParsers(head_end, parse_request, parse_response)
