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


class TunnelIndex:
    """The open tunnels of a worker by endpoint and by client address."""

    def __init__(self) -> None:
        self._by_endpoint: dict[Any, TunnelRecord] = {}  # EndpointState -> first record
        self._by_client: dict[str, TunnelRecord] = {}  # client address -> first record
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, record: TunnelRecord, tunnel: int) -> None:
        """Index ``record``, whose tunnel has relay id ``tunnel``. Its
        endpoint and client address must not change until :meth:`remove`."""
        record.tunnel = tunnel
        head = self._by_endpoint.get(record.endpoint)
        record._endpoint_next = head
        if head is not None:
            head._endpoint_prev = record
        self._by_endpoint[record.endpoint] = record
        head = self._by_client.get(record.client_ip)
        record._client_next = head
        if head is not None:
            head._client_prev = record
        self._by_client[record.client_ip] = record
        self._count += 1

    def remove(self, record: TunnelRecord) -> None:
        """Take ``record`` out (nothing happens if it is not in)."""
        if record._endpoint_prev is None and self._by_endpoint.get(record.endpoint) is not record:
            return
        prev, nxt = record._endpoint_prev, record._endpoint_next
        if nxt is not None:
            nxt._endpoint_prev = prev
        if prev is not None:
            prev._endpoint_next = nxt
        elif nxt is not None:
            self._by_endpoint[record.endpoint] = nxt
        else:
            del self._by_endpoint[record.endpoint]
        prev, nxt = record._client_prev, record._client_next
        if nxt is not None:
            nxt._client_prev = prev
        if prev is not None:
            prev._client_next = nxt
        elif nxt is not None:
            self._by_client[record.client_ip] = nxt
        else:
            del self._by_client[record.client_ip]
        record._endpoint_prev = record._endpoint_next = None
        record._client_prev = record._client_next = None
        self._count -= 1

    def of_endpoint(self, endpoint: Any) -> list[TunnelRecord]:
        """The tunnels to ``endpoint`` (an EndpointState), newest first."""
        out = []
        record = self._by_endpoint.get(endpoint)
        while record is not None:
            out.append(record)
            record = record._endpoint_next
        return out

    def of_client(self, client_ip: str) -> list[TunnelRecord]:
        """The tunnels of one client address, newest first."""
        out = []
        record = self._by_client.get(client_ip)
        while record is not None:
            out.append(record)
            record = record._client_next
        return out

    def clients(self) -> Iterator[str]:
        """Every client address that holds a tunnel."""
        return iter(self._by_client)
