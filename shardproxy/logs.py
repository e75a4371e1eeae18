"""structlog → ECS JSON lines (Elastic Common Schema), one event per line.

Events are logged with ECS dotted field names (``client.ip``,
``event.action``…); ``ecs-logging``'s formatter nests them, adds
``@timestamp``, ``log.level`` and ``ecs.version``. Fields of our own live
under ``shardproxy.*``. Every process logs to its stdout, which workers
inherit from the supervisor, so one stream carries the whole instance.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import ecs_logging
import structlog
from structlog.typing import EventDict, WrappedLogger


def configure(
    level: str = "info", static: dict[str, Any] | None = None, stream: TextIO | None = None
) -> None:
    """Set up logging for this process; ``static`` fields go on every event
    (e.g. ``{"shardproxy.worker": 3}``)."""
    fields = {"process.pid": os.getpid(), **(static or {})}

    def add_static(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            add_static,
            structlog.processors.format_exc_info,
            ecs_logging.StructlogFormatter(),  # type: ignore[list-item]  # dict vs MutableMapping
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger() -> Any:
    return structlog.get_logger()
