"""Errors that say who is at fault and what to answer (STYLE: errors typed by
who is at fault): :class:`Reject` carries the HTTP status a client gets
(before the upgrade), :class:`BackendError` a backend that broke the
handshake; :data:`NEED_DATA` is the "feed me more bytes" sentinel of every
incremental parser here (not ``None``)."""

from __future__ import annotations

from typing import Any, Final


class NeedData:
    """Sentinel: the head is not complete yet; feed more bytes."""


NEED_DATA: Final = NeedData()


class Reject(Exception):
    """The client's request cannot be proxied; answer ``status`` and close.

    ``reason`` is a short stable token for logs and metrics; ``detail`` a
    human sentence that goes in the response body and the log event.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers
        # The head (an upgrade.UpgradeRequest), if it parsed: for the log.
        self.request: Any = None


class BackendError(Exception):
    """The backend broke the handshake (malformed or missing response)."""
