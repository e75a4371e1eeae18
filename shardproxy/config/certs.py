"""What a certificate file says, read with the ``cryptography`` library:
its names (for SNI and for the names a listing claims), its subject, its
expiry, its fingerprint, and whether a key belongs to it. ``check``, the
configuration's parse (a reload with a broken file is refused) and the TLS
engine's SNI all read certificates through here."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

    from shardproxy.config.model import Config

# ``cryptography`` is imported where it is used: loading it loads ``socket``
# and ``select``, which the sans-IO packages must not (tests/unit/test_layout.py),
# and a configuration without TLS never needs it.

EXPIRY_WARNING = 30 * 86400  # check warns of a certificate that expires within this


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    path: str
    names: tuple[str, ...]  # DNS subjectAltNames, lower-case (the CN without a SAN extension)
    subject: str  # RFC 4514
    not_after: float  # unix seconds
    fingerprint: str  # SHA-256 of the leaf's DER, lower-case hex


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def _leaf(cert: x509.Certificate, path: str) -> CertificateInfo:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = [
            str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertificateInfo(
        path=path,
        names=tuple(names),
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc.timestamp(),
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


def inspect_pair(cert: str, key: str) -> CertificateInfo:
    """The certificate of a PEM chain file (its first, the leaf), checked
    against its key file. ValueError with a one-line reason: a file that
    cannot be read, is not PEM, holds no certificate, an encrypted key, or
    a key that does not belong to the certificate."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    chain = _read(cert, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"{cert} holds no PEM certificate")
    leaf = certs[0]
    key_pem = _read(key, "key")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(f"the key {key} is encrypted (give it unencrypted)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{key} holds no PEM private key") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise ValueError(f"the key {key} does not belong to the certificate {cert}")
    return _leaf(leaf, cert)


def inspect_bundle(path: str) -> int:
    """How many certificates a PEM bundle (a CA file) holds; ValueError
    when it cannot be read or holds none."""
    from cryptography import x509

    data = _read(path, "CA bundle")
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ValueError(f"{path} holds no PEM certificate")
    return len(found)


def describe_der(der: bytes) -> tuple[str, str]:
    """(RFC 4514 subject, SHA-256 hex) of a DER certificate (a client's)."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string(), hashlib.sha256(der).hexdigest()


def name_matches(pattern: str, name: str) -> bool:
    """``name`` is ``pattern`` (case-insensitive), or ``pattern`` is
    "*.example.com" and ``name`` has exactly one more label, on the left
    (RFC 6125 §6.4.3)."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    label, dot, parent = name.partition(".")
    return bool(label) and bool(dot) and parent == pattern[2:]


def covers(cert_names: Sequence[str], name: str) -> bool:
    """Whether a certificate with ``cert_names`` answers for ``name`` (a
    listed wildcard is covered only by the same wildcard)."""
    if name.startswith("*."):
        return name.lower() in (n.lower() for n in cert_names)
    return any(name_matches(n, name) for n in cert_names)


def expires_within(info: CertificateInfo, seconds: float, now: float | None = None) -> bool:
    return info.not_after - (time.time() if now is None else now) < seconds


def expiry_note(info: CertificateInfo, now: float | None = None) -> str:
    """ "expires 2027-01-02 (in 31 days)", or "expired 2026-11-30 (2 days ago)"."""
    now = time.time() if now is None else now
    day = time.strftime("%Y-%m-%d", time.gmtime(info.not_after))
    days = (info.not_after - now) / 86400
    if days < 0:
        return f"expired {day} ({_days(-days)} ago)"
    return f"expires {day} (in {_days(days)})"


def _days(days: float) -> str:
    whole = round(days)
    return "1 day" if whole == 1 else f"{whole} days"


def profile_certificates(cfg: Config) -> list[tuple[str, CertificateInfo]]:
    """(key path, what it says) of every listener certificate of ``cfg``;
    read now, so a renewed file shows its new dates."""
    out = []
    for profile in cfg.tls:
        for i, files in enumerate(profile.certificates):
            key = f"tls.{profile.name}.certificates[{i}]"
            out.append((key, inspect_pair(files.cert, files.key)))
    return out


def expiry_warnings(cfg: Config, now: float | None = None) -> list[str]:
    """One line per listener certificate that expires within EXPIRY_WARNING
    (or has expired), for check and the supervisor's log."""
    return [
        f"{key}: {info.path}: {expiry_note(info, now)}"
        for key, info in profile_certificates(cfg)
        if expires_within(info, EXPIRY_WARNING, now)
    ]
