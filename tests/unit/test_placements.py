"""What the worker gives the relay per tunnel (worker/tunnels.py): a
placement shared by similar tunnels, and a note of its own that round-trips
every client address and port."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from shardproxy.engine.api import NOTE_BYTES
from shardproxy.worker.tunnels import Placements, pack_note, unpack_note

ROUTE, SPACE = object(), object()
EP1, EP2 = object(), object()  # stand-ins: placements compare them by identity


ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(ADDRESSES, st.integers(0, 65535), st.integers(0, 65535), st.none() | ADDRESSES)
def test_a_note_holds_any_addresses_and_ports(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    client_port: int,
    source_port: int,
    forwarded: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
) -> None:
    fwd = None if forwarded is None else str(forwarded)
    note = pack_note(str(address), client_port, source_port, fwd)
    assert (note.client_ip, note.forwarded_ip) == (None, None) and len(note.note) <= NOTE_BYTES
    peer = unpack_note(note.note)
    assert ipaddress.ip_address(peer.client_ip or "") == address
    assert (peer.client_port, peer.source_port) == (client_port, source_port)
    assert peer.forwarded_ip == (None if forwarded is None else str(ipaddress.ip_address(fwd)))


def test_an_address_with_a_zone_stays_out_of_the_note() -> None:
    note = pack_note("fe80::1%eth0", 1234, 5678, "fe80::2%eth1")
    assert (note.client_ip, note.forwarded_ip) == ("fe80::1%eth0", "fe80::2%eth1")
    assert unpack_note(note.note) == (None, 1234, 5678, None)


def test_similar_tunnels_share_one_placement_until_the_last_goes() -> None:
    placements = Placements()
    a = placements.take(ROUTE, EP1, SPACE, "/chat", "ua", None)  # type: ignore[arg-type]
    b = placements.take(ROUTE, EP1, SPACE, "/chat", "ua", None)  # type: ignore[arg-type]
    other = placements.take(ROUTE, EP2, SPACE, "/chat", "ua", None)  # type: ignore[arg-type]
    assert a is b and a is not other and (a.tunnels, len(placements)) == (2, 2)
    assert placements.of_endpoint(EP1) == {a}  # type: ignore[arg-type]
    placements.give_back(a)
    assert placements.of_endpoint(EP1) == {a}  # type: ignore[arg-type]
    placements.give_back(b)
    assert placements.of_endpoint(EP1) == set() and len(placements) == 1  # type: ignore[arg-type]
    again = placements.take(ROUTE, EP1, SPACE, "/chat", "ua", None)  # type: ignore[arg-type]
    assert again is not a and again.tunnels == 1  # a fresh one: its count starts over
