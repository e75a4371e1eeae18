"""Track WebSocket frame boundaries in one direction of a relayed byte stream.

The proxy relays WebSocket bytes between client and backend without decoding
them, but it still needs to know three things about each direction:

* where frames begin and end, so that it can later inject its own control
  frames (a Close on shutdown, a Ping for liveness) *between* frames -- a frame
  written into the middle of another frame corrupts the stream;
* how many data messages went by, for metrics and balancing;
* the status code of the first Close frame, to log why a tunnel ended.

All three are visible in frame headers (RFC 6455 §5.2)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-------+-+-------------+-------------------------------+
    |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
    |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
    |N|V|V|V|       |S|             |   (if payload len==126/127)   |
    | |1|2|3|       |K|             |                               |
    +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
    |     Extended payload length continued, if payload len == 127  |
    + - - - - - - - - - - - - - - - +-------------------------------+
    |                               |Masking-key, if MASK set to 1  |
    +-------------------------------+-------------------------------+
    | Masking-key (continued)       |          Payload Data         |
    +-------------------------------- - - - - - - - - - - - - - - - +

so :class:`FrameTracker` reads headers as they stream past and skips payloads
by arithmetic: it never unmasks, copies or buffers payload data. It is sans-IO
(it imports nothing that does I/O; a test enforces that) and is fed every chunk
the relay engine moves in one direction, so the common cases are kept cheap:
a chunk holding a few small whole frames is parsed in place, and a chunk that
lies entirely inside a large payload costs one subtraction.

A header split across chunks is the only thing ever held back, as a short
``bytes`` of at most 13 bytes. The tracker never keeps a reference to the
buffer it is fed, because the engine reuses one buffer for every read.

Protocol violations visible in headers set :attr:`FrameTracker.error` and stop
the tracking; the proxy keeps relaying bytes untouched (the endpoints enforce
the protocol, we only log). RSV bits are not checked, since extensions such as
permessage-deflate (RFC 7692) legitimately set them, and neither is the
masking direction.
"""

from __future__ import annotations

__all__ = ["PONG", "FrameTracker", "close_frame", "peek_frame", "ping_frame", "unmasked_payload"]

# Opcodes, RFC 6455 §5.2 and §11.8. 3-7 and 11-15 are reserved.
_CONTINUATION = 0x0
_BINARY = 0x2
_CLOSE = 0x8
_PING = 0x9
_PONG = 0xA
PONG = _PONG

# The longest header we ever need to see in one piece: 2 bytes, a 64-bit
# extended length, a 4-byte masking key. (The first Close frame's header is
# parsed together with its 2-byte status code, but control frames have no
# extended length, so that is at most 2 + 4 + 2 bytes.)
_MAX_HEADER = 14

# RFC 7692 and friends use RSV bits, so only the opcode part of byte 0 matters.
_FIN = 0x80
_OPCODE = 0x0F
_MASK = 0x80
_LENGTH = 0x7F

# RFC 6455 §7.1.5: a Close frame without a status code counts as 1005.
_NO_STATUS_RECEIVED = 1005


class FrameTracker:
    """Follow frame boundaries in one direction of a WebSocket stream.

    Feed it every chunk of bytes passing in that direction, in order, with
    :meth:`feed`; then read:

    ``messages``
        Number of completed data messages: frames with FIN set whose opcode is
        text, binary or continuation (RFC 6455 §5.4). Control frames do not
        count.
    ``close_code``
        Status code of the first Close frame: its first two payload bytes,
        unmasked (RFC 6455 §5.5.1), or 1005 if its payload is empty (§7.1.5).
        ``None`` until a Close frame has been seen in full enough to know it.
    ``error``
        ``None``, or a short reason once a protocol violation was seen in a
        header. From then on :meth:`feed` does nothing.
    ``at_boundary``
        Whether the next byte fed starts a frame header.

    Error handling: a violation never raises. The tracker records it and
    stops parsing, because after a framing error the boundaries it would
    report are meaningless; the bytes themselves keep flowing through the
    proxy, and the endpoints deal with the violation.

    Resource handling: the proxy holds two trackers per tunnel, so an
    instance is six slots of small ints plus, only while a header is split
    across two chunks, a ``bytes`` of at most 13 bytes.
    """

    __slots__ = (
        "_fragmented",
        "_partial",
        "_remaining",
        "close_code",
        "error",
        "messages",
    )

    def __init__(self) -> None:
        self.messages = 0
        self.close_code: int | None = None
        self.error: str | None = None
        # Payload bytes of the current frame not yet seen. 0 between frames.
        self._remaining = 0
        # The start of a header that was cut off by the end of a chunk.
        self._partial = b""
        # True between the first and the last frame of a fragmented message
        # (RFC 6455 §5.4), when only continuation or control frames may follow.
        self._fragmented = False

    @property
    def at_boundary(self) -> bool:
        # After an error we no longer know where frames are, and writing a
        # frame into an unknown position would corrupt the stream: say no.
        return self._remaining == 0 and not self._partial and self.error is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Account for the next chunk of bytes of the stream."""
        if self.error is not None:
            return
        if type(data) is memoryview and (data.format != "B" or data.ndim != 1):
            # Count and index octets whatever the exporter's item format.
            data = data.cast("B")
        n = len(data)
        pos = self._remaining
        if pos >= n:
            # Common for large messages: the whole chunk is payload.
            self._remaining = pos - n
            return
        self._remaining = 0
        if self._partial:
            pos = self._complete_partial(data)
            if pos < 0:
                return
        while pos < n:
            size = self._frame(data, pos, n)
            if size <= 0:
                if size == 0:
                    self._partial = bytes(data[pos:n])
                return
            pos += size
        self._remaining = pos - n

    def feed_to_boundary(self, data: bytes | bytearray | memoryview) -> int:
        """Feed ``data`` only up to the end of the current frame, where a
        frame of our own may be written into the stream.

        Returns how many bytes that took (0 when already at a boundary), or
        -1 when the frame goes on past ``data``, which was then fed whole.
        After an error there is no boundary to find: -1, nothing fed.
        """
        if self.error is not None:
            return -1
        if type(data) is not memoryview or data.format != "B" or data.ndim != 1:
            data = memoryview(data).cast("B")
        n = len(data)
        pos = 0
        # A header cut in two: complete it a byte at a time (13 at most),
        # so that its frame's length is known before going past it.
        while self._partial and pos < n:
            self.feed(data[pos : pos + 1])
            pos += 1
            if self.error is not None:
                return -1
        if self._partial:
            return -1
        remaining = self._remaining
        if remaining > n - pos:
            self.feed(data[pos:])
            return -1
        if remaining:
            self.feed(data[pos : pos + remaining])
        return pos + remaining

    def _complete_partial(self, data: bytes | bytearray | memoryview) -> int:
        """Finish a header begun in an earlier chunk.

        Returns the offset in ``data`` just past that frame, or -1 if there is
        nothing more to do with this chunk (header still incomplete, or error).
        """
        partial = self._partial
        # Copy just enough to parse the header; _frame() is all-or-nothing,
        # so it sees the same bytes as if the header had come in one chunk.
        head = partial + bytes(data[: _MAX_HEADER - len(partial)])
        size = self._frame(head, 0, len(head))
        if size == 0:
            # Still short, so `head` holds all of `data`.
            self._partial = head
            return -1
        self._partial = b""
        if size < 0:
            return -1
        return size - len(partial)

    def _frame(self, data: bytes | bytearray | memoryview, pos: int, end: int) -> int:
        """Parse the frame header starting at ``data[pos]``.

        Returns the whole frame's length (header and payload), 0 if the header
        does not fit in ``data[pos:end]`` (then nothing is changed), or -1
        after setting :attr:`error`.
        """
        avail = end - pos
        if avail < 2:
            return 0
        b0 = data[pos]
        b1 = data[pos + 1]
        opcode = b0 & _OPCODE
        length = b1 & _LENGTH
        header = 6 if b1 & _MASK else 2  # §5.3: 4-byte masking key
        if opcode > _BINARY:
            if opcode < _CLOSE or opcode > _PONG:
                return self._fail(f"reserved opcode {opcode:#x}")
            return self._control(data, pos, avail, b0, header, length)
        if opcode == _CONTINUATION:
            if not self._fragmented:
                return self._fail("continuation frame outside a fragmented message")
        elif self._fragmented:
            return self._fail("new data frame inside a fragmented message")
        if length >= 126:
            # §5.2: 126 means a 16-bit length follows, 127 a 64-bit one.
            extended = 2 if length == 126 else 8
            if avail < header + extended:
                return 0
            start = pos + 2
            length = int.from_bytes(data[start : start + extended], "big")
            if length >> 63:
                return self._fail("64-bit payload length with the MSB set")
            header += extended
        elif avail < header:
            return 0
        # The header is complete: only now change state.
        if b0 & _FIN:
            self.messages += 1
            self._fragmented = False
        else:
            self._fragmented = True
        return header + length

    def _control(
        self,
        data: bytes | bytearray | memoryview,
        pos: int,
        avail: int,
        b0: int,
        header: int,
        length: int,
    ) -> int:
        """Parse the rest of a control frame header (Close, Ping, Pong)."""
        # §5.5: control frames MUST NOT be fragmented and MUST have a payload
        # of at most 125 bytes, so they never carry an extended length.
        if not b0 & _FIN:
            return self._fail("fragmented control frame")
        if length > 125:
            return self._fail("control frame payload over 125 bytes")
        if (b0 & _OPCODE) != _CLOSE or self.close_code is not None:
            return header + length if avail >= header else 0
        # The first Close frame: §5.5.1 says a body, if present, starts with
        # a 2-byte status code. Parse it as if it were part of the header.
        if length == 0:
            if avail < header:
                return 0
            self.close_code = _NO_STATUS_RECEIVED
            self._close_seen()
            return header
        if length == 1:
            return self._fail("close payload of 1 byte")
        if avail < header + 2:
            return 0
        code = pos + header
        hi = data[code]
        lo = data[code + 1]
        if header == 6:
            # §5.3: payload octet i is XORed with masking key octet i % 4.
            hi ^= data[pos + 2]
            lo ^= data[pos + 3]
        self.close_code = hi << 8 | lo
        self._close_seen()
        return header + length

    def _close_seen(self) -> None:
        """Called once, when :attr:`close_code` is set: a hook for a
        subclass (the relay orders the Closes of a tunnel's two directions)."""

    def _fail(self, reason: str) -> int:
        self.error = reason
        return -1


def close_frame(code: int, reason: bytes = b"", mask: bytes | None = None) -> bytes:
    """A Close frame (RFC 6455 §5.5.1): FIN, opcode 8, the 2-byte status
    code and a UTF-8 reason, at most 125 bytes of payload. Frames from a
    client must be masked (§5.3): pass the 4-byte ``mask`` then (from a
    strong source of randomness, §10.3)."""
    payload = code.to_bytes(2, "big") + reason
    if len(payload) > 125:
        raise ValueError("a Close reason may take at most 123 bytes")
    if mask is None:
        return bytes((_FIN | _CLOSE, len(payload))) + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((_FIN | _CLOSE, _MASK | len(payload))) + mask + masked


def ping_frame(payload: bytes) -> bytes:
    """An unmasked Ping (a server's, RFC 6455 §5.5.2), payload ≤ 125 bytes."""
    if len(payload) > 125:
        raise ValueError("a Ping payload may take at most 125 bytes")
    return bytes((_FIN | _PING, len(payload))) + payload


def peek_frame(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int] | None:
    """(opcode, header length, payload length) of the frame whose header
    starts at ``data[pos]``, or None while the header is not all there.
    It changes nothing: what to do with the frame is the caller's choice."""
    avail = len(data) - pos
    if avail < 2:
        return None
    b1 = data[pos + 1]
    length = b1 & _LENGTH
    header = 6 if b1 & _MASK else 2
    if length >= 126:
        extended = 2 if length == 126 else 8
        if avail < header + extended:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 2 + extended], "big")
        header += extended
    elif avail < header:
        return None
    return data[pos] & _OPCODE, header, length


def unmasked_payload(
    data: bytes | bytearray | memoryview, pos: int, header: int, length: int
) -> bytes:
    """The payload of the frame at ``data[pos]`` (all of it must be there),
    unmasked if it is masked (§5.3)."""
    payload = bytes(data[pos + header : pos + header + length])
    if not data[pos + 1] & _MASK:
        return payload
    key = data[pos + header - 4 : pos + header]
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))
