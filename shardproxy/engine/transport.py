"""Transports: how bytes move on one connection, below both engines.

In the spirit of HAProxy's ``xprt_ops`` (``raw_sock.c`` beside
``ssl_sock.c``): the handshake engine and the relay read, write, half-close,
abort and close a connection only through its :class:`Transport`, never
with ``os.read``/``os.write`` on the descriptor, so that TLS is one more
transport and not a change to the engines. A transport with per-connection
state (TLS: the session, its buffers) is one object per connection; the
plain one has none, so :data:`PLAIN` serves every plain connection and a
plain tunnel costs no memory for it (:data:`PLAIN_PAIR`).

The contract, the plain transport's, which a TLS one keeps: ``readv`` and
``read`` return the bytes the application sees (0 / ``b""``: the peer
finished, a FIN or a close_notify), raise ``BlockingIOError`` when nothing
is there yet and ``OSError`` when the connection failed; ``write`` returns
how much of ``data`` it took (maybe less than all, ``BlockingIOError``:
nothing); ``shutdown_write`` ends our direction; ``reset`` makes the coming
``close`` an abort (RST); ``close`` releases the descriptor. (A TLS
transport will add what level-triggered epoll cannot see on its own, such
as plaintext already decrypted into its buffer; the engines ask for it when
one exists, issue 15.)
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol

__all__ = [
    "PLAIN",
    "PLAIN_PAIR",
    "PlainTransport",
    "Transport",
    "Transports",
    "local_address",
    "pair",
]

_LINGER_RESET = struct.pack("ii", 1, 0)


class Transport(Protocol):
    """The operations on one connection (see the module docstring)."""

    # X-Forwarded-Proto of a client connection that came over it.
    forwarded_proto: str

    def readv(self, fd: int, buffers: Sequence[bytearray]) -> int: ...

    def read(self, fd: int, n: int) -> bytes: ...

    def write(self, fd: int, data: bytes | memoryview) -> int: ...

    def shutdown_write(self, fd: int) -> None: ...

    def reset(self, fd: int) -> None: ...

    def close(self, fd: int) -> None: ...


class PlainTransport:
    """TCP as it is: each operation is the system call (``os.readv`` and
    friends bound directly, so the seam costs one attribute lookup)."""

    forwarded_proto = "http"
    readv = staticmethod(os.readv)
    read = staticmethod(os.read)
    write = staticmethod(os.write)
    close = staticmethod(os.close)

    @staticmethod
    def shutdown_write(fd: int) -> None:
        """Send FIN on ``fd`` (TCP half-close); the descriptor stays open."""
        s = _socket_of(fd)
        try:
            s.shutdown(socket.SHUT_WR)
        finally:
            s.detach()

    @staticmethod
    def reset(fd: int) -> None:
        """Make the coming close() send RST instead of FIN (SO_LINGER {1, 0})."""
        s = _socket_of(fd)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError as e:  # pragma: no cover - only on a descriptor already dead
            if e.errno not in (errno.EBADF, errno.ENOTSOCK):
                raise
        finally:
            s.detach()


PLAIN: Transport = PlainTransport()


class Transports(NamedTuple):
    """A tunnel's two connections' transports."""

    client: Transport
    backend: Transport


PLAIN_PAIR = Transports(PLAIN, PLAIN)


def pair(client: Transport, backend: Transport) -> Transports:
    """The tunnel's pair: the shared one for two plain connections (a pair
    per tunnel would cost 64 bytes each)."""
    if client is PLAIN and backend is PLAIN:
        return PLAIN_PAIR
    return Transports(client, backend)


def _socket_of(fd: int) -> socket.socket:
    """A socket object over a bare descriptor, to call what ``os`` lacks
    (shutdown, setsockopt); ``detach()`` it after. Family and type are given
    because otherwise CPython asks the kernel for them (three getsockopt
    calls), and neither matters to those calls."""
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)


def local_address(fd: int) -> tuple[str, int]:
    """The (ip, port) ``fd`` is bound to; the family is the kernel's."""
    s = socket.socket(fileno=fd)
    try:
        ip, port = s.getsockname()[:2]
        return ip, port
    finally:
        s.detach()
