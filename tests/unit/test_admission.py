"""The admission lease (policy/admission.py): what a connection takes is
given back once, whatever path reaches the release."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardproxy.config import PoolConfig, ServerConfig
from shardproxy.policy.admission import Admission
from shardproxy.policy.registry import EndpointState, PoolRegistry


class Space:
    """An upstream tuple space that records the ports given back."""

    def __init__(self) -> None:
        self.released: list[int] = []

    def release(self, port: int, count: int = 1) -> None:
        self.released += [port] * count


def endpoints() -> tuple[EndpointState, EndpointState]:
    servers = (ServerConfig(name="a", address="10.0.0.1", ports=(80, 81), weight=1),)
    pool = PoolRegistry(PoolConfig(name="p", balance="least_conn", hash_key=None, servers=servers))
    e0, e1 = pool["a"].endpoints
    return e0, e1


def test_slots_count_against_capacity_and_come_back_once() -> None:
    admission = Admission(2)
    first, second = admission.lease("10.1.1.1"), admission.lease("10.1.1.2")
    assert not admission.has_room and not admission.over_capacity
    third = admission.lease("10.1.1.3")  # granted, to be answered 503
    assert admission.over_capacity
    third.release()
    third.release()
    assert admission.in_use == 2 and third.released
    first.release()
    second.release()
    assert admission.in_use == 0 and admission.has_room


def test_the_upstream_is_held_moved_and_given_back_once() -> None:
    e0, e1 = endpoints()
    space = Space()
    lease = Admission(10).lease("10.1.1.1")
    lease.hold_upstream(e0, space, 40001)
    assert (e0.active, e0.server.active) == (1, 1)
    lease.hold_upstream(e1, space, 40002)  # the next server after a failed connect
    assert (e0.active, e1.active, space.released) == (0, 1, [40001])
    lease.release()
    lease.release()
    lease.drop_upstream()  # after release: nothing more
    assert (e1.active, e1.server.active, space.released) == (0, 0, [40001, 40002])
    assert lease.endpoint is e1 and lease.source_port == 40002  # still readable for the log


@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535))
def test_the_two_ports_share_one_int_without_mixing(client: int, source: int, other: int) -> None:
    lease = Admission(1).lease("10.1.1.1")
    lease.client_port = client
    lease.source_port = source
    assert (lease.client_port, lease.source_port) == (client, source)
    lease.source_port = other
    assert (lease.client_port, lease.source_port) == (client, other)
    lease.client_port = other
    assert (lease.client_port, lease.source_port) == (other, other)
