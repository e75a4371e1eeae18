"""The PROXY protocol reader and writer, sans-IO: each header read whole,
one byte at a time and with the request behind it; malformed headers
refused with a 400; what we write read back (HAProxy reads it too, in
test_proxy_protocol.py)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.protocol.proxyproto import (
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeader,
    encode_v2,
    encode_v2_local,
    is_trusted,
)
from shardproxy.protocol.upgrade import NEED_DATA, Reject

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


GOOD = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n",
     ProxyHeader(1, ("192.0.2.7", 56324), ("198.51.100.1", 443))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 8080\r\n",
     ProxyHeader(1, ("2001:db8::7", 65535), ("2001:db8::1", 8080))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1, None, None)),
    (v2(1, 0x11, bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 1, 2)),
     ProxyHeader(2, ("192.0.2.7", 1), ("198.51.100.1", 2))),
    (v2(1, 0x21, ipaddress.IPv6Address("2001:db8::7").packed
        + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", 3, 4)),
     ProxyHeader(2, ("2001:db8::7", 3), ("::1", 4))),
    # TLVs after the addresses (AWS NLB sends its VPC endpoint id so) are skipped.
    (v2(1, 0x11, bytes(8) + struct.pack("!HH", 5, 6) + b"\xea\x00\x03abc"),
     ProxyHeader(2, ("0.0.0.0", 5), ("0.0.0.0", 6))),
    (encode_v2_local(), ProxyHeader(2, None, None)),
    (v2(1, 0x00, b""), ProxyHeader(2, None, None)),  # PROXY, AF_UNSPEC
]  # fmt: skip


@pytest.mark.parametrize(("wire", "header"), GOOD)
def test_a_header_read_whole_bytewise_and_with_the_request_behind_it(
    wire: bytes, header: ProxyHeader
) -> None:
    reader = HeaderReader(16384)
    assert reader.feed(wire) == header and reader.trailing == b""

    reader = HeaderReader(16384)
    results = [reader.feed(wire[i : i + 1]) for i in range(len(wire))]
    assert results[:-1] == [NEED_DATA] * (len(wire) - 1) and results[-1] == header

    reader = HeaderReader(16384)
    assert reader.feed(wire + REQUEST) == header and reader.trailing == REQUEST


BAD = [
    (REQUEST, "did not start with one"),
    (b"PROXZ TCP4", "not a PROXY protocol header"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "v1 wants"),
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n", "v1 wants"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n", "not an IP address"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n", "not a port"),
    (b"PROXY " + b"x" * 200, "longer than 107"),
    (V2_SIGNATURE[:5] + b"X", "not a PROXY protocol header"),
    (V2_SIGNATURE + bytes([0x11, 0x11, 0, 0]), "version 1"),
    (V2_SIGNATURE + bytes([0x22, 0x11, 0, 0]), "unknown command"),
    (v2(1, 0x12, bytes(12)), "not TCP"),  # UDP
    (v2(1, 0x11, bytes(11)), "shorter than"),
    (V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]), "over the limit"),
]


@pytest.mark.parametrize(("wire", "says"), BAD)
def test_a_malformed_header_is_refused_with_400(wire: bytes, says: str) -> None:
    with pytest.raises(Reject) as refused:
        reader = HeaderReader(16384)
        for i in range(len(wire)):  # as early as the bytes tell
            reader.feed(wire[i : i + 1])
    assert refused.value.status == 400 and refused.value.reason == "bad_proxy_header"
    assert says in refused.value.detail


def test_a_peer_that_closes_mid_header_is_refused() -> None:
    reader = HeaderReader(16384)
    assert reader.feed(b"PROXY TCP4") is NEED_DATA
    with pytest.raises(Reject, match="closed before"):
        reader.feed(b"")


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_data_or_a_400(data: bytes) -> None:
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        reader = HeaderReader(16384)
        try:
            for chunk in chunks:
                if chunk and isinstance(reader.feed(chunk), ProxyHeader):
                    break
        except Reject as r:
            assert r.status == 400


@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_what_we_send_reads_back(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
) -> None:
    header = HeaderReader(16384).feed(encode_v2((str(src), sport), (str(dst), dport)))
    assert isinstance(header, ProxyHeader) and header.version == 2
    assert header.source is not None and header.destination is not None
    if src.version == dst.version:
        assert header.source == (str(src), sport) and header.destination == (str(dst), dport)
    else:  # mixed families travel as IPv6, the IPv4 one mapped
        mapped = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        assert ipaddress.IPv6Address(header.source[0]) == mapped and header.source[1] == sport


def test_trust_is_by_network_and_sees_through_mapped_addresses() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert is_trusted("10.1.2.3", nets) and is_trusted("::ffff:10.1.2.3", nets)
    assert is_trusted("2001:db8::5", nets)
    assert not is_trusted("11.0.0.1", nets) and not is_trusted("::1", nets)
    assert not is_trusted("10.0.0.1", ())
