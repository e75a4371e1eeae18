"""wss:// end to end: a real ``shardproxy run`` terminating TLS on a listener
(certificates made by tests/tlscerts.py's test CA), real clients (the
``websockets`` library, ``openssl s_client``, raw sockets for what no
client sends on purpose), on each engine in turn.

One proxy per engine serves the module; a tunnel opened first over wss
(``witness``) must still echo after every bad input, on the same workers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Proxy, free_port
from peers import WsBackend, WsClient, read_until_closed
from test_metrics import get, samples
from tlscerts import Issued, TestCA
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

HEADER_TIMEOUT = 1.0
# How a TLS 1.3 client sees a refusal of its certificate: the server decides
# after the client's handshake is done, so as an alert or a closed connection
# when it reads the 101.
REFUSED = (ssl.SSLError, OSError, WebSocketException)
OPENSSL_TIMEOUT = 10.0


class Lab:
    def __init__(self, proxy: Proxy, ca: TestCA, certs: dict[str, Issued], ports: dict[str, int]):
        self.proxy = proxy
        self.ca = ca
        self.certs = certs
        self.ports = ports  # listener name → port: "edge", "strict", "mtls", "admin"

    def url(self, listener: str = "edge", host: str = "chat.example.com", path: str = "/") -> str:
        return f"wss://{host}:{self.ports[listener]}{path}"

    def context(self, client: Issued | None = None) -> ssl.SSLContext:
        ctx = self.ca.client_context()
        if client is not None:
            ctx.load_cert_chain(client.cert, client.key)
        return ctx

    def failures(self, reason: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.proxy.actions("tls-handshake-failed")
            if e.get("error", {}).get("type") == reason
        ]

    def wait_failure(self, reason: str, before: int) -> dict[str, Any]:
        """The first tls-handshake-failed event with ``reason`` after the
        ``before`` ones already logged."""
        found: list[dict[str, Any]] = self.proxy.wait_for(
            lambda _: self.failures(reason)[before:],
            f"a tls-handshake-failed event with reason {reason}",
        )
        return found[0]

    def s_client(self, listener: str, *args: str, data: bytes = b"") -> str:
        """``openssl s_client`` against a listener; its output (both streams)."""
        cmd = [
            "openssl", "s_client", "-connect", f"127.0.0.1:{self.ports[listener]}",
            "-CAfile", str(self.ca.ca_file), *args,
        ]  # fmt: skip
        done = subprocess.run(
            cmd, input=data, capture_output=True, timeout=OPENSSL_TIMEOUT, check=False
        )
        return (done.stdout + done.stderr).decode(errors="replace")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, module_proxy_engine: str) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = TestCA(tmp)
    certs = {
        "chat": ca.issue(["chat.example.com"], stem="chat"),
        "wild": ca.issue(["*.api.example.com"], key_type="rsa", stem="wild"),
        "client": ca.issue(["alice"], common_name="alice", client=True, stem="alice"),
    }
    other = TestCA(tmp, name="another CA")
    certs["stranger"] = other.issue(["mallory"], common_name="mallory", client=True)
    ports = {name: free_port() for name in ("edge", "strict", "mtls", "proxied", "admin")}
    with WsBackend() as backend:
        text = f"""
[proxy]
listen = [
  {{ address = "127.0.0.1:{ports["edge"]}", tls = "edge" }},
  {{ address = "127.0.0.1:{ports["strict"]}", tls = "strict" }},
  {{ address = "127.0.0.1:{ports["mtls"]}", tls = "mtls" }},
  {{ address = "127.0.0.1:{ports["proxied"]}", tls = "edge", accept_proxy = true }},
]
trusted_proxies = ["127.0.0.1/32"]
workers = 2
header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"

[admin]
listen = "127.0.0.1:{ports["admin"]}"

[tls.edge]
certificates = [
  {{ cert = "{certs["chat"].cert}", key = "{certs["chat"].key}" }},
  {{ cert = "{certs["wild"].cert}", key = "{certs["wild"].key}" }},
]

[tls.strict]
certificates = [{{ cert = "{certs["chat"].cert}", key = "{certs["chat"].key}" }}]
strict_sni = true
min_version = "1.3"

[tls.mtls]
certificates = [{{ cert = "{certs["chat"].cert}", key = "{certs["chat"].key}" }}]
client_ca = "{ca.ca_file}"
verify_client = "required"

[[routes]]
pool = "main"

[pools.main]
servers = [{{ address = "127.0.0.1", ports = [{backend.port}] }}]
"""
        path = tmp / "shardproxy.toml"
        path.write_text(text)
        proxy = Proxy(path, ports["edge"], 2, handshake_engine="python")
        try:
            lab = Lab(proxy, ca, certs, ports)
            witness = WsClient(ports["edge"], host="chat.example.com", tls=lab.context())
            pids = proxy.worker_pids()
            assert witness.echo("before") == "before"
            yield lab
            assert witness.echo("after") == "after", "an established wss tunnel was disturbed"
            assert proxy.worker_pids() == pids, "a worker was replaced"
            witness.close()
        finally:
            proxy.stop()


def _echo(url: str, ctx: ssl.SSLContext, text: str = "hello") -> tuple[str, Any]:
    """One message through a websockets client over wss; the answer and the
    peer certificate the client saw."""

    async def main() -> tuple[str, Any]:
        host = url.split("//", 1)[1].split(":", 1)[0]
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        async with connect(url, ssl=ctx, sock=sock, server_hostname=host, proxy=None) as ws:
            await ws.send(text)
            answer = await asyncio.wait_for(ws.recv(), 10)
            cert = ws.transport.get_extra_info("peercert")
            assert isinstance(answer, str)
            return answer, cert

    return asyncio.run(main())


def _subject_cn(cert: Any) -> str:
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


# -- the good path -------------------------------------------------------------


def test_websockets_client_over_wss_gets_the_certificate_of_its_name(lab: Lab) -> None:
    answer, cert = _echo(lab.url(host="chat.example.com"), lab.context())
    assert answer == "hello"
    assert _subject_cn(cert) == "chat.example.com"
    answer, cert = _echo(lab.url(host="eu.api.example.com"), lab.context())
    assert answer == "hello"
    assert _subject_cn(cert) == "*.api.example.com", "the wildcard certificate (RSA) by SNI"


def test_the_access_event_says_tls(lab: Lab) -> None:
    _echo(lab.url(host="chat.example.com", path="/access-tls"), lab.context())
    event = lab.proxy.wait_for(
        lambda _: [
            e for e in lab.proxy.actions("tunnel-closed") if e["url"]["path"] == "/access-tls"
        ],
        "the tunnel-closed event of the wss tunnel",
    )[0]
    tls = event["tls"]
    assert tls["established"] is True
    assert tls["version"] == "1.3" and tls["version_protocol"] == "tls"
    assert tls["client"]["server_name"] == "chat.example.com"
    assert tls["next_protocol"] == "http/1.1"
    assert tls["cipher"]


def test_forwarded_headers_say_https_and_the_listener_port(lab: Lab) -> None:
    ws = WsClient(lab.ports["edge"], "/headers", host="chat.example.com", tls=lab.context())
    try:
        headers = {k.lower(): v for k, v in json.loads(ws.receive())}
    finally:
        ws.close()
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-port"] == str(lab.ports["edge"])


def test_alpn_offers_http11_only(lab: Lab) -> None:
    both = lab.s_client("edge", "-servername", "chat.example.com", "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in both, both
    h2 = lab.s_client("edge", "-servername", "chat.example.com", "-alpn", "h2")
    assert "No ALPN negotiated" in h2, h2


def test_mtls_required_takes_a_good_certificate_and_logs_its_subject(lab: Lab) -> None:
    alice = lab.certs["client"]
    answer, _ = _echo(lab.url("mtls", path="/alice"), lab.context(alice))
    assert answer == "hello"
    event = lab.proxy.wait_for(
        lambda _: [e for e in lab.proxy.actions("tunnel-closed") if e["url"]["path"] == "/alice"],
        "the tunnel-closed event of the mTLS tunnel",
    )[0]
    assert event["tls"]["client"]["subject"] == "CN=alice"
    assert event["tls"]["client"]["hash"]["sha256"] == alice.fingerprint.upper()


def test_sessions_resume_on_every_worker(lab: Lab) -> None:
    """The workers share their ticket keys (engine/tls.py's
    share_ticket_keys): a session from one resumes on the other, which
    SO_REUSEPORT picks for about half of the reconnections."""
    ctx = lab.context()  # a session resumes through the context that made it
    first = WsClient(lab.ports["edge"], "/resume", host="chat.example.com", tls=ctx)
    first.echo("ticket")  # the tickets came with the 101
    assert isinstance(first.sock, ssl.SSLSocket)
    session = first.sock.session
    first.close()
    reused = []
    for i in range(20):
        ws = WsClient(
            lab.ports["edge"], f"/resume/{i}", host="chat.example.com", tls=ctx, session=session,
        )  # fmt: skip
        assert isinstance(ws.sock, ssl.SSLSocket)
        reused.append(ws.sock.session_reused)
        ws.close()
    assert all(reused), reused
    events = lab.proxy.wait_for(
        lambda _: (
            found
            if len(
                found := [
                    e
                    for e in lab.proxy.actions("tunnel-closed")
                    if e["url"]["path"].startswith("/resume/")
                ]
            )
            == 20
            else None
        ),
        "the 20 resumed tunnels' events",
    )
    assert all(e["tls"]["resumed"] for e in events)
    assert len({e["process"]["pid"] for e in events}) == 2, "both workers resumed sessions"


def test_metrics_give_each_certificate_its_seconds_to_expiry(lab: Lab) -> None:
    found = samples(get(lab.ports["admin"], "/metrics")[2].decode())
    left = {
        dict(labels)["certificate"]: value
        for (name, labels), value in found.items()
        if name == "shardproxy_tls_certificate_expiry_seconds"
    }
    assert set(left) >= {"tls.edge.certificates[0]", "tls.edge.certificates[1]"}
    # tlscerts issues for 30 days by default
    assert 29 * 86400 < left["tls.edge.certificates[0]"] <= 30 * 86400


def test_a_proxy_protocol_listener_reads_the_header_then_tls(lab: Lab) -> None:
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n"
    ws = WsClient(
        lab.ports["proxied"], "/proxied", host="chat.example.com", tls=lab.context(),
        preamble=header,
    )  # fmt: skip
    assert ws.echo("through both") == "through both"
    ws.close()
    event = lab.proxy.wait_for(
        lambda _: [e for e in lab.proxy.actions("tunnel-closed") if e["url"]["path"] == "/proxied"],
        "the tunnel-closed event of the proxied wss tunnel",
    )[0]
    assert event["client"]["ip"] == "203.0.113.7"
    assert event["tls"]["client"]["server_name"] == "chat.example.com"


# -- refusals, each with its reason ----------------------------------------------


def test_a_version_below_the_minimum_is_refused(lab: Lab) -> None:
    before = len(lab.failures("protocol_version"))
    out = lab.s_client("strict", "-servername", "chat.example.com", "-tls1_2")
    assert "alert protocol version" in out, out
    event = lab.wait_failure("protocol_version", before)
    assert event["event"]["outcome"] == "failure"
    assert event["client"]["ip"] == "127.0.0.1"


def test_strict_sni_answers_an_unknown_name_with_unrecognized_name(lab: Lab) -> None:
    before = len(lab.failures("unknown_server_name"))
    out = lab.s_client("strict", "-servername", "nobody.example.org")
    assert "unrecognized name" in out, out
    event = lab.wait_failure("unknown_server_name", before)
    assert event["tls"]["client"]["server_name"] == "nobody.example.org"
    # without strict_sni, the default certificate serves an unknown name
    assert "CN = chat.example.com" in lab.s_client("edge", "-servername", "nobody.example.org")


def test_mtls_without_a_certificate_is_refused(lab: Lab) -> None:
    before = len(lab.failures("no_client_certificate"))
    with pytest.raises(REFUSED):
        _echo(lab.url("mtls"), lab.context())
    lab.wait_failure("no_client_certificate", before)


def test_mtls_with_a_certificate_of_another_ca_is_refused(lab: Lab) -> None:
    before = len(lab.failures("bad_client_certificate"))
    with pytest.raises(REFUSED):
        _echo(lab.url("mtls"), lab.context(lab.certs["stranger"]))
    event = lab.wait_failure("bad_client_certificate", before)
    assert "certificate" in event["error"]["message"]


def test_plain_http_on_a_tls_port_gets_a_plain_400(lab: Lab) -> None:
    before = len(lab.failures("plain_http"))
    with socket.create_connection(("127.0.0.1", lab.ports["edge"]), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")
        answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"TLS port" in answer
    lab.wait_failure("plain_http", before)


def test_garbage_is_refused(lab: Lab) -> None:
    before = len(lab.failures("bad_handshake"))
    with socket.create_connection(("127.0.0.1", lab.ports["edge"]), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x00\x05garbage and more garbage")
        read_until_closed(s)
    lab.wait_failure("bad_handshake", before)


def test_a_client_gone_mid_handshake_is_told(lab: Lab) -> None:
    before = len(lab.failures("peer_gone"))
    hello = _client_hello()
    with socket.create_connection(("127.0.0.1", lab.ports["edge"]), timeout=10) as s:
        s.sendall(hello[: len(hello) // 2])
    lab.wait_failure("peer_gone", before)


def test_a_trickled_client_hello_times_out_under_header_timeout(lab: Lab) -> None:
    before = len(lab.failures("handshake_timeout"))
    hello = _client_hello()
    with socket.create_connection(("127.0.0.1", lab.ports["edge"]), timeout=10) as s:
        started = time.monotonic()
        s.sendall(hello[:10])
        assert read_until_closed(s) == b""  # closed by the proxy, not by us
        waited = time.monotonic() - started
    lab.wait_failure("handshake_timeout", before)
    assert waited >= HEADER_TIMEOUT * 0.9, waited


def test_failures_are_counted_by_reason_in_metrics(lab: Lab) -> None:
    before = len(lab.failures("plain_http"))
    with socket.create_connection(("127.0.0.1", lab.ports["edge"]), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        read_until_closed(s)
    lab.wait_failure("plain_http", before)

    def counted() -> float:
        found = samples(get(lab.ports["admin"], "/metrics")[2].decode())
        return found.get(
            ("shardproxy_tls_handshake_failures_total", (("reason", "plain_http"),)), 0.0
        )

    # The workers' snapshots reach the supervisor once a second.
    assert lab.proxy.wait_for(lambda _: counted() >= before + 1, "plain_http in /metrics")


def _client_hello() -> bytes:
    """A real ClientHello, as Python's ssl module writes it."""
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
