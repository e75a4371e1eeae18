"""Every log line is a valid ECS document: field names and types checked
against Elastic's own definitions (tests/ecs.py), for the events of an
accepted tunnel, a rejected request, a worker restart and a reload."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy
from ecs import definitions, problems
from peers import WsBackend, read_head
from websockets.asyncio.client import connect

from shardproxy import __version__
from shardproxy.telemetry import logs


def test_the_definitions_are_the_version_we_stamp() -> None:
    assert definitions()["version"] == logs.ECS_VERSION
    assert definitions()["fields"]["client.ip"]["type"] == "ip"


def test_the_checker_finds_what_breaks_ecs() -> None:
    good = json.loads(
        logs.ecs_json(None, "info", {"event": "x", "client.ip": "10.0.0.1", "client.port": 5})
    )
    assert problems(good) == []
    bad: dict[str, Any] = {
        "client": {"ip": "not-an-ip", "port": "5"},
        "event": {"kind": "happening", "category": ["web"], "type": ["end"]},
        "made_up": {"field": 1},
        "shardproxy": {"anything": {"goes": [1, "x"]}},
        "url": {"path": ["/a"]},
    }
    assert sorted(problems(bad)) == sorted(
        [
            "client.ip: 'not-an-ip' is not a valid ip",
            "client.port: '5' is not a valid long",
            "event.kind: 'happening' is not one of ECS's allowed values",
            "event.type 'end' is not expected with event.category 'web'",
            "made_up.field: not an ECS field (ours go under shardproxy.*)",
            "url.path: ECS does not define it as an array",
        ]
    )


def _lines(proxy: Proxy) -> list[dict[str, Any]]:
    """Every line of the proxy's output, each of which must be JSON."""
    docs = []
    for line in proxy.log_path.read_text().splitlines():
        docs.append(json.loads(line))  # a traceback or print() would fail here
    return docs


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_every_line_of_a_busy_run_is_valid_ecs(start_proxy: Callable[..., Proxy]) -> None:
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], extra='\n[log]\nstats_interval = "1s"\n')

        async def tunnel() -> None:
            async with connect(
                proxy.url + "/room/1?token=x",
                user_agent_header="ecs-test/1.0 (tunnel)",
                additional_headers={"X-Forwarded-For": "203.0.113.7, 10.1.2.3"},
            ) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"

        asyncio.run(tunnel())
        # The client is done once it closed its socket; the worker ends the
        # tunnel when it reads that FIN, which can come after the kill below.
        proxy.wait_for(lambda _: proxy.actions("tunnel-closed"), what="the tunnel's end logged")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.0\r\n\r\n")
            assert read_head(s).startswith(b"HTTP/1.1 426")
        # The worker logs the refusal right after it answered: the answer can
        # reach us first, and the kill below must not take the line with it.
        proxy.wait_for(lambda _: proxy.actions("request-rejected"), what="the 426 logged")
        victim = proxy.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        proxy.wait_for(
            lambda _: proxy.worker_pids()[0] != victim, what="the killed worker replaced"
        )
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda _: proxy.actions("reload-done"), what="the reload")
        # The old generation exits once empty, which it looks at every 0.5 s.
        proxy.wait_for(lambda _: proxy.actions("worker-retired"), what="the old workers gone")
        proxy.wait_for(lambda _: proxy.actions("stats"), what="a stats event")
        proxy.stop()

    docs = _lines(proxy)
    broken = [(doc["message"], problems(doc)) for doc in docs if problems(doc)]
    assert broken == []
    for doc in docs:
        assert doc["ecs"]["version"] == logs.ECS_VERSION
        assert doc["observer"] == {
            "type": "proxy",
            "product": "shardproxy",
            "version": __version__,
            "hostname": socket.gethostname(),
        }
        assert isinstance(doc["process"]["pid"], int) and doc["event"]["action"]

    by_action: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_action.setdefault(doc["event"]["action"], []).append(doc)
    for action in ("tunnel-closed", "request-rejected", "worker-exited", "reload-start",
                   "reload-done", "worker-retired", "stats", "supervisor-stopped"):  # fmt: skip
        assert action in by_action, f"no {action} event"

    (closed,) = by_action["tunnel-closed"]
    assert closed["user_agent"] == {"original": "ecs-test/1.0 (tunnel)"}
    assert closed["network"] == {"forwarded_ip": "203.0.113.7"}
    assert closed["http"] == {"request": {"method": "GET"}}
    assert closed["url"] == {"path": "/room/1"}
    assert closed["destination"] == {"ip": "127.0.0.1", "port": backend.port}
    assert closed["event"]["duration"] > 0
    assert closed["shardproxy"]["messages"] == {"up": 1, "down": 1}

    (rejected,) = by_action["request-rejected"]
    assert rejected["http"] == {"request": {"method": "GET"}, "response": {"status_code": 426}}
    assert rejected["user_agent"] == {"original": "curl/8.0"}
    assert rejected["url"] == {"path": "/plain"}

    (exited,) = by_action["worker-exited"]
    assert exited["process"]["exit_code"] == -signal.SIGKILL
    assert exited["log.level"] == "error"
