"""The supervisor: listen sockets, one worker process per slot, signals.

For every worker slot and every listen address the supervisor opens one
``SO_REUSEPORT`` socket and keeps it open for its whole life; the kernel
spreads incoming connections over the sockets of a port. A worker is a fresh
interpreter (``python -m shardproxy.worker``, never a fork of this trio
process) that receives its slot's sockets as inherited descriptors. Because
the supervisor still holds them, a worker that dies loses nothing that waits
in its accept queue: the replacement accepts it.

Worker lifecycle, per slot (all transitions in :meth:`Supervisor._keep_slot`)::

    spawn → ready → (exits) → restart after a backoff → spawn …
                  → (SIGTERM/SIGINT) → SIGTERM: drain → exited
                  → (SIGQUIT, or a second signal) → SIGQUIT: stop at once → exited

A drain (worker/process.py) closes every tunnel with a WebSocket Close 1001, spread
over ``[lifecycle] close_spread``; the supervisor waits ``drain_timeout``
plus a grace period, then kills what is left.

Each slot also owns one slice of the upstream port range (control/addrplan.py),
passed to its worker in the start message; a replacement gets the same slice.

Reload (SIGHUP, :meth:`Supervisor.reload`): the file is read and checked
again; if it is invalid, the error is logged and nothing changes. Otherwise a
new *generation* of workers starts on the same listen sockets (new ones are
opened for listen addresses or slots the file adds), and once every new
worker is ready the old ones are retired: they stop accepting (connections
waiting in a socket that the new generation does not use are accepted and
served by the old worker first, so none is reset), keep relaying their
tunnels, and drain them after ``reload_drain_after`` (never, by default:
they exit when their last tunnel ends). Generations share a slot's port
slice; the kernel keeps every 4-tuple unique, and the userspace allocator
skips a port the other generation still holds (EADDRNOTAVAIL) and tries the
next.

Resource handling: RLIMIT_NOFILE is raised to the hard limit at start (workers
inherit it) and the capacity it allows is logged, as is the address plan
(allocator, sources x ports x endpoints). Error handling: a listen address
that cannot be bound, or an address plan this host cannot carry out (a source
address it does not have, a port range outside the system's), fails the start
with one clear line; a worker
that dies is logged with its exit status and restarted, immediately the first
time and with an exponential backoff (up to 30 s) while it keeps dying within
a few seconds of its start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psutil
import trio

from shardproxy import config
from shardproxy.config import Config, ConfigError, Endpoint, certs, format_duration
from shardproxy.control import addrplan
from shardproxy.control.addrplan import Plan
from shardproxy.control.admin import AdminRoutes, serve_admin
from shardproxy.control.channel import Channel, request_all
from shardproxy.control.health import UP, HealthMonitor
from shardproxy.control.messages import (
    Ack,
    Drained,
    Message,
    Ready,
    Retire,
    Start,
    Stats,
    UpstreamSlice,
)
from shardproxy.host import runtime, tls
from shardproxy.host.rlimits import fd_capacity, raise_nofile_limit
from shardproxy.host.sockopts import set_tcp_keepalive
from shardproxy.telemetry import logs, metrics, stats
from shardproxy.telemetry.snapshot import WorkerSnapshot

LISTEN_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
# The first drains (SIGINT too: Ctrl-C should not cut tunnels); a second, or SIGQUIT, stops at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
STOP_GRACE = 10.0  # seconds a worker gets beyond drain_timeout (or after SIGQUIT) before SIGKILL
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 5.0  # a worker that ran this long resets the backoff
READY_TIMEOUT = 30.0  # a new generation must be ready by then, or the reload is undone
# Seconds the workers get to acknowledge an admin call's change (within admin.REQUEST_TIMEOUT).
APPLY_TIMEOUT = 3.0


class StartError(Exception):
    """The supervisor cannot start; ``str()`` says why in one line."""


def open_listen_socket(endpoint: Endpoint, *, reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise StartError(f"cannot listen on {endpoint}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that died ``failures`` times in a
    row, each within STABLE_AFTER of its start: 0, 0.5, 1, 2, … up to 30."""
    if failures <= 1:
        return 0.0
    return float(min(0.5 * 2 ** (failures - 2), RESTART_BACKOFF_MAX))


def _process_figures(pid: int) -> dict[str, Any]:
    """psutil's view of one of our processes; {} if it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return {
                "rss": p.memory_info().rss,
                "cpu_seconds": cpu.user + cpu.system,
                "open_fds": p.num_fds(),
                "max_fds": p.rlimit(psutil.RLIMIT_NOFILE)[0],
            }
    except psutil.Error:
        return {}


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass(eq=False)
class Generation:
    """The workers started from one version of the configuration."""

    number: int
    config: Config
    plan: Plan
    slots: list[list[socket.socket]]  # slots[i]: worker i's listen sockets, one per address
    retired: bool = False
    ready_slots: set[int] = field(default_factory=set)
    ready: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class WorkerProcess:
    generation: Generation
    slot: int
    process: trio.Process
    channel: Channel

    @property
    def name(self) -> str:
        """ "0", or "0 (generation 2)" after a reload."""
        n = self.generation.number
        return f"{self.slot}" if n == 1 else f"{self.slot} (generation {n})"


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg  # the current generation's
        self.log = logs.get_logger()
        self.nofile = raise_nofile_limit()
        self.plan: Plan  # set by prepare()
        self.gen: Generation  # set by prepare()
        self.sockets: dict[tuple[int, Endpoint], socket.socket] = {}  # (slot, address)
        self.workers: dict[int, WorkerProcess] = {}  # pid → every worker running
        self.stats: dict[int, WorkerSnapshot] = {}  # pid → its latest snapshot
        self.retired = stats.Retired()  # what the workers that exited had counted
        self.ready = trio.Event()  # the first generation is ready
        self.health = HealthMonitor(cfg, self.log, self._broadcast)
        self.drained: set[tuple[str, str]] = set()  # (pool, server) an operator drained
        self.restarts = 0  # workers restarted after dying
        self.reloads: Counter[str] = Counter()  # "done" / "refused"
        self.admin_socket: socket.socket | None = None
        self._health_scope = trio.CancelScope()
        self._stopping = False
        # Every worker's TLS listeners encrypt session tickets with these, so
        # that a client resumes on whichever worker SO_REUSEPORT gives it.
        # They live as long as the supervisor (a restart makes new ones).
        self.ticket_keys = os.urandom(80).hex()
        self.certificates: dict[str, tuple[str, float]] = {}  # the serving generation's

    def _read_certificates(self, cfg: Config) -> dict[str, tuple[str, float]]:
        """What the listener certificates of ``cfg`` say now (key → file,
        expiry: the /metrics gauge), with a warning logged for each that
        expires within 30 days."""
        for line in certs.expiry_warnings(cfg):
            self.log.warning(line, **{"event.action": "certificate-expiring"})
        return {key: (i.path, i.not_after) for key, i in certs.profile_certificates(cfg)}

    def prepare(self) -> None:
        """Check the address plan against this host, then bind every (slot,
        address) socket; all or nothing. Raises :class:`StartError`."""
        try:
            tls.trial(self.config)
            self.plan = addrplan.build(self.config)
        except ConfigError as e:
            raise StartError(str(e)) from None
        self.certificates = self._read_certificates(self.config)
        slots = self._open_slots(self.config)
        self.gen = Generation(1, self.config, self.plan, slots)
        if self.config.admin.listen is not None:
            try:
                self.admin_socket = open_listen_socket(self.config.admin.listen, reuse_port=False)
            except StartError as e:
                self.close_sockets()
                raise StartError(f"admin.listen: {e}") from None

    def close_admin(self) -> None:
        if self.admin_socket is not None:
            self.admin_socket.close()
            self.admin_socket = None

    def _open_slots(self, cfg: Config) -> list[list[socket.socket]]:
        """Each slot's sockets for ``cfg``: the open ones reused, the missing
        ones opened (all of them, or none and StartError)."""
        opened: list[tuple[tuple[int, Endpoint], socket.socket]] = []
        slots = []
        try:
            for slot in range(cfg.proxy.workers):
                row = []
                for ep in cfg.proxy.listen:
                    sock = self.sockets.get((slot, ep))
                    if sock is None:
                        sock = open_listen_socket(ep)
                        opened.append(((slot, ep), sock))
                    set_tcp_keepalive(sock, cfg.keepalive)  # accepted sockets inherit it
                    row.append(sock)
                slots.append(row)
        except StartError:
            for _, sock in opened:
                sock.close()
            raise
        self.sockets.update(opened)
        return slots

    def close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM, SIGINT or SIGQUIT, then stop the workers and return."""
        if not self.sockets:
            self.prepare()
        self._log_start()
        try:
            with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
                async with trio.open_nursery() as nursery:
                    self._start_generation(nursery, self.gen)
                    if self.config.log.stats_interval > 0:
                        nursery.start_soon(self._log_stats, self.config.log.stats_interval)
                    nursery.start_soon(self._run_health)
                    nursery.start_soon(self._reload_on_sighup, nursery)
                    nursery.start_soon(self._reopen_logs_on_sigusr1)
                    if self.admin_socket is not None:
                        nursery.start_soon(
                            serve_admin,
                            self.admin_socket,
                            self.config.admin.token,
                            self._admin_routes(),
                            self.log,
                        )
                    task_status.started()
                    signum = await anext(signals)
                    await self.stop_workers(signals, at_once=signum == signal.SIGQUIT)
                    nursery.cancel_scope.cancel()
        finally:
            self.close_sockets()
            self.close_admin()  # last: /healthz answers 503 while the workers drain
        self.log.info("supervisor stopped", **{"event.action": "supervisor-stopped"})

    def _log_start(self) -> None:
        p, plan = self.config.proxy, self.plan
        per_worker = fd_capacity(self.nofile)
        self.log.info(
            f"supervisor starting {p.workers} workers on {', '.join(map(str, p.listen))}; "
            f"RLIMIT_NOFILE {self.nofile} allows {per_worker} tunnels per worker "
            f"({per_worker * p.workers} in all)",
            **{
                "event.action": "supervisor-start",
                "shardproxy.workers": p.workers,
                "shardproxy.nofile": self.nofile,
                "shardproxy.capacity_per_worker": per_worker,
            },
        )
        self.log.info(
            f"upstream: {plan.allocator} port allocator ({plan.allocator_reason}); "
            f"{len(plan.sources)} source addresses x {len(plan.port_range)} ports "
            f"({plan.port_range}) x {len(plan.endpoints)} endpoints = "
            f"{plan.total.tuples} upstream connections; the instance can hold "
            f"{plan.total.limit} tunnels, bound by {plan.total.binding}",
            **{"event.action": "address-plan", "shardproxy.plan": plan.to_dict()},
        )

    def _start_generation(self, nursery: trio.Nursery, gen: Generation) -> None:
        for slot in range(gen.config.proxy.workers):
            nursery.start_soon(self._keep_slot, gen, slot)

    # -- stopping -------------------------------------------------------------

    async def stop_workers(self, signals: AsyncIterator[int], *, at_once: bool) -> None:
        """Drain (SIGTERM to every worker) or stop at once (SIGQUIT); a
        further signal while draining turns the drain into a stop at once.
        /healthz answers 503 from now on; for ``drain_delay`` everything
        else goes on (so that keepalived or a balancer moves traffic away
        before a tunnel is closed), then the listen sockets close first, so
        new connections are refused."""
        self._stopping = True
        lifecycle = self.config.lifecycle
        if not at_once and lifecycle.drain_delay > 0:
            self.log.info(
                f"drain in {lifecycle.drain_delay:g}s: /healthz answers 503 meanwhile",
                **{"event.action": "drain-delay"},
            )
            with trio.move_on_after(lifecycle.drain_delay):
                await anext(signals)
                at_once = True  # a second signal: no drain
        self.close_sockets()
        self.log.info(
            "stopping at once"
            if at_once
            else f"draining: tunnels close over {lifecycle.close_spread:g}s, "
            f"at most {lifecycle.drain_timeout:g}s",
            **{"event.action": "supervisor-stop"},
        )
        self._signal_workers(signal.SIGQUIT if at_once else signal.SIGTERM)
        limit = STOP_GRACE if at_once else lifecycle.drain_timeout + STOP_GRACE
        async with trio.open_nursery() as nursery:
            if not at_once:
                nursery.start_soon(self._stop_at_once_on_signal, signals)
            with trio.move_on_after(limit):
                for w in list(self.workers.values()):
                    await w.process.wait()
            nursery.cancel_scope.cancel()
        for w in list(self.workers.values()):
            if w.process.returncode is None:
                self.log.warning(
                    f"worker {w.name} did not stop in {limit:g}s; killing it",
                    **{"event.action": "worker-kill", "shardproxy.worker": w.slot},
                )
                w.process.kill()
                await w.process.wait()

    def _signal_workers(self, signum: int) -> None:
        for w in self.workers.values():
            if w.process.returncode is None:
                w.process.send_signal(signum)

    async def _stop_at_once_on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.log.info(
                f"received {signal.Signals(signum).name} while draining; stopping at once",
                **{"event.action": "supervisor-stop-now"},
            )
            self._signal_workers(signal.SIGQUIT)
            return

    # -- reload ---------------------------------------------------------------

    async def _reload_on_sighup(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                if not self._stopping:
                    await self.reload(nursery)

    async def _reopen_logs_on_sigusr1(self) -> None:
        """logrotate moved the log file away: reopen it, here and in every worker."""
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                logs.reopen()
                self._signal_workers(signal.SIGUSR1)
                self.log.info("log file reopened", **{"event.action": "log-reopened"})

    async def reload(self, nursery: trio.Nursery) -> bool:
        """Start a new generation from the file as it is now and retire the
        running one; on any error log it and change nothing."""
        source = self.config.source
        try:
            cfg = config.load(source)
            tls.trial(cfg)  # a renewed certificate OpenSSL cannot use refuses the reload
            plan = addrplan.build(cfg)
            slots = self._open_slots(cfg)
        except (ConfigError, StartError) as e:
            self.reloads["refused"] += 1
            self.log.error(
                f"reload refused, the running configuration stays: {e}",
                **{"event.action": "reload-refused", "error.message": str(e)},
            )
            return False
        self.certificates = self._read_certificates(cfg)
        old = self.gen
        new = Generation(old.number + 1, cfg, plan, slots)
        self.log.info(
            f"reload: starting generation {new.number} ({cfg.proxy.workers} workers)",
            **{"event.action": "reload-start", "shardproxy.generation": new.number},
        )
        self._start_generation(nursery, new)
        with trio.move_on_after(READY_TIMEOUT):
            await new.ready.wait()
        if not new.ready.is_set():
            self.reloads["refused"] += 1
            await self._retire(new, drain_after=0.0)
            self._close_unused_sockets(old)
            self.log.error(
                f"reload undone: generation {new.number} not ready in {READY_TIMEOUT:g}s",
                **{"event.action": "reload-refused", "error.message": "workers not ready"},
            )
            return False
        self.gen, self.config, self.plan = new, cfg, plan
        self.reloads["done"] += 1
        await self._retire(old, drain_after=cfg.lifecycle.reload_drain_after)
        self._close_unused_sockets(new)
        self.health.reconfigure(cfg)
        self._health_scope.cancel()
        nursery.start_soon(self._run_health)
        self.log.info(
            f"reload done: generation {new.number} serves; generation {old.number} keeps "
            f"its tunnels"
            + (
                ""
                if cfg.lifecycle.reload_drain_after is None
                else f" for {format_duration(cfg.lifecycle.reload_drain_after)}, then drains"
            ),
            **{"event.action": "reload-done", "shardproxy.generation": new.number},
        )
        return True

    async def _retire(self, gen: Generation, drain_after: float | None) -> None:
        """Tell ``gen``'s workers to stop accepting and to keep, or drain,
        their tunnels. Sockets the current generation does not use are
        swept: what waits in them is accepted and served before they close."""
        gen.retired = True
        keep = (
            {id(sock) for row in self.gen.slots for sock in row} if gen is not self.gen else set()
        )
        for w in list(self.workers.values()):
            if w.generation is gen:
                sweep = [i for i, sock in enumerate(gen.slots[w.slot]) if id(sock) not in keep]
                await self._send(w, Retire(tuple(sweep), drain_after))

    def _close_unused_sockets(self, gen: Generation) -> None:
        """Close the supervisor's copy of every socket ``gen`` does not use
        (a retired worker still holding one sweeps it, then closes it)."""
        used = {id(sock) for row in gen.slots for sock in row}
        for key, sock in list(self.sockets.items()):
            if id(sock) not in used:
                sock.close()
                del self.sockets[key]

    # -- workers ----------------------------------------------------------------

    async def _keep_slot(self, gen: Generation, slot: int) -> None:
        """Run ``gen``'s worker for ``slot``, restarting it when it dies,
        until the supervisor stops or the generation is retired."""
        failures = 0
        while not self._stopping and not gen.retired:
            started = trio.current_time()
            code, name = await self._run_worker(gen, slot)
            if self._stopping or gen.retired:
                return
            self.restarts += 1
            failures = failures + 1 if trio.current_time() - started < STABLE_AFTER else 1
            delay = restart_delay(failures)
            self.log.error(
                f"worker {name} exited ({_describe_exit(code)}); restarting in {delay:g}s",
                **{
                    "event.action": "worker-exited",
                    "event.outcome": "failure",
                    "shardproxy.worker": slot,
                    "process.exit_code": code,
                    "shardproxy.restart_delay": delay,
                },
            )
            await trio.sleep(delay)

    async def _run_worker(self, gen: Generation, slot: int) -> tuple[int, str]:
        """Spawn one worker of ``gen`` for ``slot`` and wait until it exits."""
        ours, theirs = socket.socketpair()
        listen_fds = [s.fileno() for s in gen.slots[slot]]
        try:
            command, env = runtime.module_command(
                "shardproxy.worker", str(slot), str(theirs.fileno()), *map(str, listen_fds)
            )
            proc = await trio.lowlevel.open_process(
                command,
                env=env,
                pass_fds=[theirs.fileno(), *listen_fds],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        w = WorkerProcess(gen, slot, proc, Channel(trio.socket.from_stdlib_socket(ours)))
        self.workers[proc.pid] = w
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen_to, w)
                await self._send(w, self._start_message(gen, slot))
                if self.health.down():
                    await self._send(w, self.health.message())
                if self.drained:
                    await self._send(w, self._drained_message())
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            del self.workers[proc.pid]
            w.channel.close()
            last = self.stats.pop(proc.pid, None)
            if last is not None:
                self.retired.add(last)
        if gen.retired and not self._stopping:
            self.log.info(
                f"worker {w.name} of generation {gen.number} exited ({_describe_exit(code)})",
                **{"event.action": "worker-retired", "shardproxy.worker": slot},
            )
        return code, w.name

    def _start_message(self, gen: Generation, slot: int) -> Start:
        ports = gen.plan.slices[slot]
        upstream = UpstreamSlice(
            ports.first, ports.last, gen.plan.allocator, tuple(gen.plan.excluded_in(ports))
        )
        return Start(
            slot, gen.number, gen.config.to_dict(), gen.config.source, upstream, self.ticket_keys
        )

    async def _send(self, w: WorkerProcess, message: Message) -> None:
        try:
            await w.channel.send(message)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the worker is gone; _run_worker sees it exit

    async def _broadcast(self, message: Message) -> None:
        for w in list(self.workers.values()):
            await self._send(w, message)

    async def _listen_to(self, w: WorkerProcess) -> None:
        gen, slot = w.generation, w.slot
        try:
            while (message := await w.channel.receive()) is not None:
                match message:
                    case Ready():
                        self.log.info(
                            f"worker {w.name} ready (pid {message.pid})",
                            **{
                                "event.action": "worker-ready",
                                "shardproxy.worker": slot,
                                "shardproxy.generation": gen.number,
                                "shardproxy.capacity": message.capacity,
                            },
                        )
                        gen.ready_slots.add(slot)
                        if len(gen.ready_slots) == gen.config.proxy.workers:
                            gen.ready.set()
                            if gen.number == 1:
                                self.ready.set()
                    case Stats():
                        self.stats[w.process.pid] = message.snapshot
                        for endpoint, n in message.passive_failures.items():
                            await self.health.passive_failures(endpoint, n, slot)
                    case _:
                        raise ValueError(f"a worker sent {message!r}")
        except (OSError, ValueError):
            pass  # the worker went away; _run_worker sees it exit

    # -- admin ------------------------------------------------------------------

    def _admin_routes(self) -> AdminRoutes:
        """The admin listener's requests (control/admin.py)."""
        return AdminRoutes(
            [
                ("GET", "/healthz", self._healthz),
                ("GET", "/servers", self._get_servers),
                ("GET", "/metrics", self._get_metrics),
                ("GET", "/stats", self._get_stats),
                ("POST", "/servers/{pool}/{server}/drain", partial(self._set_admin, "drain")),
                ("POST", "/servers/{pool}/{server}/ready", partial(self._set_admin, "ready")),
            ]
        )

    async def _healthz(self, _: dict[str, str]) -> tuple[int, Any]:
        return (503, {"status": "draining"}) if self._stopping else (200, {"status": "ok"})

    async def _get_servers(self, _: dict[str, str]) -> tuple[int, Any]:
        return 200, self._servers()

    async def _get_metrics(self, _: dict[str, str]) -> tuple[int, Any]:
        return 200, metrics.render(metrics.families(self.stats, self.retired, self._figures()))

    async def _get_stats(self, _: dict[str, str]) -> tuple[int, Any]:
        return 200, {**stats.summary(self.stats, self.retired), **self._figures()}

    async def _set_admin(self, action: str, args: dict[str, str]) -> tuple[int, Any]:
        """An operator drains a server (no new tunnels) or makes it ready."""
        pool, server = args["pool"], args["server"]
        if not any(
            p.name == pool and any(s.name == server for s in p.servers) for p in self.config.pools
        ):
            return 404, {"error": f"no server {server!r} in pool {pool!r}"}
        if action == "drain":
            self.drained.add((pool, server))
        else:
            self.drained.discard((pool, server))
        self.log.info(
            f"server {server} of pool {pool}: "
            + ("drained by an admin call (no new tunnels)" if action == "drain" else "ready again"),
            **{
                "event.action": f"server-{action}",
                "shardproxy.pool": pool,
                "shardproxy.server": server,
            },
        )
        # Answered once every worker has it: no new tunnel goes to a drained server after.
        channels = {w.name: w.channel for w in self.workers.values()}
        answers, unanswered = await request_all(channels, self._drained_message(), APPLY_TIMEOUT)
        applied = sum(isinstance(answer, Ack) for answer in answers.values())
        if unanswered:
            self.log.warning(
                f"server {server} of pool {pool}: workers {', '.join(unanswered)} did not "
                f"acknowledge the {action} in {APPLY_TIMEOUT:g}s",
                **{
                    "event.action": "server-admin-unanswered",
                    "shardproxy.pool": pool,
                    "shardproxy.server": server,
                    "shardproxy.workers": unanswered,
                },
            )
        body = {"pool": pool, "server": server, "admin": action, "applied": applied}
        return (202, {**body, "unanswered": unanswered}) if unanswered else (200, body)

    def _figures(self) -> dict[str, Any]:
        """The supervisor's own figures, for /metrics and /stats."""
        processes = {"supervisor": _process_figures(os.getpid())}
        for pid, w in list(self.workers.items()):
            name = f"worker-{w.slot}" + (
                "" if w.generation.number == 1 else f".{w.generation.number}"
            )
            figures = _process_figures(pid)
            if figures:
                processes[name] = figures
        return {
            "retired_histograms": {
                name: h.to_json() for name, h in self.retired.histograms.items()
            },
            "restarts": self.restarts,
            "reloads": dict(self.reloads),
            "certificates": {
                key: (path, not_after - time.time())
                for key, (path, not_after) in self.certificates.items()
            },
            "backends": {
                str(ep): state.state == UP for ep, (state, _) in self.health.endpoints.items()
            },
            "check_failures": {
                str(ep): state.failed_checks for ep, (state, _) in self.health.endpoints.items()
            },
            "processes": {k: v for k, v in processes.items() if v},
        }

    def _drained_message(self) -> Drained:
        return Drained(tuple(sorted(self.drained)))

    def _servers(self) -> list[dict[str, Any]]:
        down = set(self.health.down())
        checked = {str(ep) for ep in self.health.endpoints}
        return [
            {
                "pool": pool.name,
                "server": server.name,
                "admin": "drain" if (pool.name, server.name) in self.drained else "ready",
                "endpoints": [
                    {
                        "endpoint": str(ep),
                        "health": "down"
                        if str(ep) in down
                        else ("up" if str(ep) in checked else "unchecked"),
                    }
                    for ep in server.endpoints
                ],
            }
            for pool in self.config.pools
            for server in pool.servers
        ]

    # -- health and stats -------------------------------------------------------

    async def _run_health(self) -> None:
        with trio.CancelScope() as scope:
            self._health_scope = scope
            await self.health.run()

    async def _log_stats(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            record = stats.summary(self.stats, self.retired)
            self.log.info(
                f"{record['tunnels']} tunnels, {record['handshakes']} handshakes in flight",
                **{"event.action": "stats", "shardproxy.stats": record},
            )
