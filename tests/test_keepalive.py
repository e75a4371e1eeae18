"""Keepalive through a real ``shardproxy run``: TCP keepalive on both sides
of every tunnel."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy
from peers import WsBackend
from websockets.asyncio.client import connect


@pytest.fixture
def backend() -> Any:
    with WsBackend() as b:
        yield b


def keepalive_timers(side: str, port: int) -> list[str | None]:
    """The keepalive timer that ``ss -o`` shows for every established socket
    whose ``side`` ("sport" or "dport") is ``port`` (None: no keepalive)."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( {side} = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        m.group(1) if (m := re.search(r"timer:\(keepalive,([^,]+),", line)) else None
        for line in out.splitlines()
    ]


@pytest.mark.parametrize("idle", ["7s", "0s"])
def test_tcp_keepalive_on_both_sides_of_a_tunnel(
    idle: str, backend: WsBackend, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy([backend.port], workers=1, extra=f'\n[keepalive]\ntcp_idle = "{idle}"\n')

    async def main() -> tuple[list[str | None], list[str | None]]:
        async with connect(proxy.url + "/echo", ping_interval=None) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            # Once everything is acknowledged, ss shows the keepalive timer
            # (not the retransmission one).
            await asyncio.sleep(0.5)
            return (
                await asyncio.to_thread(keepalive_timers, "sport", proxy.port),
                await asyncio.to_thread(keepalive_timers, "dport", backend.port),
            )

    client_side, backend_side = asyncio.run(main())
    assert len(client_side) == len(backend_side) == 1, (client_side, backend_side)
    if idle == "0s":
        assert client_side == backend_side == [None]
    else:
        # Seconds left, not the kernel default's "119min…" (2 h).
        for left in client_side + backend_side:
            assert left is not None and "min" not in left, (client_side, backend_side)
