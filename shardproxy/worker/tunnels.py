"""A worker's tunnels, with no Python object of their own.

The relay keeps a token and a note per tunnel (engine/api.py's
``TunnelEngine.add``). Here the token is a :class:`Placement`: what every
tunnel of one route to one endpoint through one tuple space, with the same
path and user agent, has in common; one object for all of them, kept by
:class:`Placements` while a tunnel holds it (and a while after, for the
next tunnel like it). The note is what is the
tunnel's own: its client's address and port, its upstream source port and
the X-Forwarded-For address it came with, packed into at most 37 bytes
(:func:`pack_note`) that the compiled relay keeps inside its C struct. So
an idle tunnel costs the worker nothing in Python; its end brings both
back (:func:`note_fields`), and the lease's holdings, handed over when the
tunnel came up, go back then.

The tunnels of an endpoint are those whose placement has that endpoint:
``relay.tunnels(placements.of_endpoint(e))``, one pass in C over the
tunnels, only when an endpoint goes down.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardproxy.engine import choice
from shardproxy.policy.admission import UpstreamTuple
from shardproxy.policy.registry import EndpointState


@dataclass(eq=False, slots=True)
class Placement:
    """What many tunnels share (compared by identity)."""

    route: Any  # RouteConfig
    endpoint: EndpointState
    space: UpstreamTuple
    path: str
    user_agent: str | None
    # Only for an address no note can hold (see pack_note): None otherwise.
    client_ip: str | None = None
    forwarded_ip: str | None = None
    tunnels: int = field(default=0)  # how many hold it
    # The access event's format for its tunnels (worker/access.py), once made.
    access_template: tuple[int, bytes | None] | None = field(default=None, repr=False)
    # and the compiled relay's form of it (access.summary_form), once made.
    summary_form: tuple[tuple[int, bool], tuple[bytes, ...] | None] | None = field(
        default=None, repr=False
    )

    def key(self) -> tuple[Any, ...]:
        return _key(
            self.route, self.endpoint, self.space, self.path, self.user_agent, self.client_ip,
            self.forwarded_ip,
        )  # fmt: skip


def _key(
    route: Any,
    endpoint: EndpointState,
    space: UpstreamTuple,
    path: str,
    user_agent: str | None,
    client_ip: str | None,
    forwarded_ip: str | None,
) -> tuple[Any, ...]:
    return (id(route), id(endpoint), id(space), path, user_agent, client_ip, forwarded_ip)


_IDLE_KEPT = 1024  # Placements' placements no tunnel holds, kept for their next tunnel


class Placements:
    """The placements tunnels hold now: one per distinct combination.

    A placement the last of its tunnels gave back is kept a while (the
    latest :data:`_IDLE_KEPT`), so that the next tunnel of the same
    combination finds it with its access template and summary form made:
    where tunnels come and go one at a time, making those again cost a
    handshake more than all the rest of its Python. A kept placement holds
    its route, endpoint and space, so their ids in its key cannot be
    another object's (and a server that left stays referenced until newer
    placements push it out: at most :data:`_IDLE_KEPT` of them)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[Any, ...], Placement] = {}
        self._by_endpoint: dict[EndpointState, set[Placement]] = {}
        self._idle: dict[tuple[Any, ...], Placement] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._by_key)

    def take(
        self,
        route: Any,
        endpoint: EndpointState,
        space: UpstreamTuple,
        path: str,
        user_agent: str | None,
        client_ip: str | None = None,
        forwarded_ip: str | None = None,
    ) -> Placement:
        """The placement of that combination, held once more (``client_ip``
        and ``forwarded_ip``: what the note could not hold, else None)."""
        key = _key(route, endpoint, space, path, user_agent, client_ip, forwarded_ip)
        p = self._by_key.get(key)
        if p is None:
            p = self._idle.pop(key, None) or Placement(
                route, endpoint, space, path, user_agent, client_ip, forwarded_ip
            )
            self._by_key[key] = p
            self._by_endpoint.setdefault(endpoint, set()).add(p)
        p.tunnels += 1
        return p

    def give_back(self, p: Placement, count: int = 1) -> None:
        """One tunnel (or ``count``) less holds ``p``; the last one lets it go."""
        p.tunnels -= count
        if p.tunnels:
            return
        key = p.key()
        del self._by_key[key]
        same = self._by_endpoint[p.endpoint]
        same.discard(p)
        if not same:
            del self._by_endpoint[p.endpoint]
        idle = self._idle
        idle[key] = p
        if len(idle) > _IDLE_KEPT:
            del idle[next(iter(idle))]

    def of_endpoint(self, endpoint: EndpointState) -> set[Placement]:
        return self._by_endpoint.get(endpoint, set())


# The note: a byte saying how long each address is, the two ports, the
# client's address (4 or 16 bytes, or 0: its placement holds it), the
# forwarded address (4, 16, or 0: none, or its placement holds it).
_HEAD = struct.Struct("!BHH")  # address kinds (client << 2 | forwarded), client port, source port
_KINDS = (0, 4, 16)  # an address kind: its length in the note


def _packed(address: str | None) -> tuple[bytes, str | None]:
    """The address's bytes, or b"" and the address when it has no packed
    form (``fe80::1%eth0``: the zone)."""
    if address is None:
        return b"", None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return socket.inet_pton(family, address), None
    except OSError:
        return b"", address


def py_pack_note(
    client_ip: str | None, client_port: int, source_port: int, forwarded_ip: str | None = None
) -> tuple[bytes, str | None, str | None]:
    """A tunnel's note (at most 37 bytes), and the addresses it could not
    hold (the placement keeps those)."""
    if not (0 <= client_port <= 65535 and 0 <= source_port <= 65535):
        raise ValueError("pack_note: a port is 0 to 65535")
    client, client_left = _packed(client_ip)
    forwarded, forwarded_left = _packed(forwarded_ip)
    kinds = _KINDS.index(len(client)) << 2 | _KINDS.index(len(forwarded))
    head = _HEAD.pack(kinds, client_port, source_port)
    return head + client + forwarded, client_left, forwarded_left


def py_note_fields(note: bytes) -> tuple[str | None, int, int, bytes | None]:
    """A note's client address (as the kernel's getpeername writes it:
    inet_ntop), ports and forwarded address bytes; None: not in the note."""
    if len(note) < _HEAD.size:
        raise ValueError("note_fields: not a note")
    kinds, client_port, source_port = _HEAD.unpack_from(note)
    if kinds >> 2 > 2 or kinds & 3 > 2:
        raise ValueError("note_fields: not a note")
    client_len, forwarded_len = _KINDS[kinds >> 2], _KINDS[kinds & 3]
    at = _HEAD.size
    if len(note) < at + client_len + forwarded_len:
        raise ValueError("note_fields: not a note")
    client = note[at : at + client_len]
    forwarded = note[at + client_len : at + client_len + forwarded_len]
    client_ip = None
    if client:
        family = socket.AF_INET6 if len(client) == 16 else socket.AF_INET
        client_ip = socket.inet_ntop(family, client)
    return client_ip, client_port, source_port, forwarded or None


# The compiled module's twins where it was built (once per tunnel each;
# tests/unit/test_placements.py holds them to these).
pack_note: Callable[..., tuple[bytes, str | None, str | None]] = (
    py_pack_note if choice.COMPILED is None else choice.COMPILED.pack_note
)
note_fields: Callable[[bytes], tuple[str | None, int, int, bytes | None]] = (
    py_note_fields if choice.COMPILED is None else choice.COMPILED.note_fields
)


def forwarded_text(packed: bytes) -> str:
    """A note's forwarded address in the form it went in: as
    UpgradeRequest.forwarded_ip writes it (ipaddress: "::ffff:102:304")."""
    return str(ipaddress.ip_address(packed))
