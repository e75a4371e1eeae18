"""What the worker gives the relay per tunnel (worker/tunnels.py): a
placement shared by similar tunnels, and a note of its own that round-trips
every client address and port."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.engine import choice
from shardproxy.engine.api import NOTE_BYTES
from shardproxy.worker import tunnels
from shardproxy.worker.tunnels import Placements, forwarded_text, note_fields, pack_note

ROUTE, SPACE = object(), object()


def unpack_note(note: bytes) -> tuple[str | None, int, int, str | None]:
    """What the worker reads back from a note at a tunnel's end (its
    tunnel_closed): the addresses as text, the ports."""
    client_ip, client_port, source_port, forwarded = note_fields(note)
    return (
        client_ip,
        client_port,
        source_port,
        None if forwarded is None else forwarded_text(forwarded),
    )


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
    note, client_left, forwarded_left = pack_note(str(address), client_port, source_port, fwd)
    assert (client_left, forwarded_left) == (None, None) and len(note) <= NOTE_BYTES
    client_ip, peer_client_port, peer_source_port, forwarded_ip = unpack_note(note)
    assert ipaddress.ip_address(client_ip or "") == address
    assert (peer_client_port, peer_source_port) == (client_port, source_port)
    assert forwarded_ip == (None if forwarded is None else str(ipaddress.ip_address(fwd)))


def test_an_address_with_a_zone_stays_out_of_the_note() -> None:
    note, client_left, forwarded_left = pack_note("fe80::1%eth0", 1234, 5678, "fe80::2%eth1")
    assert (client_left, forwarded_left) == ("fe80::1%eth0", "fe80::2%eth1")
    assert unpack_note(note) == (None, 1234, 5678, None)


# -- the compiled twins (engine/_cengine.c) against the reference ----------------

compiled = pytest.mark.skipif(choice.COMPILED is None, reason="the compiled engine was not built")
TEXTS = ADDRESSES.map(str) | st.text(max_size=45) | st.sampled_from(["fe80::1%eth0", "1.2.3", ""])


def _outcome(f, *args):  # type: ignore[no-untyped-def]
    try:
        return repr(f(*args))
    except (ValueError, TypeError, OSError) as e:
        return type(e).__name__


@compiled
@given(st.none() | TEXTS, st.integers(-1, 65536), st.integers(-1, 65536), st.none() | TEXTS)
def test_the_compiled_note_is_the_references(
    client: str | None, client_port: int, source_port: int, forwarded: str | None
) -> None:
    """The same note and leftovers for any text (a zone, not an address, a
    NUL), the same refusal for a port out of range; and back."""
    assert choice.COMPILED is not None
    args = (client, client_port, source_port, forwarded)
    expected = _outcome(tunnels.py_pack_note, *args)
    assert _outcome(choice.COMPILED.pack_note, *args) == expected
    if not expected.startswith("("):
        return
    note = tunnels.py_pack_note(*args)[0]
    assert choice.COMPILED.note_fields(note) == tunnels.py_note_fields(note)


@compiled
@given(st.binary(max_size=40))
def test_any_bytes_give_both_note_readers_the_same_answer(note: bytes) -> None:
    assert choice.COMPILED is not None
    expected = _outcome(tunnels.py_note_fields, note)
    assert _outcome(choice.COMPILED.note_fields, note) == expected


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
    # The one let go, kept with what it made (its access forms); its count starts over.
    assert again is a and again.tunnels == 1 and placements.of_endpoint(EP1) == {a}  # type: ignore[arg-type]


def test_placements_no_tunnel_holds_are_kept_up_to_a_bound_oldest_out_first() -> None:
    placements = Placements()
    first = placements.take(ROUTE, EP1, SPACE, "/0", None, None)  # type: ignore[arg-type]
    placements.give_back(first)
    for i in range(1, tunnels._IDLE_KEPT + 1):  # as many others let go after it
        last = placements.take(ROUTE, EP1, SPACE, f"/{i}", None, None)  # type: ignore[arg-type]
        placements.give_back(last)
    assert len(placements) == 0 and placements.of_endpoint(EP1) == set()  # type: ignore[arg-type]
    newest = placements.take(ROUTE, EP1, SPACE, last.path, None, None)  # type: ignore[arg-type]
    assert newest is last and newest.tunnels == 1
    again = placements.take(ROUTE, EP1, SPACE, "/0", None, None)  # type: ignore[arg-type]
    assert again is not first and again.tunnels == 1  # the oldest went: a fresh one
