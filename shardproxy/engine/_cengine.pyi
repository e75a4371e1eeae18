# The compiled engine's interface (shardproxy/engine/_cengine.c).

from collections.abc import Sequence
from typing import Any

TRACKER_BYTES: int

class FrameTracker:
    """protocol.frames.FrameTracker in C."""

    def __init__(self) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def feed_to_boundary(self, data: bytes | bytearray | memoryview, /) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def at_boundary(self) -> bool: ...

# protocol.http1's head parser in C (shardproxy/engine/_chttp.c): the same
# results, and protocol.http1.HeadError with the same messages.

def head_end(buffer: bytes | bytearray | memoryview, start: int | None = 0) -> int: ...
def parse_request(
    head: bytes | bytearray | memoryview,
) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]: ...
def parse_response(
    head: bytes | bytearray | memoryview,
) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]: ...
def parse_upgrade(
    buffer: bytes | bytearray | memoryview, end: int, /
) -> (
    tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], tuple[tuple[bytes, bytes], ...], str, str]
    | None
): ...
def forwarded_head(
    method: bytes,
    target: bytes,
    raw_headers: Sequence[tuple[bytes, bytes]],
    client_ip: str,
    proto: str,
    port: int,
    /,
) -> bytes: ...

class Relay:
    """The relay's C core (engine/crelay.py wraps it as a TunnelEngine)."""

    internal_errors: int
    ended: bool
    tunnel_bytes: int
    def __init__(
        self, outcomes: tuple[str, ...], interval: float, timeout: float, ping_payload: bytes
    ) -> None: ...
    def __len__(self) -> int: ...
    def add(
        self,
        client_fd: int,
        backend_fd: int,
        token: object,
        to_backend: bytes,
        to_client: bytes,
        note: bytes,
        form: tuple[bytes, ...] | None = None,
        /,
    ) -> int: ...
    def summarize(self, bounds: tuple[float, ...], bad_codes: tuple[int, ...], /) -> None: ...
    def take_summaries(
        self,
    ) -> list[tuple[object, int, tuple[int, ...], int, int, int, int, tuple[int, ...], float]]: ...
    def take_lines(self) -> list[bytes]: ...
    def poll(self) -> int: ...
    def process(self, now: float, /) -> None: ...
    def next_wake(self, now: float, /) -> float | None: ...
    def begin_close(self, tunnel: int, to_client: bytes, to_backend: bytes, /) -> None: ...
    def ping(self, tunnel: int, /) -> bool: ...
    def end(self, tunnel: int, outcome: int, /) -> None: ...
    def state(self, tunnel: int, /) -> tuple[int, int]: ...
    def token(self, tunnel: int, /) -> object: ...
    def inspect(
        self, tunnel: int, /
    ) -> (
        tuple[
            float,
            tuple[int, int, int | None, int, str | None],
            tuple[int, int, int | None, int, str | None],
            int,
            int,
            int,
            int,
            int,
            int,
            int,
            bytes,
        ]
        | None
    ): ...
    def tunnels(self, tokens: tuple[object, ...] | None = None, /) -> list[tuple[int, object]]: ...
    def take_closed(
        self,
    ) -> list[
        tuple[
            object,
            str,
            tuple[int, int, int | None, int, str | None],
            tuple[int, int, int | None, int, str | None],
            float,
            bytes,
        ]
    ]: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...
    def poke(self) -> None: ...
    def wake_at(self, when: float | None, /) -> None: ...
    def host(self, fd: int, /) -> None: ...
    def unhost(self) -> None: ...
    def serve(self) -> bool: ...
    def attach(self, handshaker: Handshaker, /) -> None: ...

# The handshake core (_chandshake.c): event kinds, TIMEOUT's what, respond's then.
EV_ACCEPTED: int
EV_REQUEST: int
EV_FAILED: int
EV_CONNECTED: int
EV_CONNECT_FAILED: int
EV_RESPONSE: int
EV_BACKEND_FAILED: int
EV_BODY: int
EV_ESTABLISHED: int
EV_ANSWERED: int
EV_TIMEOUT: int
EV_CLOSED: int
EV_ACCEPT_ERROR: int
TO_REQUEST: int
TO_WRITE_BACKEND: int
TO_RESPONSE: int
TO_CLIENT: int
THEN_HAND_OVER: int
THEN_READ_BODY: int
THEN_ANSWERED: int

class Handshaker:
    internal_errors: int
    accepting: bool
    def __init__(
        self,
        header_timeout: float,
        connect_timeout: float,
        response_timeout: float,
        linger_timeout: float,
        max_header_bytes: int,
        max_handshakes: int,
        epoll_fd: int = -1,
    ) -> None: ...
    def __len__(self) -> int: ...
    def listen(self, fd: int, raw: bool, /) -> None: ...
    def unlisten(self, fd: int, /) -> None: ...
    def accept_one(self, fd: int, refuse: bool, /) -> int | None: ...
    def poll(self) -> int: ...
    def process(self, now: float, /) -> None: ...
    def next_wake(self) -> float | None: ...
    def take_events(self) -> list[tuple[Any, ...]]: ...
    def connect(self, hid: int, backend_fd: int, head: bytes, want_address: bool, /) -> None: ...
    def reject(self, hid: int, answer: bytes, /) -> None: ...
    def respond(self, hid: int, data: bytes, then: int, /) -> None: ...
    def read_more(self, hid: int, /) -> None: ...
    def close_hs(self, hid: int, /) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...

def render_access(
    form: tuple[bytes, ...],
    note: bytes,
    outcome: str,
    success: bool,
    up: tuple[int, int, int | None],
    down: tuple[int, int, int | None],
    duration: float,
    now: float,
    /,
) -> bytes: ...
def connect_tcp(
    family: int,
    source: str | None,
    host: str,
    port: int,
    options: tuple[tuple[int, int, int | bytes], ...],
    /,
) -> int: ...
