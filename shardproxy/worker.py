"""One worker process: accept, handshake, connect upstream, relay.

Started by the supervisor as ``python -m shardproxy.worker SLOT CONTROL_FD
LISTEN_FD...`` with its slot's listen sockets passed as descriptors; it reads
its configuration from the control channel.

Resource handling: each accepted connection is a short-lived trio task until
its 101 has been forwarded; then both sockets are detached from trio and
handed to the relay engine, which owns them from then on. The worker counts
connections (handshakes in flight plus tunnels) against a capacity derived
from RLIMIT_NOFILE (two descriptors per tunnel) or ``proxy.max_connections``,
and answers 503 with Retry-After beyond it, rather than running into EMFILE.

Error handling: a bad request or a failing backend ends only its own
connection, with an HTTP answer and a log event; accept errors from descriptor
exhaustion back off briefly instead of spinning. SIGTERM stops the worker; it
ignores SIGINT (a Ctrl-C reaches the whole process group, and the supervisor
decides how to stop). EOF on the control channel means the supervisor is gone:
the worker exits.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import trio

from . import balancer, config, logs
from .balancer import EndpointState, PoolState
from .config import Config, RouteConfig
from .control import Channel
from .handshake import (
    NEED_DATA,
    BackendError,
    NeedData,
    Reject,
    RequestReader,
    ResponseHead,
    ResponseReader,
    UpgradeRequest,
    error_response,
    forward_head,
)
from .limits import fd_capacity, raise_nofile_limit
from .relay import CLOSED, RelayEngine, Tunnel
from .routing import Router

RECV_SIZE = 65536
ACCEPT_BACKOFF = 0.1
LINGER_TIMEOUT = 2.0  # to send an error answer and see the client close
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class TunnelInfo:
    """What the access log and the accounting need once a tunnel ends."""

    __slots__ = ("client_ip", "client_port", "endpoint", "path", "route")

    def __init__(
        self,
        client_ip: str,
        client_port: int,
        route: RouteConfig,
        endpoint: EndpointState,
        path: str,
    ) -> None:
        self.client_ip = client_ip
        self.client_port = client_port
        self.route = route
        self.endpoint = endpoint
        self.path = path


class Worker:
    def __init__(self, slot: int, cfg: Config, nofile: int) -> None:
        self.slot = slot
        self.config = cfg
        self.router = Router(cfg.routes)
        self.pools = {p.name: PoolState(p) for p in cfg.pools}
        self.engine = RelayEngine(self._tunnel_closed)
        by_fds = fd_capacity(nofile)
        self.capacity = min(cfg.proxy.max_connections or by_fds, by_fds)
        self.connections = 0  # handshakes in flight + tunnels
        self.handshakes = 0
        self.counts: Counter[str] = Counter()  # totals for the stats snapshot
        self.log = logs.get_logger()

    # -- accepting ----------------------------------------------------------

    async def accept_loop(self, listener: trio.socket.SocketType) -> None:
        port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, addr = await listener.accept()
                except OSError as e:
                    if e.errno not in _EXHAUSTED:
                        raise
                    self.log.error(
                        "accept failed: out of descriptors or memory; backing off",
                        **{"event.action": "accept-error", "error.message": os.strerror(e.errno)},
                    )
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(self.handle, sock, addr, port)

    async def handle(self, client: trio.socket.SocketType, addr: Any, listen_port: int) -> None:
        """One connection from accept until its tunnel is handed to the engine."""
        client_ip, client_port = addr[0], addr[1]
        self.connections += 1
        self.handshakes += 1
        backend: trio.socket.SocketType | None = None
        endpoint: EndpointState | None = None
        handed_over = False
        started = time.monotonic()
        try:
            # Frames are written whole; waiting for ACKs (Nagle) only adds latency.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.connections > self.capacity:
                raise Reject(
                    503,
                    "over_capacity",
                    "this worker is at its connection limit",
                    (("Retry-After", "1"),),
                )
            request, first_up = await self._read_request(client)
            route = self.router.match(request.host, request.path)
            if route is None:
                raise Reject(
                    404, "no_route", f"no route for host {request.host!r} path {request.path!r}"
                )
            pool = self.pools[route.pool]
            backend, endpoint = await self._connect(pool, request, client_ip)
            head = forward_head(request, client_ip, "http", listen_port)
            reader = ResponseReader(request, self.config.proxy.max_header_bytes)
            status = await self._relay_response(client, backend, head, reader)
            if status != 101:
                raise Reject(status, "backend_refused", f"backend answered {status}")
            info = TunnelInfo(client_ip, client_port, route, endpoint, request.path)
            # Bytes that came behind either head are the tunnel's first: the
            # engine sends them, so that its frame trackers see them too.
            self.engine.add(client.detach(), backend.detach(), info, first_up, reader.trailing)
            handed_over = True
            self.counts["tunnels"] += 1
        except Reject as r:
            await self._reject(client, r, client_ip, client_port, started)
        except OSError as e:
            self.counts["handshake_failed"] += 1
            self.log.info(
                "client connection failed during the handshake",
                **{
                    "event.action": "handshake-failed",
                    "event.outcome": "failure",
                    "client.ip": client_ip,
                    "client.port": client_port,
                    "error.message": str(e),
                },
            )
        except Exception:
            # A bug of ours must cost one connection, never the worker and
            # the tunnels it holds.
            self.log.exception(
                "internal error while handling a connection",
                **{"event.action": "internal-error", "client.ip": client_ip},
            )
            await self._reject(
                client,
                Reject(500, "internal_error", "internal proxy error"),
                client_ip,
                client_port,
                started,
            )
        finally:
            self.handshakes -= 1
            if not handed_over:
                self.connections -= 1
                if endpoint is not None:
                    balancer.release(endpoint)
                if backend is not None:
                    backend.close()
                client.close()

    async def _read_request(self, client: trio.socket.SocketType) -> tuple[UpgradeRequest, bytes]:
        reader = RequestReader(self.config.proxy.max_header_bytes)
        with trio.move_on_after(self.config.proxy.header_timeout):
            while True:
                result = reader.feed(await client.recv(RECV_SIZE))
                if result is not NEED_DATA:
                    assert isinstance(result, UpgradeRequest)
                    return result, reader.trailing
        raise Reject(408, "header_timeout", "request head not complete in time")

    async def _connect(
        self, pool: PoolState, request: UpgradeRequest, client_ip: str
    ) -> tuple[trio.socket.SocketType, EndpointState]:
        """Connect to a server of the pool, trying every server once."""
        key = balancer.extract_hash_key(
            pool.config.hash_key, request.headers, request.target, client_ip
        )
        tried: list[balancer.ServerState] = []
        timeouts = 0
        while (server := pool.choose(key, tried)) is not None:
            tried.append(server)
            endpoint = server.least_used_endpoint()
            balancer.acquire(endpoint)
            ep = endpoint.endpoint
            sock = trio.socket.socket(socket.AF_INET6 if ":" in ep.host else socket.AF_INET)
            try:
                with trio.fail_after(self.config.proxy.connect_timeout):
                    await sock.connect((ep.host, ep.port))
            except (OSError, trio.TooSlowError) as e:
                balancer.release(endpoint)
                sock.close()
                timed_out = isinstance(e, trio.TooSlowError)
                timeouts += timed_out
                self.counts["upstream.connect_failed"] += 1
                self.log.warning(
                    "upstream connect failed",
                    **{
                        "event.action": "upstream-connect-failed",
                        "event.outcome": "failure",
                        "destination.ip": ep.host,
                        "destination.port": ep.port,
                        "shardproxy.pool": pool.name,
                        "shardproxy.server": server.name,
                        "error.message": "timed out" if timed_out else str(e),
                    },
                )
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, endpoint
        if tried and timeouts == len(tried):
            raise Reject(504, "upstream_timeout", "no server of the pool answered in time")
        raise Reject(502, "upstream_unavailable", "no server of the pool accepted the connection")

    async def _relay_response(
        self,
        client: trio.socket.SocketType,
        backend: trio.socket.SocketType,
        head: bytes,
        reader: ResponseReader,
    ) -> int:
        """Forward the request; pass the backend's answer back. Returns its status."""
        response: ResponseHead | NeedData = NEED_DATA
        try:
            await _send_all(backend, head)
            with trio.move_on_after(self.config.proxy.response_timeout):
                while True:
                    response = reader.feed(await backend.recv(RECV_SIZE))
                    if response is not NEED_DATA:
                        break
        except (OSError, BackendError) as e:
            raise Reject(502, "bad_gateway", f"backend failed the handshake: {e}") from None
        if not isinstance(response, ResponseHead):
            raise Reject(504, "upstream_timeout", "backend did not answer in time")
        await _send_all(client, response.head)
        if response.status == 101:
            return 101
        await self._pass_body(client, backend, reader)
        return response.status

    async def _pass_body(
        self,
        client: trio.socket.SocketType,
        backend: trio.socket.SocketType,
        reader: ResponseReader,
    ) -> None:
        """After a non-101 head: the rest of the backend's answer, then close."""
        with trio.move_on_after(self.config.proxy.response_timeout):
            received: bytes | None = None  # body bytes that came with the head first
            while True:
                try:
                    body, done = reader.body(received)
                except BackendError:
                    return  # a broken body ends the answer; the client sees the close
                if body:
                    await _send_all(client, body)
                if done:
                    return
                try:
                    received = await backend.recv(RECV_SIZE)
                except OSError:
                    return  # the backend reset: the answer ends here

    async def _reject(
        self, client: trio.socket.SocketType, r: Reject, ip: str, port: int, started: float
    ) -> None:
        self.counts[f"rejected.{r.reason}"] += 1
        fields = {
            "event.action": "request-rejected",
            "event.outcome": "failure",
            "event.duration": int((time.monotonic() - started) * 1e9),
            "client.ip": ip,
            "client.port": port,
            "http.response.status_code": r.status,
            "shardproxy.reason": r.reason,
        }
        self.log.info(r.detail, **fields)
        with trio.move_on_after(LINGER_TIMEOUT):
            try:
                if r.reason != "backend_refused":  # else the backend's answer went already
                    await _send_all(client, error_response(r.status, r.detail, r.headers))
                await _linger(client)
            except OSError:
                pass

    # -- the end of a tunnel ------------------------------------------------

    def _tunnel_closed(self, t: Tunnel, outcome: str) -> None:
        info: TunnelInfo = t.info
        balancer.release(info.endpoint)
        self.connections -= 1
        up, down = t.up, t.down
        ep = info.endpoint.endpoint
        self.counts["bytes.up"] += up.nbytes
        self.counts["bytes.down"] += down.nbytes
        self.counts["messages.up"] += up.messages
        self.counts["messages.down"] += down.messages
        self.counts[f"closed.{outcome}"] += 1
        self.log.info(
            "tunnel closed",
            **{
                "event.kind": "event",
                "event.category": ["network", "web"],
                "event.type": ["connection", "end"],
                "event.action": "tunnel-closed",
                "event.outcome": "success" if outcome == CLOSED else "failure",
                "event.duration": int((time.monotonic() - t.started) * 1e9),
                "client.ip": info.client_ip,
                "client.port": info.client_port,
                "destination.ip": ep.host,
                "destination.port": ep.port,
                "url.path": info.path,
                "shardproxy.route": f"{info.route.host}{info.route.path_prefix}",
                "shardproxy.pool": info.route.pool,
                "shardproxy.server": info.endpoint.server.name,
                "shardproxy.outcome": outcome,
                "shardproxy.bytes.up": up.nbytes,
                "shardproxy.bytes.down": down.nbytes,
                "shardproxy.messages.up": up.messages,
                "shardproxy.messages.down": down.messages,
                "shardproxy.close.client_code": up.close_code,
                "shardproxy.close.backend_code": down.close_code,
            },
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "stats",
            "slot": self.slot,
            "tunnels": len(self.engine),
            "handshakes": self.handshakes,
            "capacity": self.capacity,
            "counts": dict(self.counts),
        }


async def _linger(sock: trio.socket.SocketType) -> None:
    """Close the way nginx's lingering close does: closing a socket that still
    has unread request bytes makes the kernel send RST, which can destroy the
    answer before the client reads it. So send FIN, and read and drop what the
    client still sends until it closes too (bounded by the caller's timeout)."""
    sock.shutdown(socket.SHUT_WR)
    while await sock.recv(RECV_SIZE):
        pass


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def serve(slot: int, control_fd: int, listen_fds: list[int]) -> None:
    channel = Channel(trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd)))
    start = await channel.receive()
    if start is None or start.get("type") != "start":
        raise SystemExit("worker: no start message from the supervisor")
    cfg = config.from_mapping(start["config"], start.get("source", "<supervisor>"))
    logs.configure(cfg.log.level, {"shardproxy.worker": slot, "process.name": "worker"})
    worker = Worker(slot, cfg, raise_nofile_limit())
    listeners = [trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) for fd in listen_fds]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.engine.run)
            for listener in listeners:
                nursery.start_soon(worker.accept_loop, listener)
            nursery.start_soon(_report, channel, worker)
            nursery.start_soon(_watch_supervisor, channel, nursery.cancel_scope)
            nursery.start_soon(_watch_sigterm, nursery.cancel_scope)
            await channel.send(
                {"type": "ready", "slot": slot, "pid": os.getpid(), "capacity": worker.capacity}
            )
            worker.log.info(
                "worker accepting",
                **{"event.action": "worker-ready", "shardproxy.capacity": worker.capacity},
            )
    finally:
        worker.engine.close()
        worker.log.info("worker stopped", **{"event.action": "worker-stopped"})


async def _report(channel: Channel, worker: Worker) -> None:
    while True:
        await trio.sleep(1)
        await channel.send(worker.snapshot())


async def _watch_supervisor(channel: Channel, scope: trio.CancelScope) -> None:
    while await channel.receive() is not None:
        pass  # no supervisor → worker messages after "start" yet
    scope.cancel()


async def _watch_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slot, control_fd, *listen_fds = (int(a) for a in args)
    trio.run(serve, slot, control_fd, listen_fds)


if __name__ == "__main__":
    main()
