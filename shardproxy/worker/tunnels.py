"""A worker's tunnels: one record each, indexed by backend endpoint and by
client address.

A :class:`TunnelRecord` is the connection's admission lease (slot, client
address, route, endpoint, upstream tuple) and what its access event needs;
once its tunnel is up it also carries the relay's tunnel id, so that the
tunnels of an endpoint that went down, or of one client, are found without
looking at every tunnel (the relay finds a record by id: ``engine.token``).

The indexes are intrusive doubly linked lists, as HAProxy links a stream
into its server's list: two links per index on the record (16 bytes) and
one head per endpoint or address, no set or dict entry per tunnel, O(1) in
and out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shardproxy.policy.admission import Admission, AdmissionLease


class TunnelRecord(AdmissionLease):
    """A connection's admission lease, and what its access event needs
    besides once it is a tunnel: one record per tunnel, released when it ends."""

    __slots__ = (
        "_client_next",
        "_client_prev",
        "_endpoint_next",
        "_endpoint_prev",
        "forwarded_ip",
        "path",
        "tunnel",
        "user_agent",
    )

    def __init__(self, admission: Admission, client_ip: str) -> None:
        super().__init__(admission, client_ip)
        self.path = ""
        self.user_agent: str | None = None
        self.forwarded_ip: str | None = None
        self.tunnel = 0  # the relay's id, once indexed
        self._endpoint_prev: TunnelRecord | None = None
        self._endpoint_next: TunnelRecord | None = None
        self._client_prev: TunnelRecord | None = None
        self._client_next: TunnelRecord | None = None


class _Chains:
    """Intrusive doubly linked lists of records, one list per key, through
    two slots of each record (``prev_slot`` and ``next_slot``)."""

    __slots__ = ("_heads", "_next", "_prev")

    def __init__(self, prev_slot: str, next_slot: str) -> None:
        self._heads: dict[Any, TunnelRecord] = {}  # key -> newest record
        self._prev = prev_slot
        self._next = next_slot

    def holds(self, key: Any, record: TunnelRecord) -> bool:
        return getattr(record, self._prev) is not None or self._heads.get(key) is record

    def push(self, key: Any, record: TunnelRecord) -> None:
        head = self._heads.get(key)
        setattr(record, self._next, head)
        if head is not None:
            setattr(head, self._prev, record)
        self._heads[key] = record

    def unlink(self, key: Any, record: TunnelRecord) -> None:
        prev, nxt = getattr(record, self._prev), getattr(record, self._next)
        if nxt is not None:
            setattr(nxt, self._prev, prev)
        if prev is not None:
            setattr(prev, self._next, nxt)
        elif nxt is not None:
            self._heads[key] = nxt
        else:
            del self._heads[key]
        setattr(record, self._prev, None)
        setattr(record, self._next, None)

    def of(self, key: Any) -> list[TunnelRecord]:
        out = []
        record = self._heads.get(key)
        while record is not None:
            out.append(record)
            record = getattr(record, self._next)
        return out

    def keys(self) -> Iterator[Any]:
        return iter(self._heads)


class TunnelIndex:
    """The open tunnels of a worker by endpoint and by client address."""

    def __init__(self) -> None:
        self._by_endpoint = _Chains("_endpoint_prev", "_endpoint_next")  # by EndpointState
        self._by_client = _Chains("_client_prev", "_client_next")  # by client address
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, record: TunnelRecord, tunnel: int) -> None:
        """Index ``record``, whose tunnel has relay id ``tunnel``. Its
        endpoint and client address must not change until :meth:`remove`."""
        record.tunnel = tunnel
        self._by_endpoint.push(record.endpoint, record)
        self._by_client.push(record.client_ip, record)
        self._count += 1

    def remove(self, record: TunnelRecord) -> None:
        """Take ``record`` out (nothing happens if it is not in)."""
        if not self._by_endpoint.holds(record.endpoint, record):
            return
        self._by_endpoint.unlink(record.endpoint, record)
        self._by_client.unlink(record.client_ip, record)
        self._count -= 1

    def of_endpoint(self, endpoint: Any) -> list[TunnelRecord]:
        """The tunnels to ``endpoint`` (an EndpointState), newest first."""
        return self._by_endpoint.of(endpoint)

    def of_client(self, client_ip: str) -> list[TunnelRecord]:
        """The tunnels of one client address, newest first."""
        return self._by_client.of(client_ip)

    def clients(self) -> Iterator[str]:
        """Every client address that holds a tunnel."""
        return self._by_client.keys()
