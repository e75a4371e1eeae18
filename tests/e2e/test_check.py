"""``shardproxy check -c FILE`` as a process: the effective config on
stdout, or one line naming the file, the key and the reason; with TLS, a
comment line per certificate (its names and expiry) and a warning on
stderr for one that expires within 30 days."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

from configs import GOOD_TOML, write
from tlscerts import Issued, TestCA, write_mismatched_pair

from shardproxy import config
from shardproxy.config import from_mapping

# -- `shardproxy check` ----------------------------------------------------------


def run_check(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardproxy", "check", "-c", path],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_prints_the_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    body = "".join(line for line in result.stdout.splitlines(True) if not line.startswith("#"))
    printed = tomllib.loads(body)
    expected = config.load(path)
    assert from_mapping(printed) == expected
    assert printed == expected.to_dict()
    assert printed["proxy"]["workers"] == 3
    assert printed["proxy"]["header_timeout"] == "1500ms"
    assert printed["proxy"]["max_header_bytes"] == 16384  # a default, filled in


def _check_fails(tmp_path: Path, text: str | None, *fragments: str) -> str:
    path = str(tmp_path / "bad.toml") if text is None else write(tmp_path, text, "bad.toml")
    result = run_check(path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert path in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_check_missing_file(tmp_path: Path) -> None:
    _check_fails(tmp_path, None, "no such file")


def test_check_syntax_error(tmp_path: Path) -> None:
    _check_fails(tmp_path, "[proxy\nworkers = 2\n", "TOML syntax error", "line 1")


def test_check_unknown_key(tmp_path: Path) -> None:
    text = GOOD_TOML.replace('level = "debug"', 'level = "debug"\nformat = "json"')
    _check_fails(tmp_path, text, "log.format: unknown key")


def test_check_bad_value(tmp_path: Path) -> None:
    text = GOOD_TOML.replace("ports = [8080] }", "ports = [8080, 99999] }")
    _check_fails(tmp_path, text, "pools.chat.servers[1].ports[1]:", "99999")


# -- certificates ----------------------------------------------------------------


def _tls_toml(*profiles: tuple[str, list[Issued]]) -> str:
    """GOOD_TOML with a TLS listener per profile."""
    listen = ", ".join(
        f'{{ address = "127.0.0.1:{9443 + i}", tls = "{name}" }}'
        for i, (name, _) in enumerate(profiles)
    )
    text = GOOD_TOML.replace(
        'listen = ["127.0.0.1:9000", "[::1]:9000"]', f'listen = ["127.0.0.1:9000", {listen}]'
    )
    for name, issued in profiles:
        entries = ", ".join(f'{{ cert = "{i.cert}", key = "{i.key}" }}' for i in issued)
        text += f"\n[tls.{name}]\ncertificates = [{entries}]\n"
    return text


def _day(days_from_now: float) -> str:
    """The UTC date a certificate issued now for ``days_from_now`` ends on."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() + days_from_now * 86400))


def test_check_names_each_certificate_and_its_expiry(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    chat = ca.issue(["chat.example.com", "*.example.com"], days=90, stem="chat")
    api = ca.issue(["api.example.com"], key_type="rsa", days=200, stem="api")
    path = write(tmp_path, _tls_toml(("edge", [chat, api])))
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # nothing expires within 30 days
    comments = [line for line in result.stdout.splitlines() if line.startswith("# tls.")]
    assert comments == [
        f"# tls.edge.certificates[0]: {chat.cert}: names chat.example.com, *.example.com; "
        f"expires {_day(90)} (in 90 days)",
        f"# tls.edge.certificates[1]: {api.cert}: names api.example.com; "
        f"expires {_day(200)} (in 200 days)",
    ]
    body = "".join(line for line in result.stdout.splitlines(True) if not line.startswith("#"))
    printed = tomllib.loads(body)
    assert from_mapping(printed) == config.load(path)  # what check prints parses back
    assert printed["tls"]["edge"]["certificates"][1]["names"] == ["api.example.com"]


def test_check_warns_of_a_certificate_that_expires_or_has_expired(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    fresh = ca.issue(["chat.example.com"], days=90, stem="fresh")
    soon = ca.issue(["soon.example.com"], days=12, stem="soon")
    gone = ca.issue(["gone.example.com"], days=-3, not_before_days=-30, stem="gone")
    path = write(tmp_path, _tls_toml(("edge", [fresh, soon]), ("old", [gone])))
    result = run_check(path)
    assert result.returncode == 0, result.stderr  # a warning, not a refusal
    assert result.stderr.splitlines() == [
        f"shardproxy: warning: tls.edge.certificates[1]: {soon.cert}: "
        f"expires {_day(12)} (in 12 days)",
        f"shardproxy: warning: tls.old.certificates[0]: {gone.cert}: "
        f"expired {_day(-3)} (3 days ago)",
    ]
    assert f"# tls.old.certificates[0]: {gone.cert}: names gone.example.com; expired" in (
        result.stdout
    )


def test_check_refuses_a_certificate_with_the_key_file_and_reason(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    chat = ca.issue(["chat.example.com"], stem="chat")
    _, key = write_mismatched_pair(ca, tmp_path)  # a key of another certificate
    _check_fails(
        tmp_path,
        _tls_toml(("edge", [chat])).replace(str(chat.key), str(key)),
        "tls.edge.certificates[0]: ",
        f"the key {key} does not belong to the certificate {chat.cert}",
    )
    text = _tls_toml(("edge", [chat])).replace('tls = "edge"', 'tls = "egde"')
    _check_fails(tmp_path, text, "proxy.listen[1].tls: no [tls.egde] profile (profiles: edge)")


def test_check_refuses_a_cipher_string_openssl_does_not_know(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    chat = ca.issue(["chat.example.com"], stem="chat")
    text = _tls_toml(("edge", [chat])) + 'ciphers = "NOT-A-CIPHER"\n'
    _check_fails(tmp_path, text, "tls.edge.ciphers: OpenSSL refuses it")
