"""The handshake engine: accept, upgrade, connect upstream, in one epoll set.

Every connection from accept until its 101 (or its rejection) is a
:class:`Handshake`, a small state machine driven by epoll events and timers,
in the same shape as the relay engine and for the same reason: a trio task
per connection cost about 300 µs of CPU per handshake (scheduling, cancel
scopes, one wakeup per socket wait), several times HAProxy's whole handshake.
The protocol decisions stay in the sans-IO modules (``handshake``,
``routing``, ``balancer``); this module only moves bytes and keeps time.

States of a handshake (every transition is in :class:`HandshakeEngine`)::

    READ_REQUEST ─(PROXY header,) head valid, routed─► CONNECTING ─connected─► READ_RESPONSE
      │                                  │ refused, timeout:         │
      │                                  │ next server               ├─101─► relay engine
      │                                  └─none left: 502/504 ─┐     └─other─► PASS_BODY ─┐
      └─bad head, timeout, no route: error answer ─────────────┴──► LINGER ─EOF/timeout─► closed

Writes of heads are attempted at once and almost always complete (a head is
smaller than a socket buffer); what does not fit is kept in ``out`` and
finished on EPOLLOUT (state WRITE, which then moves on to ``after_write``).

Kernel semantics relied on: accepted sockets inherit TCP_NODELAY from the
listening socket (Linux copies the TCP options on accept), but not O_NONBLOCK,
which is set per descriptor; a non-blocking connect() reports completion as
EPOLLOUT with the outcome in SO_ERROR (connect(2)).

Collaborators (explicit, never the worker): the proxy's configuration, the
worker's :class:`~shardproxy.admission.Admission` (every connection holds a
lease from accept on, which carries its route, endpoint and upstream tuple
and goes with the tunnel to its end), the :class:`~shardproxy.upstream.Upstream`
to connect through, the :class:`~shardproxy.decisions.Decisions` of policy
(route, next server), and a sink of :class:`HandshakeEvents`, which takes the
finished tunnels and hears of every refusal and failure.

Resource handling: the engine owns every descriptor of a handshake until it
hands both over (:meth:`HandshakeEvents.established`) or closes them; a
handshake it closes gives its lease back. Error handling: socket errors
and protocol errors end only their own handshake, with an HTTP answer where
one can still be sent; accept errors from descriptor exhaustion (EMFILE,
ENFILE, ENOBUFS, ENOMEM) stop accepting for ACCEPT_BACKOFF instead of spinning.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shardproxy.config import Endpoint, ProxyConfig
from shardproxy.engine import choice
from shardproxy.engine.api import HandshakeEvents, Upgraded
from shardproxy.engine.loop import Timers, run_epoll
from shardproxy.engine.tls import (
    PLAIN_HTTP,
    TIMEOUT,
    TlsClient,
    TlsConnection,
    TlsFailure,
    TlsServer,
)
from shardproxy.engine.transport import PLAIN, Transport, Transports, local_address, pair
from shardproxy.engine.upstream import Exhausted, TupleSpace, Upstream
from shardproxy.policy.admission import Admission, AdmissionLease
from shardproxy.policy.decisions import Decisions
from shardproxy.policy.registry import EndpointState, ServerState
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

RECV_SIZE = 65536
ACCEPTS_PER_EVENT = 64  # fairness: accepting must not starve the handshakes in flight
ACCEPT_BACKOFF = 0.1
LINGER_TIMEOUT = 2.0  # to send an error answer and see the client close
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

OVER_CAPACITY = Reject(
    503, "over_capacity", "this worker is at its connection limit", (("Retry-After", "1"),)
)
SHUTTING_DOWN = Reject(503, "shutting_down", "the proxy is shutting down", (("Retry-After", "1"),))
UNTRUSTED = Reject(
    403,
    "untrusted_proxy",
    "this listener takes connections from trusted_proxies only (PROXY protocol)",
)

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP

# Handshake.state
TLS_ACCEPT = "tls_accept"  # the client's TLS handshake (a TLS listener)
READ_REQUEST = "read_request"
CONNECTING = "connecting"
TLS_CONNECT = "tls_connect"  # the TLS handshake with the backend (a TLS pool)
READ_RESPONSE = "read_response"
PASS_BODY = "pass_body"
WRITE = "write"
LINGER = "linger"
FINISHED = "finished"  # closed, or handed over to the relay


@dataclass(frozen=True, slots=True)
class Listener:
    """What a listen socket tells the handshakes it accepts."""

    port: int  # X-Forwarded-Port
    proto: str  # X-Forwarded-Proto
    proxied: bool  # connections open with a PROXY protocol header
    transport: Transport = PLAIN  # what its connections' bytes go through
    tls: TlsServer | None = None  # a TLS listener: each connection gets its own transport


class Handshake:
    """One connection on its way to becoming a tunnel."""

    __slots__ = (
        "after_write",
        "backend",
        "backend_io",
        "client",
        "client_io",
        "deadline",
        "exhausted",
        "first_up",
        "header",
        "lease",
        "listener",
        "local",
        "out",
        "out_fd",
        "reader",
        "reject",
        "request",
        "response",
        "started",
        "state",
        "timeouts",
        "tried",
    )

    def __init__(
        self, client: int, addr: Any, listener: Listener, deadline: float, lease: AdmissionLease
    ) -> None:
        self.client = client
        self.lease = lease  # its slot, client, route, endpoint and upstream tuple
        lease.client_port = addr[1]
        self.listener = listener  # what the client connected to
        self.client_io: Transport = listener.transport  # a TLS connection's own, on a TLS listener
        self.started = time.monotonic()
        self.state = READ_REQUEST
        self.deadline = deadline
        self.reader = None  # type: RequestReader | None
        self.header: HeaderReader | None = None  # a PROXY header to read first
        self.local: tuple[str, int] | None = None  # the address the client connected to
        self.request: UpgradeRequest | None = None
        self.first_up = b""  # tunnel bytes that came behind the request head
        self.tried: list[ServerState] = []
        self.timeouts = 0
        self.backend: socket.socket | None = None
        self.backend_io = PLAIN  # the upstream connection's transport
        self.exhausted = False  # some server was skipped for lack of tuple space
        self.response: ResponseReader | None = None
        self.out = b""
        self.out_fd = -1
        self.after_write: Callable[[Handshake], None] | None = None
        self.reject: Reject | None = None

    @property
    def client_ip(self) -> str:
        return self.lease.client_ip

    @property
    def client_port(self) -> int:
        return self.lease.client_port

    @property
    def transports(self) -> Transports:
        """Both sides' transports, for the relay."""
        return pair(self.client_io, self.backend_io)

    @property
    def client_cert(self) -> str:
        """The SHA-256 of the client's certificate; "" for none."""
        io = self.client_io
        info = io.tls_info if isinstance(io, TlsConnection) else None
        return "" if info is None else info.client_fingerprint


class HandshakeEngine:
    """Accepts on a worker's listen sockets and upgrades connections (see
    the module docstring for its collaborators)."""

    kind = "python"

    def __init__(
        self,
        proxy: ProxyConfig,
        listeners: list[socket.socket],
        admission: Admission,
        upstream: Upstream,
        decisions: Decisions,
        events: HandshakeEvents,
        transports: Sequence[Transport | TlsServer] = (),
        parsers: HeadParsers = choice.PARSERS,
    ) -> None:
        """``transports[i]``: what the connections of ``listeners[i]`` go
        through (plain where none is given; a TlsServer: TLS, a transport
        per connection); ``parsers``: the HTTP head parsers (the compiled
        ones where they were built). Pools with ``tls`` connect with TLS."""
        self.proxy = proxy
        self._parsers = parsers
        self.admission = admission
        self.upstream = upstream
        self.decisions = decisions
        self.events = events
        self._epoll = select.epoll()
        self._listeners = {s.fileno(): s for s in listeners}
        accept_proxy = self.proxy.accept_proxy
        kinds = [*transports, *[PLAIN] * (len(listeners) - len(transports))]
        self._about = {
            s.fileno(): Listener(
                port=s.getsockname()[1],
                proto=transport.forwarded_proto,
                proxied=Endpoint(*s.getsockname()[:2]) in accept_proxy,
                transport=PLAIN if isinstance(transport, TlsServer) else transport,
                tls=transport if isinstance(transport, TlsServer) else None,
            )
            for s, transport in zip(listeners, kinds, strict=True)
        }
        self._tls_clients = {
            name: TlsClient(pool.config.tls)
            for name, pool in decisions.pools.items()
            if pool.config.tls is not None
        }
        self._by_fd: dict[int, Handshake] = {}
        self._masks: dict[int, int] = {}  # what each handshake descriptor waits for
        self._timers: Timers[Handshake] = Timers()
        self._backoff_until = 0.0  # accept failed for lack of descriptors: wait
        self._full = False  # max_handshakes in flight: leave the rest queued
        self._accepting = False
        self.handshakes = 0
        self._sync_listeners()

    def __len__(self) -> int:
        """Handshakes in flight."""
        return self.handshakes

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled (loop.run_epoll, as the relay engine does):
        events, then the timers that fell due."""
        await run_epoll(
            self._epoll, self._dispatch, self._internal_error, self._fire_timers, self._next_wake
        )

    def _next_wake(self, now: float) -> float | None:
        wake = self._timers.next_due()
        if self._backoff_until:
            wake = self._backoff_until if wake is None else min(wake, self._backoff_until)
        return wake

    def close(self) -> None:
        for h in list(self._by_fd.values()):
            self._close(h)
        self._epoll.close()

    def _fire_timers(self, now: float) -> None:
        if self._backoff_until and now >= self._backoff_until:
            self._backoff_until = 0.0
            self._sync_listeners()
        if not self._timers.due(now):
            return
        for deadline, h in self._timers.pop_due(now):
            if h.state != FINISHED and h.deadline == deadline:
                self._timed_out(h)

    def _arm(self, h: Handshake, seconds: float) -> None:
        h.deadline = time.monotonic() + seconds
        self._timers.add(h.deadline, h)

    def _done_with(self, h: Handshake) -> None:
        """``h`` is over (closed or handed over). Its timers stay in the heap
        until due, so drop what it holds now, and rebuild the heap when dead
        entries outnumber live ones (at thousands of handshakes a second and
        10 s timers they would otherwise pile up)."""
        h.state = FINISHED
        h.request = h.response = h.reader = h.backend = h.reject = None
        h.first_up = h.out = b""
        self.handshakes -= 1
        if self._full and self.handshakes < max(1, self.proxy.max_handshakes * 3 // 4):
            self._full = False
            self._sync_listeners()
        timers = self._timers
        if len(timers) > 1024 and len(timers) > 4 * self.handshakes:
            timers.compact(lambda deadline, h: h.state != FINISHED and h.deadline == deadline)

    def _dispatch(self, fd: int, ev: int) -> None:
        h = self._by_fd.get(fd)
        if h is None:
            if fd in self._listeners:
                self._accept(fd)
            return
        state = h.state
        if state == READ_REQUEST:
            self._read_request(h)
        elif state == TLS_ACCEPT:
            self._tls_accept(h)
        elif state == CONNECTING:
            self._connected(h)
        elif state == TLS_CONNECT:
            self._tls_connect(h)
        elif state == READ_RESPONSE:
            self._read_response(h)
        elif state == WRITE:
            self._write_more(h)
        elif state == PASS_BODY:
            self._pass_body(h)
        elif state == LINGER:
            self._linger(h)

    # -- accept -------------------------------------------------------------

    def _accept(self, fd: int) -> None:
        listener = self._listeners[fd]
        for _ in range(ACCEPTS_PER_EVENT):
            if self.handshakes >= self.proxy.max_handshakes:
                self._full = True
                self._sync_listeners()
                return
            try:
                taken = _take(listener)
            except OSError as e:
                if e.errno in _EXHAUSTED:
                    self._pause_accepting(e)
                    return
                raise
            if taken is None:
                return
            self._start(*taken, self._about[fd])

    def stop_accepting(self, *, sweep: Collection[int] | None = None, refuse: bool = True) -> None:
        """Close this worker's listen sockets; handshakes under way go on.

        Connections waiting in the accept queue of the sockets in ``sweep``
        (indexes in listen order; None: all) are accepted first, so that
        closing the socket resets none of them: answered 503 with
        Retry-After when ``refuse`` (a drain), or served (a reload retiring
        a socket the new generation does not use). The other sockets are
        only let go of: another process keeps accepting on them.
        """
        for i, (fd, listener) in enumerate(self._listeners.items()):
            if sweep is None or i in sweep:
                self._accept_all(fd, listener, SHUTTING_DOWN if refuse else None)
            if self._accepting:
                self._epoll.unregister(fd)
            listener.close()
        self._listeners.clear()
        self._accepting = False

    def _accept_all(self, fd: int, listener: socket.socket, refuse: Reject | None) -> None:
        while self.admission.has_room:
            try:
                taken = _take(listener)
            except OSError:
                return  # out of descriptors: what is left gets the kernel's reset
            if taken is None:
                return
            self._start(*taken, self._about[fd], refuse=refuse)

    def _pause_accepting(self, e: OSError) -> None:
        self.events.accept_error(e)
        self._backoff_until = time.monotonic() + ACCEPT_BACKOFF
        self._sync_listeners()

    def _sync_listeners(self) -> None:
        """Listen while neither a backoff nor the handshake limit says wait.
        Connections not accepted wait in the kernel's accept queue (their
        header timeout starts at accept), which is the buffer a spike needs:
        accepting everything at once only makes every handshake slow."""
        accepting = not self._backoff_until and not self._full
        if accepting != self._accepting:
            for fd in self._listeners:
                if accepting:
                    self._epoll.register(fd, _IN)
                else:
                    self._epoll.unregister(fd)
            self._accepting = accepting

    def _start(
        self,
        client: int,
        addr: Any,
        listener: Listener,
        refuse: Reject | None = None,
    ) -> None:
        lease = self.admission.lease(addr[0])
        self.handshakes += 1
        h = Handshake(client, addr, listener, 0.0, lease)
        self._by_fd[client] = h
        if self.admission.over_capacity:
            refuse = OVER_CAPACITY
        if listener.proxied and refuse is None:
            if is_trusted(h.client_ip, self.proxy.trusted_proxies):
                h.header = HeaderReader(self.proxy.max_header_bytes)
            else:
                refuse = UNTRUSTED
        if refuse is not None:
            self._reject(h, refuse)  # in plain HTTP, on a TLS listener too: there is no TLS yet
            return
        self._arm(h, self.proxy.header_timeout)  # the TLS handshake's time too
        if listener.tls is not None:
            h.client_io = listener.tls.connection()
            h.state = TLS_ACCEPT
            self._tls_accept(h)
            return
        h.reader = RequestReader(self.proxy.max_header_bytes, self._parsers)
        self._read_request(h)  # the head usually came with the connection

    # -- TLS ----------------------------------------------------------------

    def _tls_accept(self, h: Handshake) -> None:
        """The client's TLS handshake (after its PROXY header, read in
        plain), then the request head through it."""
        tls = h.client_io
        assert isinstance(tls, TlsConnection)
        if h.header is not None:
            data = self._read_client(h, PLAIN)
            if data is None:
                return
            try:
                header = h.header.feed(data)
            except Reject as r:
                h.client_io = PLAIN  # the answer goes in plain: no TLS began
                self._reject(h, r)
                return
            if header is NEED_DATA:
                self._want(h.client, _IN)
                return
            assert isinstance(header, ProxyHeader)
            tls.feed(proxied_by(h, header))
        try:
            wait = tls.handshake(h.client)
        except TlsFailure as f:
            self._tls_failed(h, f)
            return
        if wait:
            self._want(h.client, wait)
            return
        tls.tls_info = tls.info()
        h.state = READ_REQUEST
        h.reader = RequestReader(self.proxy.max_header_bytes, self._parsers)
        self._want(h.client, _IN)
        self._read_request(h)  # it may have come with the handshake's last flight

    def _tls_failed(self, h: Handshake, f: TlsFailure) -> None:
        """A client's TLS handshake failed: told with its reason, then
        closed; plain HTTP gets a plain 400 first, as nginx answers it."""
        tls = h.client_io
        assert isinstance(tls, TlsConnection)
        self.events.tls_failed(h.lease, f.reason, f.detail, tls.server_name or "")
        if f.reason != PLAIN_HTTP:
            self._close(h)
            return
        h.client_io = PLAIN
        h.reject = None
        answer = error_response(400, "plain HTTP request sent to a TLS port", ())
        self._send(h, h.client, answer, self._linger_out)

    def _tls_connect(self, h: Handshake) -> None:
        """The TLS handshake with the backend, then the request head."""
        tls = h.backend_io
        assert isinstance(tls, TlsConnection) and h.backend is not None
        try:
            wait = tls.handshake(h.backend.fileno())
        except TlsFailure as f:
            endpoint = h.lease.endpoint
            assert endpoint is not None
            # The why goes to the log (upstream-connect-failed), not to the client.
            self._connect_failed(h, endpoint.server, endpoint, f"TLS: {f}")
            self._reject(h, Reject(502, "backend_tls_failed", "TLS to the backend failed"))
            return
        if wait:
            self._want(h.backend.fileno(), wait)
            return
        self._send_head(h)

    # -- the request --------------------------------------------------------

    def _read_client(self, h: Handshake, io: Transport) -> bytes | None:
        """A read from the client through ``io``; None: nothing yet (it
        waits for more), or the connection failed (it is closed)."""
        try:
            return io.read(h.client, RECV_SIZE)
        except BlockingIOError:
            self._want(h.client, _IN)
        except OSError as e:
            self._failed(h, e)
        return None

    def _read_request(self, h: Handshake) -> None:
        data = self._read_client(h, h.client_io)
        if data is None:
            return
        assert h.reader is not None
        try:
            if h.header is not None:
                header = h.header.feed(data)
                if header is NEED_DATA:
                    self._want(h.client, _IN)
                    return
                assert isinstance(header, ProxyHeader)
                data = proxied_by(h, header)
                if not data:
                    self._want(h.client, _IN)
                    return
            result = h.reader.feed(data)
            if result is NEED_DATA:
                self._want(h.client, _IN)
                return
            assert isinstance(result, UpgradeRequest)
            route = self.decisions.route(result)
            if route is None:
                raise Reject(
                    404, "no_route", f"no route for host {result.host!r} path {result.path!r}"
                )
        except Reject as r:
            self._reject(h, r)
            return
        h.request, h.lease.route, h.first_up, h.reader = result, route, h.reader.trailing, None
        self._want(h.client, 0)  # nothing more to read until the 101
        self._connect_next(h)

    # -- upstream -----------------------------------------------------------

    def _connect_next(self, h: Handshake) -> None:
        """Connect to the next server of the pool not tried yet (every server
        once), through the first of its endpoints with tuple space left."""
        request, route = h.request, h.lease.route
        assert request is not None
        now = time.monotonic()
        cert = h.client_cert
        while (
            server := self.decisions.next_server(route, request, h.client_ip, h.tried, now, cert)
        ) is not None:
            h.tried.append(server)
            if self._connect_server(h, server):
                return
        self._reject(h, connect_refusal(h.exhausted, len(h.tried), h.timeouts))

    def _connect_server(self, h: Handshake, server: ServerState) -> bool:
        for endpoint in server.endpoints_by_use():
            try:
                sock, space, port = self.upstream.connect(endpoint.endpoint)
            except Exhausted:
                h.exhausted = True
                continue
            except OSError as e:
                self._connect_failed(h, server, endpoint, e.strerror or str(e))
                return False
            h.lease.hold_upstream(endpoint, space, port)
            h.backend = sock
            tls = self._tls_clients.get(h.lease.route.pool)
            h.backend_io = PLAIN if tls is None else tls.connection(endpoint.endpoint)
            h.state = CONNECTING
            self._by_fd[sock.fileno()] = h
            self._want(sock.fileno(), _OUT)
            self._arm(h, self.proxy.connect_timeout)
            return True
        return False

    def _connected(self, h: Handshake) -> None:
        sock = h.backend
        assert sock is not None and h.request is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            endpoint = h.lease.endpoint
            assert endpoint is not None
            self._drop_backend(h)
            self._connect_failed(h, endpoint.server, endpoint, os.strerror(err))
            self._connect_next(h)
            return
        address, h.lease.source_port = sock.getsockname()[:2]
        space = h.lease.space
        assert isinstance(space, TupleSpace)
        if space.seen_address is None:
            space.seen_address = address
        if isinstance(h.backend_io, TlsConnection):
            h.state = TLS_CONNECT
            self._arm(h, self.proxy.connect_timeout)
            self._tls_connect(h)
            return
        self._send_head(h)

    def _send_head(self, h: Handshake) -> None:
        """The request head to the connected backend (with a PROXY header
        when its pool wants one)."""
        sock = h.backend
        assert sock is not None and h.request is not None
        if self.decisions.sends_proxy_header(h.lease.route):
            # The backend learns the client from the PROXY header: the head
            # goes as the client sent it.
            local = h.local or local_address(h.client)
            head = encode_v2((h.client_ip, h.client_port), local) + request_head(h.request)
        else:
            listener = h.listener
            head = forward_head(
                h.request, h.client_ip, listener.proto, listener.port, self._parsers
            )
        h.response = ResponseReader(h.request, self.proxy.max_header_bytes, self._parsers)
        self._arm(h, self.proxy.response_timeout)
        self._send(h, sock.fileno(), head, self._await_response)  # still waits for OUT

    def _await_response(self, h: Handshake) -> None:
        h.state = READ_RESPONSE
        assert h.backend is not None
        self._want(h.backend.fileno(), _IN)
        self._read_response(h)

    def _read_response(self, h: Handshake) -> None:
        assert h.backend is not None and h.response is not None
        try:
            data = h.backend_io.read(h.backend.fileno(), RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._reject(h, Reject(502, "bad_gateway", f"backend failed the handshake: {e}"))
            return
        try:
            head = h.response.feed(data)
        except BackendError as e:
            self._reject(h, Reject(502, "bad_gateway", f"backend failed the handshake: {e}"))
            return
        if head is NEED_DATA:
            return
        assert isinstance(head, ResponseHead)
        if isinstance(h.backend_io, TlsConnection):
            endpoint = h.lease.endpoint
            assert endpoint is not None
            self._tls_clients[h.lease.route.pool].keep_session(endpoint.endpoint, h.backend_io)
        self._want(h.backend.fileno(), 0)
        after = self._hand_over if head.status == 101 else self._start_body
        if head.status != 101:
            h.reject = Reject(head.status, "backend_refused", f"backend answered {head.status}")
        self._send(h, h.client, head.head, after)

    def _start_body(self, h: Handshake) -> None:
        h.state = PASS_BODY
        assert h.backend is not None
        self._want(h.backend.fileno(), _IN)
        self._pass_body(h, first=True)

    def _pass_body(self, h: Handshake, first: bool = False) -> None:
        """After a non-101 head: the rest of the backend's answer, then close."""
        assert h.backend is not None and h.response is not None and h.reject is not None
        received: bytes | None = None  # body bytes that came with the head first
        if not first:
            try:
                received = h.backend_io.read(h.backend.fileno(), RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                received = b""  # a reset ends the answer
        try:
            body, done = h.response.body(received)
        except BackendError:
            body, done = b"", True
        if done:
            self._drop_backend(h)
            self._send(h, h.client, body, self._finish_reject)
        elif body:
            self._want(h.backend.fileno(), 0)
            self._send(h, h.client, body, self._start_body)

    # -- endings ------------------------------------------------------------

    def _hand_over(self, h: Handshake) -> None:
        """The 101 is out: both sockets go to the relay engine."""
        assert h.backend is not None and h.lease.endpoint is not None
        backend = h.backend.fileno()
        self._want(h.client, 0)
        self._want(backend, 0)
        del self._by_fd[h.client], self._by_fd[backend]
        assert h.request is not None and h.response is not None
        tunnel = Upgraded(
            h.lease,
            h.client,
            h.backend.detach(),
            h.first_up,
            h.response.trailing,
            h.transports,
            h.request,
            time.monotonic() - h.started,
        )
        self._done_with(h)
        self.events.established(tunnel)

    def _reject(self, h: Handshake, r: Reject) -> None:
        """Answer the client with ``r`` (unless the backend's answer went already)."""
        h.reject = r
        self._drop_backend(h)
        if h.client not in self._by_fd:
            return
        self._want(h.client, 0)
        self._send(h, h.client, error_response(r.status, r.detail, r.headers), self._finish_reject)

    def _finish_reject(self, h: Handshake) -> None:
        """Log the rejection, then close the way nginx's lingering close does:
        closing a socket with unread request bytes makes the kernel send RST,
        which can destroy the answer before the client reads it. So send FIN,
        and read and drop what the client still sends until it closes."""
        r = h.reject
        assert r is not None
        self._report_reject(h, r)
        self._linger_out(h)

    def _linger_out(self, h: Handshake) -> None:
        """FIN after the answer, then read until the client closes."""
        h.state = LINGER
        self._arm(h, LINGER_TIMEOUT)
        try:
            h.client_io.shutdown_write(h.client)
        except OSError:
            self._close(h)
            return
        self._want(h.client, _IN)
        self._linger(h)

    def _linger(self, h: Handshake) -> None:
        while True:
            try:
                data = h.client_io.read(h.client, RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close(h)
                return

    def _timed_out(self, h: Handshake) -> None:
        """``h``'s deadline passed. What it waited for may have happened with
        its event still queued behind others (a worker catching up after a
        spike), so look once more before giving up."""
        state = h.state
        if state == TLS_ACCEPT:
            self._tls_accept(h)
            if h.state == TLS_ACCEPT:
                detail = f"not done within header_timeout ({self.proxy.header_timeout:g} s)"
                self._tls_failed(h, TlsFailure(TIMEOUT, detail))
        elif state == TLS_CONNECT:
            self._tls_connect(h)
            if h.state == TLS_CONNECT:
                self._reject(h, Reject(504, "upstream_timeout", "backend TLS handshake timed out"))
        elif state == READ_REQUEST:
            self._read_request(h)
            if h.state == READ_REQUEST:
                self._reject(h, Reject(408, "header_timeout", "request head not complete in time"))
        elif state == CONNECTING:
            assert h.backend is not None
            try:
                h.backend.getpeername()  # succeeds once the connect completed
            except OSError:
                pass
            else:
                self._connected(h)
                return
            h.timeouts += 1
            endpoint = h.lease.endpoint
            assert endpoint is not None
            self._drop_backend(h)
            self._connect_failed(h, endpoint.server, endpoint, "timed out")
            self._connect_next(h)
        elif state == READ_RESPONSE:
            self._read_response(h)
            if h.state == READ_RESPONSE:
                self._reject(h, Reject(504, "upstream_timeout", "backend did not answer in time"))
        elif state == WRITE and h.out_fd != h.client:  # the backend does not take the head
            self._reject(h, Reject(504, "upstream_timeout", "backend did not read the request"))
        else:  # WRITE, PASS_BODY, LINGER: give up on this client
            if h.reject is not None and state != LINGER:
                self._report_reject(h, h.reject)
            self._close(h)

    def _internal_error(self, fd: int) -> None:
        """A bug of ours must cost one connection, never the worker and the
        tunnels it holds: report it, answer 500 if we still can, close."""
        self.events.internal_error()
        h = self._by_fd.get(fd)
        if h is None or h.state == FINISHED:
            return
        try:
            if h.state in (READ_REQUEST, CONNECTING, READ_RESPONSE):
                self._reject(h, Reject(500, "internal_error", "internal proxy error"))
                return
        except Exception:
            pass
        self._close(h)

    def _report_reject(self, h: Handshake, r: Reject) -> None:
        request = h.request or r.request  # a head that parsed, upgrade or not
        self.events.rejected(h.lease, request, r, time.monotonic() - h.started)

    def _failed(self, h: Handshake, e: OSError) -> None:
        """The client's socket failed (reset, gone) before its tunnel was up."""
        self.events.handshake_failed(h.lease, e)
        self._close(h)

    def _connect_failed(
        self, h: Handshake, server: ServerState, endpoint: EndpointState, reason: str
    ) -> None:
        self.events.connect_failed(h.lease.route.pool, server, endpoint, reason)

    # -- descriptors --------------------------------------------------------

    def _send(self, h: Handshake, fd: int, data: bytes, after: Callable[[Handshake], None]) -> None:
        """Write ``data`` to ``fd``, then call ``after(h)``; waits for EPOLLOUT
        if the socket takes only part of it."""
        io = h.client_io if fd == h.client else h.backend_io
        try:
            written = io.write(fd, data) if data else 0
        except BlockingIOError:
            written = 0
        except OSError as e:
            if fd == h.client:
                self._failed(h, e)
            else:
                self._reject(h, Reject(502, "bad_gateway", f"backend failed the handshake: {e}"))
            return
        if written == len(data):
            after(h)
            return
        h.out, h.out_fd, h.after_write, h.state = data[written:], fd, after, WRITE
        self._want(fd, _OUT)

    def _write_more(self, h: Handshake) -> None:
        fd, data, after = h.out_fd, h.out, h.after_write
        assert after is not None
        h.out, h.out_fd, h.after_write = b"", -1, None
        self._want(fd, 0)
        self._send(h, fd, data, after)

    def _want(self, fd: int, mask: int) -> None:
        """Wait for ``mask`` on ``fd``. A descriptor that waits for nothing
        leaves the set, since EPOLLERR and EPOLLHUP are reported whatever the
        mask (epoll_ctl(2)) and would wake us for a socket we are not serving."""
        current = self._masks.get(fd, 0)
        if mask == current:
            return
        if not mask:
            self._epoll.unregister(fd)
            del self._masks[fd]
            return
        if current:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._masks[fd] = mask

    def _drop_backend(self, h: Handshake) -> None:
        sock = h.backend
        if sock is None:
            return
        fd = sock.fileno()
        self._want(fd, 0)
        self._by_fd.pop(fd, None)
        h.backend_io.close(sock.detach())
        h.backend = None
        h.lease.drop_upstream()

    def _close(self, h: Handshake) -> None:
        if h.state == FINISHED:
            return
        self._drop_backend(h)
        self._want(h.client, 0)
        self._by_fd.pop(h.client, None)
        h.client_io.close(h.client)
        self._done_with(h)
        h.lease.release()


class Proxied(Protocol):
    """A connection whose PROXY header is read (a Handshake here, its
    compiled engine's record in engine/chandshake.py)."""

    header: HeaderReader | None
    lease: AdmissionLease
    local: tuple[str, int] | None


def proxied_by(h: Proxied, header: ProxyHeader) -> bytes:
    """The PROXY header says whom the connection is from: that is the
    client from now on (logs, X-Forwarded-For, hashing). Returns the bytes
    that came after it."""
    assert h.header is not None
    if header.source is not None:
        h.lease.client_ip, h.lease.client_port = header.source
        h.local = header.destination
    rest, h.header = h.header.trailing, None
    return rest


def connect_refusal(exhausted: bool, tried: int, timeouts: int) -> Reject:
    """The answer when no server of the pool took the connection:
    ``exhausted``, some server was skipped for lack of tuple space; of the
    ``tried`` servers, ``timeouts`` timed out."""
    if exhausted:
        return Reject(
            503,
            "tuple_space_exhausted",
            "every source address and port of this worker is in use towards the pool",
            (("Retry-After", "1"),),
        )
    if tried and timeouts == tried:
        return Reject(504, "upstream_timeout", "no server of the pool answered in time")
    return Reject(502, "upstream_unavailable", "no server of the pool accepted the connection")


def _take(listener: socket.socket) -> tuple[int, Any] | None:
    """The next connection of ``listener``'s accept queue, as a non-blocking
    descriptor and its address, or None once the queue is empty. Skips
    clients that gave up while queued (or a firewall refused); raises any
    other OSError (EMFILE…)."""
    while True:
        try:
            client, addr = listener._accept()  # type: ignore[attr-defined]  # (fd, addr): no socket object
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        os.set_blocking(client, False)
        return client, addr
