"""The few RFC 6455 pieces the load generator and the echo backend share.

Deliberately small and allocation-light: no classes per frame, frames are
parsed from a ``bytearray`` in place and returned as tuples.
"""

from __future__ import annotations

import base64
import hashlib
import os
import resource
import socket
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Linux: bind() reserves only the address; connect() picks the port so that
# the 4-tuple is unique (not exported by Python 3.11's socket module).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

MAX_PAYLOAD = 1 << 20  # larger frames are refused (the bench never sends them)


class FrameError(Exception):
    pass


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE := hard; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def unmask(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def encode(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame; clients mask (``mask=True``), servers do not."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + unmask(key, payload)


def parse(buf: bytearray) -> tuple[bool, int, bytes] | None:
    """Take one complete frame off the front of ``buf``: (fin, opcode, payload).

    Returns None while the frame is incomplete; the payload is unmasked.
    Raises :class:`FrameError` for frames this bench does not accept.
    """
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        pos = 10
    if n > MAX_PAYLOAD:
        raise FrameError(f"frame payload of {n} bytes")
    key = None
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return None
        key = bytes(buf[pos : pos + 4])
        pos += 4
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos : pos + n])
    del buf[: pos + n]
    if key is not None:
        payload = unmask(key, payload)
    return bool(b0 & 0x80), b0 & 0x0F, payload


def split_head(buf: bytearray, limit: int = 16384) -> bytes | None:
    """Take an HTTP head (through the blank line) off ``buf``; None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > limit:
            raise FrameError("HTTP head too large")
        return None
    head = bytes(buf[: end + 4])
    del buf[: end + 4]
    return head


def header(head: bytes, name: bytes) -> bytes | None:
    """Value of the first header ``name`` (lower-case) in an HTTP head."""
    for line in head.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == name:
            return v.strip()
    return None
