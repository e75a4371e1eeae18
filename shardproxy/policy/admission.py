"""What one connection holds, taken in one place and given back once.

Every connection a worker accepts holds an :class:`AdmissionLease` from
accept to the end of its tunnel (or of its refusal): a connection slot of the
worker (counted against its capacity), then the route it was sent to and,
while it has an upstream connection, the backend endpoint (its counts are
what least-connections balances on) and the upstream 4-tuple it uses.
:meth:`AdmissionLease.release` gives back whatever is held, and only once,
however many paths reach it: an upstream connect that failed gives back its
endpoint and tuple with :meth:`AdmissionLease.drop_upstream` and the lease
takes the next server's. A tunnel's owner may take the holdings over from
the lease (:meth:`AdmissionLease.hand_over`) and give them back itself
(:meth:`Admission.give_back`), so that an idle tunnel needs no lease object.
Per-client limits and per-server caps hook in here.

Pure accounting: no I/O, no clock. The tuple is anything with a
``release(port)`` (the engine's tuple spaces), so this module does not
depend on the engine.
"""

from __future__ import annotations

from typing import Any, Protocol

from shardproxy.policy.registry import EndpointState


class UpstreamTuple(Protocol):
    """The (source address, endpoint) space an upstream connection came from."""

    def release(self, port: int, count: int = 1) -> None: ...


class Admission:
    """A worker's connection slots: handshakes in flight plus tunnels, at
    most ``capacity`` (beyond it a connection is answered 503)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    @property
    def has_room(self) -> bool:
        return self.in_use < self.capacity

    @property
    def over_capacity(self) -> bool:
        return self.in_use > self.capacity

    def give_back(
        self,
        endpoint: EndpointState | None,
        space: UpstreamTuple | None,
        port: int,
        count: int = 1,
    ) -> None:
        """What a lease handed over (:meth:`AdmissionLease.hand_over`) comes
        back: the endpoint's count, the tuple's port and the slot; or what
        ``count`` such leases held, all from ``space`` with the same
        ``port`` (0: the kernel's choice)."""
        if endpoint is not None:
            endpoint.release(count)
        if space is not None:
            space.release(port, count)
        self.in_use -= count

    def lease(self, client_ip: str) -> AdmissionLease:
        """A lease for a new connection. It is granted even over capacity,
        so that the connection holds its slot while it is answered 503
        (check :attr:`over_capacity` right after)."""
        self.in_use += 1
        return AdmissionLease(self, client_ip)


class AdmissionLease:
    """One connection's share of the worker: see the module docstring."""

    __slots__ = ("_admission", "_ports", "client_ip", "endpoint", "route", "space")

    def __init__(self, admission: Admission, client_ip: str) -> None:
        self._admission: Admission | None = admission  # None once released
        self.client_ip = client_ip
        self.route: Any = None  # the RouteConfig, once routed
        self.endpoint: EndpointState | None = None
        self.space: UpstreamTuple | None = None
        # client_port << 16 | source_port: one int object per connection
        # instead of two (32 bytes less per tunnel).
        self._ports = 0

    @property
    def client_port(self) -> int:
        return self._ports >> 16

    @client_port.setter
    def client_port(self, port: int) -> None:
        self._ports = port << 16 | self._ports & 0xFFFF

    @property
    def source_port(self) -> int:
        """The upstream connection's; 0: none yet, or the kernel chose it
        (nothing to give back by number)."""
        return self._ports & 0xFFFF

    @source_port.setter
    def source_port(self, port: int) -> None:
        self._ports = self._ports & ~0xFFFF | port

    @property
    def released(self) -> bool:
        return self._admission is None

    def hold_upstream(self, endpoint: EndpointState, space: UpstreamTuple, port: int) -> None:
        """The connection now has an upstream connection to ``endpoint``
        from ``space``, source port ``port``."""
        assert self._admission is not None, "a released lease holds nothing"
        self.drop_upstream()
        endpoint.acquire()
        self.endpoint, self.space, self.source_port = endpoint, space, port

    def drop_upstream(self) -> None:
        """Give back the endpoint and the tuple (a connect failed, or the
        backend refused the upgrade); the slot stays."""
        if self._admission is None:  # released: nothing is held any more
            return
        if self.endpoint is not None:
            self.endpoint.release()
            self.endpoint = None
        if self.space is not None:
            self.space.release(self.source_port)
            self.space = None

    def release(self) -> None:
        """Give back everything; later calls do nothing. What it held stays
        readable (the access log reads it after): only the counts go back."""
        admission = self._admission
        if admission is None:
            return
        self._admission = None
        admission.give_back(self.endpoint, self.space, self.source_port)

    def hand_over(self) -> Admission:
        """The connection keeps what the lease holds but not the lease: its
        owner gives it all back later with :meth:`Admission.give_back`
        (endpoint, space and source port, as read from the lease now), and
        the lease itself can go (a tunnel then costs no lease object)."""
        admission = self._admission
        assert admission is not None, "a released lease holds nothing"
        self._admission = None
        return admission
