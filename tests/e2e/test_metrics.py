"""Prometheus metrics: the families built from snapshots, and /metrics of a
real ``shardproxy run`` parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Proxy, free_port
from peers import WsBackend, WsClient, read_head, read_until_closed
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from shardproxy.telemetry import metrics
from shardproxy.telemetry.snapshot import Counts, SpaceUsage, WorkerSnapshot
from shardproxy.telemetry.stats import Retired


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in found.items() if n == name)


def test_counters_add_the_retired_workers_and_never_go_back() -> None:
    snap = WorkerSnapshot(
        slot=0,
        generation=1,
        tunnels=3,
        handshakes=1,
        capacity=100,
        counts=Counts(tunnels=5, rejected={"no_route": 2}, closed={"closed": 2}, bytes={"up": 10}),
        upstream=(SpaceUsage("auto", "10.0.0.1:80", 3, 50),),
    )
    retired = Retired()
    retired.add(WorkerSnapshot(1, 1, 0, 0, 0, Counts(tunnels=7, closed={"closed": 7})))
    text = metrics.render(
        metrics.families(
            {11: snap},
            retired,
            {
                "restarts": 1,
                "reloads": {"done": 2},
                "backends": {"10.0.0.1:80": True},
                "check_failures": {"10.0.0.1:80": 3},
            },
        )
    ).decode()
    found = samples(text)
    assert found[("shardproxy_tunnels_opened_total", ())] == 12
    assert found[("shardproxy_tunnels_closed_total", (("outcome", "closed"),))] == 9
    assert found[("shardproxy_rejected_total", (("reason", "no_route"),))] == 2
    assert found[("shardproxy_bytes_total", (("direction", "up"),))] == 10
    assert found[("shardproxy_tunnels", (("generation", "1"), ("worker", "0")))] == 3
    key = (("endpoint", "10.0.0.1:80"), ("source", "auto"))
    assert found[("shardproxy_upstream_tuples_used", key)] == 3
    assert found[("shardproxy_upstream_tuples_capacity", key)] == 50
    assert found[("shardproxy_worker_restarts_total", ())] == 1
    assert found[("shardproxy_reloads_total", (("result", "done"),))] == 2
    assert found[("shardproxy_backend_up", (("endpoint", "10.0.0.1:80"),))] == 1
    key = (("endpoint", "10.0.0.1:80"),)
    assert found[("shardproxy_health_check_failures_total", key)] == 3


def get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.getheader("content-type") or "", body


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_metrics_follow_the_traffic(start_proxy: Callable[..., Proxy]) -> None:
    aport = free_port()
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], extra=f'\n[admin]\nlisten = "127.0.0.1:{aport}"\n')

        async def main() -> list[Any]:
            tunnels = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(100)]
            for ws in tunnels[:40]:
                await ws.close()
            return tunnels[40:]

        held = asyncio.run(main())
        for _ in range(3):  # plain HTTP, no upgrade: 426
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_head(s).startswith(b"HTTP/1.1 426")

        deadline = time.monotonic() + 20
        while True:  # workers report every second
            status, ctype, body = get(aport, "/metrics")
            found = samples(body.decode())
            done = found.get(("shardproxy_tunnels_closed_total", (("outcome", "closed"),)), 0)
            rejected = total(found, "shardproxy_rejected_total")
            ended = found.get(("shardproxy_tunnel_duration_seconds_count", ()), 0)
            if (
                total(found, "shardproxy_tunnels") == 60 and done == ended == 40 and rejected == 3
            ) or (time.monotonic() > deadline):
                break
            time.sleep(0.2)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert total(found, "shardproxy_tunnels") == 60
        assert found[("shardproxy_tunnels_opened_total", ())] == 100
        assert found[("shardproxy_tunnels_closed_total", (("outcome", "closed"),))] == 40
        assert found[("shardproxy_rejected_total", (("reason", "not_upgrade"),))] == 3
        assert total(found, "shardproxy_upstream_tuples_used") == 60
        assert found[("shardproxy_handshake_duration_seconds_count", ())] == 100
        assert found[("shardproxy_handshake_duration_seconds_bucket", (("le", "+Inf"),))] == 100
        assert found[("shardproxy_tunnel_duration_seconds_count", ())] == 40
        assert found[("shardproxy_route_tunnels", (("route", "*/"),))] == 60
        assert total(found, "shardproxy_server_connections") == 60
        processes = {
            dict(labels)["process"] for (n, labels) in found if n == "shardproxy_process_open_fds"
        }
        assert processes == {"supervisor", "worker-0", "worker-1"}
        assert all(
            v > 0 for (n, _), v in found.items() if n == "shardproxy_process_resident_memory_bytes"
        )

        status, ctype, body = get(aport, "/stats")
        stats = json.loads(body)
        assert status == 200 and ctype == "application/json"
        assert stats["tunnels"] == 60 and len(stats["workers"]) == 2
        assert stats["totals"]["tunnels"] == 100
        assert set(stats["processes"]) == {"supervisor", "worker-0", "worker-1"}
        del held  # the proxy's stop ends them


@pytest.mark.usefixtures("proxy_engine")  # on both engines
def test_streams_that_went_bad_are_in_the_access_event_and_counted(
    start_proxy: Callable[..., Proxy],
) -> None:
    """A Close 1002 (protocol error) or 1007 (invalid data) says the stream
    went bad on the way: the access event names the side that said it first,
    and /metrics counts it; a frame header the proxy's tracker could not
    follow is named and counted too."""
    aport = free_port()
    with WsBackend() as backend:
        proxy = start_proxy(
            [backend.port], workers=1, extra=f'\n[admin]\nlisten = "127.0.0.1:{aport}"\n'
        )

        async def main() -> None:
            async with connect(proxy.url + "/close/1007", ping_interval=None) as ws:
                await ws.send("the backend finds this invalid")
                await ws.wait_closed()
            async with connect(proxy.url + "/echo", ping_interval=None) as ws:
                await ws.send("fine")
                assert await ws.recv() == "fine"
                await ws.close(1002, "the client finds the stream bad")
            async with connect(proxy.url + "/echo", ping_interval=None) as ws:
                await ws.send("fine")
                assert await ws.recv() == "fine"

        asyncio.run(main())
        raw = WsClient(proxy.port)
        raw.sock.sendall(bytes([0x83, 0x80]) + b"abcd")  # reserved opcode 3
        assert read_until_closed(raw.sock) != b""  # the backend's Close 1002
        raw.close()

        closed = proxy.wait_for(
            lambda evs: len(found := proxy.actions("tunnel-closed")) == 4 and found,
            what="four access events",
        )
        by_path = {e["url"]["path"]: e for e in closed}
        assert by_path["/close/1007"]["shardproxy"]["close"]["error_by"] == "backend"
        assert by_path["/close/1007"]["event"]["outcome"] == "failure"
        client_bad, fine, garbage = (e for e in closed if e["url"]["path"] == "/echo")
        assert client_bad["shardproxy"]["close"]["error_by"] == "client"
        assert client_bad["shardproxy"]["close"]["client_code"] == 1002
        assert "error_by" not in fine["shardproxy"]["close"]
        assert fine["event"]["outcome"] == "success" and "frame_error" not in fine["shardproxy"]
        assert garbage["shardproxy"]["close"]["error_by"] == "backend"
        assert garbage["shardproxy"]["frame_error"] == {"up": "reserved opcode 0x3"}

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            found = samples(get(aport, "/metrics")[2].decode())
            return found if total(found, "shardproxy_bad_stream_closes_total") == 3 else None

        found = proxy.wait_for(lambda _: counted(), what="the counts in /metrics")
        bad = "shardproxy_bad_stream_closes_total"
        assert found[(bad, (("code", "1007"), ("side", "backend")))] == 1
        assert found[(bad, (("code", "1002"), ("side", "backend")))] == 1
        assert found[(bad, (("code", "1002"), ("side", "client")))] == 1
        assert found[("shardproxy_frame_errors_total", (("direction", "up"),))] == 1
