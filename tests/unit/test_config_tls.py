"""Tests for the configuration's TLS: ``[tls.NAME]`` profiles, the listen
entry's ``tls``, ``[pools.NAME.tls]``, ``hash_key = "client_cert"``
(config/parse.py, config/model.py) and what a certificate file says
(config/certs.py), over real files made by tests/tlscerts.py.

Every refusal is checked for the key it names, the file and the reason:
an operator reads only the one line."""

from __future__ import annotations

import calendar
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tlscerts import Issued, TestCA, write_mismatched_pair

from shardproxy import config
from shardproxy.config import (
    BackendTls,
    CertificateFiles,
    Config,
    ConfigError,
    Endpoint,
    HashKey,
    TlsProfile,
    certs,
    from_mapping,
)

SOURCE = "test.toml"
DAY = 86400


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def chat(ca: TestCA) -> Issued:
    return ca.issue(["chat.example.com", "*.chat.example.com"], stem="chat")


@pytest.fixture(scope="module")
def api(ca: TestCA) -> Issued:
    return ca.issue(["api.example.com"], key_type="rsa", stem="api")


def pair(issued: Issued, **extra: Any) -> dict[str, Any]:
    return {"cert": str(issued.cert), "key": str(issued.key), **extra}


def with_tls(
    profile: dict[str, Any] | None = None,
    *,
    listen: list[Any] | None = None,
    pool_tls: dict[str, Any] | None = None,
    **pool: Any,
) -> dict[str, Any]:
    """A valid config with one TLS listener on the ``edge`` profile."""
    data: dict[str, Any] = {
        "proxy": {"listen": listen or [{"address": "127.0.0.1:8443", "tls": "edge"}]},
        "routes": [{"pool": "chat"}],
        "pools": {"chat": {"servers": [{"address": "10.0.1.5", "ports": [8080]}], **pool}},
    }
    if profile is not None:
        data["tls"] = {"edge": profile}
    if pool_tls is not None:
        data["pools"]["chat"]["tls"] = pool_tls
    return data


def error(data: Any, key: str, *fragments: str) -> ConfigError:
    """Parse ``data``; it must fail at exactly ``key`` with every fragment in the reason."""
    with pytest.raises(ConfigError) as info:
        from_mapping(data, SOURCE)
    e = info.value
    assert e.source == SOURCE
    assert e.key == key, str(e)
    assert str(e) == f"{SOURCE}: {key}: {e.reason}"
    assert "\n" not in str(e)
    for fragment in fragments:
        assert fragment in e.reason, str(e)
    return e


def round_trip(c: Config) -> None:
    """Workers re-parse the supervisor's to_dict: it must give back ``c``."""
    d = c.to_dict()
    assert from_mapping(d) == c
    assert from_mapping(tomllib.loads(tomli_w.dumps(d))) == c


# -- certs: names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("chat.example.com", "chat.example.com", True),
        ("Chat.Example.COM", "chat.example.com", True),  # DNS names are case-insensitive
        ("chat.example.com", "CHAT.example.com", True),
        ("chat.example.com.", "chat.example.com", True),  # the root's dot
        ("chat.example.com", "api.example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "A.EXAMPLE.com", True),
        ("*.example.com", "example.com", False),  # RFC 6125 6.4.3: one label, never zero
        ("*.example.com", "a.b.example.com", False),  # ... nor two
        ("*.example.com", ".example.com", False),  # an empty label
        ("*.example.com", "a.example.org", False),
        ("*.example.com", "*.example.com", True),  # the same text
        ("a.example.com", "*.example.com", False),
        ("f*.example.com", "foo.example.com", False),  # only a whole left-most label
    ],
)
def test_name_matches(pattern: str, name: str, expected: bool) -> None:
    assert certs.name_matches(pattern, name) is expected


def test_covers_a_name_by_any_of_the_certificates_names() -> None:
    names = ("chat.example.com", "*.chat.example.com")
    assert certs.covers(names, "chat.example.com")
    assert certs.covers(names, "eu.chat.example.com")
    assert not certs.covers(names, "a.eu.chat.example.com")
    assert not certs.covers(names, "example.com")
    assert not certs.covers((), "chat.example.com")


def test_a_listed_wildcard_is_covered_only_by_the_same_wildcard() -> None:
    assert certs.covers(("*.example.com",), "*.example.com")
    assert certs.covers(("*.example.com",), "*.EXAMPLE.com")
    assert not certs.covers(("a.example.com", "b.example.com"), "*.example.com")
    assert not certs.covers(("*.b.example.com",), "*.example.com")
    assert not certs.covers(("*.example.com",), "*.b.example.com")


# -- certs: what a file says -------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_inspect_pair_reads_the_leaf_of_a_chain(ca: TestCA, key_type: str) -> None:
    issued = ca.issue(["Chat.Example.com", "*.example.com"], key_type=key_type, days=10)
    info = certs.inspect_pair(str(issued.cert), str(issued.key))
    assert info.path == str(issued.cert)
    assert info.names == ("chat.example.com", "*.example.com")  # lower-case, in order
    assert info.subject == "CN=Chat.Example.com"
    assert info.fingerprint == issued.fingerprint
    assert abs(info.not_after - (time.time() + 10 * DAY)) < 120  # whole seconds in X.509


def test_a_certificate_without_san_is_named_by_its_cn(ca: TestCA) -> None:
    issued = ca.issue([], common_name="Legacy.Example.com")
    assert certs.inspect_pair(str(issued.cert), str(issued.key)).names == ("legacy.example.com",)


def test_ip_subject_alt_names_are_names_too(ca: TestCA) -> None:
    issued = ca.issue(["127.0.0.1", "localhost"])
    assert set(certs.inspect_pair(str(issued.cert), str(issued.key)).names) == {
        "127.0.0.1",
        "localhost",
    }


def _encrypted_key(issued: Issued, directory: Path) -> Path:
    key = serialization.load_pem_private_key(issued.key.read_bytes(), password=None)
    path = directory / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def test_inspect_pair_refuses_with_a_one_line_reason(
    ca: TestCA, chat: Issued, tmp_path: Path
) -> None:
    def refused(cert: Path | str, key: Path | str) -> str:
        with pytest.raises(ValueError) as info:
            certs.inspect_pair(str(cert), str(key))
        assert "\n" not in str(info.value)
        return str(info.value)

    missing = tmp_path / "missing.pem"
    assert refused(missing, chat.key) == (
        f"cannot read the certificate {missing}: No such file or directory"
    )
    assert (
        refused(chat.cert, missing) == f"cannot read the key {missing}: No such file or directory"
    )
    assert refused(chat.cert, tmp_path) == f"cannot read the key {tmp_path}: Is a directory"
    text = tmp_path / "text.pem"
    text.write_text("not a certificate\n")
    assert refused(text, chat.key) == f"{text} holds no PEM certificate"
    assert refused(chat.key, chat.key) == f"{chat.key} holds no PEM certificate"
    assert refused(chat.cert, text) == f"{text} holds no PEM private key"
    assert refused(chat.cert, chat.cert) == f"{chat.cert} holds no PEM private key"
    cert, key = write_mismatched_pair(ca, tmp_path)
    assert refused(cert, key) == f"the key {key} does not belong to the certificate {cert}"
    encrypted = _encrypted_key(chat, tmp_path)
    assert refused(chat.cert, encrypted) == (
        f"the key {encrypted} is encrypted (give it unencrypted)"
    )


def test_describe_der_gives_the_subject_and_fingerprint(ca: TestCA) -> None:
    client = ca.issue([], common_name="alice", client=True)
    der = x509.load_pem_x509_certificate(client.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert certs.describe_der(der) == ("CN=alice", client.fingerprint)


def _info(not_after: float) -> certs.CertificateInfo:
    return certs.CertificateInfo("/etc/chat.pem", ("chat.example.com",), "CN=chat", not_after, "")


NOW = float(calendar.timegm((2026, 12, 3, 12, 0, 0)))


def test_expires_within() -> None:
    info = _info(NOW + 10 * DAY)
    assert certs.expires_within(info, 11 * DAY, now=NOW)
    assert not certs.expires_within(info, 9 * DAY, now=NOW)
    assert certs.expires_within(_info(NOW - 1), 0, now=NOW)  # expired: within any time
    assert certs.expires_within(_info(time.time() + 60), 120)  # now: the clock's


@pytest.mark.parametrize(
    ("not_after", "note"),
    [
        (NOW + 31 * DAY, "expires 2027-01-03 (in 31 days)"),
        (NOW + 12 * DAY - 60, "expires 2026-12-15 (in 12 days)"),  # rounded to the day
        (NOW + DAY, "expires 2026-12-04 (in 1 day)"),
        (NOW - 2 * DAY, "expired 2026-12-01 (2 days ago)"),
    ],
)
def test_expiry_note(not_after: float, note: str) -> None:
    assert certs.expiry_note(_info(not_after), now=NOW) == note


def test_expiry_warnings_name_each_certificate_within_30_days(ca: TestCA) -> None:
    fresh = ca.issue(["chat.example.com"], days=90)
    soon = ca.issue(["api.example.com"], days=12.5)
    gone = ca.issue(["old.example.com"], days=-2, not_before_days=-10)
    data = with_tls(
        {"certificates": [pair(fresh), pair(soon)]},
        listen=[{"address": "127.0.0.1:8443", "tls": "edge"}],
    )
    data["tls"]["old"] = {"certificates": [pair(gone)]}  # named by no listener: still read
    cfg = from_mapping(data)
    assert [key for key, _ in certs.profile_certificates(cfg)] == [
        "tls.edge.certificates[0]",
        "tls.edge.certificates[1]",
        "tls.old.certificates[0]",
    ]
    warnings = certs.expiry_warnings(cfg)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"tls.edge.certificates[1]: {soon.cert}: expires ")
    assert warnings[0].endswith("(in 12 days)")
    assert warnings[1].startswith(f"tls.old.certificates[0]: {gone.cert}: expired ")
    assert warnings[1].endswith("(2 days ago)")
    assert certs.expiry_warnings(cfg, now=time.time() - 60 * DAY) == []  # all far off then


# -- [tls.NAME] --------------------------------------------------------------------


def test_a_profile_with_its_defaults(chat: Issued) -> None:
    c = from_mapping(with_tls({"certificates": [pair(chat)]}), SOURCE)
    assert c.tls == (
        TlsProfile(
            name="edge",
            certificates=(
                CertificateFiles(
                    str(chat.cert), str(chat.key), ("chat.example.com", "*.chat.example.com")
                ),
            ),
            min_version="1.2",
            ciphers="",
            session_tickets=2,
            strict_sni=False,
            client_ca="",
            verify_client="none",
        ),
    )
    assert c.tls_profile("edge") is c.tls[0]
    assert c.proxy.tls_listeners == ((Endpoint("127.0.0.1", 8443), "edge"),)
    assert c.proxy.tls_profile_of(Endpoint("127.0.0.1", 8443)) == "edge"
    round_trip(c)


def test_a_profile_with_every_key(ca: TestCA, chat: Issued, api: Issued) -> None:
    profile = {
        "certificates": [pair(chat, names=["Chat.Example.com"]), pair(api)],
        "min_version": "1.3",
        "ciphers": "ECDHE+AESGCM",
        "session_tickets": 0,
        "strict_sni": True,
        "client_ca": str(ca.ca_file),
        "verify_client": "required",
    }
    listen = [
        {"address": "127.0.0.1:8443", "tls": "edge", "accept_proxy": True},
        {"address": "[::1]:8443", "tls": "edge"},
        "127.0.0.1:8080",
    ]
    data = with_tls(profile, listen=listen)
    data["proxy"]["trusted_proxies"] = ["10.0.0.0/8"]
    c = from_mapping(data, SOURCE)
    (p,) = c.tls
    assert [f.names for f in p.certificates] == [("chat.example.com",), ("api.example.com",)]
    assert (p.min_version, p.ciphers, p.session_tickets, p.strict_sni) == (
        "1.3",
        "ECDHE+AESGCM",
        0,
        True,
    )
    assert (p.client_ca, p.verify_client) == (str(ca.ca_file), "required")
    assert c.proxy.tls_listeners == (
        (Endpoint("127.0.0.1", 8443), "edge"),
        (Endpoint("::1", 8443), "edge"),
    )
    assert c.proxy.accept_proxy == frozenset({Endpoint("127.0.0.1", 8443)})
    assert c.proxy.tls_profile_of(Endpoint("127.0.0.1", 8080)) is None
    round_trip(c)
    d = c.to_dict()
    assert d["proxy"]["listen"] == [
        {"address": "127.0.0.1:8443", "accept_proxy": True, "tls": "edge"},
        {"address": "[::1]:8443", "tls": "edge"},
        "127.0.0.1:8080",
    ]
    assert d["tls"]["edge"]["certificates"][1] == {
        "cert": str(api.cert),
        "key": str(api.key),
        "names": ["api.example.com"],  # filled in: the effective names
    }


def test_a_profile_no_listener_names_is_kept(chat: Issued) -> None:
    data = with_tls({"certificates": [pair(chat)]}, listen=["127.0.0.1:8080"])
    c = from_mapping(data, SOURCE)
    assert [p.name for p in c.tls] == ["edge"]
    assert c.proxy.tls_listeners == ()
    round_trip(c)


def test_without_tls_the_effective_config_has_no_tls_table() -> None:
    c = from_mapping(with_tls(listen=["127.0.0.1:8080"]), SOURCE)
    assert c.tls == ()
    assert "tls" not in c.to_dict()
    assert "tls" not in c.to_dict()["pools"]["chat"]


def test_relative_paths_are_the_config_files_directorys(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "certs").mkdir()
    issued = ca.issue(["chat.example.com"], stem="relative")
    for part in (issued.cert, issued.key):
        os.link(part, tmp_path / "certs" / part.name)
    os.link(ca.ca_file, tmp_path / "certs" / "ca.pem")
    data = with_tls(
        {
            "certificates": [{"cert": "certs/relative.pem", "key": "./certs/relative.key"}],
            "client_ca": "certs/ca.pem",
            "verify_client": "optional",
        },
        pool_tls={"ca_file": "certs/ca.pem"},
    )
    path = tmp_path / "shardproxy.toml"
    path.write_text(tomli_w.dumps(data))
    monkeypatch.chdir("/")  # not the config's directory
    c = config.load(str(path))
    files = c.tls[0].certificates[0]
    assert (files.cert, files.key) == (
        str(tmp_path / "certs/relative.pem"),
        str(tmp_path / "certs/relative.key"),
    )
    assert c.tls[0].client_ca == str(tmp_path / "certs/ca.pem")
    pool_tls = c.pool("chat").tls
    assert pool_tls is not None and pool_tls.ca_file == str(tmp_path / "certs/ca.pem")
    assert from_mapping(c.to_dict(), "<supervisor>") == c  # absolute: from anywhere


def test_listed_names_must_be_the_certificates(chat: Issued) -> None:
    ok = from_mapping(
        with_tls(
            {"certificates": [pair(chat, names=["eu.chat.example.com", "*.chat.example.com"])]}
        )
    )
    assert ok.tls[0].certificates[0].names == ("eu.chat.example.com", "*.chat.example.com")
    round_trip(ok)
    e = error(
        with_tls({"certificates": [pair(chat, names=["chat.example.com", "api.example.com"])]}),
        "tls.edge.certificates[0].names[1]",
    )
    assert e.reason == (
        f"api.example.com is not a name of {chat.cert} "
        "(its names: chat.example.com, *.chat.example.com)"
    )
    error(
        with_tls({"certificates": [pair(chat, names=["*.example.com"])]}),
        "tls.edge.certificates[0].names[0]",
        "*.example.com is not a name of",
    )
    error(
        with_tls({"certificates": [pair(chat, names=["a.b.chat.example.com"])]}),
        "tls.edge.certificates[0].names[0]",
        "is not a name of",
    )
    error(
        with_tls({"certificates": [pair(chat, names=[])]}),
        "tls.edge.certificates[0].names",
        "at least one name",
    )
    error(
        with_tls({"certificates": [pair(chat, names="chat.example.com")]}),
        "tls.edge.certificates[0].names",
        "must be an array",
    )
    error(
        with_tls({"certificates": [pair(chat, names=[7])]}),
        "tls.edge.certificates[0].names[0]",
        "must be a string",
    )


def test_every_certificate_is_checked_with_its_index(
    ca: TestCA, chat: Issued, tmp_path: Path
) -> None:
    cert, key = write_mismatched_pair(ca, tmp_path)
    e = error(
        with_tls({"certificates": [pair(chat), {"cert": str(cert), "key": str(key)}]}),
        "tls.edge.certificates[1]",
    )
    assert e.reason == f"the key {key} does not belong to the certificate {cert}"
    missing = tmp_path / "gone.pem"
    error(
        with_tls({"certificates": [{"cert": str(missing), "key": str(chat.key)}]}),
        "tls.edge.certificates[0]",
        f"cannot read the certificate {missing}",
        "No such file",
    )
    error(
        with_tls({"certificates": [{"cert": str(chat.cert), "key": str(missing)}]}),
        "tls.edge.certificates[0]",
        f"cannot read the key {missing}",
    )
    encrypted = _encrypted_key(chat, tmp_path)
    error(
        with_tls({"certificates": [{"cert": str(chat.cert), "key": str(encrypted)}]}),
        "tls.edge.certificates[0]",
        f"the key {encrypted} is encrypted",
    )
    error(
        with_tls({"certificates": [{"cert": str(chat.key), "key": str(chat.key)}]}),
        "tls.edge.certificates[0]",
        f"{chat.key} holds no PEM certificate",
    )


@pytest.mark.parametrize(
    ("entry", "key", "fragment"),
    [
        ({"key": "k.pem"}, "tls.edge.certificates[0].cert", "is required"),
        ({"cert": "c.pem"}, "tls.edge.certificates[0].key", "is required"),
        ({"cert": "", "key": "k.pem"}, "tls.edge.certificates[0].cert", "must name a file"),
        ({"cert": 7, "key": "k.pem"}, "tls.edge.certificates[0].cert", "must be a string"),
        (
            {"cert": "c.pem", "key": "k.pem", "sni": []},
            "tls.edge.certificates[0].sni",
            "unknown key",
        ),
        ("c.pem", "tls.edge.certificates[0]", "must be a table"),
    ],
)
def test_a_certificate_entry_is_cert_key_and_names(entry: Any, key: str, fragment: str) -> None:
    error(with_tls({"certificates": [entry]}), key, fragment)


def test_a_profile_needs_certificates() -> None:
    error(with_tls({}), "tls.edge.certificates", "at least one { cert, key }")
    error(with_tls({"certificates": []}), "tls.edge.certificates", "at least one")
    error(with_tls({"certificates": {}}), "tls.edge.certificates", "must be an array")


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ({"min_version": "1.1"}, "tls.edge.min_version", 'must be "1.2" or "1.3", got \'1.1\''),
        ({"min_version": 1.3}, "tls.edge.min_version", "must be a string"),
        ({"session_tickets": 11}, "tls.edge.session_tickets", "between 0 and 10, got 11"),
        ({"session_tickets": -1}, "tls.edge.session_tickets", "between 0 and 10"),
        ({"session_tickets": True}, "tls.edge.session_tickets", "must be an integer"),
        ({"strict_sni": "yes"}, "tls.edge.strict_sni", "must be true or false"),
        ({"ciphers": ["ECDHE"]}, "tls.edge.ciphers", "must be a string"),
        ({"verify_client": "always"}, "tls.edge.verify_client", "none, optional, required"),
        (
            {"verify_client": "optional"},
            "tls.edge.client_ca",
            'is required with verify_client = "optional"',
        ),
        (
            {"verify_client": "required"},
            "tls.edge.client_ca",
            'is required with verify_client = "required"',
        ),
        ({"session_ticket": 2}, "tls.edge.session_ticket", "unknown key (allowed here: "),
    ],
)
def test_profile_keys_are_checked(
    chat: Issued, override: dict[str, Any], key: str, fragment: str
) -> None:
    error(with_tls({"certificates": [pair(chat)], **override}), key, fragment)


def test_client_ca_must_be_a_readable_pem_bundle(chat: Issued, tmp_path: Path) -> None:
    base = {"certificates": [pair(chat)], "verify_client": "required"}
    missing = tmp_path / "ca.pem"
    error(
        with_tls({**base, "client_ca": str(missing)}),
        "tls.edge.client_ca",
        f"cannot read the CA bundle {missing}: No such file or directory",
    )
    error(
        with_tls({**base, "client_ca": str(chat.key)}),
        "tls.edge.client_ca",
        f"{chat.key} holds no PEM certificate",
    )


def test_the_tls_table_holds_profiles(chat: Issued) -> None:
    data = with_tls(listen=["127.0.0.1:8080"])
    error({**data, "tls": "edge"}, "tls", "must be a table")
    error({**data, "tls": {"edge": [pair(chat)]}}, "tls.edge", "must be a table")


# -- the listen entry's tls ----------------------------------------------------------


def test_a_listener_must_name_a_known_profile(chat: Issued) -> None:
    data = with_tls(listen=["127.0.0.1:8080", {"address": "127.0.0.1:8443", "tls": "edge"}])
    error(data, "proxy.listen[1].tls", "no [tls.edge] profile (profiles: none defined)")
    data["tls"] = {"chat": {"certificates": [pair(chat)]}, "api": {"certificates": [pair(chat)]}}
    e = error(data, "proxy.listen[1].tls")
    assert e.reason == "no [tls.edge] profile (profiles: api, chat)"
    data["proxy"]["listen"][1]["tls"] = 1
    error(data, "proxy.listen[1].tls", "must be a string")


def test_a_listen_entry_table_is_address_tls_and_accept_proxy(chat: Issued) -> None:
    profile = {"certificates": [pair(chat)]}
    error(with_tls(profile, listen=[{"tls": "edge"}]), "proxy.listen[0].address", "is required")
    error(
        with_tls(profile, listen=[{"address": "127.0.0.1:8443", "tls": "edge", "sni": "x"}]),
        "proxy.listen[0].sni",
        "unknown key (allowed here: accept_proxy, address, tls)",
    )
    error(
        with_tls(profile, listen=[{"address": "127.0.0.1:8443", "tls": "edge", "accept_proxy": 1}]),
        "proxy.listen[0].accept_proxy",
        "must be true or false",
    )
    plain = from_mapping(with_tls(profile, listen=[{"address": "127.0.0.1:8443", "tls": ""}]))
    assert plain.proxy.tls_listeners == ()
    assert plain.to_dict()["proxy"]["listen"] == ["127.0.0.1:8443"]


# -- [pools.NAME.tls] --------------------------------------------------------------


def test_pool_tls_defaults_and_every_key(ca: TestCA) -> None:
    c = from_mapping(with_tls(listen=["127.0.0.1:8080"], pool_tls={}), SOURCE)
    assert c.pool("chat").tls == BackendTls(True, "", "", "", "")
    round_trip(c)
    client = ca.issue([], common_name="shardproxy", client=True)
    pool_tls = {
        "verify": False,
        "ca_file": str(ca.ca_file),
        "server_name": "chat.internal",
        "cert": str(client.cert),
        "key": str(client.key),
    }
    c = from_mapping(with_tls(listen=["127.0.0.1:8080"], pool_tls=pool_tls), SOURCE)
    assert c.pool("chat").tls == BackendTls(
        False, str(ca.ca_file), "chat.internal", str(client.cert), str(client.key)
    )
    round_trip(c)
    assert c.to_dict()["pools"]["chat"]["tls"] == pool_tls


def test_pool_tls_empty_strings_are_the_defaults() -> None:
    pool_tls = {"ca_file": "", "server_name": "", "cert": "", "key": ""}
    c = from_mapping(with_tls(listen=["127.0.0.1:8080"], pool_tls=pool_tls), SOURCE)
    assert c.pool("chat").tls == BackendTls()


def test_pool_tls_refusals(ca: TestCA, chat: Issued, tmp_path: Path) -> None:
    def refused(pool_tls: dict[str, Any], key: str, *fragments: str) -> None:
        error(with_tls(listen=["127.0.0.1:8080"], pool_tls=pool_tls), key, *fragments)

    refused({"cert": str(chat.cert)}, "pools.chat.tls.key", "is required with cert")
    refused({"key": str(chat.key), "cert": ""}, "pools.chat.tls.cert", "is required with key")
    cert, key = write_mismatched_pair(ca, tmp_path)
    refused(
        {"cert": str(cert), "key": str(key)},
        "pools.chat.tls",
        f"the key {key} does not belong to the certificate {cert}",
    )
    missing = tmp_path / "none.pem"
    refused(
        {"ca_file": str(missing)}, "pools.chat.tls.ca_file", f"cannot read the CA bundle {missing}"
    )
    refused({"ca_file": str(chat.key)}, "pools.chat.tls.ca_file", "holds no PEM certificate")
    refused({"verify": "yes"}, "pools.chat.tls.verify", "must be true or false")
    refused({"server_name": 1}, "pools.chat.tls.server_name", "must be a string")
    refused({"sni": "x"}, "pools.chat.tls.sni", "unknown key")
    data = with_tls(listen=["127.0.0.1:8080"])
    data["pools"]["chat"]["tls"] = True
    error(data, "pools.chat.tls", "must be a table")


# -- hash_key = "client_cert" --------------------------------------------------------


def test_hash_key_client_cert() -> None:
    c = from_mapping(with_tls(listen=["127.0.0.1:8080"], balance="hash", hash_key="client_cert"))
    assert c.pool("chat").hash_key == HashKey("client_cert")
    assert c.to_dict()["pools"]["chat"]["hash_key"] == "client_cert"
    round_trip(c)
    error(
        with_tls(listen=["127.0.0.1:8080"], balance="hash", hash_key="client_cert:x"),
        "pools.chat.hash_key",
        "client_ip or client_cert",
    )
    error(
        with_tls(listen=["127.0.0.1:8080"], balance="hash"),
        "pools.chat.hash_key",
        "client_ip or client_cert",
    )
