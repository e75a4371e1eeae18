"""Bad input from clients and backends: each gets its clear answer, and the
worker stays up with its established tunnels untouched.

One proxy per engine serves the whole module. A tunnel opened before the first test
(`witness`) must still echo after the last, on the same worker processes.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy, free_port
from peers import (
    RawServer,
    WsBackend,
    WsClient,
    closed_port,
    read_head,
    read_until_closed,
    upgrade_head,
    websocket_accept,
)

HEADER_TIMEOUT = 1.0
RESPONSE_TIMEOUT = 1.0
MAX_HEADER_BYTES = 4096


def _silent(conn: socket.socket) -> None:
    read_head(conn)
    conn.recv(1)  # until the proxy gives up and closes


def _forbidden(conn: socket.socket) -> None:
    read_head(conn)
    conn.sendall(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n"
    )


def _slow_body(conn: socket.socket) -> None:
    read_head(conn)
    conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nlog ")
    time.sleep(0.2)
    conn.sendall(b"in first")


def _close_delimited_body(conn: socket.socket) -> None:
    read_head(conn)
    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\n\r\nsomething ")
    time.sleep(0.2)
    conn.sendall(b"broke")


def _vanish(conn: socket.socket) -> None:
    read_head(conn)


def _half_frame_then_reset(conn: socket.socket) -> None:
    head = read_head(conn)
    key = next(
        line.split(b":", 1)[1]
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n\r\n"
    )
    conn.sendall(bytes([0x82, 126]) + struct.pack("!H", 1000) + b"only part of it")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Lab:
    def __init__(self, proxy: Proxy, backend: WsBackend) -> None:
        self.proxy = proxy
        self.backend = backend

    def ask(self, data: bytes, *, close_write: bool = False) -> bytes:
        """Send raw bytes; return everything the proxy answers before closing."""
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as s:
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
            return read_until_closed(s)

    def closed_with(self, outcome: str) -> list[dict[str, Any]]:
        """Wait for, and return, the tunnel-closed events with this outcome."""
        return self.proxy.wait_for(
            lambda _: [
                e
                for e in self.proxy.actions("tunnel-closed")
                if e["shardproxy"]["outcome"] == outcome
            ],
            f"a tunnel-closed event with outcome {outcome}",
        )

    def rejected(self, reason: str) -> list[dict[str, Any]]:
        return [
            e for e in self.proxy.actions("request-rejected") if e["shardproxy"]["reason"] == reason
        ]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, module_proxy_engine: str) -> Iterator[Lab]:
    """On each engine in turn (conftest.module_proxy_engine)."""
    with (
        WsBackend() as backend,
        RawServer(_silent) as silent,
        RawServer(_forbidden) as forbidden,
        RawServer(_vanish) as vanish,
        RawServer(_slow_body) as slow_body,
        RawServer(_close_delimited_body) as close_body,
        RawServer(_half_frame_then_reset) as half,
        closed_port() as refused1,
        closed_port() as refused2,
    ):
        port = free_port()
        routes = {
            "/refused": [refused1, refused2],
            "/mixed": [refused1, backend.port],
            "/silent": [silent.port],
            "/forbidden": [forbidden.port],
            "/vanish": [vanish.port],
            "/slowbody": [slow_body.port],
            "/closebody": [close_body.port],
            "/half": [half.port],
            "/": [backend.port],
        }
        text = (
            f'[proxy]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n'
            f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\n'
            f'response_timeout = "{int(RESPONSE_TIMEOUT * 1000)}ms"\n'
            f"max_header_bytes = {MAX_HEADER_BYTES}\n"
            # Every event these tests cause is logged (they look for them).
            "\n[log]\nerror_rate = 0\n"
        )
        for i, (prefix, ports) in enumerate(routes.items()):
            servers = ", ".join(
                f'{{ name = "s{j}", address = "127.0.0.1", ports = [{p}] }}'
                for j, p in enumerate(ports)
            )
            text += f'\n[[routes]]\nhost = "127.0.0.1"\npath_prefix = "{prefix}"\npool = "p{i}"\n'
            text += f'[pools.p{i}]\nbalance = "round_robin"\nservers = [{servers}]\n'
        path: Path = tmp_path_factory.mktemp("bad") / "bad.toml"
        path.write_text(text)
        proxy = Proxy(path, port, workers=2)
        try:
            yield Lab(proxy, backend)
        finally:
            proxy.stop()


@pytest.fixture(scope="module")
def witness(lab: Lab) -> Iterator[tuple[WsClient, dict[int, int]]]:
    """A tunnel, and the worker pids, from before any bad input."""
    client = WsClient(lab.proxy.port, "/echo")
    assert client.echo("before") == "before"
    yield client, lab.proxy.worker_pids()
    client.close()


@pytest.fixture(autouse=True)
def _witness_survives(witness: tuple[WsClient, dict[int, int]], lab: Lab) -> Iterator[None]:
    yield
    client, pids = witness
    assert client.echo("still here") == "still here"
    assert lab.proxy.worker_pids() == pids, "a worker was restarted"


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def _header(answer: bytes, name: bytes) -> bytes | None:
    head = answer.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name.lower():
            return v.strip()
    return None


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nNo colon here\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(50) + b"\r\n\r\n",  # TLS hello
    ],
    ids=["request-line", "header-line", "tls"],
)
def test_malformed_request_is_400(lab: Lab, request_bytes: bytes) -> None:
    assert _status(lab.ask(request_bytes)) == 400


def test_unknown_http_version_is_505(lab: Lab) -> None:
    assert _status(lab.ask(b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n")) == 505


def test_head_over_the_limit_is_431(lab: Lab) -> None:
    big = upgrade_head("/echo", extra=f"X-Padding: {'a' * MAX_HEADER_BYTES}\r\n")
    assert _status(lab.ask(big)) == 431
    # The event is written after the answer is out: the client may read first.
    assert lab.proxy.wait_for(
        lambda _: lab.rejected("header_too_large"), "a header_too_large event"
    )


def test_slow_head_is_408_after_the_header_timeout(lab: Lab) -> None:
    with socket.create_connection(("127.0.0.1", lab.proxy.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        answer = read_until_closed(s)
        waited = time.monotonic() - started
    assert _status(answer) == 408
    assert waited >= HEADER_TIMEOUT * 0.9


def test_slowloris_trickle_does_not_extend_the_deadline(lab: Lab) -> None:
    with socket.create_connection(("127.0.0.1", lab.proxy.port), timeout=10) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\n")
        started = time.monotonic()
        s.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < HEADER_TIMEOUT * 5 and not answer:
            try:
                s.sendall(b"X-A: b\r\n")
                answer = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
    assert _status(answer) == 408


def test_plain_http_is_426(lab: Lab) -> None:
    answer = lab.ask(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _status(answer) == 426
    assert _header(answer, b"Upgrade") == b"websocket"


def test_wrong_websocket_version_is_426_naming_13(lab: Lab) -> None:
    head = upgrade_head("/echo").replace(b"Version: 13", b"Version: 8")
    answer = lab.ask(head)
    assert _status(answer) == 426
    assert _header(answer, b"Sec-WebSocket-Version") == b"13"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: b"\r\n".join(
            x for x in h.split(b"\r\n") if not x.startswith(b"Sec-WebSocket-Key")
        ),
        lambda h: h.replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: !!"),
        lambda h: h.replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: c2hvcnQ= "),
    ],
    ids=["missing", "not-base64", "wrong-length"],
)
def test_bad_websocket_key_is_400(lab: Lab, mangle: Callable[[bytes], bytes]) -> None:
    assert _status(lab.ask(mangle(upgrade_head("/echo")))) == 400


def test_unknown_host_is_404(lab: Lab) -> None:
    assert _status(lab.ask(upgrade_head("/echo", host="elsewhere.example"))) == 404
    # The event is written after the answer is out: the client may read first.
    assert lab.proxy.wait_for(lambda _: lab.rejected("no_route"), "a no_route event")


def test_every_server_refusing_is_502_after_trying_each(lab: Lab) -> None:
    before = len(lab.proxy.actions("upstream-connect-failed"))
    assert _status(lab.ask(upgrade_head("/refused"))) == 502
    failures = lab.proxy.wait_for(
        lambda _: len(lab.proxy.actions("upstream-connect-failed")) - before >= 2, "failures"
    )
    assert failures


def test_refused_server_is_retried_on_another(lab: Lab) -> None:
    def refused() -> list[dict[str, Any]]:
        return [
            e
            for e in lab.proxy.actions("upstream-connect-failed")
            if e["shardproxy"]["pool"] == "p1" and e["shardproxy"]["server"] == "s0"
        ]

    before = len(refused())
    # Round robin in each worker: whatever the split of 6 connections over
    # the 2 workers, at least 2 of them pick the refusing server first.
    for _ in range(6):
        client = WsClient(lab.proxy.port, "/mixed")
        assert client.echo("retried") == "retried"
        client.close()
    lab.proxy.wait_for(lambda _: len(refused()) - before >= 2, "the refused server tried")


def test_backend_silent_is_504(lab: Lab) -> None:
    started = time.monotonic()
    assert _status(lab.ask(upgrade_head("/silent"))) == 504
    assert time.monotonic() - started >= RESPONSE_TIMEOUT * 0.9


def test_backend_non_101_answer_is_passed_back(lab: Lab) -> None:
    answer = lab.ask(upgrade_head("/forbidden"))
    assert _status(answer) == 403
    assert answer.endswith(b"\r\n\r\nnope")
    assert _header(answer, b"Connection") == b"close"


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [("/slowbody", 401, b"log in first"), ("/closebody", 500, b"something broke")],
    ids=["length-in-pieces", "close-delimited"],
)
def test_backend_answer_body_arriving_later_is_passed_back_whole(
    lab: Lab, path: str, status: int, body: bytes
) -> None:
    answer = lab.ask(upgrade_head(path))
    assert _status(answer) == status
    assert answer.split(b"\r\n\r\n", 1)[1] == body


def test_backend_vanishing_mid_handshake_is_502(lab: Lab) -> None:
    assert _status(lab.ask(upgrade_head("/vanish"))) == 502


def test_client_vanishing_mid_handshake_is_logged(lab: Lab) -> None:
    before = len(lab.rejected("client_closed"))
    answer = lab.ask(b"GET /echo HTTP/1.1\r\nHost: 127.", close_write=True)
    assert _status(answer) == 400
    assert lab.proxy.wait_for(lambda _: len(lab.rejected("client_closed")) > before, "log")


def test_client_vanishing_mid_frame_closes_both_sides(lab: Lab) -> None:
    before = len(lab.backend.close_codes)
    s = socket.create_connection(("127.0.0.1", lab.proxy.port), timeout=10)
    s.sendall(upgrade_head("/echo"))
    assert _status(read_head(s)) == 101
    s.sendall(bytes([0x82, 0x80 | 126]) + struct.pack("!H", 1000) + b"mask" + b"partial")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST in the middle of a frame
    deadline = time.monotonic() + 10
    while len(lab.backend.close_codes) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.backend.close_codes[before:] == [1006]  # abnormal closure, seen by the backend
    closed = lab.closed_with("client_reset")
    assert closed[0]["shardproxy"]["bytes"]["up"] == 4 + 4 + len(b"partial")


def test_backend_vanishing_mid_frame_closes_both_sides(lab: Lab) -> None:
    received = b""
    with socket.create_connection(("127.0.0.1", lab.proxy.port), timeout=10) as s:
        s.sendall(upgrade_head("/half"))
        with pytest.raises(ConnectionResetError):  # the backend's abort is passed on
            while chunk := s.recv(65536):
                received += chunk
    assert _status(received) == 101
    assert lab.closed_with("backend_reset")


def test_over_capacity_is_503_with_retry_after(start_proxy: Callable[..., Proxy], lab: Lab) -> None:
    proxy = start_proxy([lab.backend.port], workers=1, proxy={"max_connections": 2})
    held = [WsClient(proxy.port, "/echo") for _ in range(2)]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(upgrade_head("/echo"))
        answer = read_until_closed(s)
    assert _status(answer) == 503
    assert _header(answer, b"Retry-After") == b"1"
    assert all(c.echo("held") == "held" for c in held)
    held[0].close()
    proxy.wait_for(lambda _: proxy.actions("tunnel-closed"), "the tunnel to close")
    again = WsClient(proxy.port, "/echo")  # a place is free again
    assert again.echo("in") == "in"
    for c in [*held[1:], again]:
        c.close()


def test_handshakes_beyond_max_handshakes_wait_their_turn(
    start_proxy: Callable[..., Proxy], lab: Lab
) -> None:
    """With every handshake slot taken, a new connection waits in the accept
    queue (no answer, no error) and is served once a slot frees up."""
    proxy = start_proxy([lab.backend.port], workers=1, proxy={"max_handshakes": 1})
    head = upgrade_head("/echo")
    slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    slow.sendall(head[:10])  # holds the only slot
    waiting = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    waiting.sendall(upgrade_head("/echo"))
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(1)  # not accepted yet: nobody answers
    slow.sendall(head[10:])
    assert _status(read_head(slow)) == 101
    assert _status(read_head(waiting)) == 101
    slow.close()
    waiting.close()
