"""Tests for shardproxy.routing: host and path-prefix routes, first match wins."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.config import RouteConfig, from_mapping
from shardproxy.policy.routing import Router


def router(*routes: tuple[str, str, str]) -> Router:
    """Routes as (host, path_prefix, pool), parsed the way an operator writes them."""
    pools = {pool for _, _, pool in routes}
    data: dict[str, Any] = {
        "routes": [{"host": h, "path_prefix": p, "pool": pool} for h, p, pool in routes],
        "pools": {name: {"servers": [{"address": "10.0.0.1", "ports": [1]}]} for name in pools},
    }
    return Router(from_mapping(data).routes)


def pool_for(r: Router, host: str, path: str) -> str | None:
    route = r.match(host, path)
    return None if route is None else route.pool


def test_match_returns_the_route() -> None:
    r = router(("chat.example.com", "/ws", "chat"))
    assert r.match("chat.example.com", "/ws") == RouteConfig("chat.example.com", "/ws", "chat")


def test_no_match_is_none() -> None:
    r = router(("chat.example.com", "/ws", "chat"))
    assert r.match("other.example.com", "/ws") is None
    assert r.match("chat.example.com", "/other") is None
    assert Router([]).match("a", "/") is None


def test_first_match_in_file_order_wins() -> None:
    r = router(
        ("*", "/admin", "admin"),
        ("chat.example.com", "/", "chat"),
        ("*.example.com", "/", "wild"),
        ("*", "/", "default"),
    )
    assert pool_for(r, "chat.example.com", "/admin/x") == "admin"  # earlier, though less specific
    assert pool_for(r, "chat.example.com", "/room") == "chat"
    assert pool_for(r, "news.example.com", "/room") == "wild"
    assert pool_for(r, "example.org", "/room") == "default"
    # The same routes in the other order: the catch-all shadows everything.
    rev = router(
        ("*", "/", "default"),
        ("*.example.com", "/", "wild"),
        ("chat.example.com", "/", "chat"),
        ("*", "/admin", "admin"),
    )
    for host, path in [("chat.example.com", "/admin/x"), ("news.example.com", "/")]:
        assert pool_for(rev, host, path) == "default"


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("example.com", False),
        ("badexample.com", False),
        ("a.example.com.evil.org", False),
        ("a.example.org", False),
    ],
)
def test_wildcard_host(host: str, matches: bool) -> None:
    r = router(("*.example.com", "/", "wild"))
    assert (pool_for(r, host, "/") == "wild") is matches


def test_exact_host_is_exact() -> None:
    r = router(("example.com", "/", "exact"))
    assert pool_for(r, "example.com", "/") == "exact"
    for host in ("a.example.com", "example.com.au", "xexample.com", "example.co"):
        assert pool_for(r, host, "/") is None


def test_host_pattern_is_case_insensitive_as_configured() -> None:
    # Config lower-cases patterns; the handshake lower-cases the Host header.
    r = router(("Chat.Example.COM", "/", "chat"), ("*.EXAMPLE.com", "/", "wild"))
    assert pool_for(r, "chat.example.com", "/") == "chat"
    assert pool_for(r, "x.example.com", "/") == "wild"


def test_star_matches_any_host() -> None:
    r = router(("*", "/", "any"))
    for host in ("example.com", "a.b.c", "127.0.0.1", "::1", ""):
        assert pool_for(r, host, "/x") == "any"


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/chat", True),
        ("/chat/room", True),
        ("/chatroom", True),  # a plain string prefix, as documented
        ("/cha", False),
        ("/", False),
        ("/Chat", False),  # paths are case-sensitive
        ("/x/chat", False),
    ],
)
def test_path_prefix_is_a_plain_string_prefix(path: str, matches: bool) -> None:
    r = router(("*", "/chat", "chat"))
    assert (pool_for(r, "h", path) == "chat") is matches


def test_trailing_slash_excludes_longer_names() -> None:
    r = router(("*", "/chat/", "chat"), ("*", "/", "rest"))
    assert pool_for(r, "h", "/chat/room") == "chat"
    assert pool_for(r, "h", "/chat/") == "chat"
    assert pool_for(r, "h", "/chatroom") == "rest"
    assert pool_for(r, "h", "/chat") == "rest"


def test_host_and_path_must_both_match() -> None:
    r = router(("a.example.com", "/ws", "a"), ("*", "/ws", "any"))
    assert pool_for(r, "a.example.com", "/ws") == "a"
    assert pool_for(r, "b.example.com", "/ws") == "any"
    assert pool_for(r, "a.example.com", "/http") is None


_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_hosts = st.lists(_labels, min_size=1, max_size=4).map(".".join)
_paths = st.from_regex(r"/[a-z/]{0,12}", fullmatch=True)


@given(_hosts, st.data(), _paths)
def test_match_agrees_with_the_documented_rules(
    pattern_base: str, data: st.DataObject, prefix: str
) -> None:
    path = data.draw(st.one_of(_paths, st.builds(lambda rest: prefix + rest[1:], _paths)))
    # Hosts equal to the pattern, below it, or anything at all.
    host = data.draw(
        st.one_of(
            st.just(pattern_base),
            st.builds(lambda sub: f"{sub}.{pattern_base}", _hosts),
            st.builds(lambda h: h + pattern_base, _hosts),  # "x" + "example.com"
            _hosts,
        )
    )
    wildcard = "*." + pattern_base
    r = router((pattern_base, prefix, "exact"), (wildcard, prefix, "wild"), ("*", "/", "any"))
    got = pool_for(r, host, path)
    if not path.startswith(prefix):
        assert got == "any"
    elif host == pattern_base:
        assert got == "exact"
    elif host.endswith("." + pattern_base):
        assert got == "wild"
    else:
        assert got == "any"
