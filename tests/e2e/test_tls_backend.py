"""wss:// backends: a pool connected with TLS (``[pools.X.tls]``), in front
of the ``websockets`` server over TLS with a certificate of the tests' CA,
on each engine: verified, refused with a 502 and its reason when the CA is
the wrong one, taken when verification is off, and health-checked with
TLS too."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from conftest import Proxy, free_port
from peers import WsBackend, WsClient, read_until_closed, upgrade_head
from tlscerts import TestCA


class Lab:
    def __init__(self, proxy: Proxy, backend: WsBackend) -> None:
        self.proxy = proxy
        self.backend = backend


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, module_proxy_engine: str) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("tls-backend")
    ca = TestCA(tmp)
    other = TestCA(tmp, name="another CA")
    leaf = ca.issue(["127.0.0.1", "backend.internal"], stem="backend")
    with WsBackend(tls=ca.server_context(leaf)) as backend:
        port = free_port()
        server = f'servers = [{{ address = "127.0.0.1", ports = [{backend.port}] }}]'
        health = 'kind = "websocket"\npath = "/health-ws"\ninterval = "200ms"\ntimeout = "150ms"\n'
        text = f"""
[proxy]
listen = ["127.0.0.1:{port}"]
workers = 2

[[routes]]
path_prefix = "/wrong"
pool = "wrong"

[[routes]]
path_prefix = "/noverify"
pool = "noverify"

[[routes]]
path_prefix = "/named"
pool = "named"

[[routes]]
pool = "good"

[pools.good]
{server}
[pools.good.tls]
ca_file = "{ca.ca_file}"
[pools.good.health]
{health}rise = 1
fall = 1

[pools.named]
{server}
[pools.named.tls]
ca_file = "{ca.ca_file}"
server_name = "backend.internal"

[pools.wrong]
{server}
[pools.wrong.tls]
ca_file = "{other.ca_file}"

[pools.noverify]
{server}
[pools.noverify.tls]
verify = false
"""
        path = tmp / "shardproxy.toml"
        path.write_text(text)
        proxy = Proxy(path, port, 2, handshake_engine="python")
        try:
            yield Lab(proxy, backend)
        finally:
            proxy.stop()


@pytest.mark.parametrize("path", ["/echo", "/named/echo", "/noverify/echo"])
def test_a_wss_backend_echoes(lab: Lab, path: str) -> None:
    ws = WsClient(lab.proxy.port, path)
    try:
        assert ws.echo("over tls") == "over tls"
        assert ws.echo("x" * 100_000) == "x" * 100_000
    finally:
        ws.close()


def test_a_backend_certificate_that_does_not_verify_is_a_502_with_its_reason(lab: Lab) -> None:
    with socket.create_connection(("127.0.0.1", lab.proxy.port), timeout=10) as s:
        s.sendall(upgrade_head("/wrong/echo"))
        answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert answer.endswith(b"\r\n\r\nTLS to the backend failed\n"), answer
    event = lab.proxy.wait_for(
        lambda _: [
            e
            for e in lab.proxy.actions("request-rejected")
            if e["shardproxy"]["reason"] == "backend_tls_failed"
        ],
        "the rejection of the unverified backend",
    )[0]
    assert event["http"]["response"]["status_code"] == 502
    failed = lab.proxy.wait_for(
        lambda _: lab.proxy.actions("upstream-connect-failed"), "the failed connect's event"
    )[0]
    assert failed["error"]["message"].startswith("TLS: bad_server_certificate: "), failed
    assert failed["shardproxy"]["pool"] == "wrong"


def test_health_checks_of_a_tls_pool_speak_tls(lab: Lab) -> None:
    """The good pool's checks are websocket handshakes over TLS: the
    backend (which speaks TLS only) sees them, and none failed (with
    fall = 1 a failed one would have taken the server down)."""
    lab.proxy.wait_for(
        lambda _: lab.backend.paths.count("/health-ws") >= 3, "three health checks over TLS"
    )
    assert lab.proxy.actions("server-down") == []
