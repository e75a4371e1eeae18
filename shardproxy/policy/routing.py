"""Route a request to a pool by host and path prefix.

Routes are tried in the order of the file; the first match wins (as
HAProxy's ``use_backend`` rules do). ``host`` is ``"*"`` (any), an exact
name, or ``"*.example.com"`` (any name ending in ``.example.com``, not
``example.com`` itself). ``path_prefix`` is a plain string prefix of the
path without its query: ``"/chat"`` matches ``/chat``, ``/chat/room`` and
``/chatroom``; write ``"/chat/"`` to exclude the last.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardproxy.config import RouteConfig


def host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


class Router:
    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)

    def match(self, host: str, path: str) -> RouteConfig | None:
        for route in self.routes:
            if host_matches(route.host, host) and path.startswith(route.path_prefix):
                return route
        return None
