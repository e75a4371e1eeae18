"""A worker's tunnels, with no Python object of their own.

The relay keeps a token and a note per tunnel (engine/api.py's
``TunnelEngine.add``). Here the token is a :class:`Placement`: what every
tunnel of one route to one endpoint through one tuple space, with the same
path, user agent and forwarded address, has in common; one object for all
of them, kept by :class:`Placements` while a tunnel holds it. The note is
what is the tunnel's own: its client's address and port and its upstream
source port, packed into at most 20 bytes (:func:`pack_note`) that the
compiled relay keeps inside its C struct. So an idle tunnel costs the worker
nothing in Python; its end brings both back (:func:`unpack_note`), and the
lease's holdings, handed over when the tunnel came up, go back then.

The tunnels of an endpoint are those whose placement has that endpoint:
``relay.tunnels(placements.of_endpoint(e))``, one pass in C over the
tunnels, only when an endpoint goes down.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shardproxy.policy.admission import UpstreamTuple
from shardproxy.policy.registry import EndpointState

_PORTS = struct.Struct("!HH")  # client port, source port


@dataclass(eq=False, slots=True)
class Placement:
    """What many tunnels share (compared by identity)."""

    route: Any  # RouteConfig
    endpoint: EndpointState
    space: UpstreamTuple
    path: str
    user_agent: str | None
    forwarded_ip: str | None
    client_ip: str | None = None  # only for an address no note can hold (see pack_note)
    tunnels: int = field(default=0)  # how many hold it


class Placements:
    """The placements tunnels hold now: one per distinct combination."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[Any, ...], Placement] = {}
        self._by_endpoint: dict[EndpointState, set[Placement]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def take(
        self,
        route: Any,
        endpoint: EndpointState,
        space: UpstreamTuple,
        path: str,
        user_agent: str | None,
        forwarded_ip: str | None,
        client_ip: str | None = None,
    ) -> Placement:
        """The placement of that combination, held once more."""
        key = (id(route), id(endpoint), id(space), path, user_agent, forwarded_ip, client_ip)
        p = self._by_key.get(key)
        if p is None:
            p = Placement(route, endpoint, space, path, user_agent, forwarded_ip, client_ip)
            self._by_key[key] = p
            self._by_endpoint.setdefault(endpoint, set()).add(p)
        p.tunnels += 1
        return p

    def give_back(self, p: Placement) -> None:
        """One tunnel less holds ``p``; the last one lets it go."""
        p.tunnels -= 1
        if p.tunnels:
            return
        key = (
            id(p.route), id(p.endpoint), id(p.space), p.path, p.user_agent, p.forwarded_ip,
            p.client_ip,
        )  # fmt: skip
        del self._by_key[key]
        same = self._by_endpoint[p.endpoint]
        same.discard(p)
        if not same:
            del self._by_endpoint[p.endpoint]

    def of_endpoint(self, endpoint: EndpointState) -> set[Placement]:
        return self._by_endpoint.get(endpoint, set())


class Peer(NamedTuple):
    """A tunnel's own, from its note."""

    client_ip: str | None  # None: the placement holds it
    client_port: int
    source_port: int


def pack_note(client_ip: str, client_port: int, source_port: int) -> tuple[bytes, str | None]:
    """The note of a tunnel (the two ports, then 4 or 16 address bytes),
    and the address if the note could not hold it (an IPv6 address with a
    zone, ``fe80::1%eth0``: its placement holds it then)."""
    ports = _PORTS.pack(client_port, source_port)
    family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
    try:
        return ports + socket.inet_pton(family, client_ip), None
    except OSError:
        return ports, client_ip


def unpack_note(note: bytes) -> Peer:
    client_port, source_port = _PORTS.unpack_from(note)
    address = note[_PORTS.size :]
    if not address:
        return Peer(None, client_port, source_port)
    family = socket.AF_INET6 if len(address) == 16 else socket.AF_INET
    return Peer(socket.inet_ntop(family, address), client_port, source_port)
