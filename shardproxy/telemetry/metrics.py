"""Prometheus metrics, from the workers' snapshots the supervisor keeps.

:func:`families` turns the latest snapshot of every worker
(telemetry/snapshot.py), what the workers that exited had counted, and the
supervisor's own figures into metric
families; :func:`render` writes them in the text exposition format with
``prometheus_client`` (not by hand). Names follow Prometheus conventions:
``shardproxy_`` prefix, base units, ``_total`` for counters. Counters are
sums over the workers plus the retired totals, so they never go back when a
worker is replaced or a reload retires a generation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shardproxy.telemetry.snapshot import Counts, Histogram, WorkerSnapshot, merge_histograms
from shardproxy.telemetry.stats import Retired, total_counts, upstream_usage

# Counts field → (metric, help, label): one number (label None), or bytes
# and messages by direction, both directions always there
_ALWAYS: dict[str, tuple[str, str, str | None]] = {
    "tunnels": ("shardproxy_tunnels_opened_total", "Tunnels established (101 passed on).", None),
    "bytes": ("shardproxy_bytes_total", "Bytes relayed by ended tunnels.", "direction"),
    "messages": (
        "shardproxy_messages_total",
        "WebSocket data messages relayed by ended tunnels.",
        "direction",
    ),
    "connect_failed": (
        "shardproxy_upstream_connect_failures_total",
        "Upstream connects refused or timed out.",
        None,
    ),
    "handshake_failed": (
        "shardproxy_handshake_failures_total",
        "Client connections that failed during the handshake.",
        None,
    ),
    "ping_timeout": (
        "shardproxy_ping_timeouts_total",
        "Tunnels ended because the client did not answer the proxy's ping.",
        None,
    ),
    "internal_error": (
        "shardproxy_internal_errors_total",
        "Connections ended by an error of the proxy's own (each is logged with its trace).",
        None,
    ),
}
# Counts field → (metric, help, label), a sample per label value counted
_BY_LABEL: dict[str, tuple[str, str, str]] = {
    "rejected": ("shardproxy_rejected_total", "Requests refused, by reason.", "reason"),
    "closed": ("shardproxy_tunnels_closed_total", "Tunnels ended, by outcome.", "outcome"),
    "tls_failed": (
        "shardproxy_tls_handshake_failures_total",
        "Client TLS handshakes that failed, by reason (engine/tls.py's REASONS).",
        "reason",
    ),
    "log_suppressed": (
        "shardproxy_log_events_suppressed_total",
        "Events [log] error_rate left out of the log, by event.action.",
        "action",
    ),
    "frame_error": (
        "shardproxy_frame_errors_total",
        "Tunnels whose framing the proxy lost (a frame header against RFC 6455 §5), "
        "by direction: it could put no Ping or Close of its own into them.",
        "direction",
    ),
}


# snapshot key → (family, metric name, help), per process
_PER_PROCESS: tuple[tuple[str, type[GaugeMetricFamily | CounterMetricFamily], str, str], ...] = (
    ("rss", GaugeMetricFamily, "shardproxy_process_resident_memory_bytes", "Resident memory."),
    ("cpu_seconds", CounterMetricFamily, "shardproxy_process_cpu_seconds", "User+system CPU."),
    ("open_fds", GaugeMetricFamily, "shardproxy_process_open_fds", "Open file descriptors."),
    ("max_fds", GaugeMetricFamily, "shardproxy_process_max_fds", "RLIMIT_NOFILE (soft)."),
)


def families(
    snapshots: Mapping[int, WorkerSnapshot],
    retired: Retired,
    supervisor: Mapping[str, Any],
) -> list[Metric]:
    """Every metric family. ``supervisor`` holds ``restarts``, ``reloads``
    (result → count), ``backends`` (endpoint → up?) and ``processes``
    (name → {rss, cpu_seconds, open_fds, max_fds})."""
    out: list[Metric] = []
    out += _worker_gauges(snapshots.values())
    out += _counters(total_counts(snapshots.values(), retired))
    out += _upstream(snapshots.values())
    out += _current(snapshots.values())
    out += _histograms(snapshots.values(), retired.histograms)
    out += _supervisor(supervisor)
    return out


def _current(snapshots: Iterable[WorkerSnapshot]) -> list[Metric]:
    routes: Counter[str] = Counter()
    servers: Counter[tuple[str, str]] = Counter()
    for s in snapshots:
        routes.update(s.routes)
        servers.update(s.servers)
    by_route = GaugeMetricFamily(
        "shardproxy_route_tunnels", "Tunnels open now, per route.", labels=["route"]
    )
    for route, n in sorted(routes.items()):
        by_route.add_metric([route], n)
    by_server = GaugeMetricFamily(
        "shardproxy_server_connections",
        "Upstream connections now (tunnels and connects under way), per server.",
        labels=["pool", "server"],
    )
    for (pool, server), n in sorted(servers.items()):
        by_server.add_metric([pool, server], n)
    return [by_route, by_server]


_HISTOGRAMS = {
    "handshake_seconds": (
        "shardproxy_handshake_duration_seconds",
        "From accept to the 101 passed on to the client.",
    ),
    "tunnel_seconds": (
        "shardproxy_tunnel_duration_seconds",
        "How long ended tunnels lasted.",
    ),
}


def _histograms(
    snapshots: Iterable[WorkerSnapshot], retired: Mapping[str, Histogram]
) -> list[Metric]:
    snapshots = list(snapshots)
    out: list[Metric] = []
    for key, (name, doc) in _HISTOGRAMS.items():
        parts = [s.histograms()[key] for s in snapshots]
        if key in retired:
            parts.append(retired[key])
        merged = merge_histograms(parts)
        if merged is None:
            continue
        cumulative, buckets = 0, []
        for bound, n in zip([*merged.bounds, float("inf")], merged.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        out.append(HistogramMetricFamily(name, doc, buckets=buckets, sum_value=merged.sum))
    return out


def _worker_gauges(snapshots: Iterable[WorkerSnapshot]) -> list[Metric]:
    labels = ["worker", "generation"]
    tunnels = GaugeMetricFamily("shardproxy_tunnels", "Tunnels open now.", labels=labels)
    handshakes = GaugeMetricFamily(
        "shardproxy_handshakes_in_flight",
        "Connections between accept and 101 (or their answer).",
        labels=labels,
    )
    capacity = GaugeMetricFamily(
        "shardproxy_connections_capacity",
        "Connections a worker may hold (RLIMIT_NOFILE or max_connections).",
        labels=labels,
    )
    for s in snapshots:
        worker = [str(s.slot), str(s.generation)]
        tunnels.add_metric(worker, s.tunnels)
        handshakes.add_metric(worker, s.handshakes)
        capacity.add_metric(worker, s.capacity)
    return [tunnels, handshakes, capacity]


def _counters(totals: Counts) -> list[Metric]:
    out: list[Metric] = []
    for field, (name, doc, label) in _ALWAYS.items():
        value = getattr(totals, field)
        if label is None:
            family = CounterMetricFamily(name, doc, labels=[])
            family.add_metric([], value)
        else:
            family = CounterMetricFamily(name, doc, labels=[label])
            for direction in ("up", "down"):
                family.add_metric([direction], value.get(direction, 0))
        out.append(family)
    for field, (name, doc, label) in _BY_LABEL.items():
        family = CounterMetricFamily(name, doc, labels=[label])
        for value, n in sorted(getattr(totals, field).items()):
            family.add_metric([value], n)
        out.append(family)
    bad = CounterMetricFamily(
        "shardproxy_bad_stream_closes_total",
        "Tunnels a side closed with 1002 (protocol error) or 1007 (invalid data): "
        "streams that went bad, by the side that said so and the code.",
        labels=["side", "code"],
    )
    for (side, code), n in sorted(totals.bad_stream.items(), key=lambda c: (c[0][0], str(c[0][1]))):
        bad.add_metric([side, str(code)], n)
    return [*out, bad]


def _upstream(snapshots: Iterable[WorkerSnapshot]) -> list[Metric]:
    labels = ["source", "endpoint"]
    used = GaugeMetricFamily(
        "shardproxy_upstream_tuples_used",
        "Upstream connections per (source address, backend endpoint).",
        labels=labels,
    )
    capacity = GaugeMetricFamily(
        "shardproxy_upstream_tuples_capacity",
        "Upstream connections the address plan allows per (source address, backend endpoint).",
        labels=labels,
    )
    for u in upstream_usage(snapshots):
        used.add_metric([u["source"], u["endpoint"]], u["used"])
        capacity.add_metric([u["source"], u["endpoint"]], u["capacity"])
    return [used, capacity]


def _supervisor(s: Mapping[str, Any]) -> list[Metric]:
    restarts = CounterMetricFamily(
        "shardproxy_worker_restarts_total", "Workers restarted after dying."
    )
    restarts.add_metric([], s.get("restarts", 0))
    reloads = CounterMetricFamily(
        "shardproxy_reloads_total", "Reloads, by result.", labels=["result"]
    )
    for result, n in sorted(s.get("reloads", {}).items()):
        reloads.add_metric([result], n)
    up = GaugeMetricFamily(
        "shardproxy_backend_up",
        "Health of checked backend endpoints (1 up, 0 down).",
        labels=["endpoint"],
    )
    for endpoint, is_up in sorted(s.get("backends", {}).items()):
        up.add_metric([endpoint], 1 if is_up else 0)
    failed = CounterMetricFamily(
        "shardproxy_health_check_failures",
        "Failed health checks of checked backend endpoints, refused or timed-out "
        "connects the workers saw included.",
        labels=["endpoint"],
    )
    for endpoint, n in sorted(s.get("check_failures", {}).items()):
        failed.add_metric([endpoint], n)
    expiry = GaugeMetricFamily(
        "shardproxy_tls_certificate_expiry_seconds",
        "Seconds until each listener certificate expires (negative: expired), "
        "as read at start or at the last reload.",
        labels=["certificate", "file"],
    )
    for key, (path, seconds) in sorted(s.get("certificates", {}).items()):
        expiry.add_metric([key, path], seconds)
    out: list[Metric] = [restarts, reloads, up, failed, expiry]
    per_process = [
        (key, kind(name, doc, labels=["process"])) for key, kind, name, doc in _PER_PROCESS
    ]
    for key, family in per_process:
        for name, figures in sorted(s.get("processes", {}).items()):
            family.add_metric([name], figures[key])
        out.append(family)
    return out


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def render(metrics: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry)
