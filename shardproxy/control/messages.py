"""The messages between the supervisor and its workers, as types.

Each is a frozen dataclass; on the wire (control/channel.py) a JSON object
with its ``type`` (the class's ``TYPE``) and its fields. :func:`decode`
turns an object back into its class and refuses an unknown type or a field
it does not know, so that both ends dispatch on classes (``match``), never
on strings.

supervisor → worker: :class:`Start` (first), :class:`Health`,
:class:`Drained`, :class:`Retire`. worker → supervisor: :class:`Ready`,
:class:`Stats`.

A message that wants an answer travels in a :class:`Request` with an id;
the answer (:class:`Ack`: applied) comes back in a :class:`Reply` with the
same id. The supervisor sends :class:`Drained` as a request when an
operator drains a server, so that it answers once every worker has it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from shardproxy.telemetry.snapshot import WorkerSnapshot


@dataclass(frozen=True, slots=True)
class UpstreamSlice:
    """A worker slot's part of the address plan (control/addrplan.py)."""

    first: int
    last: int
    allocator: str  # "kernel" | "userspace"
    excluded: tuple[int, ...]  # ports of the slice not to use (listen, reserved)


@dataclass(frozen=True, slots=True)
class Start:
    """The first message: the effective configuration (Config.to_dict) and
    the slot's port slice."""

    TYPE: ClassVar[str] = "start"
    slot: int
    generation: int
    config: dict[str, Any]
    source: str  # where the configuration came from, for its error messages
    upstream: UpstreamSlice
    # TLS session ticket keys common to every worker (hex; engine/tls.py's
    # share_ticket_keys): made by the supervisor at start, kept across reloads.
    ticket_keys: str = ""


@dataclass(frozen=True, slots=True)
class Health:
    """The backend endpoints down now ("ip:port"), whenever that changes."""

    TYPE: ClassVar[str] = "health"
    down: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Drained:
    """The (pool, server) pairs an operator drained: no new tunnels."""

    TYPE: ClassVar[str] = "drained"
    servers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Retire:
    """A reload replaced this worker's generation: stop accepting (sweeping
    the listen sockets of ``sweep``, indexes in listen order), keep relaying,
    drain after ``drain_after`` seconds (None: never)."""

    TYPE: ClassVar[str] = "retire"
    sweep: tuple[int, ...]
    drain_after: float | None


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker accepts now; ``capacity``: the connections it may hold."""

    TYPE: ClassVar[str] = "ready"
    slot: int
    pid: int
    capacity: int


@dataclass(frozen=True, slots=True)
class Stats:
    """A worker's snapshot, every second (Worker.snapshot), and the connects
    refused or timed out per endpoint since the last one (the supervisor
    counts them as failed health checks)."""

    TYPE: ClassVar[str] = "stats"
    snapshot: WorkerSnapshot
    passive_failures: dict[str, int]


@dataclass(frozen=True, slots=True)
class Ack:
    """The answer to a request: its message was applied."""

    TYPE: ClassVar[str] = "ack"


Message = Start | Health | Drained | Retire | Ready | Stats | Ack
_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Start, Health, Drained, Retire, Ready, Stats, Ack)
}


@dataclass(frozen=True, slots=True)
class Request:
    """A message that wants an answer: the other end sends a :class:`Reply`
    with the same ``id`` (control/channel.py pairs them)."""

    TYPE: ClassVar[str] = "request"
    id: int
    message: Message


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the request ``id``."""

    TYPE: ClassVar[str] = "reply"
    id: int
    message: Message


Envelope = Request | Reply


def encode(message: Message | Envelope) -> bytes:
    return json.dumps(_to_json(message), separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message | Envelope:
    """The message of one line; ValueError for anything else."""
    data = json.loads(line)
    if isinstance(data, dict) and data.get("type") in (Request.TYPE, Reply.TYPE):
        envelope = Request if data.pop("type") == Request.TYPE else Reply
        if set(data) != {"id", "message"} or not isinstance(data["id"], int):
            raise ValueError(f"{envelope.TYPE} with fields {sorted(data)}, not ['id', 'message']")
        return envelope(data["id"], _from_json(data["message"]))
    return _from_json(data)


def _to_json(message: Message | Envelope) -> dict[str, Any]:
    if isinstance(message, Request | Reply):
        return {"type": message.TYPE, "id": message.id, "message": _to_json(message.message)}
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if isinstance(message, Start):
        fields["upstream"] = dataclasses.asdict(message.upstream)
    elif isinstance(message, Stats):
        fields["snapshot"] = message.snapshot.to_json()
    return {"type": message.TYPE, **fields}


def _from_json(data: Any) -> Message:
    if not isinstance(data, dict) or data.get("type") not in _TYPES:
        raise ValueError(f"not a control message: {str(data)[:80]}")
    cls = _TYPES[data.pop("type")]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:
        raise ValueError(f"{cls.TYPE} message with fields {sorted(data)}, not {sorted(names)}")
    if cls is Start:
        data["upstream"] = UpstreamSlice(
            **{**data["upstream"], "excluded": tuple(data["upstream"]["excluded"])}
        )
    elif cls is Health:
        data["down"] = tuple(data["down"])
    elif cls is Drained:
        data["servers"] = tuple((pool, server) for pool, server in data["servers"])
    elif cls is Retire:
        data["sweep"] = tuple(data["sweep"])
    elif cls is Stats:
        data["snapshot"] = WorkerSnapshot.from_json(data["snapshot"])
    return cls(**data)
