"""The admin listener of a real ``shardproxy run``: health, and draining one
server by hand."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from conftest import Proxy, free_port
from peers import WsBackend
from websockets.asyncio.client import connect

TOKEN = "s3cret"


def call(port: int, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = json.loads(response.read() or b"null")
    conn.close()
    return response.status, body


def admin_config(port: int) -> str:
    return f'\n[admin]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'


def test_draining_a_server_by_hand_keeps_its_tunnels_and_sends_new_ones_elsewhere(
    start_proxy: Callable[..., Proxy],
) -> None:
    aport = free_port()
    with WsBackend() as b0, WsBackend() as b1:
        proxy = start_proxy([b0.port, b1.port], extra=admin_config(aport))
        for path in ("/servers", "/stats", "/metrics"):
            assert call(aport, "GET", path, token=None)[0] == 401
            assert call(aport, "GET", path, token="wrong")[0] == 401
        assert call(aport, "POST", "/servers/main/b0/drain", token=None)[0] == 401
        # Health checks of load balancers cannot send a token.
        assert call(aport, "GET", "/healthz", token=None) == (200, {"status": "ok"})
        assert call(aport, "GET", "/healthz") == (200, {"status": "ok"})
        status, servers = call(aport, "GET", "/servers")
        assert status == 200
        assert [(s["server"], s["admin"]) for s in servers] == [("b0", "ready"), ("b1", "ready")]
        assert servers[0]["endpoints"] == [
            {"endpoint": f"127.0.0.1:{b0.port}", "health": "unchecked"}
        ]

        async def main() -> None:
            held = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(10)]
            assert b0.peers and b1.peers
            assert call(aport, "POST", "/servers/main/b0/drain") == (
                200,
                {"pool": "main", "server": "b0", "admin": "drain", "applied": 2},
            )
            await asyncio.to_thread(
                proxy.wait_for, lambda evs: proxy.actions("server-drain"), "server-drain"
            )
            await asyncio.sleep(0.3)  # the workers have the message
            on_b0 = len(b0.peers)
            for _ in range(20):
                async with connect(proxy.url + "/echo", ping_interval=None) as ws:
                    await ws.send("x")
                    await ws.recv()
            assert len(b0.peers) == on_b0  # none to the drained server
            for i, ws in enumerate(held):  # its tunnels are kept
                await ws.send(f"kept {i}")
                assert await ws.recv() == f"kept {i}"
            assert call(aport, "POST", "/servers/main/b0/ready")[0] == 200
            await asyncio.sleep(0.3)
            for _ in range(20):
                async with connect(proxy.url + "/echo", ping_interval=None) as ws:
                    await ws.send("x")
                    await ws.recv()
            assert len(b0.peers) > on_b0
            for ws in held:
                await ws.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        assert call(aport, "POST", "/servers/main/nope/drain")[0] == 404
        assert call(aport, "GET", "/servers/main/b0/drain")[0] == 405
        assert call(aport, "GET", "/nothing")[0] == 404


def answer(action: str, applied: int = 2, **more: Any) -> dict[str, Any]:
    """The admin's answer to a drain or ready of main/b0."""
    return {"pool": "main", "server": "b0", "admin": action, "applied": applied, **more}


@contextmanager
def stopped(proxy: Proxy, slot: int) -> Iterator[None]:
    """Worker ``slot`` stopped (SIGSTOP): it reads nothing until the block ends."""
    pids = proxy.wait_for(lambda evs: len(proxy.worker_pids()) == 2 and proxy.worker_pids(), "pids")
    os.kill(pids[slot], signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pids[slot], signal.SIGCONT)


async def open_and_close(url: str, n: int) -> None:
    for i in range(n):
        async with connect(url + "/echo", ping_interval=None) as ws:
            await ws.send(f"x{i}")
            assert await ws.recv() == f"x{i}"


def test_once_a_drain_is_answered_no_worker_sends_a_new_tunnel_to_the_server(
    start_proxy: Callable[..., Proxy],
) -> None:
    """No wait between the answer and the connections: every worker has
    applied the drain before it comes (the answer says how many did)."""
    aport = free_port()
    with WsBackend() as b0, WsBackend() as b1:
        proxy = start_proxy([b0.port, b1.port], extra=admin_config(aport))
        asyncio.run(open_and_close(proxy.url, 4))  # both servers in use
        assert b0.peers and b1.peers
        for _ in range(3):
            assert call(aport, "POST", "/servers/main/b0/drain") == (200, answer("drain"))
            on_b0, on_b1 = len(b0.peers), len(b1.peers)
            asyncio.run(asyncio.wait_for(open_and_close(proxy.url, 30), 60))
            assert len(b0.peers) == on_b0 and len(b1.peers) == on_b1 + 30
            assert call(aport, "POST", "/servers/main/b0/ready") == (200, answer("ready"))


def test_the_answer_waits_for_a_worker_slow_to_apply_the_drain(
    start_proxy: Callable[..., Proxy],
) -> None:
    aport = free_port()
    with WsBackend() as b0, WsBackend() as b1:
        proxy = start_proxy([b0.port, b1.port], extra=admin_config(aport))
        with ThreadPoolExecutor(1) as pool, stopped(proxy, 1):
            drain = pool.submit(call, aport, "POST", "/servers/main/b0/drain")
            proxy.wait_for(lambda evs: proxy.actions("server-drain"), "server-drain")
            assert not drain.done()  # sent to worker 1, which has not run since
        assert drain.result(10) == (200, answer("drain"))
        on_b0 = len(b0.peers)
        asyncio.run(asyncio.wait_for(open_and_close(proxy.url, 30), 60))
        assert len(b0.peers) == on_b0


def test_a_worker_that_does_not_answer_is_named_and_does_not_hold_the_call(
    start_proxy: Callable[..., Proxy],
) -> None:
    aport = free_port()
    with WsBackend() as b0, WsBackend() as b1:
        proxy = start_proxy([b0.port, b1.port], extra=admin_config(aport))
        with stopped(proxy, 1):
            status, body = call(aport, "POST", "/servers/main/b0/drain")
        assert (status, body) == (202, answer("drain", applied=1, unanswered=["1"]))
        (event,) = proxy.wait_for(
            lambda evs: proxy.actions("server-admin-unanswered"), "server-admin-unanswered"
        )
        assert event["shardproxy"]["workers"] == ["1"]
        # Its late answer is dropped; the channel goes on answering.
        assert call(aport, "POST", "/servers/main/b0/ready") == (200, answer("ready"))


def test_healthz_turns_503_while_draining(start_proxy: Callable[..., Proxy]) -> None:
    aport = free_port()
    with WsBackend() as b0:
        proxy = start_proxy(
            [b0.port], extra=admin_config(aport) + '\n[lifecycle]\nclose_spread = "10s"\n'
        )

        async def main() -> None:
            held = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(4)]
            proxy.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(
                proxy.wait_for, lambda evs: proxy.actions("supervisor-stop"), "drain"
            )
            status, body = await asyncio.to_thread(call, aport, "GET", "/healthz")
            assert (status, body) == (503, {"status": "draining"})
            for ws in held:
                await ws.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        assert proxy.proc.wait(20) == 0


def test_drain_delay_turns_healthz_503_before_anything_closes(
    start_proxy: Callable[..., Proxy],
) -> None:
    aport = free_port()
    with WsBackend() as b0:
        proxy = start_proxy(
            [b0.port],
            extra=admin_config(aport) + '\n[lifecycle]\ndrain_delay = "3s"\nclose_spread = "0s"\n',
        )

        async def main() -> float:
            held = await connect(proxy.url + "/echo", ping_interval=None)
            proxy.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.to_thread(
                proxy.wait_for, lambda evs: proxy.actions("drain-delay"), "the drain delay"
            )
            assert await asyncio.to_thread(call, aport, "GET", "/healthz") == (
                503,
                {"status": "draining"},
            )
            # Still serving meanwhile: the held tunnel and a new one.
            async with connect(proxy.url + "/echo", ping_interval=None) as late:
                await late.send("late")
                assert await late.recv() == "late"
            await held.send("held")
            assert await held.recv() == "held"
            await held.wait_closed()  # then the drain's Close 1001
            assert held.close_code == 1001
            return time.monotonic() - signalled

        assert asyncio.run(asyncio.wait_for(main(), 60)) >= 3.0
        assert proxy.proc.wait(20) == 0


def test_a_broken_admin_request_gets_400_and_the_listener_goes_on(
    start_proxy: Callable[..., Proxy],
) -> None:
    aport = free_port()
    with WsBackend() as b0:
        start_proxy([b0.port], extra=admin_config(aport))
        with socket.create_connection(("127.0.0.1", aport), timeout=10) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        assert call(aport, "GET", "/healthz")[0] == 200


def test_status_renders_a_running_instance(start_proxy: Callable[..., Proxy]) -> None:
    aport = free_port()
    with WsBackend() as b0:
        proxy = start_proxy([b0.port], extra=admin_config(aport))
        config_path = proxy.log_path.with_suffix(".toml")

        async def main() -> list[Any]:
            return [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(3)]

        held = asyncio.run(main())
        deadline = time.monotonic() + 20
        while True:  # the workers' next snapshots
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "shardproxy",
                    "status",
                    "-c",
                    str(config_path),
                    "--once",
                    "--interval",
                    "0.5",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            if "tunnels 3 /" in out.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        lines = out.stdout.splitlines()
        assert lines[0].startswith("shardproxy: ok  tunnels 3 / capacity")
        assert lines[1].startswith("per second: opened ")
        assert sum(1 for line in lines if re.match(r"^[01]\s+\d", line)) == 2  # two workers
        assert any(line.startswith("main/b0") and "ready" in line for line in lines)
        assert any(line.startswith("auto ") and f"127.0.0.1:{b0.port}" in line for line in lines)
        del held


def test_status_without_an_admin_listener_says_so(start_proxy: Callable[..., Proxy]) -> None:
    with WsBackend() as b0:
        proxy = start_proxy([b0.port])
        path = proxy.log_path.with_suffix(".toml")
        out = subprocess.run(
            [sys.executable, "-m", "shardproxy", "status", "-c", str(path), "--once"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1
        assert out.stderr.strip().endswith("[admin] listen is not set: nothing to ask")
