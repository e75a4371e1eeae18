"""The Grafana dashboard (deploy/grafana/shardproxy.json) agrees with the code:
it is a well-formed dashboard on the templated Prometheus datasource, and
every metric its queries name is one a real ``shardproxy run`` exports on
/metrics, used the way its type allows (rate() on counters and histogram
series only, histogram_quantile() on ``_bucket`` series only)."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import REPO, Proxy, free_port
from peers import WsBackend, WsClient, read_head, read_until_closed
from prometheus_client.parser import text_string_to_metric_families
from tlscerts import TestCA
from websockets.asyncio.client import connect

from shardproxy.telemetry import metrics
from shardproxy.telemetry.snapshot import WorkerSnapshot
from shardproxy.telemetry.stats import Retired

DASHBOARD = REPO / "deploy" / "grafana" / "shardproxy.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC = re.compile(r"\bshardproxy_[a-z0-9_]+")
RANGE_FUNCTION = re.compile(r"\b(?:rate|irate|increase)\(\s*$")

Dashboard = dict[str, Any]


def load() -> Dashboard:
    dashboard: Dashboard = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(dashboard: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, also those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def graphs(dashboard: Dashboard) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def queries(dashboard: Dashboard) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in graphs(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def exported(text: str) -> dict[str, str]:
    """{sample name: type of its family} of an exposition text: a counter
    ``x`` gives ``x_total``, a histogram ``x`` gives ``x_bucket``, ``x_count``
    and ``x_sum``."""
    return {
        sample.name: family.type
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def problems(dashboard: Dashboard, exposition: str) -> list[str]:
    """What is wrong with the dashboard's queries against /metrics' text."""
    kinds = exported(exposition)
    found = []
    for expr in queries(dashboard):
        for m in METRIC.finditer(expr):
            name, before = m.group(), expr[: m.start()]
            kind = kinds.get(name)
            if kind is None:
                found.append(f"{name}: not exported ({expr})")
            elif kind in ("counter", "histogram") and not RANGE_FUNCTION.search(before):
                found.append(f"{name}: a {kind} series outside rate()/increase() ({expr})")
            elif kind == "gauge" and RANGE_FUNCTION.search(before):
                found.append(f"{name}: rate()/increase() of a gauge ({expr})")
            elif name.endswith("_bucket") and "histogram_quantile(" not in before:
                found.append(f"{name}: buckets outside histogram_quantile() ({expr})")
    return found


def test_the_dashboard_is_a_grafana_dashboard_on_the_templated_datasource() -> None:
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] == 39
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS" and ds_input["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"] == DATASOURCE
    assert "shardproxy_" in json.dumps(variables["instance"]["query"])

    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p for p in panels if p["type"] == "row"]
    assert [r["title"] for r in rows] == [
        "Overview",
        "Upstream tuple space",
        "Latency",
        "Traffic",
        "Backends",
        "Process",
    ]
    assert all(not r.get("targets") for r in rows)
    for panel in graphs(dashboard):
        what = panel.get("title") or panel["id"]
        assert panel.get("title"), f"panel {what}: no title"
        assert panel.get("description"), f"panel {what}: no description"
        assert panel["datasource"] == DATASOURCE, f"panel {what}: not on ${{datasource}}"
        assert panel["targets"], f"panel {what}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], f"panel {what}: empty query"
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"panel {what}"
            assert 'instance=~"$instance"' in target["expr"], f"panel {what}: no $instance"

    cells: set[tuple[int, int]] = set()
    for panel in panels:  # on the 24-column grid, no two panels overlap
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {panel['title']} overlaps another"
        cells |= mine


def test_the_check_catches_a_wrong_name_and_a_misused_type() -> None:
    """problems() is not vacuous: a typo, rate() of a gauge and a counter
    without rate() are each reported (against families built in-process)."""
    snapshot = WorkerSnapshot(slot=0, generation=1, tunnels=1, handshakes=0, capacity=10)
    text = metrics.render(metrics.families({1: snapshot}, Retired(), {})).decode()
    good = load()
    baseline = set(problems(good, text))

    def broken(expr: str) -> set[str]:
        dashboard = copy.deepcopy(good)
        graphs(dashboard)[0]["targets"][0]["expr"] = expr
        return set(problems(dashboard, text)) - baseline

    (typo,) = broken('sum(rate(shardproxy_tunnels_opend_total{instance=~"$instance"}[5m]))')
    assert typo.startswith("shardproxy_tunnels_opend_total: not exported")
    (gauge,) = broken('sum(rate(shardproxy_tunnels{instance=~"$instance"}[5m]))')
    assert gauge.startswith("shardproxy_tunnels: rate()/increase() of a gauge")
    (raw,) = broken('sum(shardproxy_tunnels_opened_total{instance=~"$instance"})')
    assert raw.startswith("shardproxy_tunnels_opened_total: a counter series outside")


def get_metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200
    return body.decode()


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in found.items() if n == name)


def test_every_metric_the_dashboard_queries_is_exported(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    aport = free_port()
    extra = (
        '\n[pools.main.health]\nkind = "tcp"\ninterval = "500ms"\ntimeout = "250ms"\n'
        f'\n[admin]\nlisten = "127.0.0.1:{aport}"\n'
        # One logged error event per worker, then one a second: the rest of
        # the refused requests below are counted as suppressed.
        "\n[log]\nerror_rate = 1\nerror_burst = 1\n"
    )
    # A TLS listener, and one plain HTTP request to it below: the TLS
    # families then have samples too.
    ca = TestCA(tmp_path)
    leaf = ca.issue(["dashboard.example.com"])
    tls_port, port = free_port(), free_port()
    extra += f'\n[tls.edge]\ncertificates = [{{ cert = "{leaf.cert}", key = "{leaf.key}" }}]\n'
    listen = [f"127.0.0.1:{port}", {"address": f"127.0.0.1:{tls_port}", "tls": "edge"}]
    with WsBackend() as backend:
        proxy = start_proxy(
            [backend.port], port=port, proxy={"listen": listen}, extra=extra,
            handshake_engine="python",
        )  # fmt: skip
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_head(s).startswith(b"HTTP/1.1 400")

        async def tunnels() -> list[Any]:
            opened = [await connect(proxy.url + "/echo", ping_interval=None) for _ in range(10)]
            for ws in opened:
                await ws.send("ping")
                assert await ws.recv() == "ping"
            for ws in opened[:4]:
                await ws.close()
            return opened[4:]

        held = asyncio.run(tunnels())
        # A stream that goes bad: a reserved opcode, which the backend
        # answers with a Close 1002 (and the proxy's tracker cannot follow).
        bad = WsClient(proxy.port)
        bad.sock.sendall(bytes([0x83, 0x80]) + b"abcd")
        assert read_until_closed(bad.sock)
        bad.close()
        rejected = 10
        for _ in range(rejected):  # plain HTTP, no upgrade: 426
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_head(s).startswith(b"HTTP/1.1 426")

        config = proxy.log_path.with_suffix(".toml")  # so that shardproxy_reloads_total has one
        good_config = config.read_text()
        config.write_text("[proxy\n")
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda _: proxy.actions("reload-refused"), "the refused reload")
        config.write_text(good_config)

        deadline = time.monotonic() + 20
        while True:  # workers report every second
            text = get_metrics(aport)
            found = values(text)
            ready = (
                total(found, "shardproxy_tunnels") == 6
                and total(found, "shardproxy_tunnels_opened_total") == 11
                and total(found, "shardproxy_tunnel_duration_seconds_count") == 5
                and total(found, "shardproxy_bad_stream_closes_total") == 1
                and total(found, "shardproxy_frame_errors_total") == 1
                and total(found, "shardproxy_rejected_total") == rejected
                and total(found, "shardproxy_log_events_suppressed_total") > 0
                and total(found, "shardproxy_reloads_total") == 1
                and total(found, "shardproxy_backend_up") == 1
                and total(found, "shardproxy_tls_handshake_failures_total") == 1
            )
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ready, f"the traffic did not show on /metrics in time:\n{text}"
        proxy.stop()  # ends the held tunnels before the backend stops (else it waits)
        del held

    dashboard = load()
    names = {m.group() for expr in queries(dashboard) for m in METRIC.finditer(expr)}
    assert len(names) >= 20, names  # the extraction found the dashboard's metrics
    assert problems(dashboard, text) == []
    # and the dashboard shows every family /metrics has
    samples = {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}
    assert {f for f, of in samples.items() if not of & names} == set()
