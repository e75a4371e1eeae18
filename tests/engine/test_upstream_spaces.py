"""Upstream connects in-process: tuple spaces towards an endpoint nobody
named at start are made the first time it is connected to."""

from __future__ import annotations

import socket

import pytest

from shardproxy.config import Endpoint, PortRange
from shardproxy.control.addrplan import read_system_port_range
from shardproxy.engine.upstream import Exhausted, Upstream


def system_range() -> PortRange:
    return PortRange(*read_system_port_range())


@pytest.mark.parametrize("allocator", ["kernel", "userspace"])
def test_an_endpoint_unknown_at_start_gets_its_tuple_spaces_on_first_connect(
    allocator: str,
) -> None:
    upstream = Upstream(system_range(), ["127.0.0.1"], [], allocator)
    assert upstream.snapshot() == []
    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = Endpoint("127.0.0.1", server.getsockname()[1])
        sock, space, port = upstream.connect(endpoint)
        sock.setblocking(True)
        sock.settimeout(5)
        peer, _ = server.accept()  # the connect completed
        (usage,) = upstream.snapshot()
        assert usage["endpoint"] == str(endpoint) and usage["used"] == 1
        space.release(port)
        assert upstream.snapshot()[0]["used"] == 0
        peer.close()
        sock.close()


def test_an_endpoint_with_no_source_of_its_family_is_exhausted() -> None:
    upstream = Upstream(system_range(), ["127.0.0.1"], [], "kernel")
    with pytest.raises(Exhausted):
        upstream.connect(Endpoint("::1", 9))
