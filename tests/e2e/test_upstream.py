"""The address plan at work, through a real ``shardproxy run``: 2 workers,
2 source addresses, 2 backend endpoints and 100 ports, for each allocator.

Capacity is 2 sources x 100 ports x 2 endpoints = 400 tunnels, 200 per
worker (each owns a slice of 50 ports). The kernel spreads clients over the
workers' listen sockets (SO_REUSEPORT), so a client may reach a full worker
while the other still has room: the tests fill the instance until 400 are
up, then expect every further client to get 503.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy, free_port
from peers import WsBackend
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from shardproxy.control.addrplan import read_system_port_range

SOURCES = ("127.0.3.1", "127.0.3.2")
PORTS = 100
WORKERS = 2
CAPACITY = len(SOURCES) * PORTS * 2  # two endpoints
REFUSED_IN_A_ROW = 20  # at random over 2 workers: a free place hides 20 times at odds 1e-6


def pick_range() -> tuple[int, int]:
    """100 ports inside the system range that no socket of this host uses
    now. The kernel allocator's connect() skips every port some socket bound
    explicitly (a listener, or the TIME_WAIT one leaves behind) whatever its
    address, so a range crossed by earlier tests' servers would hold less."""
    first, last = read_system_port_range()
    used = _local_ports()
    start = first + 1000
    while any(p in used for p in range(start, start + PORTS)):
        start += PORTS
    assert start + PORTS - 1 <= last, "no free range of 100 ports"
    return start, start + PORTS - 1


def _local_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


class Clients:
    """Websocket clients of the proxy, and the refusals they got."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.open: list[ClientConnection] = []
        self.refused: list[InvalidStatus] = []

    async def attempt(self) -> bool:
        try:
            ws = await connect(self.proxy.url + "/echo", ping_interval=None, open_timeout=10)
        except InvalidStatus as e:
            self.refused.append(e)
            return False
        self.open.append(ws)
        return True

    async def fill(self, target: int, max_attempts: int) -> None:
        for _ in range(max_attempts):
            if len(self.open) >= target:
                return
            await self.attempt()
        raise AssertionError(f"only {len(self.open)} of {target} tunnels after {max_attempts}")

    async def refused_in_a_row(self, n: int) -> None:
        for i in range(n):
            assert not await self.attempt(), f"client {i + 1} after capacity was let through"

    async def all_echo(self) -> None:
        async def one(i: int, ws: ClientConnection) -> None:
            await ws.send(f"still here {i}")
            assert await ws.recv() == f"still here {i}"

        await asyncio.gather(*(one(i, ws) for i, ws in enumerate(self.open)))

    async def close_all(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.open))
        self.open.clear()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.mark.parametrize("allocator", ["kernel", "userspace"])
def test_exact_capacity_then_503_and_one_close_frees_one_place(
    allocator: str, start_proxy: Callable[..., Proxy]
) -> None:
    with WsBackend() as b1, WsBackend() as b2:
        port = free_port()
        with socket.socket() as holder:  # keeps the listen port out of the picked range
            holder.bind(("127.0.0.1", port))
            first, last = pick_range()
        proxy = start_proxy(
            [b1.port, b2.port],
            port=port,
            workers=WORKERS,
            one_server=True,
            upstream={
                "source_addresses": list(SOURCES),
                "port_range": f"{first}-{last}",
                "port_allocator": allocator,
            },
            extra='\n[log]\nstats_interval = "1s"\n',
        )
        plan = proxy.actions("address-plan")[0]["shardproxy"]["plan"]
        assert plan["allocator"]["name"] == allocator
        assert plan["total"]["tuples"] == CAPACITY
        clients = Clients(proxy)

        async def main() -> None:
            await clients.fill(40, 60)
            # Spread: each worker rotates over the sources per endpoint.
            early = Counter(ip for ip, _ in b1.peers + b2.peers)
            assert set(early) == set(SOURCES)
            assert abs(early[SOURCES[0]] - early[SOURCES[1]]) <= 4, early
            await clients.fill(CAPACITY, CAPACITY + 600)
            await clients.refused_in_a_row(REFUSED_IN_A_ROW)
            await clients.all_echo()  # refusals disturb no tunnel
            _assert_full(proxy, clients, [b1, b2], (first, last))

            # One tunnel ends (the backend closes TCP first, RFC 6455 §7.1.1,
            # so no TIME_WAIT holds the tuple): exactly one place comes free.
            await clients.open.pop().close()
            await _wait_until(lambda: _closed_tunnels(proxy) == 1)
            await clients.fill(CAPACITY, 2 * REFUSED_IN_A_ROW)
            await clients.refused_in_a_row(REFUSED_IN_A_ROW)
            await clients.all_echo()
            await clients.close_all()

        run(main())
        _assert_each_worker_used_its_own_slice(proxy, plan)
        assert not proxy.actions("internal-error")


def _assert_full(
    proxy: Proxy, clients: Clients, backends: list[WsBackend], ports: tuple[int, int]
) -> None:
    for refusal in clients.refused:
        assert refusal.response.status_code == 503
        assert refusal.response.headers["Retry-After"] == "1"
    # Every tuple of the plan was used exactly once.
    tuples = Counter((ip, port, b.port) for b in backends for ip, port in b.peers)
    assert len(tuples) == CAPACITY and set(tuples.values()) == {1}
    assert {ip for ip, _, _ in tuples} == set(SOURCES)
    assert all(ports[0] <= port <= ports[1] for _, port, _ in tuples)
    usage = _upstream_usage(proxy, CAPACITY)
    assert len(usage) == 4  # (source, endpoint) pairs, summed over the workers
    assert {(u["source"], u["used"], u["capacity"]) for u in usage} == {
        (s, PORTS, PORTS) for s in SOURCES
    }
    rejected = proxy.actions("request-rejected")
    assert {e["shardproxy"]["reason"] for e in rejected} == {"tuple_space_exhausted"}
    assert len(rejected) == len(clients.refused)


def _closed_tunnels(proxy: Proxy) -> int:
    return len(proxy.actions("tunnel-closed"))


async def _wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _upstream_usage(proxy: Proxy, used: int) -> list[dict[str, Any]]:
    """The supervisor's latest stats record once it counts ``used`` tuples."""

    def latest(events: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        stats = [e for e in events if e.get("event", {}).get("action") == "stats"]
        if not stats:
            return None
        usage: list[dict[str, Any]] = stats[-1]["shardproxy"]["stats"]["upstream"]
        return usage if sum(u["used"] for u in usage) == used else None

    result: list[dict[str, Any]] = proxy.wait_for(latest, what=f"stats with {used} tuples used")
    return result


def _assert_each_worker_used_its_own_slice(proxy: Proxy, plan: dict[str, Any]) -> None:
    slices = {s["slot"]: (s["first"], s["last"]) for s in plan["slices"]}
    closed = proxy.wait_for(
        lambda events: (
            [e for e in events if e.get("event", {}).get("action") == "tunnel-closed"]
            if _closed_tunnels(proxy) == CAPACITY + 1
            else None
        ),
        what="every tunnel's tunnel-closed event",
    )
    by_worker: Counter[int] = Counter()
    for event in closed:
        worker = event["shardproxy"]["worker"]
        first, last = slices[worker]
        assert first <= event["source"]["port"] <= last, event
        assert event["source"]["ip"] in SOURCES
        by_worker[worker] += 1
    assert set(by_worker) == {0, 1}
