"""The admin listener's route table, on its own."""

from __future__ import annotations

from typing import Any

import trio

from shardproxy.control.admin import AdminRoutes


def ask(method: str, path: str) -> tuple[int, Any]:
    async def fixed(args: dict[str, str]) -> tuple[int, Any]:
        return 200, {"route": "fixed", **args}

    async def captured(args: dict[str, str]) -> tuple[int, Any]:
        return 200, {"route": "captured", **args}

    routes = AdminRoutes(
        [
            ("GET", "/healthz", fixed),
            ("POST", "/servers/{pool}/{server}/drain", captured),
            ("GET", "/servers/{pool}/{server}/drain", fixed),
        ]
    )

    async def main() -> tuple[int, Any]:
        return await routes(method, path)

    return trio.run(main)


def test_a_fixed_path_and_captured_segments_reach_their_handler() -> None:
    assert ask("GET", "/healthz") == (200, {"route": "fixed"})
    assert ask("GET", "/healthz/") == (200, {"route": "fixed"})
    assert ask("POST", "/servers/chat/a%20b/drain") == (
        200,
        {"route": "captured", "pool": "chat", "server": "a b"},
    )
    assert ask("GET", "/servers/chat/a/drain") == (
        200,
        {"route": "fixed", "pool": "chat", "server": "a"},
    )


def test_a_wrong_method_is_405_naming_the_right_one_and_an_unknown_path_404() -> None:
    assert ask("POST", "/healthz") == (405, {"error": "use GET"})
    assert ask("DELETE", "/servers/chat/a/drain") == (405, {"error": "use GET or POST"})
    assert ask("GET", "/servers/chat/a/bogus")[0] == 404
    assert ask("GET", "/servers/chat/drain")[0] == 404
