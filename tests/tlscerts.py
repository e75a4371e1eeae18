"""A test CA and the certificates the TLS tests need, made with the
``cryptography`` library into a directory: ECDSA P-256 or RSA 2048 leaves
with DNS (or IP) subjectAltNames, server or client, any validity."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path  # PEM: the leaf, then the CA (a chain)
    key: Path  # PEM, unencrypted PKCS#8
    common_name: str
    fingerprint: str  # SHA-256 of the leaf's DER, lower-case hex


def _key(key_type: str) -> Any:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be ec or rsa, not {key_type!r}")


def _pem_key(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cert"


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class TestCA:
    """A certificate authority of the tests' own (ECDSA P-256)."""

    __test__ = False  # not a test class, for pytest

    def __init__(self, directory: Path, name: str = "shardproxy test CA") -> None:
        self.directory = directory
        self.name = name
        self._key = _key("ec")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self._pem = self._cert.public_bytes(serialization.Encoding.PEM)
        self.ca_file = directory / f"{_slug(name)}-ca.pem"
        self.ca_file.write_bytes(self._pem)
        self._issued = 0

    def issue(
        self,
        names: Sequence[str],
        *,
        key_type: str = "ec",
        common_name: str | None = None,
        days: float = 30.0,
        not_before_days: float = -1.0,
        client: bool = False,
        stem: str | None = None,
    ) -> Issued:
        """A leaf for ``names`` (subjectAltNames), valid from
        ``not_before_days`` to ``days`` from now; files named after ``stem``."""
        key = _key(key_type)
        cn = common_name or (names[0] if names else "client")
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=not_before_days))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(n) for n in names]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        self._issued += 1
        base = stem or f"{_slug(cn)}-{self._issued}"
        cert_path = self.directory / f"{base}.pem"
        key_path = self.directory / f"{base}.key"
        der = cert.public_bytes(serialization.Encoding.DER)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self._pem)
        key_path.write_bytes(_pem_key(key))
        return Issued(cert_path, key_path, cn, hashlib.sha256(der).hexdigest())

    def client_context(self) -> ssl.SSLContext:
        """A TLS client's context trusting this CA alone (names checked),
        offering ALPN http/1.1 as browsers do for a websocket."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def server_context(self, issued: Issued) -> ssl.SSLContext:
        """A TLS server's context with ``issued`` (a wss:// backend)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(issued.cert, issued.key)
        return ctx


def write_mismatched_pair(ca: TestCA, directory: Path) -> tuple[Path, Path]:
    """A certificate and a key that do not belong together."""
    one = ca.issue(["one.example.com"], stem="mismatch-one")
    two = ca.issue(["two.example.com"], stem="mismatch-two")
    return one.cert, two.key
