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

A drain (worker.py) closes every tunnel with a WebSocket Close 1001, spread
over ``[lifecycle] close_spread``; the supervisor waits ``drain_timeout``
plus a grace period, then kills what is left.

Each slot also owns one slice of the upstream port range (addrplan.py),
passed to its worker in the start message; a replacement gets the same slice.

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

import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import trio

from . import addrplan, logs, stats
from .addrplan import Plan
from .config import Config, ConfigError, Endpoint, HealthConfig, parse_host_port
from .control import Channel
from .health import DOWN, EndpointHealth, run_check
from .limits import fd_capacity, raise_nofile_limit

LISTEN_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
# The first drains (SIGINT too: Ctrl-C should not cut tunnels); a second, or SIGQUIT, stops at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
STOP_GRACE = 10.0  # seconds a worker gets beyond drain_timeout (or after SIGQUIT) before SIGKILL
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 5.0  # a worker that ran this long resets the backoff


class StartError(Exception):
    """The supervisor cannot start; ``str()`` says why in one line."""


def open_listen_socket(endpoint: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.log = logs.get_logger()
        self.nofile = raise_nofile_limit()
        # slots[i] holds worker i's listen sockets, one per listen address.
        self.slots: list[list[socket.socket]] = []
        self.plan: Plan  # set by prepare()
        self.processes: dict[int, trio.Process] = {}
        self.stats: dict[int, dict[str, Any]] = {}  # slot → its latest snapshot
        self.retired: Counter[str] = Counter()  # counts of workers that exited
        self.ready = trio.Event()  # every slot has reported ready once
        self.channels: dict[int, Channel] = {}  # slot → its worker's control channel
        # Endpoints of pools with active checks (the first pool's settings
        # win for an endpoint that several pools share).
        self.health: dict[Endpoint, tuple[EndpointHealth, HealthConfig]] = {}
        for pool in cfg.pools:
            if pool.health is not None:
                for server in pool.servers:
                    for ep in server.endpoints:
                        if ep not in self.health:
                            state = EndpointHealth(pool.health.rise, pool.health.fall)
                            self.health[ep] = (state, pool.health)
        self._ready_slots: set[int] = set()
        self._stopping = False

    def prepare(self) -> None:
        """Check the address plan against this host, then bind every (slot,
        address) socket; all or nothing. Raises :class:`StartError`."""
        try:
            self.plan = addrplan.build(self.config)
        except ConfigError as e:
            raise StartError(str(e)) from None
        try:
            for _ in range(self.config.proxy.workers):
                self.slots.append([open_listen_socket(ep) for ep in self.config.proxy.listen])
        except StartError:
            self.close_sockets()
            raise

    def close_sockets(self) -> None:
        for sockets in self.slots:
            for s in sockets:
                s.close()
        self.slots.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM or SIGINT, then stop the workers and return."""
        if not self.slots:
            self.prepare()
        p = self.config.proxy
        per_worker = fd_capacity(self.nofile)
        plan = self.plan
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
        try:
            with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
                async with trio.open_nursery() as nursery:
                    for slot in range(p.workers):
                        nursery.start_soon(self._keep_slot, slot)
                    if self.config.log.stats_interval > 0:
                        nursery.start_soon(self._log_stats, self.config.log.stats_interval)
                    for endpoint in self.health:
                        nursery.start_soon(self._check_endpoint, endpoint)
                    task_status.started()
                    signum = await anext(signals)
                    await self.stop_workers(signals, at_once=signum == signal.SIGQUIT)
                    nursery.cancel_scope.cancel()
        finally:
            self.close_sockets()
        self.log.info("supervisor stopped", **{"event.action": "supervisor-stopped"})

    async def stop_workers(self, signals: AsyncIterator[int], *, at_once: bool) -> None:
        """Drain (SIGTERM to every worker) or stop at once (SIGQUIT); a
        further signal while draining turns the drain into a stop at once.
        The listen sockets close first, so new connections are refused."""
        self._stopping = True
        self.close_sockets()
        lifecycle = self.config.lifecycle
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
                for proc in list(self.processes.values()):
                    await proc.wait()
            nursery.cancel_scope.cancel()
        for slot, proc in self.processes.items():
            if proc.returncode is None:
                self.log.warning(
                    f"worker {slot} did not stop in {limit:g}s; killing it",
                    **{"event.action": "worker-kill", "shardproxy.worker": slot},
                )
                proc.kill()
                await proc.wait()

    def _signal_workers(self, signum: int) -> None:
        for proc in self.processes.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def _stop_at_once_on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.log.info(
                f"received {signal.Signals(signum).name} while draining; stopping at once",
                **{"event.action": "supervisor-stop-now"},
            )
            self._signal_workers(signal.SIGQUIT)
            return

    async def _keep_slot(self, slot: int) -> None:
        failures = 0
        while not self._stopping:
            started = trio.current_time()
            code = await self._run_worker(slot)
            if self._stopping:
                return
            failures = failures + 1 if trio.current_time() - started < STABLE_AFTER else 1
            delay = restart_delay(failures)
            self.log.error(
                f"worker {slot} exited ({_describe_exit(code)}); restarting in {delay:g}s",
                **{
                    "event.action": "worker-exited",
                    "event.outcome": "failure",
                    "shardproxy.worker": slot,
                    "process.exit_code": code,
                    "shardproxy.restart_delay": delay,
                },
            )
            await trio.sleep(delay)

    async def _run_worker(self, slot: int) -> int:
        """Spawn one worker for ``slot`` and wait until it exits."""
        ours, theirs = socket.socketpair()
        listen_fds = [s.fileno() for s in self.slots[slot]]
        try:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "shardproxy.worker",
                    str(slot),
                    str(theirs.fileno()),
                    *map(str, listen_fds),
                ],
                pass_fds=[theirs.fileno(), *listen_fds],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.processes[slot] = proc
        channel = Channel(trio.socket.from_stdlib_socket(ours))
        self.channels[slot] = channel
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen_to, slot, channel)
                await channel.send(
                    {
                        "type": "start",
                        "slot": slot,
                        "config": self.config.to_dict(),
                        "source": self.config.source,
                        "upstream": {
                            "first": self.plan.slices[slot].first,
                            "last": self.plan.slices[slot].last,
                            "allocator": self.plan.allocator,
                            "excluded": self.plan.excluded_in(self.plan.slices[slot]),
                        },
                    }
                )
                if self._down():
                    await channel.send(self._health_message())
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.channels.pop(slot, None)
            channel.close()
            last = self.stats.pop(slot, None)
            if last is not None:
                self.retired.update(last["counts"])
        return code

    # -- health ---------------------------------------------------------------

    async def _check_endpoint(self, endpoint: Endpoint) -> None:
        cfg = self.health[endpoint][1]
        await trio.sleep(random.uniform(0, cfg.interval))  # endpoints not all at once
        while True:
            error = await run_check(endpoint, cfg)
            await self._record(endpoint, error)
            await trio.sleep(cfg.interval)

    async def _passive_failures(self, text: str, n: int, slot: int) -> None:
        try:
            endpoint = parse_host_port(text)
        except ValueError:
            return
        if endpoint in self.health:
            for _ in range(n):
                await self._record(endpoint, f"connect failed (seen by worker {slot})")

    async def _record(self, endpoint: Endpoint, error: str | None) -> None:
        state, cfg = self.health[endpoint]
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
        message = self._health_message()
        for channel in list(self.channels.values()):
            try:
                await channel.send(message)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # that worker is gone; its successor gets the state at start

    def _down(self) -> list[str]:
        return sorted(str(ep) for ep, (state, _) in self.health.items() if state.state == DOWN)

    def _health_message(self) -> dict[str, Any]:
        return {"type": "health", "down": self._down()}

    async def _log_stats(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            record = stats.summary(self.stats, self.retired)
            self.log.info(
                f"{record['tunnels']} tunnels, {record['handshakes']} handshakes in flight",
                **{"event.action": "stats", "shardproxy.stats": record},
            )

    async def _listen_to(self, slot: int, channel: Channel) -> None:
        try:
            while (message := await channel.receive()) is not None:
                if message["type"] == "ready":
                    self.log.info(
                        f"worker {slot} ready (pid {message['pid']})",
                        **{
                            "event.action": "worker-ready",
                            "shardproxy.worker": slot,
                            "shardproxy.capacity": message["capacity"],
                        },
                    )
                    self._ready_slots.add(slot)
                    if len(self._ready_slots) == self.config.proxy.workers:
                        self.ready.set()
                elif message["type"] == "stats":
                    self.stats[slot] = message
                    for endpoint, n in message.get("passive_failures", {}).items():
                        await self._passive_failures(endpoint, n, slot)
        except (OSError, ValueError):
            pass  # the worker went away; _run_worker sees it exit
