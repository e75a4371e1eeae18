"""Certificate renewal as certbot does it (the files rewritten in place),
then SIGHUP: new handshakes get the renewed certificate, a wss tunnel
opened before still echoes, and a broken file refuses the reload and
changes nothing. Also the expiry warning at start and in check."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import Proxy, free_port
from peers import WsBackend, WsClient
from tlscerts import Issued, TestCA, write_mismatched_pair


def _config(tmp: Path, port: int, backend: int, cert: Path, key: Path) -> Path:
    path = tmp / "shardproxy.toml"
    path.write_text(
        f'[proxy]\nlisten = [{{ address = "127.0.0.1:{port}", tls = "edge" }}]\nworkers = 2\n\n'
        f'[tls.edge]\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]\n\n'
        '[[routes]]\npool = "main"\n\n'
        f'[pools.main]\nservers = [{{ address = "127.0.0.1", ports = [{backend}] }}]\n'
    )
    return path


def _served_fingerprint(port: int, ca: TestCA) -> str:
    """The SHA-256 of the certificate a new handshake gets."""
    ctx = ca.client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="chat.example.com") as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _install(issued: Issued, cert: Path, key: Path) -> None:
    shutil.copyfile(issued.cert, cert)
    shutil.copyfile(issued.key, key)


def test_a_renewed_certificate_is_served_after_sighup_and_tunnels_stay(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    first = ca.issue(["chat.example.com"], days=10, stem="first")  # expires soon: a warning
    renewed = ca.issue(["chat.example.com"], days=90, stem="renewed")
    cert, key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    _install(first, cert, key)
    port = free_port()
    with WsBackend() as backend:
        proxy = Proxy(_config(tmp_path, port, backend.port, cert, key), port, 2, "python")
        try:
            warned = proxy.actions("certificate-expiring")
            assert warned and "expires" in warned[0]["message"], warned
            tunnel = WsClient(port, host="chat.example.com", tls=ca.client_context())
            assert tunnel.echo("before") == "before"
            assert _served_fingerprint(port, ca) == first.fingerprint

            _install(renewed, cert, key)
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_for(lambda _: proxy.actions("reload-done"), "the reload")
            assert _served_fingerprint(port, ca) == renewed.fingerprint
            assert tunnel.echo("during") == "during", "the tunnel of before the reload"

            _, bad_key = write_mismatched_pair(ca, tmp_path)
            shutil.copyfile(bad_key, key)  # a key that is not the certificate's
            proxy.proc.send_signal(signal.SIGHUP)
            refused = proxy.wait_for(lambda _: proxy.actions("reload-refused"), "the refusal")
            assert "does not belong to the certificate" in refused[0]["error"]["message"]
            assert _served_fingerprint(port, ca) == renewed.fingerprint
            assert tunnel.echo("after") == "after"
            tunnel.close()
        finally:
            proxy.stop()


def test_check_names_each_certificate_and_warns_of_one_that_expires(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    soon = ca.issue(["chat.example.com", "*.chat.example.com"], days=12)
    path = _config(tmp_path, free_port(), free_port(), soon.cert, soon.key)
    done = subprocess.run(
        [sys.executable, "-m", "shardproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"# tls.edge.certificates[0]: {soon.cert}: names chat.example.com, *.chat.example.com;"
        in (done.stdout)
    )
    assert "shardproxy: warning: tls.edge.certificates[0]:" in done.stderr
    assert "(in 12 days)" in done.stderr or "(in 11 days)" in done.stderr, done.stderr


def test_check_refuses_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    cert, key = write_mismatched_pair(ca, tmp_path)
    path = _config(tmp_path, free_port(), free_port(), cert, key)
    done = subprocess.run(
        [sys.executable, "-m", "shardproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line == (
        f"shardproxy: {path}: tls.edge.certificates[0]: "
        f"the key {key} does not belong to the certificate {cert}"
    ), line
