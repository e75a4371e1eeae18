"""Checks a log document against the official ECS field definitions.

The definitions come from Elastic's ``@elastic/ecs`` npm package (pinned in
tests/node/package.json, installed by scripts/install-node-deps), read
through tests/node/ecs_fields.mjs. Every field of a document must be an ECS
field of the right type, or live under ``shardproxy.*`` (our namespace);
fields with allowed values (event.kind, event.category, event.type,
event.outcome) must use them, and every event.type must be one ECS expects
with every event.category of the same event.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).parent / "node"
CUSTOM = "shardproxy"

_STRINGS = {"keyword", "constant_keyword", "wildcard", "match_only_text", "text"}
_INTEGERS = {"long", "integer", "short", "byte", "unsigned_long"}
_NUMBERS = {"float", "half_float", "scaled_float", "double"}
_PARSERS: dict[str, Callable[[Any], object]] = {
    "ip": ipaddress.ip_address,
    "date": datetime.fromisoformat,
}


@functools.cache
def definitions() -> dict[str, Any]:
    out = subprocess.run(
        ["node", str(NODE_DIR / "ecs_fields.mjs")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    loaded: dict[str, Any] = json.loads(out)
    return loaded


def leaves(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of every leaf; a dict that is itself an ECS field
    of type object/flattened (e.g. ``labels``) counts as one leaf."""
    fields = definitions()["fields"]
    out: list[tuple[str, Any]] = []
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and fields.get(name, {}).get("type") not in (
            "object",
            "flattened",
        ):
            out += leaves(value, name + ".")
        else:
            out.append((name, value))
    return out


def _type_problem(kind: str, value: Any) -> str | None:
    if kind in _STRINGS:
        ok = isinstance(value, str)
    elif kind in _INTEGERS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind in _NUMBERS:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind in ("object", "flattened"):
        ok = isinstance(value, dict)
    elif kind in _PARSERS:
        try:
            _PARSERS[kind](value)
            ok = True
        except (TypeError, ValueError):
            ok = False
    else:
        return f"type {kind} is not checked here"
    return None if ok else f"{value!r} is not a valid {kind}"


def problems(doc: dict[str, Any]) -> list[str]:
    """What in ``doc`` breaks the ECS definitions; [] when it is valid."""
    fields = definitions()["fields"]
    found: list[str] = []
    values: dict[str, Any] = {}
    for name, value in leaves(doc):
        values[name] = value
        if name.split(".")[0] == CUSTOM:
            if name in fields:
                found.append(f"{name}: our namespace collides with an ECS field")
            continue
        spec = fields.get(name)
        if spec is None:
            found.append(f"{name}: not an ECS field (ours go under {CUSTOM}.*)")
            continue
        if value is None:
            continue  # a field may be absent; null says the same
        items = value if spec["array"] and isinstance(value, list) else [value]
        if isinstance(value, list) and not spec["array"]:
            found.append(f"{name}: ECS does not define it as an array")
            continue
        for item in items:
            if (problem := _type_problem(spec["type"], item)) is not None:
                found.append(f"{name}: {problem}")
            allowed = spec["allowed"]
            if allowed is not None and item not in {a["name"] for a in allowed}:
                found.append(f"{name}: {item!r} is not one of ECS's allowed values")
    found += _categorisation(values, fields)
    return found


def _categorisation(values: dict[str, Any], fields: dict[str, Any]) -> list[str]:
    def as_list(v: Any) -> list[Any]:
        return [] if v is None else v if isinstance(v, list) else [v]

    expected = {a["name"]: a["types"] for a in fields["event.category"]["allowed"]}
    out = []
    for category in as_list(values.get("event.category")):
        for kind in as_list(values.get("event.type")):
            if kind not in (expected.get(category) or []):
                out.append(f"event.type {kind!r} is not expected with event.category {category!r}")
    return out
