"""PROXY protocol through a real ``shardproxy run``, with HAProxy as the
independent peer on both sides: HAProxy's ``send-proxy`` (v1) and
``send-proxy-v2`` in front of an ``accept_proxy`` listener, and HAProxy's
``accept-proxy`` behind a pool with ``send_proxy = "v2"``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from conftest import Proxy, free_port
from peers import WsBackend, WsClient, read_head, upgrade_head

from shardproxy.config import Endpoint, HealthConfig
from shardproxy.control.health import run_check
from shardproxy.protocol.proxyproto import encode_v2, encode_v2_local

# Every test here runs on both engines (conftest.proxy_engine).
pytestmark = pytest.mark.usefixtures("proxy_engine")

TRUSTED = "127.0.0.1"  # the address HAProxy and the tests' trusted clients connect from
CLIENT = "127.0.0.9"  # the client HAProxy speaks for
UNTRUSTED = "127.0.0.2"


@contextlib.contextmanager
def haproxy(tmp_path: Path, config: str, port: int) -> Iterator[None]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(binary).exists(), "haproxy is installed by scripts/install-bench-peers"
    path = tmp_path / f"haproxy-{port}.cfg"
    path.write_text(
        "defaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n" + config
    )
    proc = subprocess.Popen([binary, "-db", "-f", str(path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def forwarded_for(client: WsClient) -> list[str]:
    """The X-Forwarded-For headers the backend saw (its /headers path)."""
    headers = json.loads(client.receive())
    return [v for n, v in headers if n.lower() == "x-forwarded-for"]


def proxied_listener(port: int) -> dict[str, object]:
    return {
        "listen": [{"address": f"127.0.0.1:{port}", "accept_proxy": True}],
        "trusted_proxies": [f"{TRUSTED}/32"],
    }


def test_haproxy_v1_and_v2_headers_set_the_client(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    port, v1, v2 = free_port(), free_port(), free_port()
    config = "".join(
        f"listen l{version}\n  mode tcp\n  bind 127.0.0.1:{front}\n"
        f"  server s {TRUSTED}:{port} {option}\n"
        for version, front, option in ((1, v1, "send-proxy"), (2, v2, "send-proxy-v2"))
    )
    with WsBackend() as backend, haproxy(tmp_path, config, v2):
        proxy = start_proxy([backend.port], port=port, proxy=proxied_listener(port))
        for front in (v1, v2):
            client = WsClient(front, "/headers", source=CLIENT)
            assert forwarded_for(client) == [CLIENT]  # not HAProxy's 127.0.0.1
            assert client.echo("through haproxy") == "through haproxy"
            client.close()
        closed = proxy.wait_for(
            lambda _: len(proxy.actions("tunnel-closed")) >= 2 and proxy.actions("tunnel-closed"),
            what="two access events",
        )
    assert [e["client"]["ip"] for e in closed] == [CLIENT, CLIENT]


def test_untrusted_and_malformed_headers_are_refused_and_tunnels_go_on(
    start_proxy: Callable[..., Proxy],
) -> None:
    port = free_port()
    header = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n"
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], port=port, proxy=proxied_listener(port))
        pids = proxy.worker_pids()
        held = WsClient(port, "/echo", preamble=header)  # trusted, v1
        v6 = encode_v2(("2001:db8::7", 4242), ("::1", port))
        via_v2 = WsClient(port, "/headers", preamble=v6)
        assert forwarded_for(via_v2) == ["2001:db8::7"]

        def answer(source: str, data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), 10, (source, 0)) as s:
                s.sendall(data)
                return read_head(s)

        # The same header from an address not in trusted_proxies: 403.
        assert answer(UNTRUSTED, header + upgrade_head()).startswith(b"HTTP/1.1 403")
        assert answer(UNTRUSTED, upgrade_head()).startswith(b"HTTP/1.1 403")
        # From a trusted one, but no header or a broken one: 400.
        for broken in (
            upgrade_head(),
            b"PROXY TCP4 203.0.113.9\r\n" + upgrade_head(),
            b"PROXY TCP4 999.0.113.9 127.0.0.1 1 2\r\n",
            encode_v2_local()[:12] + b"\x31\x11\x00\x0c" + bytes(12),
            b"PROXY " + b"9" * 300,
        ):
            assert answer(TRUSTED, broken).startswith(b"HTTP/1.1 400"), broken
        assert held.echo("still here") == "still here"
        local = WsClient(port, "/headers", preamble=encode_v2_local())  # LOCAL: the socket's
        assert forwarded_for(local) == [TRUSTED]
        events = proxy.wait_for(
            lambda _: (
                len(proxy.actions("request-rejected")) >= 7 and proxy.actions("request-rejected")
            ),
            what="seven rejections",
        )
        assert proxy.worker_pids() == pids  # no worker went down
    reasons = [(e["shardproxy"]["reason"], e["client"]["ip"]) for e in events]
    assert reasons.count(("untrusted_proxy", UNTRUSTED)) == 2
    assert reasons.count(("bad_proxy_header", TRUSTED)) == 5


def test_send_proxy_v2_tells_haproxy_the_client_instead_of_x_forwarded_for(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    hport = free_port()
    with WsBackend() as backend:
        config = (
            f"listen l\n  mode http\n  option forwardfor\n"
            f"  bind 127.0.0.1:{hport} accept-proxy\n  server s 127.0.0.1:{backend.port}\n"
        )
        with haproxy(tmp_path, config, hport):
            proxy = start_proxy([hport], extra='send_proxy = "v2"\n')
            client = WsClient(proxy.port, "/headers", source=CLIENT)
            # HAProxy read our v2 header and wrote the client into its own
            # X-Forwarded-For; shardproxy added none.
            assert forwarded_for(client) == [CLIENT]
            assert client.echo("via haproxy") == "via haproxy"
            client.close()
            # Health checks of such a pool open with a LOCAL header, which
            # HAProxy's accept-proxy takes; without it, HAProxy refuses.
            check = HealthConfig("websocket", "/echo", 101, 1.0, 5.0, 1, 1, "keep")
            endpoint = Endpoint("127.0.0.1", hport)
            assert trio.run(run_check, endpoint, check, encode_v2_local()) is None
            assert trio.run(run_check, endpoint, check) is not None


def test_accept_proxy_needs_trusted_proxies(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[proxy]\nlisten = [{ address = "127.0.0.1:18080", accept_proxy = true }]\n'
        '[[routes]]\npool = "p"\n[pools.p]\nservers = [{ address = "10.0.0.1", ports = [80] }]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "shardproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "proxy.trusted_proxies: is required" in out.stderr


def test_a_reload_that_drops_a_proxied_listener_serves_its_queue(
    start_proxy: Callable[..., Proxy],
) -> None:
    """Connections queued on an accept_proxy listener that a reload removes
    are served by the retiring worker, PROXY header and all. (Whether its
    accept loop or the retirement's sweep takes them depends on which event
    the resumed worker handles first; both paths read the header.)"""
    port, new_port = free_port(), free_port()
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], workers=1, port=port, proxy=proxied_listener(port))
        (old_worker,) = proxy.worker_pids().values()
        os.kill(old_worker, signal.SIGSTOP)  # connections now wait in its accept queue
        header = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n"
        queued = [socket.create_connection(("127.0.0.1", port), 10) for _ in range(5)]
        for s in queued:
            s.sendall(header + upgrade_head("/headers"))
        config = proxy.log_path.with_suffix(".toml")
        config.write_text(
            config.read_text().replace(
                f'address = "127.0.0.1:{port}"', f'address = "127.0.0.1:{new_port}"'
            )
        )
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda _: proxy.actions("reload-done"), what="the reload")
        os.kill(old_worker, signal.SIGCONT)  # it retires: sweeps the dropped socket first
        for s in queued:
            s.settimeout(10)
            data = b""
            while b"203.0.113.9" not in data:
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 101")
            s.close()
