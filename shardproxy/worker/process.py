"""One worker process: accept, handshake, connect upstream, relay.

Started by the supervisor as ``python -m shardproxy.worker SLOT CONTROL_FD
LISTEN_FD...`` with its slot's listen sockets passed as descriptors; it reads
its configuration from the control channel.

A worker is two epoll engines on one loop (``engine/loop.py``), each driven
by one trio task: the handshake engine (``engine/handshake.py``) accepts and
upgrades connections, and hands each established pair of sockets to the
relay engine (``engine/relay.py``, behind ``engine/api.py``), which owns them
from then on and sends the keepalive pings. This module composes them: it is
the handshake engine's event sink and the relay's (``established``,
``tunnel_closed``…), writes the access log and keeps the counts.

Resource handling: every connection holds an admission lease
(``policy/admission.py``) from accept to the end of its tunnel, counted
against a capacity derived from RLIMIT_NOFILE (two descriptors per tunnel)
or ``proxy.max_connections``; beyond it, 503 with Retry-After, rather than
running into EMFILE. When the tunnel comes up, its lease's holdings pass to
the relay as a placement shared with similar tunnels and a few bytes of its
own (``worker/tunnels.py``): an idle tunnel has no Python object.

Drain (SIGTERM, :meth:`Worker.drain`): the worker stops accepting (what
waits in its accept queue gets 503), then closes its tunnels the WebSocket
way, a Close 1001 "going away" to the client and to the backend, evenly
spread over ``[lifecycle] close_spread`` so that clients reconnect at a
steady rate and not all at once; each side has ``close_wait`` to answer
before its sockets are closed anyway. The worker exits when it holds nothing
more, or at ``drain_timeout``. A second SIGTERM, or SIGQUIT, stops it at
once.

Error handling: a bad request or a failing backend ends only its own
connection, with an HTTP answer and a log event. The worker ignores SIGINT
(a Ctrl-C reaches the whole process group, and the supervisor decides how to
stop). EOF on the control channel means the supervisor is gone: the worker
exits.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import trio

from shardproxy import config
from shardproxy.config import Config, Endpoint, PortRange, RouteConfig
from shardproxy.control.channel import Channel
from shardproxy.control.messages import Ack, Drained, Health, Ready, Request, Retire, Start, Stats
from shardproxy.engine import choice
from shardproxy.engine.api import (
    OUTCOMES,
    PING_TIMEOUT,
    EndSummary,
    FlowStats,
    Handshakes,
    Keepalive,
    TunnelEngine,
    TunnelStats,
    Upgraded,
)
from shardproxy.engine.factory import handshake_engine, relay_engine
from shardproxy.engine.tls import TlsServer
from shardproxy.engine.transport import PLAIN, Transport
from shardproxy.engine.upstream import TupleSpace, Upstream
from shardproxy.host.rlimits import fd_capacity, raise_nofile_limit
from shardproxy.policy.admission import Admission, AdmissionLease
from shardproxy.policy.decisions import Decisions
from shardproxy.policy.registry import EndpointState, PoolRegistry, ServerState
from shardproxy.policy.routing import Router
from shardproxy.policy.sampling import AccessSampler, ErrorBudget
from shardproxy.protocol.errors import Reject
from shardproxy.protocol.upgrade import UpgradeRequest
from shardproxy.telemetry import logs
from shardproxy.telemetry.snapshot import (
    HANDSHAKE_BOUNDS,
    TUNNEL_BOUNDS,
    BucketCounts,
    SpaceUsage,
    Tally,
    WorkerSnapshot,
)
from shardproxy.worker import access
from shardproxy.worker.tunnels import (
    Placement,
    Placements,
    forwarded_text,
    note_fields,
    pack_note,
)

# ECS categorisation (event.category, event.type): a tunnel is a network
# connection; ECS expects "connection" and "end" with "network" but not with
# "web" (tests/e2e/test_ecs.py holds us to the definitions).
_NETWORK = ("network",)
_CONNECTION = ("connection",)
_DENIED = ("connection", "denied")
GOING_AWAY = 1001  # RFC 6455 §7.4.1: "an endpoint is going away, such as a server going down"
DRAIN_POLL = 0.05  # seconds between looks whether a draining worker is empty
RETIRED_POLL = 0.5  # seconds between looks whether a retired worker is empty
_EVENT = "event"
SUPPRESSED_REPORT_EVERY = 10.0  # seconds between log-suppressed events during a flood
# Close codes that say the stream received was bad (RFC 6455 §7.4.1): 1002
# protocol error, 1007 data inconsistent with the message type (invalid
# UTF-8 in a text message). A tunnel closed with one went bad on the way.
BAD_STREAM_CODES = frozenset({1002, 1007})


class Worker:
    def __init__(
        self,
        slot: int,
        cfg: Config,
        nofile: int,
        listeners: list[socket.socket],
        ports: PortRange,
        allocator: str,
        excluded: list[int],
        ticket_keys: bytes = b"",
    ) -> None:
        """``ticket_keys``: the TLS session ticket keys every worker shares (b"": its own)."""
        self.slot = slot
        self.config = cfg
        self.upstream = Upstream(
            ports,
            cfg.upstream.source_addresses,
            cfg.endpoints(),
            allocator,
            excluded,
            cfg.keepalive,
        )
        self.router = Router(cfg.routes)
        self.pools = {p.name: PoolRegistry(p) for p in cfg.pools}
        keepalive = cfg.keepalive
        # Typed by their interfaces (engine/api.py): the worker uses nothing else.
        self.relay: TunnelEngine = relay_engine(
            self, Keepalive(keepalive.ping_interval, keepalive.ping_timeout)
        )
        self.placements = Placements()  # what the relay's tunnels share (their tokens)
        by_fds = fd_capacity(nofile)
        self.admission = Admission(min(cfg.proxy.max_connections or by_fds, by_fds))
        self.counts = Tally()  # totals for the stats snapshot
        self.passive_failures: Counter[str] = Counter()  # endpoint → since the last report
        self.handshake_seconds = BucketCounts(HANDSHAKE_BOUNDS)  # accept → 101 passed on
        self.tunnel_seconds = BucketCounts(TUNNEL_BOUNDS)  # 101 → closed
        # The ordinary ends of tunnels with a summary form may come in
        # summaries (tunnels_closed), their access lines written by the
        # engine (the compiled relay's, in C).
        self.summarizing = self.relay.summarize(TUNNEL_BOUNDS, tuple(sorted(BAD_STREAM_CODES)))
        self.route_tunnels: Counter[RouteConfig] = Counter()  # route → tunnels open now
        self.access_sampler = AccessSampler()
        self.error_budget = ErrorBudget(cfg.log.error_rate, cfg.log.error_burst)
        self._suppressed: Counter[str] = Counter()  # left out since the last log-suppressed
        self._suppressed_report_at = 0.0
        self.draining = False
        self.generation = 1
        self.log = logs.get_logger()
        self.handshake: Handshakes = handshake_engine(
            cfg.proxy,
            listeners,
            self.admission,
            self.upstream,
            Decisions(self.router, self.pools),
            self,
            listener_transports(cfg, listeners, ticket_keys),
            relay=self.relay,
        )

    @property
    def capacity(self) -> int:
        return self.admission.capacity

    # -- events of the handshake engine (engine.handshake.HandshakeEvents) ---------

    def established(self, u: Upgraded) -> None:
        """A handshake became a tunnel: the lease's holdings go with it to
        the relay, as a shared placement and a note (worker/tunnels.py)."""
        lease = u.lease
        assert lease.endpoint is not None and lease.space is not None
        agent, forwarded = u.request.user_agent_and_forwarded_ip()
        note, client_left, forwarded_left = pack_note(
            lease.client_ip, lease.client_port, lease.source_port, forwarded
        )
        placement = self.placements.take(
            lease.route,
            lease.endpoint,
            lease.space,
            u.request.path,
            None if agent is None else sys.intern(agent),
            client_left,
            forwarded_left,
        )
        lease.hand_over()  # given back in tunnel_closed
        self.handshake_seconds.observe(u.seconds)
        self.route_tunnels[lease.route] += 1
        self.counts.tunnels += 1
        summary = (
            access.summary_form(placement, self.config.log.access) if self.summarizing else None
        )
        tunnel = self.relay.add(
            u.client_fd, u.backend_fd, placement, u.to_backend, u.to_client, u.io, note, summary
        )
        # Came up during a drain (and alive: its first bytes could be written).
        if self.draining and self.relay.alive(tunnel):
            self.relay.begin_close(tunnel, *self._going_away())

    def accept_error(self, e: OSError) -> None:
        self.log.error(
            "accept failed: out of descriptors or memory; backing off",
            **{"event.action": "accept-error", "error.message": os.strerror(e.errno or 0)},
        )

    def internal_error(self) -> None:
        self.counts.internal_error += 1
        if self.may_log("internal-error"):
            self.log.exception(
                "internal error while handling a connection", **{"event.action": "internal-error"}
            )

    def may_log(self, action: str) -> bool:
        """Whether the error budget lets an event one connection caused be
        written now (its counts are kept either way)."""
        return self.error_budget.allow(action, time.monotonic())

    def report_suppressed(self) -> None:
        """Count what the error budget left out; every
        SUPPRESSED_REPORT_EVERY seconds, say so in one event."""
        taken = self.error_budget.take_suppressed()
        self.counts.log_suppressed.update(taken)
        self._suppressed.update(taken)
        now = time.monotonic()
        if not self._suppressed or now < self._suppressed_report_at:
            return
        total = sum(self._suppressed.values())
        self.log.warning(
            f"{total} events left out of the log by [log] error_rate",
            **{
                "event.action": "log-suppressed",
                "shardproxy.suppressed": dict(self._suppressed),
            },
        )
        self._suppressed.clear()
        self._suppressed_report_at = now + SUPPRESSED_REPORT_EVERY

    def rejected(
        self, lease: AdmissionLease, request: UpgradeRequest | None, r: Reject, seconds: float
    ) -> None:
        self.counts.rejected[r.reason] += 1
        if not self.may_log("request-rejected"):
            return
        fields: dict[str, Any] = {
            "event.kind": _EVENT,
            "event.category": _NETWORK,
            "event.type": _DENIED,
            "event.action": "request-rejected",
            "event.outcome": "failure",
            "event.duration": int(seconds * 1e9),
            "client.ip": lease.client_ip,
            "client.port": lease.client_port,
            "http.response.status_code": r.status,
            "shardproxy.reason": r.reason,
        }
        if request is not None:
            fields["http.request.method"] = request.method.decode("latin-1")
            fields["url.path"] = request.path
            if (agent := request.user_agent()) is not None:
                fields["user_agent.original"] = agent
            if (forwarded := request.forwarded_ip()) is not None:
                fields["network.forwarded_ip"] = forwarded
        log = self.log.warning if r.status >= 500 else self.log.info  # ours or the backend's
        log(r.detail, **fields)

    def handshake_failed(self, lease: AdmissionLease, e: OSError) -> None:
        self.counts.handshake_failed += 1
        if not self.may_log("handshake-failed"):
            return
        self.log.info(
            "client connection failed during the handshake",
            **{
                "event.kind": _EVENT,
                "event.category": _NETWORK,
                "event.type": _CONNECTION,
                "event.action": "handshake-failed",
                "event.outcome": "failure",
                "client.ip": lease.client_ip,
                "client.port": lease.client_port,
                "error.message": str(e),
            },
        )

    def tls_failed(self, lease: AdmissionLease, reason: str, detail: str, server_name: str) -> None:
        self.counts.tls_failed[reason] += 1
        if not self.may_log("tls-handshake-failed"):
            return
        tls: dict[str, Any] = {"tls.established": False}
        if server_name:
            tls["tls.client.server_name"] = server_name
        self.log.info(
            "client TLS handshake failed",
            **{
                "event.kind": _EVENT,
                "event.category": _NETWORK,
                "event.type": _CONNECTION,
                "event.action": "tls-handshake-failed",
                "event.outcome": "failure",
                "event.reason": reason,
                "client.ip": lease.client_ip,
                "client.port": lease.client_port,
                "error.type": reason,
                "error.message": detail,
                **tls,
            },
        )

    def connect_failed(
        self, pool: str, server: ServerState, endpoint: EndpointState, reason: str
    ) -> None:
        ep = endpoint.endpoint
        self.counts.connect_failed += 1
        self.passive_failures[str(ep)] += 1  # the supervisor counts them as failed checks
        if not self.may_log("upstream-connect-failed"):
            return
        self.log.warning(
            "upstream connect failed",
            **{
                "event.kind": _EVENT,
                "event.category": _NETWORK,
                "event.type": _CONNECTION,
                "event.action": "upstream-connect-failed",
                "event.outcome": "failure",
                "destination.ip": ep.host,
                "destination.port": ep.port,
                "shardproxy.pool": pool,
                "shardproxy.server": server.name,
                "error.message": reason,
            },
        )

    # -- events of the relay engine (engine.api.TunnelEvents) ---------------

    def relay_error(self) -> None:
        """A bug in the relay, contained to one tunnel (called inside the
        ``except``, so the trace is logged); its access event follows."""
        self.counts.internal_error += 1
        if self.may_log("internal-error"):
            self.log.exception(
                "internal error while relaying a tunnel", **{"event.action": "internal-error"}
            )

    def tunnel_closed(self, token: Any, outcome: str, stats: TunnelStats) -> None:
        info: Placement = token
        client_ip, client_port, source_port, forwarded = note_fields(stats.note)
        if client_ip is None:
            client_ip = info.client_ip
        forwarded_ip = info.forwarded_ip if forwarded is None else forwarded_text(forwarded)
        up, down = stats.up, stats.down
        self._give_back(info, 1, source_port, up.bytes, down.bytes, up.messages, down.messages)
        duration = stats.duration
        self.tunnel_seconds.observe(duration)
        assert isinstance(info.space, TupleSpace)
        self.counts.closed[outcome] += 1
        if outcome == PING_TIMEOUT:
            self._ping_timed_out(client_ip, client_port)
        error_by = None
        if up.close_code in BAD_STREAM_CODES or down.close_code in BAD_STREAM_CODES:
            error_by = self._count_bad_stream(up, down)
        if up.frame_error is not None or down.frame_error is not None:
            self._count_frame_errors(up, down)
        route = info.route
        if not self.config.log.access or not self.access_sampler.keep(route, route.access_sample):
            return
        access.write(
            info, client_ip, client_port, source_port, forwarded_ip, outcome, up, down,
            duration, error_by, stats.tls,
        )  # fmt: skip

    def tunnels_closed(self, token: Any, summary: EndSummary) -> None:
        """tunnel_closed for ``summary.tunnels`` ordinary ends of ``token``'s
        tunnels at once (their access lines are written: api.TunnelEngine.summarize)."""
        s = summary
        self._give_back(
            token, s.tunnels, 0, s.up_bytes, s.down_bytes, s.up_messages, s.down_messages
        )
        self.tunnel_seconds.add(s.seconds, s.seconds_sum)
        closed = self.counts.closed
        for outcome, ended in zip(OUTCOMES, s.outcomes, strict=True):
            if ended:
                closed[outcome] += ended

    def _give_back(
        self,
        info: Placement,
        tunnels: int,
        source_port: int,
        up_bytes: int,
        down_bytes: int,
        up_messages: int,
        down_messages: int,
    ) -> None:
        """What ``tunnels`` ended tunnels of ``info`` held comes back (their
        placement, endpoint, tuple, slots and route count), and their
        figures are counted (tunnel_closed, tunnels_closed)."""
        self.placements.give_back(info, tunnels)
        self.admission.give_back(info.endpoint, info.space, source_port, tunnels)
        self.route_tunnels[info.route] -= tunnels
        counts = self.counts
        counts.bytes["up"] += up_bytes
        counts.bytes["down"] += down_bytes
        counts.messages["up"] += up_messages
        counts.messages["down"] += down_messages

    def _count_bad_stream(self, up: FlowStats, down: FlowStats) -> str | None:
        """The side (``client`` or ``backend``) whose Close said the stream
        it received was bad (a code of BAD_STREAM_CODES), counted; None if
        neither did. When both did, the first: the other typically echoed
        its code (RFC 6455 §5.5.1)."""
        closes = [(up.close_order, "client", up), (down.close_order, "backend", down)]
        for order, side, flow in sorted(closes):
            if order and flow.close_code in BAD_STREAM_CODES:
                self.counts.bad_stream[(side, flow.close_code)] += 1
                return side
        return None

    def _count_frame_errors(self, up: FlowStats, down: FlowStats) -> None:
        """The frame tracker lost a direction's framing (a header that
        breaks RFC 6455 §5): from then on the proxy could put no frame of
        its own into that direction."""
        for name, flow in (("up", up), ("down", down)):
            if flow.frame_error is not None:
                self.counts.frame_error[name] += 1

    # -- drain --------------------------------------------------------------

    async def drain(self) -> None:
        """Stop accepting and close every tunnel with a Close 1001, spread
        over ``close_spread``; return once nothing is left. The caller bounds
        it with ``drain_timeout``."""
        lifecycle = self.config.lifecycle
        self.draining = True
        self.handshake.stop_accepting()
        tunnels = [tunnel for tunnel, _ in self.relay.tunnels()]
        self.log.info(
            f"draining: {len(tunnels)} tunnels get a Close 1001 over {lifecycle.close_spread:g}s",
            **{"event.action": "drain-start", "shardproxy.tunnels": len(tunnels)},
        )
        # Tunnels from handshakes still under way are closed as they come
        # up (established).
        self.relay.close_spread(tunnels, lifecycle.close_spread, *self._going_away())
        while len(self.relay) or len(self.handshake):
            await trio.sleep(DRAIN_POLL)

    # -- pings (the engine sends them and ends silent clients) ---------------

    def _ping_timed_out(self, client_ip: str | None, client_port: int) -> None:
        self.counts.ping_timeout += 1
        if not self.may_log("ping-timeout"):
            return
        self.log.info(
            f"client sent nothing for {self.config.keepalive.ping_timeout:g}s after a ping; "
            "closed its tunnel",
            **{
                "event.action": "ping-timeout",
                "client.ip": client_ip,
                "client.port": client_port,
            },
        )

    # -- health (from the supervisor) ---------------------------------------

    def set_health(self, down: set[Endpoint]) -> None:
        """Apply the supervisor's set of endpoints that are down: no new
        tunnels to them; with ``on_server_down = "close"``, their tunnels
        are closed with a Close 1001, spread like a drain."""
        placements: set[Placement] = set()
        for pool in self.pools.values():
            went_down = pool.set_health(down)
            health = pool.config.health
            if went_down and health is not None and health.on_server_down == "close":
                for endpoint in went_down:
                    placements |= self.placements.of_endpoint(endpoint)
        tunnels = [tunnel for tunnel, _ in self.relay.tunnels(placements)] if placements else []
        if tunnels:
            self.log.info(
                f"closing {len(tunnels)} tunnels of backends that went down",
                **{"event.action": "server-down-close", "shardproxy.tunnels": len(tunnels)},
            )
            self.relay.close_spread(
                tunnels, self.config.lifecycle.close_spread, *self._going_away()
            )

    def set_drained(self, drained: set[tuple[str, str]]) -> None:
        """The (pool, server) pairs an operator drained: no new tunnels."""
        for pool in self.pools.values():
            pool.set_drained(server for name, server in drained if name == pool.name)

    def _going_away(self) -> tuple[int, bytes, float]:
        """Close 1001 both ways; the sockets close at the latest after close_wait."""
        return GOING_AWAY, b"going away", self.config.lifecycle.close_wait

    async def retire(self, sweep: list[int], drain_after: float | None) -> None:
        """A reload started a new generation: stop accepting, keep relaying
        until the tunnels end by themselves or ``drain_after`` (None: no
        limit) passes, then drain. Returns when nothing is left."""
        self.handshake.stop_accepting(sweep=sweep, refuse=False)
        self.log.info(
            f"retired by a reload: keeping {len(self.relay)} tunnels"
            + ("" if drain_after is None else f", draining them in {drain_after:g}s"),
            **{"event.action": "worker-retiring", "shardproxy.tunnels": len(self.relay)},
        )
        with trio.move_on_after(math.inf if drain_after is None else drain_after):
            while len(self.relay) or len(self.handshake):
                await trio.sleep(RETIRED_POLL)
            return
        if not self.draining:
            with trio.move_on_after(self.config.lifecycle.drain_timeout):
                await self.drain()

    def snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(
            slot=self.slot,
            generation=self.generation,
            tunnels=len(self.relay),
            handshakes=len(self.handshake),
            capacity=self.capacity,
            counts=self.counts.freeze(),
            upstream=tuple(SpaceUsage.from_json(space) for space in self.upstream.snapshot()),
            handshake_seconds=self.handshake_seconds.freeze(),
            tunnel_seconds=self.tunnel_seconds.freeze(),
            routes={access.route_name(r): n for r, n in self.route_tunnels.items() if n},
            servers={
                (pool.name, server.name): server.active
                for pool in self.pools.values()
                for server in pool.servers
            },
        )


def listener_transports(
    cfg: Config, listeners: list[socket.socket], ticket_keys: bytes = b""
) -> list[Transport | TlsServer]:
    """What each listen socket's connections go through: plain TCP, or
    TLS with the profile its listen entry names (one TlsServer per
    profile, its certificates loaded now: a new worker reads renewed files)."""
    servers: dict[str, TlsServer] = {}
    out: list[Transport | TlsServer] = []
    for s in listeners:
        profile = cfg.proxy.tls_profile_of(Endpoint(*s.getsockname()[:2]))
        if profile is None:
            out.append(PLAIN)
            continue
        if profile not in servers:
            servers[profile] = TlsServer(cfg.tls_profile(profile), ticket_keys)
        out.append(servers[profile])
    return out


async def serve(slot: int, control_fd: int, listen_fds: list[int]) -> None:
    channel = Channel(trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd)))
    start = await channel.receive()
    if not isinstance(start, Start):
        raise SystemExit("worker: no start message from the supervisor")
    cfg = config.from_mapping(start.config, start.source)
    generation = start.generation
    logs.configure(
        cfg.log.level,
        {"shardproxy.worker": slot, "shardproxy.generation": generation, "process.name": "worker"},
        logs.open_stream(cfg.log.file),
    )
    listeners = [socket.socket(fileno=fd) for fd in listen_fds]
    for listener in listeners:
        listener.setblocking(False)
    up = start.upstream
    ports = PortRange(up.first, up.last)
    worker = Worker(
        slot,
        cfg,
        raise_nofile_limit(),
        listeners,
        ports,
        up.allocator,
        list(up.excluded),
        bytes.fromhex(start.ticket_keys),
    )
    worker.generation = generation
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.relay.run)
            nursery.start_soon(worker.handshake.run)
            nursery.start_soon(_report, channel, worker)
            nursery.start_soon(_watch_supervisor, channel, worker, nursery)
            nursery.start_soon(_watch_signals, worker, nursery)
            nursery.start_soon(_reopen_log_on_sigusr1)
            await channel.send(Ready(slot, os.getpid(), worker.capacity))
            worker.log.info(
                "worker accepting",
                **{
                    "event.action": "worker-ready",
                    "shardproxy.capacity": worker.capacity,
                    "shardproxy.ports": str(ports),
                    "shardproxy.allocator": up.allocator,
                    "shardproxy.engine": choice.ENGINE,
                    "shardproxy.handshake_engine": worker.handshake.kind,
                },
            )
    finally:
        worker.handshake.close()
        worker.relay.close()
        worker.log.info("worker stopped", **{"event.action": "worker-stopped"})


async def _report(channel: Channel, worker: Worker) -> None:
    while True:
        await trio.sleep(1)
        worker.report_suppressed()
        snapshot = worker.snapshot()
        failures = dict(worker.passive_failures)
        worker.passive_failures.clear()
        await channel.send(Stats(snapshot, failures))


async def _watch_supervisor(channel: Channel, worker: Worker, nursery: trio.Nursery) -> None:
    """Apply what the supervisor sends; a request is answered once applied."""
    while (received := await channel.receive()) is not None:
        message = received.message if isinstance(received, Request) else received
        match message:
            case Health():
                worker.set_health({config.parse_host_port(e) for e in message.down})
            case Drained():
                worker.set_drained(set(message.servers))
            case Retire():
                nursery.start_soon(_retire_then_stop, worker, message, nursery.cancel_scope)
            case _:
                raise ValueError(f"the supervisor sent {message!r}")
        if isinstance(received, Request):
            await channel.reply(received, Ack())
    nursery.cancel_scope.cancel()  # the supervisor is gone


async def _watch_signals(worker: Worker, nursery: trio.Nursery) -> None:
    """The first SIGTERM drains; a second one, or SIGQUIT, stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGQUIT) as signals:
        async for signum in signals:
            if signum == signal.SIGTERM and not worker.draining:
                nursery.start_soon(_drain_then_stop, worker, nursery.cancel_scope)
                continue
            worker.log.info("stopping at once", **{"event.action": "worker-stop-now"})
            nursery.cancel_scope.cancel()
            return


async def _reopen_log_on_sigusr1() -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            logs.reopen()


async def _retire_then_stop(worker: Worker, message: Retire, scope: trio.CancelScope) -> None:
    await worker.retire(list(message.sweep), message.drain_after)
    scope.cancel()


async def _drain_then_stop(worker: Worker, scope: trio.CancelScope) -> None:
    with trio.move_on_after(worker.config.lifecycle.drain_timeout) as timeout:
        await worker.drain()
    if timeout.cancelled_caught:
        worker.log.warning(
            f"drain_timeout reached with {len(worker.relay)} tunnels left; closing them",
            **{"event.action": "drain-timeout", "shardproxy.tunnels": len(worker.relay)},
        )
    scope.cancel()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until serve() listens for them, a SIGQUIT must not dump core nor a
    # SIGUSR1 (log reopen) kill the worker.
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    slot, control_fd, *listen_fds = (int(a) for a in args)
    trio.run(serve, slot, control_fd, listen_fds)


if __name__ == "__main__":
    main()
