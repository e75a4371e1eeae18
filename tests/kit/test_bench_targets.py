"""The benchmark's targets (bench/targets.py): shardproxy, HAProxy, nginx and
"direct" each start with a generated config, carry a real websocket
handshake and echo to the bench's echo backend, report a version, and stop
cleanly leaving no process behind. HAProxy and nginx must be installed
(``scripts/install-bench-peers``, which ``scripts/test`` runs); a missing
one fails the test rather than skipping it. No timing is asserted."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))

from bench import wire
from bench.measure import connections_to
from bench.peers import find_binary
from bench.procs import BenchError, LineProcess, Upstream, pick_port
from bench.targets import TARGETS, Target, make_target

PEER_BINARIES = {"haproxy": "haproxy", "nginx": "nginx"}


@pytest.fixture
def backend_port() -> Iterator[int]:
    port = pick_port()
    backend = LineProcess(
        "backend",
        [sys.executable, "-m", "bench.backend", "--port", str(port), "--procs", "1",
         "--lifetime", "120"],
        stdin=False,
    )  # fmt: skip
    try:
        backend.expect("ready", 20)
        yield port
    finally:
        backend.stop(10)


def need_binary(name: str) -> None:
    binary = PEER_BINARIES.get(name)
    if binary is None:
        return
    try:
        find_binary(binary)
    except BenchError:
        pytest.fail(f"{binary} is not installed: run scripts/install-bench-peers")


def recv_until(sock: socket.socket, buf: bytearray, done: object) -> None:
    while not done():  # type: ignore[operator]
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed early; got {bytes(buf)!r}")
        buf += chunk


def upgrade(address: tuple[str, int]) -> socket.socket:
    """A websocket after a real RFC 6455 handshake (101, accept checked)."""
    sock = socket.create_connection(address, timeout=10)
    head = handshake(sock, address, bytearray())
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def handshake(sock: socket.socket, address: tuple[str, int], buf: bytearray) -> bytes:
    """Send an upgrade request, read the response head into ``buf``, check the accept."""
    key = wire.new_key()
    host, port = address
    sock.sendall(
        b"GET /bench HTTP/1.1\r\n"
        b"Host: %s:%d\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key)
    )
    recv_until(sock, buf, lambda: b"\r\n\r\n" in buf)
    head = wire.split_head(buf)
    assert head is not None
    assert wire.header(head, b"sec-websocket-accept") == wire.accept_for(key), head
    return bytes(head)


def websocket_echo(address: tuple[str, int], payload: bytes) -> None:
    """A real RFC 6455 handshake, one masked text frame echoed, a clean close."""
    with socket.create_connection(address, timeout=10) as sock:
        buf = bytearray()
        head = handshake(sock, address, buf)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert (wire.header(head, b"upgrade") or b"").lower() == b"websocket", head

        sock.sendall(wire.encode(wire.OP_TEXT, payload, mask=True))
        frames: list[tuple[bool, int, bytes]] = []

        def got_frame() -> bool:
            frame = wire.parse(buf)
            if frame is not None:
                frames.append(frame)
            return bool(frames)

        recv_until(sock, buf, got_frame)
        assert frames[0] == (True, wire.OP_TEXT, payload)

        frames.clear()
        sock.sendall(wire.encode(wire.OP_CLOSE, b"\x03\xe8", mask=True))
        recv_until(sock, buf, got_frame)
        assert frames[0][1] == wire.OP_CLOSE, frames


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            continue
    return left


@pytest.mark.parametrize("name", TARGETS)
def test_target_proxies_a_websocket(name: str, tmp_path: Path, backend_port: int) -> None:
    need_binary(name)
    listen_port = pick_port(avoid={backend_port})
    target = make_target(
        name,
        tmp_path / name,
        listen=("127.0.0.1", listen_port),
        backend=("127.0.0.1", backend_port),
        workers=1,
    )
    assert target.name == name
    expected = backend_port if name == "direct" else listen_port
    assert target.address == ("127.0.0.1", expected)

    version = target.version()
    assert version["name"] == name
    if name != "direct":
        assert isinstance(version["version"], str) and version["version"], version

    target.start()
    pids: list[int] = []
    try:
        assert target.wait_ready(30) >= 0
        procs = target.processes()
        pids = [p.pid for p in procs]
        if name == "direct":
            assert procs == []
        else:
            assert procs, "a proxy has processes"
            roles = [target.role(p) for p in procs]
            assert sum(target.is_worker(r) for r in roles) >= 1, roles
            assert target.config_path.is_file()
        for i in range(3):
            websocket_echo(target.address, f"hello {name} {i}".encode())
    finally:
        result = target.stop(30)
    assert result["exit_code"] in (0, -signal.SIGTERM), (result, target.log_tail(20))
    assert result["leftover_workers_killed"] == []
    assert alive(pids) == [], f"{name} left processes behind"
    assert target.processes() == [] or name == "direct"


def test_unknown_target_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as e:
        make_target("envoy", tmp_path, listen=("127.0.0.1", 1), backend=("127.0.0.1", 2), workers=1)
    for name in TARGETS:
        assert name in str(e.value)


@pytest.mark.parametrize("name", ["haproxy", "nginx"])
def test_peer_config_rejected(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_binary(name)
    target = make_target(
        name, tmp_path, listen=("127.0.0.1", 1), backend=("127.0.0.1", 2), workers=1
    )
    monkeypatch.setattr(target, "config_text", lambda: "no-such-directive here;\n")
    with pytest.raises(BenchError, match="rejected the config"):
        target.start()
    assert target.processes() == []


def _unstarted(name: str, workdir: Path, upstream: Upstream | None = None) -> Target:
    return make_target(
        name,
        workdir,
        listen=("127.0.0.1", 1),
        backend=("127.0.0.1", 2),
        workers=3,
        upstream=upstream,
    )


def test_upstream_sources_in_generated_configs(tmp_path: Path) -> None:
    upstream = Upstream(("127.64.0.1", "127.64.0.2", "127.64.0.3"))
    text = _unstarted("shardproxy", tmp_path, upstream).config_text()
    assert '[upstream]\nsource_addresses = ["127.64.0.1", "127.64.0.2", "127.64.0.3"]\n' in text
    assert "[upstream]" not in _unstarted("shardproxy", tmp_path).config_text()

    haproxy = _unstarted("haproxy", tmp_path, upstream)
    lines = [line.split() for line in haproxy.config_text().splitlines()]
    servers = [words for words in lines if words[:1] == ["server"]]
    assert [s[-1] for s in servers] == list(upstream.sources)
    assert {s[2] for s in servers} == {"127.0.0.1:2"}  # every line to the same backend
    plan = haproxy.plan()
    assert plan is not None
    first, last = upstream.ports()
    assert plan["total"]["tuples"] == 3 * (last - first + 1)
    assert plan["sources"] == list(upstream.sources) and plan["endpoints"] == ["127.0.0.1:2"]
    with pytest.raises(BenchError, match="nginx"):
        _unstarted("nginx", tmp_path, upstream).config_text()


def test_haproxy_connects_from_each_source(tmp_path: Path, backend_port: int) -> None:
    """One ``server`` line per source address: held tunnels reach the one
    backend port from every address (the kernel's count)."""
    need_binary("haproxy")
    sources = ("127.64.0.1", "127.64.0.2")
    target = make_target(
        "haproxy",
        tmp_path,
        listen=("127.0.0.1", pick_port(avoid={backend_port})),
        backend=("127.0.0.1", backend_port),
        workers=1,
        upstream=Upstream(sources),
    )
    target.start()
    held: list[socket.socket] = []
    try:
        target.wait_ready(30)
        held = [upgrade(target.address) for _ in range(4)]
        conns = connections_to("127.0.0.1", backend_port)
    finally:
        for sock in held:
            sock.close()
        result = target.stop(30)
    assert conns["total"] == 4 and set(conns["by_source"]) == set(sources), conns
    assert result["exit_code"] in (0, -signal.SIGTERM), (result, target.log_tail(20))
