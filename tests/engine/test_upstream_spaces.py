"""Upstream connects in-process: tuple spaces towards an endpoint nobody
named at start are made the first time it is connected to."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest

from shardproxy.config import Endpoint, KeepaliveConfig, PortRange
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


@pytest.mark.parametrize("allocator", ["kernel", "userspace"])
@pytest.mark.parametrize("source", ["127.0.0.1", "127.9.8.7"])
def test_a_bare_descriptor_connect_sets_what_a_socket_connect_sets(
    allocator: str, source: str
) -> None:
    """connect_fd (the compiled handshake engine's, through the C
    connect_tcp where it was built) and connect give the same socket: the
    source address, a port of the slice, TCP_NODELAY and the keepalive."""
    keepalive = KeepaliveConfig(31, 7, 4, ping_interval=0, ping_timeout=10)
    ports = PortRange(40000, 40999)
    upstream = Upstream(ports, [source], [], allocator, keepalive=keepalive)
    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = Endpoint("127.0.0.1", server.getsockname()[1])
        made, _, _ = upstream.connect(endpoint)
        fd, space, port = upstream.connect_fd(endpoint)
        bare = socket.socket(fileno=fd)
        try:
            assert not os.get_blocking(fd) and not os.get_inheritable(fd)
            for sock in (made, bare):
                sock.setblocking(True)
                sock.settimeout(5)
                peer, (peer_ip, peer_port) = server.accept()  # the connect completed
                peer.close()
                address, local_port = sock.getsockname()
                assert address == source and ports.first <= local_port <= ports.last
                assert (peer_ip, peer_port) == (address, local_port)
            options = [
                (socket.IPPROTO_TCP, socket.TCP_NODELAY),
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            ]
            seen = [[s.getsockopt(level, name) for level, name in options] for s in (made, bare)]
            assert seen[0] == seen[1] == [1, 1, 31, 7, 4]
            assert space.used == 2 and (port == 0) == (allocator == "kernel")
        finally:
            made.close()
            bare.close()


def test_a_bare_descriptor_connect_that_is_refused_reports_it_and_leaks_nothing() -> None:
    upstream = Upstream(system_range(), ["127.0.0.1"], [], "kernel")
    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = Endpoint("127.0.0.1", server.getsockname()[1])
    before = len(os.listdir("/proc/self/fd"))
    try:
        fd, _, _ = upstream.connect_fd(endpoint)
    except ConnectionRefusedError:
        pass  # refused within the connect call
    else:  # or reported as SO_ERROR once the connect completes (connect(2))
        sock = socket.socket(fileno=fd)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        assert poller.poll(5000), "the refused connect never completed"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
        sock.close()
    assert len(os.listdir("/proc/self/fd")) == before
