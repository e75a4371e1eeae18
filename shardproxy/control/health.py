"""Health of backend endpoints: active checks, and the state they drive.

The supervisor checks every endpoint of every pool that has a
``[pools.NAME.health]`` table, once per interval (not once per worker), and
counts the connects that workers saw refused or timed out as failed checks
too (they report them in their stats snapshots). State per endpoint, with
its transitions all in :meth:`EndpointHealth.record`::

    UP ──``fall`` failures in a row──► DOWN ──``rise`` successes in a row──► UP

An endpoint starts UP, as HAProxy's servers do: a fresh instance serves at
once, and a dead backend is found within ``fall`` intervals. The supervisor
sends the set of DOWN endpoints to every worker when it changes; a server
whose endpoints are all down gets no new tunnels.

The checks (:func:`run_check`) are the only I/O here: ``tcp`` connects,
``http`` sends ``GET path`` and wants the ``expect`` status, ``websocket``
makes a real upgrade and wants a 101 with the right Sec-WebSocket-Accept,
then closes with a Close 1000.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from shardproxy.config import Config, Endpoint, HealthConfig, parse_host_port
from shardproxy.control.messages import Health
from shardproxy.host.tls import client_context
from shardproxy.protocol.frames import close_frame
from shardproxy.protocol.http1 import HeadError, head_end, parse_response
from shardproxy.protocol.proxyproto import encode_v2_local

UP = "up"
DOWN = "down"
MAX_HEAD = 16384
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class EndpointHealth:
    """The rise/fall state of one endpoint."""

    __slots__ = ("failed_checks", "failures", "fall", "last_error", "rise", "state", "successes")

    def __init__(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall
        self.state = UP
        self.successes = 0
        self.failures = 0
        self.last_error = ""
        self.failed_checks = 0  # since start, for shardproxy_health_check_failures_total

    def record(self, error: str | None) -> bool:
        """Count one check (``error`` None = success); True if the state changed."""
        if error is None:
            self.successes += 1
            self.failures = 0
            if self.state == DOWN and self.successes >= self.rise:
                self.state = UP
                return True
            return False
        self.failures += 1
        self.failed_checks += 1
        self.successes = 0
        self.last_error = error
        if self.state == UP and self.failures >= self.fall:
            self.state = DOWN
            return True
        return False


class HealthMonitor:
    """The supervisor's checks of every endpoint of the pools that have a
    health table, and the state they drive. ``broadcast(message)`` sends
    the state to every worker; it is called whenever an endpoint changes."""

    def __init__(
        self,
        cfg: Config,
        log: Any,
        broadcast: Callable[[Health], Awaitable[None]],
    ) -> None:
        self.log = log
        self.broadcast = broadcast
        self.endpoints: dict[Endpoint, tuple[EndpointHealth, HealthConfig]] = {}
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        """Check what ``cfg`` says (the first pool's settings win for an
        endpoint that several pools share); an endpoint checked before
        keeps its state. Restart :meth:`run` to apply."""
        endpoints: dict[Endpoint, tuple[EndpointHealth, HealthConfig]] = {}
        self.preambles: dict[Endpoint, bytes] = {}  # a PROXY LOCAL header for send_proxy pools
        # Pools connected with TLS are checked with TLS: (context, server name).
        self.tls: dict[Endpoint, tuple[ssl.SSLContext, str]] = {}
        for pool in cfg.pools:
            if pool.health is None:
                continue
            for server in pool.servers:
                for ep in server.endpoints:
                    if ep in endpoints:
                        continue
                    old = self.endpoints.get(ep)
                    state = old[0] if old else EndpointHealth(pool.health.rise, pool.health.fall)
                    state.rise, state.fall = pool.health.rise, pool.health.fall
                    endpoints[ep] = (state, pool.health)
                    self.preambles[ep] = encode_v2_local() if pool.send_proxy else b""
                    if pool.tls is not None:
                        ctx = client_context(pool.tls)
                        self.tls[ep] = (ctx, pool.tls.server_name or ep.host)
        self.endpoints = endpoints

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for endpoint in self.endpoints:
                nursery.start_soon(self._check_endpoint, endpoint)

    async def _check_endpoint(self, endpoint: Endpoint) -> None:
        cfg = self.endpoints[endpoint][1]
        await trio.sleep(random.uniform(0, cfg.interval))  # endpoints not all at once
        while True:
            error = await run_check(endpoint, cfg, self.preambles[endpoint], self.tls.get(endpoint))
            await self.record(endpoint, error)
            await trio.sleep(cfg.interval)

    async def passive_failures(self, text: str, n: int, worker: int) -> None:
        """``n`` connects to ``text`` ("ip:port") that a worker saw fail."""
        try:
            endpoint = parse_host_port(text)
        except ValueError:
            return
        if endpoint in self.endpoints:
            for _ in range(n):
                await self.record(endpoint, f"connect failed (seen by worker {worker})")

    async def record(self, endpoint: Endpoint, error: str | None) -> None:
        state, cfg = self.endpoints[endpoint]
        if not state.record(error):
            return
        down = state.state == DOWN
        log = self.log.warning if down else self.log.info
        log(
            f"backend {endpoint} is {state.state}"
            + (
                f": {error} ({cfg.fall} failures in a row)"
                if down
                else f" ({cfg.rise} checks passed)"
            ),
            **{
                "event.action": "server-down" if down else "server-up",
                "destination.ip": endpoint.host,
                "destination.port": endpoint.port,
                **({"error.message": error} if error else {}),
            },
        )
        await self.broadcast(self.message())

    def down(self) -> list[str]:
        return sorted(str(ep) for ep, (s, _) in self.endpoints.items() if s.state == DOWN)

    def message(self) -> Health:
        return Health(tuple(self.down()))


# -- the checks -------------------------------------------------------------


async def run_check(
    endpoint: Endpoint,
    cfg: HealthConfig,
    preamble: bytes = b"",
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> str | None:
    """One check of ``endpoint``: None if healthy, else why not. ``preamble``
    goes first (a PROXY header, for backends that want one); with ``tls``
    (a context and the server name), the check speaks TLS after it, as
    the workers do, and a certificate that does not verify fails it."""
    try:
        with trio.fail_after(cfg.timeout):
            family = trio.socket.AF_INET6 if ":" in endpoint.host else trio.socket.AF_INET
            sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
            try:
                await sock.connect((endpoint.host, endpoint.port))
            except BaseException:
                sock.close()
                raise
            stream: trio.abc.Stream
            async with trio.SocketStream(sock) as stream:
                if preamble:
                    await stream.send_all(preamble)
                if tls is not None:
                    stream = trio.SSLStream(stream, tls[0], server_hostname=tls[1])
                    await stream.do_handshake()
                if cfg.kind == "tcp":
                    return None
                if cfg.kind == "http":
                    return await _http(stream, endpoint, cfg)
                return await _websocket(stream, endpoint, cfg)
    except trio.TooSlowError:
        return f"no answer within {cfg.timeout:g}s"
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {getattr(cause, 'verify_message', None) or cause.reason or cause}"
        return f"connection broken: {e}"


def _host(endpoint: Endpoint) -> str:
    return str(endpoint)


async def _read_head(stream: trio.abc.Stream) -> tuple[int, dict[bytes, bytes]]:
    data = bytearray()
    while (end := head_end(data)) < 0:
        if len(data) > MAX_HEAD:
            raise HeadError("response head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise HeadError("connection closed before a whole response head")
        data += chunk
    _, status, _, headers = parse_response(bytes(data[:end]))
    return status, {name.lower(): value for name, value in headers}


async def _http(stream: trio.abc.Stream, endpoint: Endpoint, cfg: HealthConfig) -> str | None:
    await stream.send_all(
        f"GET {cfg.path} HTTP/1.1\r\nHost: {_host(endpoint)}\r\n"
        "User-Agent: shardproxy-health\r\nConnection: close\r\n\r\n".encode()
    )
    try:
        status, _ = await _read_head(stream)
    except HeadError as e:
        return f"bad answer: {e}"
    return None if status == cfg.expect else f"status {status}, expected {cfg.expect}"


async def _websocket(stream: trio.abc.Stream, endpoint: Endpoint, cfg: HealthConfig) -> str | None:
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        f"GET {cfg.path} HTTP/1.1\r\nHost: {_host(endpoint)}\r\n"
        "User-Agent: shardproxy-health\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    try:
        status, headers = await _read_head(stream)
    except HeadError as e:
        return f"bad answer: {e}"
    if status != 101:
        return f"status {status}, expected 101"
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    if headers.get(b"sec-websocket-accept") != accept:
        return "101 without the right Sec-WebSocket-Accept"
    await stream.send_all(close_frame(1000, b"", os.urandom(4)))
    return None
