"""structlog → ECS JSON lines (Elastic Common Schema), one event per line.

Events are logged with ECS dotted field names (``client.ip``,
``event.action``…); :func:`ecs_json` nests them and adds ``@timestamp``,
``log.level``, ``message`` and ``ecs.version``, producing the same document
as ``ecs-logging``'s ``StructlogFormatter`` (a test holds the two side by
side), but stamped with the ECS version whose definitions our fields are
tested against (``ecs-logging`` stamps 1.6.0 whatever the fields). Fields
of our own live under ``shardproxy.*``. Every process logs to its stdout,
which workers inherit from the supervisor, so one stream carries the whole
instance; or, with ``[log] file``, every process appends to that
file (:class:`LogFile`: whole lines in each ``write`` on an ``O_APPEND``
descriptor, at most PIPE_BUF bytes of them when :data:`batched` holds a
round's lines, so lines of different processes do not mix), and SIGUSR1
makes them reopen it after logrotate moved it away.

Why not ``ecs-logging``'s formatter itself: it costs about 50 µs per event
(generic dict normalising and merging, three ``json.dumps`` calls), and a
worker writes one access event per tunnel: that was a third of the CPU of a
handshake. This one splits each key once (cached) and serialises once.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from shardproxy import __version__

# The ECS release whose field definitions tests/e2e/test_ecs.py checks our events
# against (the @elastic/ecs package of that version, tests/node).
ECS_VERSION = "8.11.0"

_paths: dict[str, tuple[str, ...]] = {}
_second = -1
_second_text = ""


def _timestamp(now: float) -> str:
    """``2026-11-26T13:08:22.746Z``; the part up to the second is cached."""
    global _second, _second_text
    whole = int(now)
    if whole != _second:
        _second = whole
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second_text}.{int((now - whole) * 1000):03d}Z"


def _nest(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        path = _paths.get(key)
        if path is None:
            path = _paths[key] = tuple(key.split("."))
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        leaf = path[-1]
        if type(value) is dict and leaf in node:
            node[leaf].update(value)  # a namespace given both nested and dotted
        else:
            node[leaf] = value
    return out


def ecs_json(_: WrappedLogger, method_name: str, event: EventDict) -> str:
    """The structlog renderer: one ECS JSON document per event."""
    message = str(event.pop("event", ""))
    exc = event.pop("exc_info", None)
    if exc:  # log.exception(), or exc_info= given explicitly
        if isinstance(exc, BaseException):
            exc = (type(exc), exc, exc.__traceback__)
        elif not isinstance(exc, tuple):
            exc = sys.exc_info()
        event["error.stack_trace"] = "".join(traceback.format_exception(*exc))
    # ECS puts these three first; the rest follows nested.
    doc: dict[str, Any] = {
        "@timestamp": _timestamp(time.time()),
        "log.level": "warning" if method_name == "warn" else method_name,
        "message": message,
    }
    doc.update(_nest(event))
    doc["ecs"] = {"version": ECS_VERSION}
    # orjson: a tenth of json.dumps's time, which an access event per tunnel
    # made a tenth of a worker's CPU per handshake; the same compact UTF-8
    # text for every value a log holds (a float NaN would be null, not NaN).
    return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


_static: dict[str, Any] = {}  # configure's static fields, nested
_generation = 0  # configure's calls
_min_level = logging.INFO
_LEVELS = logging.getLevelNamesMapping()


def enabled(level: str) -> bool:
    """Whether events of ``level`` are written."""
    return _LEVELS[level.upper()] >= _min_level


def document(message: str, fields: dict[str, Any], level: str = "info") -> bytes:
    """The line :func:`emit_nested` writes for these fields (nested already,
    namespaces as dicts, no dotted keys): the same document as a
    ``log.<level>(message, **fields)`` would give. ``fields`` may be changed
    (the static fields are merged into its namespaces)."""
    for key, value in _static.items():
        have = fields.get(key)
        if have is None:
            fields[key] = value
        elif type(have) is dict:
            for name, inner in value.items():
                have.setdefault(name, inner)
    doc: dict[str, Any] = {
        "@timestamp": _timestamp(time.time()),
        "log.level": level,
        "message": message,
    }
    doc.update(fields)
    doc["ecs"] = {"version": ECS_VERSION}
    return orjson.dumps(
        doc, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
    )


def emit_nested(message: str, fields: dict[str, Any], level: str = "info") -> None:
    """One event whose fields are nested already, written without
    structlog's chain (:func:`document`), for the access event a worker
    writes per tunnel (structlog's bound logger and the nesting of every
    key took 14 µs of it)."""
    if _LEVELS[level.upper()] < _min_level:
        return
    write_line(document(message, fields, level))


def write_line(line: bytes) -> None:
    """A whole line of :func:`document` or :func:`template`'s making, as
    bytes, in one ``write`` where the stream is a file (every writer
    flushes its line, so bytes and text do not overtake each other);
    inside :data:`batched`, at its end."""
    batch = _batch
    if batch is None or threading.get_ident() != _batch_thread:
        _write_bytes(line)  # another thread's line does not wait for this one's batch
    else:
        batch.append(line)


_batch: list[bytes] | None = None  # lines held by `batched`
_batch_thread = 0  # the thread whose batch it is
# Workers share the supervisor's stdout, often a pipe: a write of at most
# PIPE_BUF bytes to a pipe is never interleaved with another process's
# (pipe(7)), so a batch goes out in writes of whole lines up to that size.
ATOMIC_WRITE = select.PIPE_BUF


class _Batched:
    """``with logs.batched:`` the lines written meanwhile go out together
    at the end, in writes of :data:`ATOMIC_WRITE` bytes at most (a longer
    line alone), also when it ends by an exception. The engines' loops hold
    each round's events so: one system call for many tunnels' access
    events. A round is a few hundred microseconds of work with no wait
    inside, so no line waits on anything else. Only the lines of the thread
    that opened the batch wait (another thread's could come after it was
    written). Nested: the outermost writes. Every event goes through
    :func:`write_line` (the structlog chain too, :class:`_Lines`), so lines
    keep their order."""

    __slots__ = ("_depth",)

    def __init__(self) -> None:
        self._depth = 0

    def __enter__(self) -> None:
        global _batch, _batch_thread
        self._depth += 1
        if self._depth == 1:
            _batch_thread = threading.get_ident()
            _batch = []

    def __exit__(self, *_: object) -> None:
        global _batch
        self._depth -= 1
        if self._depth:
            return
        lines, _batch = _batch, None
        chunk: list[bytes] = []
        size = 0
        for line in lines or ():
            if size + len(line) > ATOMIC_WRITE and chunk:
                _write_bytes(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            _write_bytes(b"".join(chunk))


class _Lines:
    """What structlog writes to: each rendered event through :func:`write_line`."""

    def write(self, text: str) -> None:
        write_line(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        pass


batched = _Batched()


def _bytes_writer(stream: Any) -> Any:
    if isinstance(stream, LogFile):
        return stream.write_bytes
    try:
        fd = stream.fileno()  # a real file (stdout): straight to its descriptor
    except (AttributeError, OSError, ValueError):
        fd = None  # io.StringIO and the like
    if fd is not None:

        def write(line: bytes) -> None:
            written = os.write(fd, line)
            while written < len(line):  # a pipe may take it in parts
                written += os.write(fd, line[written:])

        return write

    def write_text(line: bytes) -> None:
        stream.write(line.decode())
        stream.flush()

    return write_text


def generation() -> int:
    """How many times :func:`configure` ran: a :func:`template` made at
    another generation has other static fields."""
    return _generation


def timestamp(now: float) -> bytes:
    """``now`` as @timestamp's text, for a :func:`template`'s slot."""
    return _timestamp(now).encode()


def template(message: str, fields: dict[str, Any], slots: Mapping[str, bytes]) -> bytes:
    """:func:`document` of ``fields`` as a bytes %-format, for events of one
    shape whose other fields stay the same: every value of ``fields`` that
    is a key of ``slots`` (a marker string) is replaced, quotes and all, by
    its directive (``b"%d"``; ``b'"%s"'`` for bytes that need no JSON
    escaping; ``b"%s"`` for JSON text), and the @timestamp by ``%s``. The
    markers must come in the document in the order of ``slots``, so that
    ``template(...) % (timestamp(t), *values)`` is the document of those
    values at ``t`` (tests/unit/test_access.py holds the two equal)."""
    line = document(message, fields).replace(b"%", b"%%")
    stamp = line.index(b'"@timestamp":"') + len(b'"@timestamp":"')
    line = line[:stamp] + b"%s" + line[line.index(b'"', stamp) :]
    at = stamp
    for marker, directive in slots.items():
        quoted = orjson.dumps(marker)
        found = line.find(quoted, at)
        if found < 0 or line.count(quoted) != 1:
            raise ValueError(f"template: {marker!r} is not once in the document, in order")
        line = line[:found] + directive + line[found + len(quoted) :]
        at = found + len(directive)
    return line


class LogFile:
    """The log file, as the stream structlog writes to: each line goes out
    in one ``os.write`` on an ``O_APPEND`` descriptor; :meth:`reopen`
    starts a new file at the same path (logrotate's ``create`` method)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, text: str) -> int:
        self.write_bytes(text.encode("utf-8", "replace"))
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        written = 0
        while written < len(data):  # a regular file takes it whole, short of a full disk
            written += os.write(self._fd, data[written:])

    def flush(self) -> None:
        pass

    def reopen(self) -> None:
        fd = self._open()
        os.close(self._fd)
        self._fd = fd


_stream: Any = None  # what this process logs to
_write_bytes: Any = None  # and how a line of bytes goes there (_bytes_writer)


def reopen() -> None:
    """SIGUSR1: reopen the log file, if logging goes to one."""
    if isinstance(_stream, LogFile):
        _stream.reopen()


def open_stream(path: str) -> TextIO | LogFile:
    """Where ``[log] file`` says to log: stdout for "", else the file."""
    return LogFile(path) if path else sys.stdout


def configure(
    level: str = "info",
    static: dict[str, Any] | None = None,
    stream: TextIO | LogFile | None = None,
) -> None:
    """Set up logging for this process; ``static`` fields go on every event
    (e.g. ``{"shardproxy.worker": 3}``)."""
    fields = {
        "process.pid": os.getpid(),
        # ECS: the observer is the intermediary device that saw the event.
        "observer.type": "proxy",
        "observer.product": "shardproxy",
        "observer.version": __version__,
        "observer.hostname": socket.gethostname(),
        **(static or {}),
    }

    def add_static(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    global _stream, _static, _min_level, _generation, _write_bytes
    _generation += 1
    _stream = stream or sys.stdout
    _write_bytes = _bytes_writer(_stream)
    _static = _nest(fields)
    _min_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[add_static, ecs_json],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(_Lines()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get_logger() -> Any:
    return structlog.get_logger()
