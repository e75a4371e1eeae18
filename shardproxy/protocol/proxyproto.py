"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-IO.

A layer-4 load balancer in front of shardproxy (AWS NLB, another HAProxy)
opens each connection with a header that says whom the connection really
comes from; ``[proxy] listen`` entries with ``accept_proxy = true`` read it,
from the addresses in ``trusted_proxies`` only (anyone else could claim any
address). Towards backends, ``send_proxy = "v2"`` on a pool sends one.

- :class:`HeaderReader` takes the first bytes of a connection and yields a
  :class:`ProxyHeader` once a whole v1 or v2 header has arrived (the version
  is told by the first bytes), or raises :class:`~shardproxy.handshake.Reject`
  (400, ``bad_proxy_header``). What follows the header is kept in
  ``trailing``: it is the HTTP request.
- :func:`encode_v2` and :func:`encode_v2_local` build the headers sent to
  backends (the LOCAL command for health checks: "the connection was
  established on purpose by the proxy without being relayed", §2.2).

Nothing here imports trio or touches a socket.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from shardproxy.protocol.errors import NEED_DATA, NeedData, Reject

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # §2.1: the longest v1 line, CRLF included
_V2_FIXED = 16  # signature, version/command, family/protocol, length
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_ADDRESS_BYTES = {_INET: 12, _INET6: 36}

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    # None when the header carries no addresses (v2 LOCAL, v1 UNKNOWN, a
    # family other than TCP over IPv4/IPv6): the connection's own are used.
    source: Address | None
    destination: Address | None


def _bad(detail: str) -> Reject:
    return Reject(400, "bad_proxy_header", f"malformed PROXY protocol header: {detail}")


class HeaderReader:
    """Reads one PROXY protocol header, v1 or v2, of at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._buffer = b""
        self.trailing = b""

    def feed(self, data: bytes) -> ProxyHeader | NeedData:
        """Feed bytes; ``b""`` means the peer closed its side."""
        if not data:
            raise _bad("connection closed before the header was complete")
        buffer = self._buffer = self._buffer + data
        if buffer[:1] == V1_PREFIX[:1]:
            if not V1_PREFIX.startswith(buffer[:6]):
                raise _bad("not a PROXY protocol header")
            return self._v1(buffer)
        if buffer[:1] == V2_SIGNATURE[:1]:
            if not V2_SIGNATURE.startswith(buffer[:12]):
                raise _bad("not a PROXY protocol header")
            return self._v2(buffer)
        raise _bad("the connection did not start with one (is accept_proxy meant here?)")

    def _v1(self, buffer: bytes) -> ProxyHeader | NeedData:
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise _bad("v1 line longer than 107 bytes")
            return NEED_DATA
        self.trailing = buffer[end + 2 :]
        return parse_v1(buffer[:end])

    def _v2(self, buffer: bytes) -> ProxyHeader | NeedData:
        if len(buffer) < _V2_FIXED:
            return NEED_DATA
        (length,) = struct.unpack_from("!H", buffer, 14)
        if _V2_FIXED + length > self._max:
            raise _bad(f"v2 header of {_V2_FIXED + length} bytes is over the limit")
        if len(buffer) < _V2_FIXED + length:
            return NEED_DATA
        self.trailing = buffer[_V2_FIXED + length :]
        return parse_v2(buffer[: _V2_FIXED + length])


def parse_v1(line: bytes) -> ProxyHeader:
    """``PROXY TCP4 SRC DST SPORT DPORT`` (no CRLF) → ProxyHeader (§2.1)."""
    parts = line.split(b" ")
    if parts[:2] == [b"PROXY", b"UNKNOWN"]:
        return ProxyHeader(1, None, None)  # the rest of the line is to be ignored
    if len(parts) != 6 or parts[0] != b"PROXY" or parts[1] not in (b"TCP4", b"TCP6"):
        raise _bad("v1 wants PROXY TCP4|TCP6 SRC DST SPORT DPORT, or PROXY UNKNOWN")
    version = 4 if parts[1] == b"TCP4" else 6
    src, dst = (_v1_address(p, version) for p in parts[2:4])
    sport, dport = (_v1_port(p) for p in parts[4:6])
    return ProxyHeader(1, (src, sport), (dst, dport))


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(f"{text[:45]!r} is not an IP address") from None
    if address.version != version:
        raise _bad(f"{address} is not an IPv{version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise _bad(f"{text[:8]!r} is not a port")
    return int(text)


def parse_v2(header: bytes) -> ProxyHeader:
    """A whole v2 header (signature included) → ProxyHeader (§2.2). TLVs
    after the addresses are skipped."""
    version, command = header[12] >> 4, header[12] & 0xF
    if version != 2:
        raise _bad(f"version {version} in a v2 header")
    if command not in (_LOCAL, _PROXY):
        raise _bad(f"unknown command {command:#x}")
    family, protocol = header[13] >> 4, header[13] & 0xF
    if command == _LOCAL or family in (_UNSPEC, _UNIX):
        return ProxyHeader(2, None, None)
    if family not in _ADDRESS_BYTES or protocol != _STREAM:
        raise _bad(f"family/protocol {header[13]:#04x} is not TCP over IPv4 or IPv6")
    body = header[_V2_FIXED:]
    if len(body) < _ADDRESS_BYTES[family]:
        raise _bad("address block shorter than its family needs")
    size = 4 if family == _INET else 16
    src = str(ipaddress.ip_address(body[:size]))
    dst = str(ipaddress.ip_address(body[size : 2 * size]))
    sport, dport = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(2, (src, sport), (dst, dport))


def is_trusted(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a peer at ``ip`` may send a PROXY header (an IPv4 peer on a
    dual-stack socket, ``::ffff:a.b.c.d``, counts as a.b.c.d)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def encode_v2(source: Address, destination: Address) -> bytes:
    """A v2 PROXY header for a TCP connection from ``source`` to ``destination``
    (an IPv4 address beside an IPv6 one is written IPv4-mapped)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        src, dst = (
            a if a.version == 6 else ipaddress.IPv6Address(f"::ffff:{a}") for a in (src, dst)
        )
    family = _INET if src.version == 4 else _INET6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x20 | _PROXY, family << 4 | _STREAM]) + _length(body) + body


def encode_v2_local() -> bytes:
    """A v2 LOCAL header: no addresses; the backend uses the connection's own."""
    return V2_SIGNATURE + bytes([0x20 | _LOCAL, 0]) + _length(b"")


def _length(body: bytes) -> bytes:
    return struct.pack("!H", len(body))
