"""The supervisor's duties, with real processes and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy
from peers import WsBackend
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


@pytest.fixture
def backend() -> Any:
    with WsBackend() as b:
        yield b


async def _echoes(ws: ClientConnection, text: str) -> bool:
    try:
        await ws.send(text)
        return await asyncio.wait_for(ws.recv(), 5) == text
    except (ConnectionClosed, TimeoutError):
        return False


def _peer_worker(proxy: Proxy, ws: ClientConnection) -> int:
    """Which worker holds this tunnel: the one whose process owns the
    proxy-side socket of the client's connection."""
    import psutil

    local = ws.local_address[:2]
    for slot, pid in proxy.worker_pids().items():
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.raddr and (c.raddr.ip, c.raddr.port) == local:
                return slot
    raise AssertionError(f"no worker holds {local}")


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_killed_worker_is_restarted_and_others_keep_their_tunnels(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=2)

    async def main() -> None:
        conns = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(40)]
        owner = {id(ws): _peer_worker(proxy, ws) for ws in conns}
        assert set(owner.values()) == {0, 1}, "both workers should hold tunnels"
        victim_pid = proxy.worker_pids()[0]
        os.kill(victim_pid, signal.SIGKILL)

        # The killed slot's socket stays open in the supervisor: connections
        # made right now wait in its accept queue for the replacement.
        fresh = [
            await connect(proxy.url + "/echo", ping_interval=None, open_timeout=20)
            for _ in range(20)
        ]
        assert all([await _echoes(ws, f"fresh {i}") for i, ws in enumerate(fresh)])

        for i, ws in enumerate(conns):
            alive = await _echoes(ws, f"old {i}")
            assert alive == (owner[id(ws)] == 1), f"tunnel on worker {owner[id(ws)]}: echo={alive}"
        for ws in conns + fresh:
            await ws.close()

        restarted = proxy.wait_for(lambda _: proxy.worker_pids().get(0) != victim_pid, "restart")
        assert restarted

    asyncio.run(asyncio.wait_for(main(), 60))
    exited = proxy.actions("worker-exited")
    assert exited and exited[0]["process"]["exit_code"] == -signal.SIGKILL
    assert "killed by SIGKILL" in exited[0]["message"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything_cleanly(
    signum: int, backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=2)
    workers = list(proxy.worker_pids().values())
    proxy.proc.send_signal(signum)
    assert proxy.proc.wait(20) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert proxy.actions("supervisor-stopped")
    assert len([e for e in proxy.actions("worker-stopped")]) == 2


def test_start_logs_descriptor_capacity(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    import resource

    proxy = start_proxy([backend.port], workers=2)
    start = proxy.actions("supervisor-start")[0]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert start["shardproxy"]["nofile"] == hard  # raised to the hard limit
    assert start["shardproxy"]["capacity_per_worker"] == (hard - 64) // 2
    assert f"allows {(hard - 64) // 2} tunnels per worker" in start["message"]


def test_listen_address_in_use_is_one_clear_line(tmp_path: Any, backend: WsBackend) -> None:
    import socket

    from conftest import toml_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(toml_config([backend.port], port=port))
        result = subprocess.run(
            [sys.executable, "-m", "shardproxy", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"shardproxy: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_worker_that_keeps_dying_is_restarted_with_backoff(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=1)
    for kills in range(1, 4):
        pid = proxy.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)  # each one dies soon after its start
        proxy.wait_for(lambda _, old=pid: proxy.worker_pids().get(0) not in (None, old), "restart")
        assert len(proxy.actions("worker-exited")) == kills
    delays = [e["shardproxy"]["restart_delay"] for e in proxy.actions("worker-exited")]
    assert delays == [0.0, 0.5, 1.0]
    assert echoes_through(proxy)


def test_restart_delay_grows_to_a_ceiling() -> None:
    from shardproxy.control.supervisor import RESTART_BACKOFF_MAX, restart_delay

    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.0, 0.5, 1.0, 2.0]
    assert delays == sorted(delays)
    assert delays[-1] == RESTART_BACKOFF_MAX


def echoes_through(proxy: Proxy) -> bool:
    async def echo() -> bool:
        async with connect(proxy.url + "/echo") as ws:
            return await _echoes(ws, "after the restarts")

    return bool(asyncio.run(asyncio.wait_for(echo(), 20)))


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_connections_queued_for_a_dead_worker_are_served_by_its_replacement(
    backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=2)
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)  # accepts nothing: its socket's queue fills

    async def main() -> None:
        attempts = [
            asyncio.ensure_future(connect(proxy.url + "/echo", ping_interval=None, open_timeout=30))
            for _ in range(40)
        ]
        await asyncio.sleep(2)  # the other worker serves its share meanwhile
        queued = [a for a in attempts if not a.done()]
        assert queued, "no connection waited for the stopped worker"
        os.kill(victim, signal.SIGKILL)
        conns = await asyncio.gather(*attempts)  # every one, queued ones included
        assert all([await _echoes(ws, f"m{i}") for i, ws in enumerate(conns)])
        for ws in conns:
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert proxy.worker_pids()[0] != victim
