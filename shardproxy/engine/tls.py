"""TLS as a transport: :class:`TlsConnection` keeps engine/transport.py's
contract over OpenSSL (the ``ssl`` module's :class:`ssl.SSLObject` on two
memory BIOs), so the handshake engine and the relay move the plaintext of a
wss:// connection exactly as they move a plain one's bytes.

- **Server side** (:class:`TlsServer`, one per TLS listener, built from its
  ``[tls.NAME]`` profile): one ``SSLContext`` per certificate, the one of
  the first certificate wrapping every connection; its SNI callback moves a
  connection to the certificate whose names match (exact, then a wildcard of
  one label, RFC 6125 §6.4.3), else keeps the default, or answers the
  ``unrecognized_name`` alert when the profile has ``strict_sni`` (a client
  without SNI too, as HAProxy's strict-sni does). ALPN offers ``http/1.1``
  alone: a client that offers only ``h2`` gets no ALPN answer and speaks
  HTTP/1.1 or leaves (RFC 7301 §3.2 lets a server ignore the extension).
- **Client side** (:class:`TlsClient`, one per pool with ``[pools.X.tls]``):
  verification on by default, SNI and the name checked from ``server_name``
  (else the server's address), a session kept per endpoint for resumption.

How the engines' level-triggered epoll stays enough: a read takes from the
socket at most what the caller's buffer can hold, less the partial record
already in the BIO, and decrypts every complete record into the buffer
(plaintext is shorter than its records), so after a read no decryptable
record waits in the BIO that the socket's readiness would not announce.
The one exception is the end of a handshake, which may have brought the
first application records with it: the first read after it looks into the
BIO before the socket (``_buffered``).

Writes keep the plain contract "took ``k`` bytes" as OpenSSL's own
``SSL_write`` retry rule does: ``data`` is sealed into records at once; if
the socket does not take all of them, the call says it took nothing and
keeps the records, and the next call (which the contract makes present the
same bytes again, maybe with more after them) sends those records first and
then says it took the bytes they sealed. Memory per connection is therefore
bounded by one write's records, as a plain connection's parked bytes are.

Failures of a handshake are :class:`TlsFailure`, with a reason in our words
(:data:`REASONS`, the metric's label) and OpenSSL's own text as the detail;
a record that does not decrypt later is an ``OSError`` (:class:`TlsError`)
to the engines, which end that tunnel as they end a reset one.
"""

from __future__ import annotations

import errno
import os
import select
import ssl
from collections.abc import Sequence
from typing import Any, cast

from shardproxy.config import BackendTls, Endpoint, TlsProfile
from shardproxy.config.certs import describe_der
from shardproxy.engine.api import TlsInfo
from shardproxy.engine.transport import PLAIN
from shardproxy.host.tls import client_context, server_context

__all__ = [
    "REASONS",
    "TlsClient",
    "TlsConnection",
    "TlsError",
    "TlsFailure",
    "TlsServer",
]

HANDSHAKE_READ = 16384  # raw bytes per read while handshaking: a ClientHello, or a flight

# Why a handshake failed, in our words: the label of
# shardproxy_tls_handshake_failures_total and the access event's error.type.
UNKNOWN_NAME = "unknown_server_name"  # strict_sni, and no certificate for the name
PROTOCOL_VERSION = "protocol_version"  # below min_version, or nothing in common
NO_SHARED_CIPHER = "no_shared_cipher"
PLAIN_HTTP = "plain_http"  # an HTTP request on a TLS port
NO_CLIENT_CERT = "no_client_certificate"  # verify_client = "required"
BAD_CLIENT_CERT = "bad_client_certificate"  # it did not verify against client_ca
PEER_ALERT = "peer_alert"  # the peer refused us (our certificate, say) with an alert
PEER_GONE = "peer_gone"  # closed or reset mid-handshake
TIMEOUT = "handshake_timeout"  # not done within header_timeout (the engine's)
BAD_HANDSHAKE = "bad_handshake"  # anything else that is not TLS as it should be
BAD_SERVER_CERT = "bad_server_certificate"  # towards a backend: it did not verify
REASONS = (
    UNKNOWN_NAME,
    PROTOCOL_VERSION,
    NO_SHARED_CIPHER,
    PLAIN_HTTP,
    NO_CLIENT_CERT,
    BAD_CLIENT_CERT,
    PEER_ALERT,
    PEER_GONE,
    TIMEOUT,
    BAD_HANDSHAKE,
    BAD_SERVER_CERT,
)

_BY_OPENSSL_REASON = {
    "UNSUPPORTED_PROTOCOL": PROTOCOL_VERSION,
    "VERSION_TOO_LOW": PROTOCOL_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": PROTOCOL_VERSION,
    "NO_PROTOCOLS_AVAILABLE": PROTOCOL_VERSION,
    "NO_SHARED_CIPHER": NO_SHARED_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": NO_SHARED_CIPHER,
    "HTTP_REQUEST": PLAIN_HTTP,
    "HTTPS_PROXY_REQUEST": PLAIN_HTTP,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CLIENT_CERT,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": NO_CLIENT_CERT,
}


class TlsFailure(Exception):
    """A handshake that cannot complete: ``reason`` (one of REASONS) and
    OpenSSL's words for it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TlsError(ConnectionError):
    """A TLS connection failed after its handshake (a record that does not
    decrypt, an alert): to the engines, a connection that failed."""


def _failure(e: ssl.SSLError, server_side: bool) -> TlsFailure:
    name = getattr(e, "reason", None) or ""
    if isinstance(e, ssl.SSLEOFError):
        return TlsFailure(PEER_GONE, "the peer closed the connection mid-handshake")
    bad_cert = BAD_CLIENT_CERT if server_side else BAD_SERVER_CERT
    if isinstance(e, ssl.SSLCertVerificationError):
        return TlsFailure(bad_cert, e.verify_message or str(e))
    reason = _BY_OPENSSL_REASON.get(name)
    if reason is None:
        if name.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            reason = PEER_ALERT
        elif name == "CERTIFICATE_VERIFY_FAILED":
            reason = bad_cert
        else:
            reason = BAD_HANDSHAKE
    return TlsFailure(reason, (name.lower().replace("_", " ") if name else str(e)))


TICKET_KEYS_BYTES = 80  # OpenSSL 3's set of session ticket keys: name 16, HMAC 32, AES 32
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_libssl: Any = None


def share_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give ``ctx`` these session ticket keys, so that every worker (each
    its own process, each with random keys of its own otherwise) resumes
    the sessions of the others: SO_REUSEPORT sends a client's next
    connection to any worker. The ``ssl`` module has no call for it, so
    this goes to OpenSSL's ``SSL_CTX_ctrl`` through ctypes, with the
    ``SSL_CTX *`` that CPython keeps right after the object header of an
    SSLContext (Modules/_ssl.c, PySSLContext); the pointer is used only
    when OpenSSL's options read through it equal ``ctx.options``. Whether
    the keys were set (False: the worker keeps its own keys)."""
    global _libssl
    import ctypes
    import sys

    if len(keys) != TICKET_KEYS_BYTES:
        raise ValueError(f"ticket keys are {TICKET_KEYS_BYTES} bytes, not {len(keys)}")
    try:
        if _libssl is None:
            lib = ctypes.CDLL("libssl.so.3")
            lib.SSL_CTX_ctrl.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_long,
                ctypes.c_void_p,
            ]
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            _libssl = lib
    except (OSError, AttributeError):
        return False
    if not ssl.OPENSSL_VERSION.startswith("OpenSSL 3."):
        return False
    header = sys.getsizeof(object())  # PyObject_HEAD
    pointer = ctypes.c_void_p.from_address(id(ctx) + header).value
    if not pointer or _libssl.SSL_CTX_get_options(pointer) != int(ctx.options):
        return False
    buffer = ctypes.create_string_buffer(keys, TICKET_KEYS_BYTES)
    return bool(_libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), buffer))


class TlsServer:
    """The TLS side of one listener: makes a :class:`TlsConnection` per
    accepted connection (see the module docstring for SNI)."""

    forwarded_proto = "https"

    def __init__(self, profile: TlsProfile, ticket_keys: bytes = b"") -> None:
        """``ticket_keys``: session ticket keys common to every worker (the
        supervisor's); b"": this process's own."""
        self.profile = profile
        self._contexts = [server_context(profile, c.cert, c.key) for c in profile.certificates]
        # Whether the workers' tickets are common (share_ticket_keys).
        self.shared_tickets = bool(ticket_keys) and all(
            share_ticket_keys(ctx, ticket_keys) for ctx in self._contexts
        )
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}  # ".example.com" → its context
        for files, ctx in zip(profile.certificates, self._contexts, strict=True):
            for name in files.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[1:], ctx)
                else:
                    self._exact.setdefault(name, ctx)
        self.default = self._contexts[0]
        self.default.sni_callback = self._choose

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context of the certificate for ``server_name``; None: no
        certificate has the name (the default serves it unless strict)."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        ctx = self._exact.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            ctx = self._wildcard.get("." + parent) if dot and parent else None
        return ctx

    def _choose(self, obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        obj.shardproxy_sni = server_name
        chosen = self.context_for(server_name)
        if chosen is None:
            if self.profile.strict_sni:
                obj.shardproxy_refused = UNKNOWN_NAME
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None
        if chosen is not ctx:
            obj.context = chosen
        return None

    def connection(self) -> TlsConnection:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return TlsConnection(
            self.default.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing
        )


class TlsClient:
    """The TLS side of a pool's upstream connections (``[pools.X.tls]``),
    with a session kept per endpoint for resumption."""

    def __init__(self, tls: BackendTls) -> None:
        self.tls = tls
        self.context = client_context(tls)
        self._sessions: dict[Endpoint, ssl.SSLSession] = {}

    def connection(self, endpoint: Endpoint) -> TlsConnection:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.context.wrap_bio(
            incoming,
            outgoing,
            server_side=False,
            server_hostname=self.tls.server_name or endpoint.host,
            session=self._sessions.get(endpoint),
        )
        return TlsConnection(obj, incoming, outgoing)

    def keep_session(self, endpoint: Endpoint, conn: TlsConnection) -> None:
        """Keep ``conn``'s session for the next connection to ``endpoint``
        (TLS 1.3 sends it after the handshake: call this after a read)."""
        session = conn.session
        if session is not None:
            self._sessions[endpoint] = session


class TlsConnection:
    """One TLS connection, a Transport (engine/transport.py) over its
    descriptor; :meth:`handshake` first."""

    __slots__ = (
        "_buffered",
        "_eof",
        "_in",
        "_obj",
        "_out",
        "_raw",
        "_sealed",
        "server_name",
        "tls_info",
    )

    forwarded_proto = "https"

    def __init__(self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self._obj = obj
        self._in = incoming
        self._raw = outgoing
        self._out = b""  # records not yet taken by the socket
        self._sealed = 0  # bytes of the caller's that ``_out`` holds sealed
        self._eof = False
        self._buffered = False  # records may wait in the BIO (after the handshake)
        self.server_name: str | None = None  # the client's SNI (server side)
        self.tls_info: TlsInfo | None = None  # the engine's record of it, once established

    # -- the handshake -----------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection before TLS (behind a PROXY header)."""
        self._in.write(data)

    def handshake(self, fd: int) -> int:
        """One step of the handshake: 0 when it is done, else the epoll
        events to wait for (EPOLLIN or EPOLLOUT). Raises :class:`TlsFailure`
        (any alert of ours was sent, as far as the socket took it)."""
        obj = self._obj
        while True:
            if not self._flush_handshake(fd):
                return select.EPOLLOUT
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                self._collect()
                if not self._flush_handshake(fd):
                    return select.EPOLLOUT
                try:
                    data = os.read(fd, HANDSHAKE_READ)
                except BlockingIOError:
                    return select.EPOLLIN
                except OSError as e:
                    raise TlsFailure(PEER_GONE, e.strerror or str(e)) from None
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            except ssl.SSLError as e:
                if obj.server_side:
                    self.server_name = self._sni()
                refused = getattr(obj, "shardproxy_refused", None)
                failure = _failure(e, obj.server_side)
                if refused is not None:
                    failure = TlsFailure(refused, f"no certificate for {self._sni()!r}")
                self._collect()
                try:
                    self._send_some(fd)  # the alert, if the socket takes it
                except OSError:
                    pass
                raise failure from None
            self._collect()
            if not self._flush_handshake(fd):
                return select.EPOLLOUT
            self._buffered = True
            if obj.server_side:
                self.server_name = self._sni()
            return 0

    def _flush_handshake(self, fd: int) -> bool:
        """Send the records of the handshake so far; whether all went."""
        if not self._out:
            return True
        try:
            return self._send_some(fd)
        except OSError as e:
            raise TlsFailure(PEER_GONE, e.strerror or str(e)) from None

    def _sni(self) -> str | None:
        # The name the client asked for, as the SNI callback saw it.
        name: str | None = getattr(self._obj, "shardproxy_sni", None)
        return name

    def info(self) -> TlsInfo:
        """What the access event says of this connection (after the handshake)."""
        obj = self._obj
        cipher = obj.cipher()
        subject = fingerprint = ""
        der = obj.getpeercert(binary_form=True) if obj.server_side else None
        if der:
            subject, fingerprint = describe_der(der)
        return TlsInfo(
            obj.version() or "",
            cipher[0] if cipher else "",
            self.server_name or "",
            obj.selected_alpn_protocol() or "",
            obj.session_reused,
            subject,
            fingerprint,
        )

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._obj.session

    # -- the Transport contract -------------------------------------------

    def readv(self, fd: int, buffers: Sequence[bytearray]) -> int:
        return self._read_into(fd, memoryview(buffers[0]))

    def read(self, fd: int, n: int) -> bytes:
        buf = bytearray(n)
        k = self._read_into(fd, memoryview(buf))
        return bytes(buf[:k])

    def _read_into(self, fd: int, buf: memoryview) -> int:
        if self._eof:
            return 0
        if self._buffered:
            self._buffered = False
            n = self._decrypt(fd, buf)
            if n or self._eof:
                return n
        room = len(buf) - self._in.pending
        data = os.read(fd, max(room, HANDSHAKE_READ))  # BlockingIOError, OSError: the caller's
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        n = self._decrypt(fd, buf)
        if n or self._eof:
            return n
        raise BlockingIOError(errno.EAGAIN, "no application data yet")

    def _decrypt(self, fd: int, buf: memoryview) -> int:
        """Every complete record of the BIO into ``buf``; sets ``_eof`` at
        the peer's close_notify or at a TCP end without one (truncation
        shows in the WebSocket stream, which the frame trackers see)."""
        obj, pos, size = self._obj, 0, len(buf)
        while pos < size:
            try:
                k = cast(int, obj.read(size - pos, buf[pos:]))  # given a buffer: a count
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                break
            except ssl.SSLError as e:
                self._collect()  # OpenSSL's alert (bad_record_mac...) goes to the peer
                try:
                    self._send_some(fd)
                except OSError:
                    pass
                raise TlsError(errno.EPROTO, f"TLS: {e.reason or e}") from None
            if not k:
                self._eof = True
                break
            pos += k
        if self._raw.pending:  # a KeyUpdate's answer, a ticket: goes out with the next write
            self._collect()
            try:
                self._send(fd)
            except BlockingIOError:
                pass
        return pos

    def write(self, fd: int, data: bytes | memoryview) -> int:
        done = 0
        if self._out:
            if not self._send(fd):
                raise BlockingIOError(errno.EAGAIN, "the socket takes no more records")
            done, self._sealed = self._sealed, 0
            data = data[done:]
            if not data:
                return done
        try:
            self._obj.write(data)
        except ssl.SSLError as e:
            raise TlsError(errno.EPROTO, f"TLS: {e.reason or e}") from None
        self._collect()
        if self._send_some(fd):
            return done + len(data)
        self._sealed = len(data)
        return done

    def shutdown_write(self, fd: int) -> None:
        """close_notify, then FIN; the other direction may go on (TLS 1.3
        half-close, RFC 8446 §6.1)."""
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify written; the peer's is not awaited
        except ssl.SSLError:
            pass
        self._collect()
        if self._send_some(fd):
            PLAIN.shutdown_write(fd)

    reset = staticmethod(PLAIN.reset)

    def close(self, fd: int) -> None:
        self._out = b""
        PLAIN.close(fd)

    # -- records to the socket ---------------------------------------------

    def _collect(self) -> bool:
        """Move the records OpenSSL wrote into ``_out``; whether any were."""
        if not self._raw.pending:
            return False
        self._out += self._raw.read()
        return True

    def _send(self, fd: int) -> bool:
        """Write ``_out`` on; whether all of it went. BlockingIOError: none of it."""
        n = os.write(fd, self._out)
        self._out = self._out[n:]
        return not self._out

    def _send_some(self, fd: int) -> bool:
        try:
            return self._send(fd)
        except BlockingIOError:
            return False
