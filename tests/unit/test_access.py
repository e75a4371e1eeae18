"""The tunnel-closed access event (worker/access.py): the line a
placement's template gives is the line of the whole document
(access.fields through logs.document), byte for byte, for any route,
server, path, user agent and figures; the rarer shapes are written whole;
and the compiled relay's line from the placement's summary form
(_cengine.render_access) is the template's."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.config import RouteConfig, ServerConfig
from shardproxy.engine import choice
from shardproxy.engine.api import CLOSED, DRAINED, PING_TIMEOUT, STOPPED, FlowStats
from shardproxy.policy.registry import ServerState
from shardproxy.telemetry import logs
from shardproxy.worker import access
from shardproxy.worker.tunnels import Placement, note_fields, pack_note

_STAMP = re.compile(rb'^\{"@timestamp":"[^"]*"')

texts = st.text(max_size=30)  # quotes, backslashes, %, controls, any code point
ips = st.ip_addresses().map(str)
ports = st.integers(0, 65535)
codes = st.none() | st.integers(0, 65535)
flows = st.builds(
    FlowStats,
    st.integers(0, 2**50),
    st.integers(0, 2**40),
    codes,
    st.integers(0, 2),
    st.just(None),
)


def placement(
    host: str, prefix: str, pool: str, sample: float, server: str, dest: str, port: int,
    path: str, agent: str | None, seen: str | None,
) -> Placement:  # fmt: skip
    state = ServerState(ServerConfig(server, dest, (port,), 1))
    space = SimpleNamespace(seen_address=seen, release=lambda port: None, returns_ports=False)
    return Placement(
        RouteConfig(host, prefix, pool, sample), state.endpoints[0], space, path, agent
    )


placements = st.builds(
    placement,
    texts,
    texts,
    texts,
    st.sampled_from([1.0, 0.25]),
    texts,
    ips,
    ports,
    texts,
    st.none() | texts,
    ips,
)


def lines(stream: io.StringIO) -> list[bytes]:
    text = stream.getvalue().encode()  # lines end at "\n" only (a U+0085 may be inside)
    out = [_STAMP.sub(b'{"@timestamp":"T"', line) for line in text.split(b"\n")[:-1]]
    stream.seek(0)
    stream.truncate()
    return out


@given(
    placements,
    ips,
    ports,
    ports,
    st.sampled_from([CLOSED, DRAINED, PING_TIMEOUT, STOPPED]),
    flows,
    flows,
    st.floats(0, 1e6),
)
def test_the_template_gives_the_whole_documents_line(
    info: Placement,
    client_ip: str,
    client_port: int,
    source_port: int,
    outcome: str,
    up: FlowStats,
    down: FlowStats,
    duration: float,
) -> None:
    stream = io.StringIO()
    logs.configure("info", {"shardproxy.worker": 7}, stream=stream)
    args: tuple[Any, ...] = (client_ip, client_port, source_port, None, outcome, up, down)
    access.write(info, *args, duration, None)
    assert info.access_template is not None
    if info.access_template[1] is None:  # a text of the placement's holds a marker
        route = info.route
        texts = (route.host, route.path_prefix, route.pool, info.path, info.user_agent or "")
        assert "\ufdd0" in "".join(texts) + info.endpoint.server.name  # (repr escapes it)
    seen = info.space.seen_address  # type: ignore[attr-defined]
    doc = access.fields(
        info, client_ip, client_port, seen, source_port, None, outcome, up, down, duration, None
    )
    logs.write_line(logs.document(access.MESSAGE, doc))
    fast, whole = lines(stream)
    assert fast == whole
    event = json.loads(fast)
    assert event["shardproxy"]["worker"] == 7 and event["client"]["ip"] == client_ip


def test_other_shapes_are_written_whole_and_a_new_configuration_makes_a_new_template() -> None:
    info = placement("*", "/", "p", 1.0, "s1", "127.0.0.1", 9000, "/chat", "ua", "127.0.0.2")
    up = FlowStats(10, 1, 1002, 1, None)
    down = FlowStats(20, 2, 1002, 2, "reserved bits set")
    stream = io.StringIO()
    logs.configure("info", {"shardproxy.worker": 1}, stream=stream)
    access.write(info, "10.0.0.1", 5, 6, "192.0.2.9", CLOSED, up, down, 1.5, "client")
    (line,) = lines(stream)
    event = json.loads(line)
    assert info.access_template is not None  # made, but not for this shape
    assert event["network"]["forwarded_ip"] == "192.0.2.9"
    assert event["shardproxy"]["close"]["error_by"] == "client"
    assert event["shardproxy"]["frame_error"] == {"down": "reserved bits set"}
    assert event["event"]["outcome"] == "failure"

    plain = FlowStats(10, 1, 1000, 1, None)
    access.write(info, "10.0.0.1", 5, 6, None, CLOSED, plain, plain, 1.5, None)
    logs.configure("info", {"shardproxy.worker": 2}, stream=stream)
    access.write(info, "10.0.0.1", 5, 6, None, CLOSED, plain, plain, 1.5, None)
    logs.configure("warning", {"shardproxy.worker": 2}, stream=stream)
    access.write(info, "10.0.0.1", 5, 6, None, CLOSED, plain, plain, 1.5, None)  # not written
    first, second = (json.loads(line) for line in lines(stream))
    assert (first["shardproxy"]["worker"], second["shardproxy"]["worker"]) == (1, 2)
    assert first["event"]["outcome"] == "success" and first["source"]["ip"] == "127.0.0.2"


@pytest.mark.skipif(choice.COMPILED is None, reason="the compiled engine was not built here")
@given(
    placements,
    ips,
    ports,
    ports,
    st.sampled_from([CLOSED, DRAINED, STOPPED, "client_reset", "internal_error"]),
    flows.filter(lambda f: f.close_code not in (1002, 1007)),
    flows.filter(lambda f: f.close_code not in (1002, 1007)),
    st.floats(0, 1e6),
    st.floats(0, 4e9),
)
def test_the_relays_line_from_the_summary_form_is_the_templates(
    info: Placement,
    client_ip: str,
    client_port: int,
    source_port: int,
    outcome: str,
    up: FlowStats,
    down: FlowStats,
    duration: float,
    now: float,
) -> None:
    assert choice.COMPILED is not None
    stream = io.StringIO()
    logs.configure("info", {"shardproxy.worker": 3}, stream=stream)
    form = access.summary_form(info, True)
    if info.route.access_sample < 1.0 or info.access_template[1] is None:  # type: ignore[index]
        assert form is None  # sampled per end, or every event whole
        return
    assert form is not None and len(form) == 14
    assert access.summary_form(info, False) == ()  # [log] access off: no line
    note = pack_note(client_ip, client_port, source_port)[0]
    seen_ip = note_fields(note)[0]  # the worker's client address: the note's
    flows_c = [(f.bytes, f.messages, f.close_code) for f in (up, down)]
    success = outcome in (CLOSED, DRAINED)
    line = choice.COMPILED.render_access(form, note, outcome, success, *flows_c, duration, now)
    access.write(info, seen_ip, client_port, source_port, None, outcome, up, down, duration, None)
    (written,) = lines(stream)
    assert _STAMP.sub(b'{"@timestamp":"T"', line) == written + b"\n"
    assert line.startswith(b'{"@timestamp":"' + logs.timestamp(now) + b'"')
