"""OpenSSL contexts from the configuration's TLS settings, for the worker's
TLS transport (engine/tls.py) and the supervisor's health checks, and
:func:`trial`: every context of a configuration built once, so that what
only OpenSSL can judge (a cipher string, a key it cannot use, a CA bundle
it cannot read) refuses a start or a reload with one line naming the key."""

from __future__ import annotations

import ssl

from shardproxy.config import BackendTls, Config, ConfigError, TlsProfile

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
ALPN = ["http/1.1"]  # never h2 until websockets over HTTP/2 (RFC 8441) exist here


def _base(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.set_alpn_protocols(ALPN)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx


def server_context(profile: TlsProfile, cert: str, key: str) -> ssl.SSLContext:
    """A listener's context for one certificate of ``profile``."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[profile.min_version]
    if profile.ciphers:
        ctx.set_ciphers(profile.ciphers)
    ctx.num_tickets = profile.session_tickets
    if not profile.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    ctx.load_cert_chain(cert, key)
    if profile.verify_client != "none":
        ctx.load_verify_locations(profile.client_ca)
        ctx.verify_mode = _VERIFY[profile.verify_client]
    return ctx


def client_context(tls: BackendTls) -> ssl.SSLContext:
    """A pool's context towards its servers: verification on unless
    ``verify = false`` (the system's store, or ``ca_file``)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.verify:
        if tls.ca_file:
            ctx.load_verify_locations(tls.ca_file)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def trial(cfg: Config) -> None:
    """Build every TLS context of ``cfg`` once; ConfigError on the first
    that OpenSSL refuses."""
    for profile in cfg.tls:
        for i, files in enumerate(profile.certificates):
            key = f"tls.{profile.name}.certificates[{i}]"
            if i == 0 and profile.ciphers:
                key = f"tls.{profile.name}.ciphers"
            try:
                server_context(profile, files.cert, files.key)
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(cfg.source, key, f"OpenSSL refuses it: {_why(e)}") from None
    for pool in cfg.pools:
        if pool.tls is not None:
            try:
                client_context(pool.tls)
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(
                    cfg.source, f"pools.{pool.name}.tls", f"OpenSSL refuses it: {_why(e)}"
                ) from None


def _why(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(e)
