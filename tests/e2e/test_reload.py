"""Reload on SIGHUP through a real ``shardproxy run``: established tunnels
keep echoing, new connections never fail and follow the new file."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Proxy, free_port
from peers import WsBackend
from websockets.asyncio.client import ClientConnection, connect

# Every test here runs on both engines (conftest.proxy_engine).
pytestmark = pytest.mark.usefixtures("proxy_engine")

TUNNELS = 500


def config_text(port: int, b1: int, b2: int, pool: str) -> str:
    return (
        f'[proxy]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n\n'
        '[log]\nstats_interval = "0s"\n\n'
        f'[[routes]]\npool = "{pool}"\n\n'
        f'[pools.one]\nservers = [{{ address = "127.0.0.1", ports = [{b1}] }}]\n\n'
        f'[pools.two]\nservers = [{{ address = "127.0.0.1", ports = [{b2}] }}]\n'
    )


class Setup:
    """Two backends, a config file routing to pool one or two, the proxy."""

    def __init__(self, tmp_path: Path, b1: WsBackend, b2: WsBackend) -> None:
        self.b1, self.b2 = b1, b2
        self.port = free_port()
        self.path = tmp_path / "shardproxy.toml"
        self.proxy: Proxy | None = None

    def write(self, pool: str, extra: str = "") -> None:
        self.path.write_text(config_text(self.port, self.b1.port, self.b2.port, pool) + extra)

    def start(self, extra: str = "") -> Proxy:
        self.write("one", extra)
        self.proxy = Proxy(self.path, self.port, 2)
        return self.proxy


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with WsBackend() as b1, WsBackend() as b2:
        s = Setup(tmp_path, b1, b2)
        yield s
        if s.proxy is not None:
            s.proxy.stop()


class Traffic:
    """Every tunnel echoing in a loop, and new connections opened, used and
    closed one after another; every failure is kept."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.failures: list[str] = []
        self.echoes = 0
        self.opened = 0
        self.running = True

    async def echo_loop(self, i: int, ws: ClientConnection) -> None:
        n = 0
        while self.running:
            try:
                await ws.send(f"{i}:{n}")
                reply = await asyncio.wait_for(ws.recv(), 10)
            except Exception as e:
                self.failures.append(f"tunnel {i}: {e!r}")
                return
            if reply != f"{i}:{n}":
                self.failures.append(f"tunnel {i}: got {reply!r}")
            self.echoes += 1
            n += 1
            await asyncio.sleep(0.2)

    async def connect_loop(self) -> None:
        while self.running:
            try:
                async with connect(
                    self.proxy.url + "/echo", ping_interval=None, open_timeout=10
                ) as ws:
                    await ws.send("new")
                    assert await asyncio.wait_for(ws.recv(), 10) == "new"
                self.opened += 1
            except Exception as e:
                self.failures.append(f"new connection: {e!r}")
            await asyncio.sleep(0.01)


async def wait_log(proxy: Proxy, action: str, count: int) -> None:
    await asyncio.to_thread(
        proxy.wait_for, lambda evs: len(proxy.actions(action)) >= count, f"{count} {action}"
    )


def test_reloads_keep_tunnels_and_new_connections_follow_the_new_file(setup: Setup) -> None:
    b1, b2, proxy = setup.b1, setup.b2, setup.start()
    traffic = Traffic(proxy)

    async def main() -> None:
        tunnels = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(TUNNELS)]
        await asyncio.gather(*(ws.send("first") for ws in tunnels))
        assert await asyncio.gather(*(ws.recv() for ws in tunnels)) == ["first"] * TUNNELS
        assert len(b1.peers) == TUNNELS  # (each backend handler has run by now)
        tasks = [asyncio.ensure_future(traffic.echo_loop(i, ws)) for i, ws in enumerate(tunnels)]
        tasks.append(asyncio.ensure_future(traffic.connect_loop()))
        await asyncio.sleep(1)

        proxy.proc.send_signal(signal.SIGHUP)  # 1: the same file
        await wait_log(proxy, "reload-done", 1)
        await asyncio.sleep(1)

        setup.write("two")
        proxy.proc.send_signal(signal.SIGHUP)  # 2: the route now goes to pool two
        await wait_log(proxy, "reload-done", 2)
        await asyncio.sleep(0.5)  # connections begun before the switch finish
        on_b1, on_b2 = len(b1.peers), len(b2.peers)
        await asyncio.sleep(1.5)
        assert len(b1.peers) == on_b1, "a new connection followed the old route"
        assert len(b2.peers) > on_b2

        setup.path.write_text("[proxy\nworkers = 2\n")  # 3: broken
        proxy.proc.send_signal(signal.SIGHUP)
        await wait_log(proxy, "reload-refused", 1)
        on_b2 = len(b2.peers)
        await asyncio.sleep(1)
        assert len(b2.peers) > on_b2, "the running configuration should stay"

        traffic.running = False
        await asyncio.gather(*tasks)
        for ws in tunnels:
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert traffic.failures == []
    assert traffic.echoes > TUNNELS * 5 and traffic.opened > 50
    refused = proxy.actions("reload-refused")[0]
    assert "TOML syntax error" in refused["error"]["message"]
    # The retired generations leave once their tunnels are gone: 2 + 2 workers.
    proxy.wait_for(lambda evs: len(proxy.actions("worker-retired")) >= 4, "old workers exit")
    live = psutil.Process(proxy.proc.pid).children()
    assert len(live) == 2
    assert not proxy.actions("worker-exited")  # no worker died


def test_reload_drain_after_closes_old_tunnels_with_1001(setup: Setup) -> None:
    proxy = setup.start('\n[lifecycle]\nreload_drain_after = "1s"\nclose_spread = "1s"\n')

    async def main() -> list[Any]:
        tunnels = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(20)]
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGHUP)
        codes = []
        for ws in tunnels:
            await asyncio.wait_for(ws.wait_closed(), 15)
            codes.append(ws.close_code)
        assert time.monotonic() - started > 1  # not before reload_drain_after
        return codes

    assert asyncio.run(main()) == [1001] * 20
    proxy.wait_for(lambda evs: len(proxy.actions("worker-retired")) >= 2, "old workers exit")


def test_reload_opens_added_listen_addresses_and_closes_removed_ones(setup: Setup) -> None:
    proxy = setup.start()
    extra_port = free_port()
    text = setup.path.read_text()
    two = text.replace(
        f'listen = ["127.0.0.1:{setup.port}"]',
        f'listen = ["127.0.0.1:{setup.port}", "127.0.0.1:{extra_port}"]',
    )
    assert two != text
    setup.path.write_text(two)

    async def echo_on(port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}/echo", ping_interval=None) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"

    with pytest.raises(OSError):
        asyncio.run(echo_on(extra_port))
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda evs: proxy.actions("reload-done"), "reload-done")
    asyncio.run(echo_on(extra_port))  # opened
    asyncio.run(echo_on(setup.port))
    setup.path.write_text(
        two.replace(f'listen = ["127.0.0.1:{setup.port}", ', "listen = [")
    )  # only the new address is left
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda evs: len(proxy.actions("reload-done")) == 2, "second reload-done")
    asyncio.run(echo_on(extra_port))
    proxy.wait_for(lambda evs: len(proxy.actions("worker-retired")) >= 4, "old workers exit")
    with pytest.raises(OSError):  # closed: refused
        asyncio.run(echo_on(setup.port))
