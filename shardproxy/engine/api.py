"""The interface between a worker and its engines: the relay
(:class:`TunnelEngine`, reporting to :class:`TunnelEvents`) and the
handshake engine (:class:`Handshakes`, reporting to
:class:`HandshakeEvents` in records of its own such as :class:`Upgraded`).

The worker hands the engine a tunnel (two connected non-blocking sockets,
its token, its first bytes each way) and gets back a tunnel id; it asks for
a WebSocket close or an end by id; the engine tells it of every tunnel that
ended, with the token, the outcome and a small :class:`TunnelStats` record
(or, for the ordinary ends an engine summarizes, an :class:`EndSummary` per
token and round: :meth:`TunnelEngine.summarize`).
Nothing outside an engine reads its objects. Two engines implement it: the
Python reference (``engine/relay.py``) and the compiled one
(``engine/crelay.py`` over ``engine/_cengine.c``); ``engine/factory.py``
builds the one ``engine/choice.py`` chose.

Keepalive is the engine's own business (:class:`Keepalive`): it pings each
client once per interval, spread evenly, and ends a client silent for a
whole timeout after a Ping with outcome PING_TIMEOUT, so that no Python runs
per tunnel per interval in a compiled engine.

Limits per tunnel: none exist yet, so ``add`` takes none; the per-route
frame and message limits (issue 17) come as one more argument, a record the
engine reads per frame header.

Ids: an int per tunnel, never reused by the same engine while the worker
lives (a descriptor number is: a closed tunnel's fds come back for the next).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from shardproxy.engine.transport import PLAIN_PAIR, Transports
from shardproxy.policy.admission import AdmissionLease
from shardproxy.policy.registry import EndpointState, ServerState
from shardproxy.protocol.errors import Reject
from shardproxy.protocol.upgrade import UpgradeRequest

# The ways a tunnel ends, for the access log and metrics (the log's words).
CLOSED = "closed"  # both directions finished with FIN
CLIENT_RESET = "client_reset"
BACKEND_RESET = "backend_reset"
STOPPED = "stopped"  # closed by the proxy without a WebSocket close handshake
DRAINED = "drained"  # closed by the proxy after a WebSocket close handshake (begin_close)
PING_TIMEOUT = "ping_timeout"  # the client sent nothing for ping_timeout after a Ping
INTERNAL_ERROR = "internal_error"  # a bug of ours while relaying; both sides reset
# Every outcome, in the compiled core's order (_cengine.c: SP_CLOSED ...;
# EndSummary.outcomes counts per name in this order).
OUTCOMES = (CLOSED, CLIENT_RESET, BACKEND_RESET, STOPPED, DRAINED, PING_TIMEOUT, INTERNAL_ERROR)


class FlowStats(NamedTuple):
    """One direction of an ended tunnel. (These records made once per
    tunnel are named tuples: a frozen dataclass of five fields takes 550 ns
    to make, a named tuple 230, and the handshake path makes five of them.)"""

    bytes: int
    messages: int  # WebSocket data messages, from frame headers
    close_code: int | None  # of the first Close frame; 1005 for one without a code
    close_order: int  # when that Close went by, in the order of every Close; 0: none
    frame_error: str | None  # why the frame tracker lost this direction's framing


class TlsInfo(NamedTuple):
    """A client's TLS connection, for the access event (ECS ``tls.*``)."""

    version: str  # "TLSv1.3"
    cipher: str
    server_name: str  # the client's SNI; "" for none
    alpn: str  # the protocol agreed by ALPN; "" for none
    resumed: bool
    client_subject: str  # the client certificate's subject (RFC 4514); "" for none
    client_fingerprint: str  # its SHA-256, lower-case hex; "" for none


class TunnelStats(NamedTuple):
    up: FlowStats  # client → backend
    down: FlowStats  # backend → client
    duration: float  # seconds, from the 101 to the end
    note: bytes = b""  # what the owner gave ``add`` (TunnelEngine.add)
    tls: TlsInfo | None = None  # the client's TLS connection; None: plain TCP


class EndSummary(NamedTuple):
    """Tunnels of one token that ended the ordinary way in one round,
    told together (:meth:`TunnelEvents.tunnels_closed`; see
    :meth:`TunnelEngine.summarize` for which ends are ordinary)."""

    tunnels: int  # how many ended
    outcomes: tuple[int, ...]  # how many ended with each of OUTCOMES
    up_bytes: int  # client → backend, summed
    down_bytes: int
    up_messages: int
    down_messages: int
    seconds: tuple[int, ...]  # the durations per bucket of summarize's bounds (bisect_left)
    seconds_sum: float


PING_STATES = ("none", "due", "sent")  # TunnelView.ping
NOTE_BYTES = 37  # TunnelEngine.add's note: room for two IPv6 addresses, two ports and a byte


@dataclass(frozen=True, slots=True)
class TunnelView:
    """What an engine can tell of one open tunnel (TunnelEngine.inspect):
    its figures so far, and where its state machine stands."""

    seconds: float  # since the 101
    up: FlowStats  # client → backend, so far
    down: FlowStats
    parked: tuple[int, int]  # bytes waiting for their destination (up, down); >0: source paused
    closing: bool  # begin_close ran
    ping: str  # PING_STATES: none; due (waiting for frame boundaries); sent (unanswered)
    at_boundary: tuple[bool, bool]  # each direction between frames (up, down)
    held: int  # client bytes kept back while looking for our Pong
    note: bytes  # the owner's, from add


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The proxy's WebSocket pings to clients; interval 0: none."""

    interval: float = 0.0
    timeout: float = 10.0


class TunnelEvents(Protocol):
    """What an engine tells its owner. Neither may raise or block."""

    def tunnel_closed(self, token: Any, outcome: str, stats: TunnelStats) -> None:
        """Called once per tunnel, after both its sockets were closed, but
        for those an engine summarizes (:meth:`tunnels_closed`)."""

    def tunnels_closed(self, token: Any, summary: EndSummary) -> None:
        """``summary.tunnels`` tunnels of ``token`` ended the ordinary way
        (:meth:`TunnelEngine.summarize`); their access lines are written."""

    def relay_error(self) -> None:
        """A bug of ours, called inside the ``except`` (the trace can be
        logged); that tunnel is then reset both ways, outcome INTERNAL_ERROR."""


class TunnelEngine(Protocol):
    """The relay engine of one worker."""

    def add(
        self,
        client_fd: int,
        backend_fd: int,
        token: Any,
        to_backend: bytes,
        to_client: bytes,
        io: Transports = PLAIN_PAIR,
        note: bytes = b"",
        summary: tuple[bytes, ...] | None = None,
    ) -> int:
        """Take over two connected sockets, their bytes moving through ``io``
        (engine/transport.py); the tunnel's id. ``note``: at most
        :data:`NOTE_BYTES` of the owner's, kept with the tunnel and handed
        back in its TunnelStats (so that what differs per tunnel need not
        be a Python object: the token may be shared by many tunnels).
        ``summary``: the tunnel's end may be summarized (:meth:`summarize`),
        its access line written from this form (worker/access.py's
        summary_form; ``()``: no line)."""

    def summarize(self, bounds: tuple[float, ...], bad_codes: tuple[int, ...]) -> bool:
        """From now on, an engine may tell the ordinary ends of tunnels
        added with a ``summary`` form together, per token and round
        (:meth:`TunnelEvents.tunnels_closed`), their durations counted over
        ``bounds``, and write their access lines itself. Ordinary: not
        PING_TIMEOUT, both framings intact, neither Close code one of
        ``bad_codes``, and a note (worker/tunnels.py) that holds the
        client's address and no forwarded address. Any other end comes to
        ``tunnel_closed``, as every end does from an engine that ignores
        this (the Python engines: one Python call per end either way).
        Returns whether this engine summarizes (else its owner need make no
        forms)."""

    def begin_close(self, tunnel: int, code: int, reason: bytes, wait: float | None = None) -> None:
        """A WebSocket Close with ``code`` each way at frame boundaries
        (RFC 6455 §7), then both sockets closed, outcome DRAINED; ended
        anyway ``wait`` seconds later (outcome STOPPED; None: no bound)."""

    def close_spread(
        self, tunnels: Sequence[int], span: float, code: int, reason: bytes, wait: float | None
    ) -> None:
        """:meth:`begin_close` each tunnel in turn, evenly over ``span``
        seconds, the first at once (drains, servers that went down)."""

    def end(self, tunnel: int, outcome: str = STOPPED) -> None:
        """Close the tunnel now, if it is still open."""

    def alive(self, tunnel: int) -> bool: ...

    def token(self, tunnel: int) -> Any:
        """The token the tunnel was added with; None once it ended."""

    def inspect(self, tunnel: int) -> TunnelView | None:
        """The tunnel as it stands; None once it ended."""

    def tunnels(self, tokens: Collection[Any] | None = None) -> Sequence[tuple[int, Any]]:
        """(id, token) of every open tunnel; with ``tokens``, of those
        whose token is one of them (compared by identity)."""

    def __len__(self) -> int: ...

    async def run(self) -> None:
        """Relay until cancelled."""

    def close(self) -> None:
        """Close every tunnel (outcome STOPPED) and the engine."""


class Upgraded(NamedTuple):
    """A handshake that became a tunnel: what its owner takes over."""

    lease: AdmissionLease  # what the connection holds (released, or handed over, by the owner)
    client_fd: int
    backend_fd: int
    to_backend: bytes  # tunnel bytes that came behind the request head
    to_client: bytes  # and behind the response head
    io: Transports  # what each side's bytes went through
    request: UpgradeRequest
    seconds: float  # from accept to the 101 passed on


class HandshakeEvents(Protocol):
    """What the handshake engine tells its owner, in records of its own
    (never its Handshake objects, so that a compiled engine can report the
    same). None of these may raise or block; the engine has closed nothing
    of its own when they are called but for :meth:`established`, which
    hands both descriptors over."""

    def established(self, tunnel: Upgraded) -> None:
        """The 101 went to the client: the descriptors are the owner's now."""

    def rejected(
        self, lease: AdmissionLease, request: UpgradeRequest | None, r: Reject, seconds: float
    ) -> None:
        """The connection of ``lease`` was answered ``r``, ``seconds`` after
        accept; ``request``: its head, if one parsed (counted and logged by
        the owner)."""

    def handshake_failed(self, lease: AdmissionLease, e: OSError) -> None:
        """The client's socket failed before its tunnel was up."""

    def tls_failed(self, lease: AdmissionLease, reason: str, detail: str, server_name: str) -> None:
        """The client's TLS handshake failed (``reason``: one of
        engine/tls.py's REASONS; ``server_name``: its SNI, "" for none);
        the connection is closed (a plain 400 first, for plain HTTP)."""

    def connect_failed(
        self, pool: str, server: ServerState, endpoint: EndpointState, reason: str
    ) -> None:
        """An upstream connect was refused or timed out (the next server is tried)."""

    def accept_error(self, e: OSError) -> None:
        """accept() failed for lack of descriptors or memory: backing off."""

    def internal_error(self) -> None:
        """A bug of ours, called inside the ``except`` (the trace can be
        logged); the connection is answered 500 or closed after."""


class Handshakes(Protocol):
    """The handshake engine of one worker (engine/handshake.py's
    HandshakeEngine): accepts on its listen sockets, upgrades, connects
    upstream, and reports to its HandshakeEvents."""

    kind: str  # "python" or "compiled": which engine this is (the worker-ready event)

    def stop_accepting(self, *, sweep: Collection[int] | None = None, refuse: bool = True) -> None:
        """Let go of the listen sockets (those of ``sweep`` emptied first,
        their queue refused with 503 when ``refuse``, else served)."""

    def __len__(self) -> int:
        """Handshakes in flight."""

    async def run(self) -> None:
        """Serve until cancelled."""

    def close(self) -> None:
        """Close every handshake and the engine."""
