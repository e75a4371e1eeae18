"""The compiled handshake engine: :class:`CompiledHandshakeEngine`, a
:class:`~shardproxy.engine.api.Handshakes` over the C core in
``engine/_chandshake.c`` (``Handshaker``).

The core does every system call of a handshake and keeps its I/O state in a
C struct: accept, the request head's bytes under ``max_header_bytes``, the
upstream connect's completion, the forwarded head's write, the backend's
answer, the 101 to the client, the lingering close after an answer of ours,
and the deadlines. This module makes the decisions, in batches after each
call into the core (its events, see the C head comment): the lease, the
head's validation (``protocol/upgrade.py``'s readers, with the C head
parser), the route, the server and the upstream connect through the address
plan, the answers' bytes, and every report to
:class:`~shardproxy.engine.api.HandshakeEvents`. So the two engines answer
the same bytes with the same verdicts from the same code, and only the
moving of bytes differs.

In a worker the core shares the compiled relay's epoll set and loop
(``relay=``; :meth:`CompiledRelayEngine.attach`): one set and one trio task
serve handshakes and tunnels alike, and this engine's :meth:`run` only
waits. Alone (the engine tests) it runs a set and a loop of its own.

Per handshake, besides the core's struct, a small :class:`_Pending` holds
what the policy reads (the lease, the parsed request, the servers tried):
those are Python objects the policy code takes anyway, and they live only
until the 101 or the close.

Which listeners: the core reads plain TCP, so a worker with a non-plain
(TLS) listener, or a pool connected with TLS, runs the Python engine instead (:func:`serves`;
the factory decides, engine/factory.py). A PROXY-protocol (``accept_proxy``)
listener's connections are read raw: every read goes to this module, which
reads the PROXY header and then the head with the Python engine's readers,
asking the core for the next read (``read_more``) until it has them.
Differences from the Python engine that no client can see: the core reads
at most ``max_header_bytes`` + 4 KiB for the head, so tunnel bytes sent
behind a head beyond that wait in the socket for the relay; a connection
refused at accept (over capacity, a drain) may have had its head read
before the refusal, and is logged without it, as the Python engine does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import trio

from shardproxy.config import Endpoint, ProxyConfig
from shardproxy.engine import choice
from shardproxy.engine.api import HandshakeEvents, Upgraded
from shardproxy.engine.handshake import (
    LINGER_TIMEOUT,
    OVER_CAPACITY,
    SHUTTING_DOWN,
    UNTRUSTED,
    connect_refusal,
    proxied_by,
)
from shardproxy.engine.loop import BUSY_ROUND
from shardproxy.engine.transport import PLAIN, PLAIN_PAIR, local_address
from shardproxy.engine.upstream import Exhausted, TupleSpace, Upstream
from shardproxy.policy.admission import Admission, AdmissionLease
from shardproxy.policy.decisions import Decisions
from shardproxy.policy.registry import ServerState
from shardproxy.protocol.errors import NEED_DATA, BackendError, Reject
from shardproxy.protocol.http1 import HeadParsers
from shardproxy.protocol.proxyproto import HeaderReader, ProxyHeader, encode_v2, is_trusted
from shardproxy.protocol.upgrade import (
    RequestReader,
    ResponseHead,
    ResponseReader,
    UpgradeRequest,
    error_response,
    forward_head,
    request_head,
)

if TYPE_CHECKING:
    from shardproxy.engine._cengine import Handshaker
    from shardproxy.engine.crelay import CompiledRelayEngine

_FD = 0xFFFFFFFF  # a handshake id's low half: its client descriptor (see the C head comment)


def serves(transports: Sequence[object], decisions: Decisions | None = None) -> bool:
    """Whether the core can take listeners with these transports, and
    connect to the pools of ``decisions``: plain TCP only, both ways."""
    if choice.COMPILED is None or not all(t is PLAIN for t in transports):
        return False
    pools = () if decisions is None else decisions.pools.values()
    return all(pool.config.tls is None for pool in pools)


class _Pending:
    """What the decisions about one handshake read, until it ends."""

    __slots__ = (
        "exhausted",
        "first_up",
        "header",
        "lease",
        "local",
        "port",
        "reader",
        "reject",
        "request",
        "response",
        "started",
        "timeouts",
        "tried",
    )

    def __init__(self, lease: AdmissionLease, port: int) -> None:
        self.lease = lease
        self.port = port  # of the listener: X-Forwarded-Port
        self.started = time.monotonic()
        self.reader: RequestReader | None = None
        self.header: HeaderReader | None = None  # a PROXY header to read first
        self.local: tuple[str, int] | None = None  # the address the client connected to
        self.request: UpgradeRequest | None = None
        self.first_up = b""
        self.tried: list[ServerState] = []
        self.timeouts = 0
        self.exhausted = False
        self.response: ResponseReader | None = None
        self.reject: Reject | None = None


class CompiledHandshakeEngine:
    """The handshake engine of one worker, compiled: the same contract and
    collaborators as :class:`~shardproxy.engine.handshake.HandshakeEngine`."""

    kind = "compiled"

    def __init__(
        self,
        proxy: ProxyConfig,
        listeners: list[socket.socket],
        admission: Admission,
        upstream: Upstream,
        decisions: Decisions,
        events: HandshakeEvents,
        transports: Sequence[object] = (),
        parsers: HeadParsers = choice.PARSERS,
        relay: CompiledRelayEngine | None = None,
    ) -> None:
        """``relay``: the worker's compiled relay, whose epoll set and loop
        this engine then shares (CompiledRelayEngine.attach); None: a set
        and a loop (:meth:`run`) of its own."""
        compiled = choice.COMPILED
        if compiled is None or not serves(transports, decisions):
            raise ValueError("the compiled handshake engine takes plain TCP only, both ways")
        self.proxy = proxy
        self.admission = admission
        self.upstream = upstream
        self.decisions = decisions
        self.events = events
        self._parsers = parsers
        self._core: Handshaker = compiled.Handshaker(
            proxy.header_timeout,
            proxy.connect_timeout,
            proxy.response_timeout,
            LINGER_TIMEOUT,
            proxy.max_header_bytes,
            proxy.max_handshakes,
            -1 if relay is None else relay.epoll_fd(),
        )
        self._c = compiled
        self._listeners = list(listeners)
        self._ports = {s.fileno(): s.getsockname()[1] for s in listeners}
        self._proxied = {
            s.fileno(): Endpoint(*s.getsockname()[:2]) in proxy.accept_proxy for s in listeners
        }
        self._pending: dict[int, _Pending] = {}
        self._internal_errors = 0
        self._refusal: Reject | None = None  # of the connections stop_accepting sweeps
        c = compiled
        handlers: dict[int, Callable[[Any], None]] = {
            c.EV_ACCEPTED: self._accepted,
            c.EV_REQUEST: self._request,
            c.EV_FAILED: self._failed,
            c.EV_CONNECTED: self._connected,
            c.EV_CONNECT_FAILED: self._connect_failed,
            c.EV_RESPONSE: self._response,
            c.EV_BACKEND_FAILED: self._backend_failed,
            c.EV_BODY: self._body,
            c.EV_ESTABLISHED: self._established,
            c.EV_ANSWERED: self._answered,
            c.EV_TIMEOUT: self._timed_out,
            c.EV_CLOSED: self._closed,
        }
        self._handlers = [handlers[kind] for kind in range(len(handlers))]
        self._accept_error = c.EV_ACCEPT_ERROR
        for s in listeners:
            self._core.listen(s.fileno(), self._proxied[s.fileno()])
        self._shared = relay is not None
        if relay is not None:
            relay.attach(self)

    def __len__(self) -> int:
        """Handshakes in flight."""
        return len(self._core)

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        """loop.run_epoll's rhythm over the core: sleep in trio until its
        epoll set is readable or a deadline is due, then rounds until one is
        quiet, each followed by the decisions its events asked for."""
        if self._shared:  # the relay's loop serves this engine too
            await trio.sleep_forever()
        core = self._core
        epoll_fd = core.fileno()
        wait_readable = trio.lowlevel.wait_readable
        while True:
            wake = core.next_wake()
            if wake is None:
                await wait_readable(epoll_fd)
            else:
                with trio.move_on_at(trio.current_time() + max(0.0, wake - time.monotonic())):
                    await wait_readable(epoll_fd)
            while True:
                try:
                    handled = core.poll()
                finally:
                    self._deliver()
                now = time.monotonic()
                if wake is not None and now >= wake:
                    try:
                        core.process(now)
                    finally:
                        self._deliver()
                    wake = core.next_wake()
                if handled < BUSY_ROUND:
                    break
                await trio.lowlevel.checkpoint()

    # -- for the relay whose set and loop it shares (crelay.SharedSet) ---------

    @property
    def core(self) -> Handshaker:
        return self._core

    def deliver(self) -> None:
        self._deliver()

    def process(self, now: float) -> None:
        try:
            self._core.process(now)
        finally:
            self._deliver()

    def next_wake(self) -> float | None:
        return self._core.next_wake()

    def close(self) -> None:
        """Close every handshake (their leases given back) and the engine."""
        self._core.close()
        for p in self._pending.values():
            p.lease.release()
        self._pending.clear()

    def stop_accepting(self, *, sweep: Collection[int] | None = None, refuse: bool = True) -> None:
        """As HandshakeEngine.stop_accepting."""
        for i, listener in enumerate(self._listeners):
            if sweep is None or i in sweep:
                self._accept_all(listener, refuse)
            self._core.unlisten(listener.fileno())
            listener.close()
        self._listeners.clear()

    def _accept_all(self, listener: socket.socket, refuse: bool) -> None:
        self._refusal = SHUTTING_DOWN if refuse else None
        try:
            while self.admission.has_room:
                try:
                    hid = self._core.accept_one(listener.fileno(), refuse)
                except OSError:
                    return  # out of descriptors: what is left gets the kernel's reset
                finally:
                    self._deliver()
                if hid is None:
                    return
        finally:
            self._refusal = None

    # -- the core's events ----------------------------------------------------

    def _deliver(self) -> None:
        """Act on every event the last call into the core recorded (acting
        records more: a refusal's answer goes out at once, say)."""
        core = self._core
        events = core.take_events()
        while events:
            handlers = self._handlers
            for event in events:
                kind = event[0]
                if kind == self._accept_error:
                    self._pause_accepting(event[1])
                    continue
                try:
                    handlers[kind](event)
                except Exception:
                    self._contain(kind, event[1])
            events = core.take_events()
        if core.internal_errors != self._internal_errors:
            self._internal_errors = core.internal_errors
            try:
                raise MemoryError("the compiled handshake engine could not record an event")
            except MemoryError:
                self.events.internal_error()

    def _pause_accepting(self, err: int) -> None:
        self.events.accept_error(OSError(err, os.strerror(err)))

    def _accepted(self, event: tuple[int, int, str, int, int, int, bytes | None]) -> None:
        _, hid, ip, port, refused, listener, request = event
        lease = self.admission.lease(ip)
        lease.client_port = port
        p = self._pending[hid] = _Pending(lease, self._ports.get(listener, 0))
        refuse = (self._refusal or SHUTTING_DOWN) if refused else None
        if self.admission.over_capacity:
            refuse = OVER_CAPACITY
        if refuse is None and self._proxied.get(listener):
            if is_trusted(ip, self.proxy.trusted_proxies):
                p.header = HeaderReader(self.proxy.max_header_bytes)
            else:
                refuse = UNTRUSTED
        if refuse is not None:
            self._reject(hid, p, refuse)
            return
        p.reader = RequestReader(self.proxy.max_header_bytes, self._parsers)
        if request is not None:  # the whole head came with the connection
            self._take_request(hid, p, request)

    def _request(self, event: tuple[int, int, bytes]) -> None:
        _, hid, data = event
        p = self._pending.get(hid)
        if p is not None and p.reader is not None:  # else refused meanwhile
            self._take_request(hid, p, data)

    def _take_request(self, hid: int, p: _Pending, data: bytes) -> None:
        assert p.reader is not None
        try:
            if p.header is not None:
                header = p.header.feed(data)
                if header is NEED_DATA:
                    self._core.read_more(hid)
                    return
                assert isinstance(header, ProxyHeader)
                data = proxied_by(p, header)
                if not data:
                    self._core.read_more(hid)
                    return
            result = p.reader.feed(data)
            # From a plain listener the core gives a head end, too many
            # bytes or EOF, on each of which the reader decides; from a
            # PROXY listener, every read.
            if result is NEED_DATA:
                self._core.read_more(hid)
                return
            assert isinstance(result, UpgradeRequest)
            route = self.decisions.route(result)
            if route is None:
                raise Reject(
                    404, "no_route", f"no route for host {result.host!r} path {result.path!r}"
                )
        except Reject as r:
            self._reject(hid, p, r)
            return
        p.request, p.lease.route, p.first_up, p.reader = result, route, p.reader.trailing, None
        self._connect_next(hid, p)

    def _connect_next(self, hid: int, p: _Pending) -> None:
        """HandshakeEngine._connect_next: the next server not tried yet."""
        request, route = p.request, p.lease.route
        assert request is not None
        now = time.monotonic()
        while (
            server := self.decisions.next_server(route, request, p.lease.client_ip, p.tried, now)
        ) is not None:
            p.tried.append(server)
            if self._connect_server(hid, p, server):
                return
        self._reject(hid, p, connect_refusal(p.exhausted, len(p.tried), p.timeouts))

    def _connect_server(self, hid: int, p: _Pending, server: ServerState) -> bool:
        for endpoint in server.endpoints_by_use():
            try:
                fd, space, port = self.upstream.connect_fd(endpoint.endpoint)
            except Exhausted:
                p.exhausted = True
                continue
            except OSError as e:
                self.events.connect_failed(
                    p.lease.route.pool, server, endpoint, e.strerror or str(e)
                )
                return False
            p.lease.hold_upstream(endpoint, space, port)
            p.response = None  # made when an answer comes to Python (_response)
            wanted = space.seen_address is None  # the kernel's choice, not seen yet
            self._core.connect(hid, fd, self._head(hid, p), wanted)
            return True
        return False

    def _head(self, hid: int, p: _Pending) -> bytes:
        """The head the backend gets (HandshakeEngine._connected's)."""
        request, lease = p.request, p.lease
        assert request is not None
        if self.decisions.sends_proxy_header(lease.route):
            local = p.local or local_address(hid & _FD)
            return encode_v2((lease.client_ip, lease.client_port), local) + request_head(request)
        proto = PLAIN.forwarded_proto
        return forward_head(request, lease.client_ip, proto, p.port, self._parsers)

    def _connected(self, event: tuple[int, int, str | None, int]) -> None:
        """The first connect from a space whose source address the kernel
        chooses: the address it chose, for the access events (the core
        asks only then; the source port comes with ESTABLISHED)."""
        _, hid, address, _port = event
        space = self._pending[hid].lease.space
        assert isinstance(space, TupleSpace)
        if space.seen_address is None:
            space.seen_address = address

    def _connect_failed(self, event: tuple[int, int, int, int]) -> None:
        _, hid, err, timed_out = event
        p = self._pending[hid]
        endpoint = p.lease.endpoint
        assert endpoint is not None
        p.lease.drop_upstream()
        if timed_out:
            p.timeouts += 1
        reason = "timed out" if timed_out else os.strerror(err)
        self.events.connect_failed(p.lease.route.pool, endpoint.server, endpoint, reason)
        self._connect_next(hid, p)

    def _response(self, event: tuple[int, int, bytes]) -> None:
        """A read of the backend's answer (a whole 101 in the first read the
        core passes on itself: ESTABLISHED then carries the bytes behind it)."""
        _, hid, data = event
        p = self._pending[hid]
        if p.response is None:
            assert p.request is not None
            p.response = ResponseReader(p.request, self.proxy.max_header_bytes, self._parsers)
        try:
            head = p.response.feed(data)
        except BackendError as e:
            self._reject(hid, p, Reject(502, "bad_gateway", f"backend failed the handshake: {e}"))
            return
        if head is NEED_DATA:
            self._core.read_more(hid)
            return
        assert isinstance(head, ResponseHead)
        if head.status == 101:
            self._core.respond(hid, head.head, self._c.THEN_HAND_OVER)
            return
        p.reject = Reject(head.status, "backend_refused", f"backend answered {head.status}")
        self._pass_body(hid, p, head.head, None)

    def _body(self, event: tuple[int, int, bytes]) -> None:
        _, hid, data = event
        self._pass_body(hid, self._pending[hid], b"", data)

    def _pass_body(self, hid: int, p: _Pending, head: bytes, received: bytes | None) -> None:
        """HandshakeEngine._pass_body: after a non-101 head, its body, then close."""
        assert p.response is not None
        try:
            body, done = p.response.body(received)
        except BackendError:
            body, done = b"", True
        if done:
            p.lease.drop_upstream()
        c = self._c
        self._core.respond(hid, head + body, c.THEN_ANSWERED if done else c.THEN_READ_BODY)

    def _backend_failed(self, event: tuple[int, int, int]) -> None:
        _, hid, err = event
        e = OSError(err, os.strerror(err))
        reject = Reject(502, "bad_gateway", f"backend failed the handshake: {e}")
        self._reject(hid, self._pending[hid], reject)

    def _established(self, event: tuple[int, int, int, int, float, int, bytes | None]) -> None:
        _, hid, client_fd, backend_fd, seconds, source_port, behind = event
        p = self._pending.pop(hid)
        p.lease.source_port = source_port
        assert p.request is not None
        if behind is None:  # the 101 came through _response
            assert p.response is not None
            behind = p.response.trailing
        tunnel = Upgraded(
            p.lease,
            client_fd,
            backend_fd,
            p.first_up,
            behind,
            PLAIN_PAIR,
            p.request,
            seconds,
        )
        self.events.established(tunnel)

    def _answered(self, event: tuple[int, int]) -> None:
        p = self._pending[event[1]]
        assert p.reject is not None
        self._report_reject(p, p.reject)

    def _timed_out(self, event: tuple[int, int, int]) -> None:
        _, hid, what = event
        p = self._pending[hid]
        c = self._c
        if what == c.TO_REQUEST:
            self._reject(hid, p, Reject(408, "header_timeout", "request head not complete in time"))
        elif what == c.TO_WRITE_BACKEND:
            self._reject(
                hid, p, Reject(504, "upstream_timeout", "backend did not read the request")
            )
        elif what == c.TO_RESPONSE:
            self._reject(hid, p, Reject(504, "upstream_timeout", "backend did not answer in time"))
        else:  # writing to the client, or passing a body: give up on this client
            if p.reject is not None:
                self._report_reject(p, p.reject)
            self._close(hid)

    def _failed(self, event: tuple[int, int, int]) -> None:
        """The client's socket failed (the core closed the handshake)."""
        _, hid, err = event
        p = self._pending.pop(hid)
        try:
            self.events.handshake_failed(p.lease, OSError(err, os.strerror(err)))
        finally:
            p.lease.release()

    def _closed(self, event: tuple[int, int]) -> None:
        p = self._pending.pop(event[1], None)
        if p is not None:
            p.lease.release()

    # -- commands ---------------------------------------------------------------

    def _reject(self, hid: int, p: _Pending, r: Reject) -> None:
        """HandshakeEngine._reject: answer ``r``; reported once it is out (ANSWERED)."""
        p.reject = r
        p.lease.drop_upstream()
        self._core.reject(hid, error_response(r.status, r.detail, r.headers))

    def _report_reject(self, p: _Pending, r: Reject) -> None:
        request = p.request or r.request  # a head that parsed, upgrade or not
        self.events.rejected(p.lease, request, r, time.monotonic() - p.started)

    def _close(self, hid: int) -> None:
        self._core.close_hs(hid)
        p = self._pending.pop(hid, None)
        if p is not None:
            p.lease.release()

    def _contain(self, kind: int, hid: int) -> None:
        """HandshakeEngine._internal_error: a bug of ours costs one
        connection: reported, answered 500 while the answer can still be
        ours, else closed."""
        self.events.internal_error()
        p = self._pending.get(hid)
        if p is None:
            return
        c = self._c
        early = (c.EV_ACCEPTED, c.EV_REQUEST, c.EV_CONNECTED, c.EV_CONNECT_FAILED, c.EV_RESPONSE)
        try:
            if kind in early and p.reject is None:
                self._reject(hid, p, Reject(500, "internal_error", "internal proxy error"))
                return
        except Exception:
            pass
        self._close(hid)
