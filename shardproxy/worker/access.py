"""The access event of a tunnel that ended (``tunnel-closed``), one per
tunnel: :func:`fields` is its document, and :func:`write` writes it.

Most of the document is the same for every tunnel of one placement (route,
pool, server, destination, path, user agent, and the process's static
fields): :func:`write` fills a %-format of that placement's document
(``logs.template``), made once and kept on the placement, with the
tunnel's own figures; an event of a rarer shape (a Close that said the
stream was bad, a lost framing, an X-Forwarded-For address, a source
address not known) is built whole by :func:`fields`. The two give the same
line (tests/unit/test_access.py); the template takes half the time (2.9
against 5.7 µs, the write included, in a micro-benchmark), and this event
is written once per handshake.

The compiled relay writes the event itself, for the tunnels that end the
ordinary way (engine/api.py's TunnelEngine.summarize): :func:`summary_form`
gives it the template's texts around the slots, and it fills them in C
(_cengine.c's sp_render; tests/unit/test_access.py holds its line to
:func:`write`'s). The worker then counts such ends in a summary per
placement (Worker.tunnels_closed): no Python runs per end.
"""

from __future__ import annotations

import re
import time
from typing import Any

from shardproxy.engine.api import CLOSED, DRAINED, FlowStats, TlsInfo
from shardproxy.telemetry import logs
from shardproxy.worker.tunnels import Placement

MESSAGE = "tunnel closed"
_GET = {"request": {"method": "GET"}}  # every tunnel began with a GET (RFC 6455 §4.1)
_EVENT = "event"
_NETWORK = ("network",)
_TYPE_END = ("connection", "end")
_SUCCESS = (CLOSED, DRAINED)


def route_name(route: Any) -> str:
    """A route's name in events and metrics: host and path prefix."""
    return f"{route.host}{route.path_prefix}"


def fields(
    info: Placement,
    client_ip: str | None,
    client_port: int,
    source_ip: str | None,
    source_port: int,
    forwarded_ip: str | None,
    outcome: str,
    up: FlowStats,
    down: FlowStats,
    duration: float,
    error_by: str | None,
    tls: TlsInfo | None = None,
) -> dict[str, Any]:
    """The event's fields, nested (``logs.emit_nested``'s input)."""
    route = info.route
    ep = info.endpoint.endpoint
    ours: dict[str, Any] = {
        "route": route_name(route),
        "pool": route.pool,
        "server": info.endpoint.server.name,
        "outcome": outcome,
        "bytes": {"up": up.bytes, "down": down.bytes},
        "messages": {"up": up.messages, "down": down.messages},
        "close": {"client_code": up.close_code, "backend_code": down.close_code},
    }
    if error_by is not None:
        ours["close"]["error_by"] = error_by
    if up.frame_error is not None or down.frame_error is not None:
        flows = (("up", up), ("down", down))
        ours["frame_error"] = {name: flow.frame_error for name, flow in flows if flow.frame_error}
    if route.access_sample < 1.0:  # one event stands for 1/access_sample tunnels
        ours["access_sample"] = route.access_sample
    out: dict[str, Any] = {
        "client": {"ip": client_ip, "port": client_port},
        "source": {"ip": source_ip, "port": source_port},
        "destination": {"ip": ep.host, "port": ep.port},
        "url": {"path": info.path},
        "http": _GET,
        "shardproxy": ours,
        "event": {
            "kind": _EVENT,
            "category": _NETWORK,
            "type": _TYPE_END,
            "action": "tunnel-closed",
            "outcome": "success" if outcome in _SUCCESS and error_by is None else "failure",
            "duration": int(duration * 1e9),
        },
    }
    if info.user_agent is not None:
        out["user_agent"] = {"original": info.user_agent}
    if forwarded_ip is not None:
        out["network"] = {"forwarded_ip": forwarded_ip}
    if tls is not None:
        out["tls"] = tls_fields(tls)
    return out


def tls_fields(tls: TlsInfo) -> dict[str, Any]:
    """ECS ``tls.*`` of a client's TLS connection."""
    protocol, _, version = tls.version.partition("v")
    doc: dict[str, Any] = {
        "established": True,
        "version_protocol": protocol.lower() or "tls",
        "version": version,
        "cipher": tls.cipher,
        "resumed": tls.resumed,
    }
    if tls.alpn:
        doc["next_protocol"] = tls.alpn
    client: dict[str, Any] = {}
    if tls.server_name:
        client["server_name"] = tls.server_name
    if tls.client_subject:
        client["subject"] = tls.client_subject
        client["hash"] = {"sha256": tls.client_fingerprint.upper()}
    if client:
        doc["client"] = client
    return doc


# The template's slots, in document order (logs.template): the marker in
# fields() and its directive. Addresses (inet_ntop's text) and outcomes
# (engine/api.py's names) need no JSON escaping.
_TEXT, _INT = b'"%s"', b"%d"
_SLOTS = {
    "\ufdd0client.ip": _TEXT,
    "\ufdd0client.port": _INT,
    "\ufdd0source.ip": _TEXT,
    "\ufdd0source.port": _INT,
    "\ufdd0outcome": _TEXT,
    "\ufdd0bytes.up": _INT,
    "\ufdd0bytes.down": _INT,
    "\ufdd0messages.up": _INT,
    "\ufdd0messages.down": _INT,
    "\ufdd0close.client": b"%s",
    "\ufdd0close.backend": b"%s",
    "\ufdd0event.outcome": _TEXT,
    "\ufdd0duration": _INT,
}


def _template_of(info: Placement) -> bytes | None:
    """The placement's format (:func:`_template`), made once per logs generation."""
    made = info.access_template
    if made is None or made[0] != logs.generation():
        made = info.access_template = (logs.generation(), _template(info))
    return made[1]


def summary_form(info: Placement, access: bool) -> tuple[bytes, ...] | None:
    """The compiled relay's form of the event for the tunnels of ``info``
    (TunnelEngine.add's ``summary``), made once per logs generation: the
    texts of its template around the slots :func:`write` fills, in that
    order, the source address written in, and ``%%`` undone; ``()`` when
    no event is written for them (``access``: ``[log] access``); None when
    each end must come to tunnel_closed: a sampled route (the sampler
    counts per end), a placement whose events are built whole, a source
    address not known yet, a space that takes each port back by number
    (the userspace allocator)."""
    made = info.summary_form
    if made is None or made[0] != (logs.generation(), access):
        made = info.summary_form = ((logs.generation(), access), _summary_form(info, access))
    return made[1]


def _summary_form(info: Placement, access: bool) -> tuple[bytes, ...] | None:
    space = info.space
    if getattr(space, "returns_ports", True):
        return None
    rate = info.route.access_sample
    if not access or rate <= 0.0 or not logs.enabled("info"):
        return ()
    source_ip = space.seen_address  # type: ignore[attr-defined]  # a TupleSpace
    template = _template_of(info)
    if rate < 1.0 or template is None or source_ip is None:
        return None
    texts = _texts(template)
    # @timestamp, client.ip, client.port, source.ip, source.port, ...: the
    # source address is the placement's.
    return (*texts[:3], texts[3] + source_ip.encode() + texts[4], *texts[5:])


def _texts(template: bytes) -> list[bytes]:
    """A %-format's texts around its directives (``%s``, ``%d``), ``%%`` undone."""
    texts: list[bytes] = []
    text: list[bytes] = []
    at = 0
    for m in _DIRECTIVE.finditer(template):
        text.append(template[at : m.start()])
        if m.group() == b"%%":
            text.append(b"%")
        else:
            texts.append(b"".join(text))
            text = []
        at = m.end()
    text.append(template[at:])
    texts.append(b"".join(text))
    return texts


_DIRECTIVE = re.compile(rb"%%|%[sd]")


def _template(info: Placement) -> bytes | None:
    """The placement's format; None if a text of its own holds a marker
    (a server name in the configuration could): then every event is whole."""
    m = list(_SLOTS)
    doc = fields(info, m[0], 0, m[2], 0, None, m[4], _flow(), _flow(), 0.0, None)
    doc["client"]["port"], doc["source"]["port"] = m[1], m[3]
    ours = doc["shardproxy"]
    ours["bytes"] = {"up": m[5], "down": m[6]}
    ours["messages"] = {"up": m[7], "down": m[8]}
    ours["close"] = {"client_code": m[9], "backend_code": m[10]}
    doc["event"]["outcome"], doc["event"]["duration"] = m[11], m[12]
    try:
        return logs.template(MESSAGE, doc, _SLOTS)
    except ValueError:
        return None


def _flow() -> FlowStats:
    return FlowStats(0, 0, None, 0, None)


_CODES: dict[int | None, bytes] = {None: b"null"}


def _code(code: int | None) -> bytes:
    """A close code as JSON (null for none); the codes seen are kept, at
    most 4096 of them (a peer chooses them: RFC 6455 §7.4.2)."""
    text = _CODES.get(code)
    if text is None:
        assert code is not None  # in _CODES
        text = b"%d" % code
        if len(_CODES) < 4096:
            _CODES[code] = text
    return text


def write(
    info: Placement,
    client_ip: str | None,
    client_port: int,
    source_port: int,
    forwarded_ip: str | None,
    outcome: str,
    up: FlowStats,
    down: FlowStats,
    duration: float,
    error_by: str | None,
    tls: TlsInfo | None = None,
) -> None:
    """Write the event (at info level): from the placement's template when
    it has the common shape, else whole (a TLS tunnel's too)."""
    if not logs.enabled("info"):
        return
    source_ip = info.space.seen_address  # type: ignore[attr-defined]  # a TupleSpace
    template = _template_of(info)
    if (
        template is None
        or error_by is not None
        or client_ip is None
        or forwarded_ip is not None
        or source_ip is None
        or up.frame_error is not None
        or down.frame_error is not None
        or tls is not None
    ):
        doc = fields(
            info, client_ip, client_port, source_ip, source_port, forwarded_ip, outcome, up,
            down, duration, error_by, tls,
        )  # fmt: skip
        logs.emit_nested(MESSAGE, doc)
        return
    success = outcome in _SUCCESS
    logs.write_line(
        template
        % (
            logs.timestamp(time.time()),
            client_ip.encode(),
            client_port,
            source_ip.encode(),
            source_port,
            outcome.encode(),
            up.bytes,
            down.bytes,
            up.messages,
            down.messages,
            _code(up.close_code),
            _code(down.close_code),
            b"success" if success else b"failure",
            int(duration * 1e9),
        )
    )
