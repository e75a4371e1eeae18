"""The periodic stats event of a running proxy, and counts that go on when
access events are off (the aggregation itself: tests/unit/test_stats.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from conftest import Proxy
from peers import WsBackend, upgrade_head
from websockets.asyncio.client import connect


def test_running_proxy_logs_stats_that_survive_a_worker_restart(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], workers=2, extra='\n[log]\nstats_interval = "200ms"\n')

        def stats_where(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            found = proxy.wait_for(
                lambda _: [e for e in proxy.actions("stats") if pred(e["shardproxy"]["stats"])],
                "a matching stats event",
            )
            return found[-1]["shardproxy"]["stats"]

        async def main() -> None:
            conns = [await connect(proxy.url + "/echo") for _ in range(6)]
            record = stats_where(lambda s: s["tunnels"] == 6)
            assert record["totals"].get("tunnels") == 6
            assert len(record["workers"]) == 2
            # A worker restart keeps the totals (the dead worker's are retired).
            os.kill(proxy.worker_pids()[0], signal.SIGKILL)
            for ws in conns:
                await ws.close()
            for _ in range(3):
                async with connect(proxy.url + "/echo"):
                    pass

        asyncio.run(asyncio.wait_for(main(), 30))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(upgrade_head("/echo").replace(b"Version: 13", b"Version: 7"))
            s.recv(1000)
        record = stats_where(
            lambda s: (
                s["totals"].get("tunnels") == 9
                and s["totals"].get("rejected", {}).get("bad_version") == 1
                and len(s["workers"]) == 2
            )
        )
        assert record["tunnels"] == 0


def test_access_events_can_be_turned_off_while_counts_go_on(
    start_proxy: Callable[..., Proxy],
) -> None:
    with WsBackend() as backend:
        proxy = start_proxy(
            [backend.port],
            workers=1,
            extra='\n[log]\nstats_interval = "200ms"\naccess = false\n',
        )

        async def main() -> None:
            for _ in range(3):
                async with connect(proxy.url + "/echo") as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"

        asyncio.run(asyncio.wait_for(main(), 30))
        record = proxy.wait_for(
            lambda _: [
                e["shardproxy"]["stats"]
                for e in proxy.actions("stats")
                if e["shardproxy"]["stats"]["totals"].get("closed", {}).get("closed") == 3
            ],
            "stats counting the three tunnels",
        )[-1]
        assert record["totals"]["messages"] == {"up": 1 * 3, "down": 1 * 3}
        assert proxy.actions("tunnel-closed") == []
