"""Tests for shardproxy.balancer: pools, server state and the algorithms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from itertools import groupby

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardproxy.config import Balance, HashKey, PoolConfig, ServerConfig, from_mapping
from shardproxy.policy.balancer import LeastConn, RendezvousHash, RoundRobin, extract_hash_key
from shardproxy.policy.registry import PoolRegistry, ServerState


def pool(
    balance: Balance,
    weights: Sequence[int] = (1, 1, 1),
    *,
    names: Sequence[str] | None = None,
    ports: Sequence[int] = (8080,),
) -> PoolRegistry:
    names = names or [chr(ord("a") + i) for i in range(len(weights))]
    servers = tuple(
        ServerConfig(name=name, address=f"10.0.0.{i + 1}", ports=tuple(ports), weight=w)
        for i, (name, w) in enumerate(zip(names, weights, strict=True))
    )
    hash_key = HashKey("client_ip") if balance == "hash" else None
    return PoolRegistry(PoolConfig(name="p", balance=balance, hash_key=hash_key, servers=servers))


def picks(p: PoolRegistry, n: int, *, hold: bool = False, key: bytes | None = None) -> list[str]:
    """Choose ``n`` times; with ``hold`` each pick opens a tunnel (acquire)."""
    out = []
    for _ in range(n):
        s = p.choose(key, now=0.0)
        assert s is not None
        if hold:
            s.endpoints_by_use()[0].acquire()
        out.append(s.name)
    return out


def name_of(p: PoolRegistry, key: bytes | None, exclude: Sequence[ServerState] = ()) -> str:
    s = p.choose(key, exclude, now=0.0)
    assert s is not None
    return s.name


def server(p: PoolRegistry, name: str) -> ServerState:
    (s,) = [s for s in p.servers if s.name == name]
    return s


def set_active(p: PoolRegistry, **counts: int) -> None:
    for name, n in counts.items():
        s = server(p, name)
        for _ in range(n):
            s.endpoints_by_use()[0].acquire()


def test_the_configured_balance_picks_the_algorithm() -> None:
    c = from_mapping(
        {
            "routes": [{"pool": "rr"}],
            "pools": {
                "rr": {"balance": "round_robin", "servers": [{"address": "::1", "ports": [1]}]},
                "lc": {"servers": [{"address": "::1", "ports": [1]}]},
                "h": {
                    "balance": "hash",
                    "hash_key": "client_ip",
                    "servers": [{"address": "::1", "ports": [1]}],
                },
            },
        }
    )
    kinds = {pc.name: type(PoolRegistry(pc).algorithm) for pc in c.pools}
    assert kinds == {"rr": RoundRobin, "lc": LeastConn, "h": RendezvousHash}
    p = PoolRegistry(c.pool("lc"))
    assert p.name == "lc"
    assert [s.name for s in p.servers] == ["[::1]"]


# -- acquire / release, endpoints ------------------------------------------------


def test_acquire_and_release_count_per_endpoint_and_server() -> None:
    p = pool("least_conn", (1,), ports=(8080, 8081))
    s = p.servers[0]
    e0, e1 = s.endpoints
    e0.acquire()
    e0.acquire()
    e1.acquire()
    assert (s.active, e0.active, e1.active) == (3, 2, 1)
    e0.release()
    assert (s.active, e0.active, e1.active) == (2, 1, 1)
    assert e0.server is s
    assert (e0.endpoint.host, e0.endpoint.port) == ("10.0.0.1", 8080)


def test_endpoints_by_use_spreads_tunnels_over_the_ports() -> None:
    p = pool("least_conn", (1,), ports=(8080, 8081, 8082))
    s = p.servers[0]
    used = []
    for _ in range(9):
        e = s.endpoints_by_use()[0]
        e.acquire()
        used.append(e.endpoint.port)
    assert Counter(used) == {8080: 3, 8081: 3, 8082: 3}
    # A tunnel ends on 8081: that port is now the least used.
    s.endpoints[1].release()
    assert s.endpoints_by_use()[0].endpoint.port == 8081


# -- round robin -----------------------------------------------------------------


def test_smooth_weighted_round_robin_interleaves() -> None:
    p = pool("round_robin", (5, 1, 1))
    seq = picks(p, 7)
    assert Counter(seq) == {"a": 5, "b": 1, "c": 1}
    # Smooth, not clumped: the heavy server never runs more than twice in a
    # row, and the light ones are not next to each other.
    assert max(len(list(run)) for name, run in groupby(seq) if name == "a") <= 2
    assert abs(seq.index("b") - seq.index("c")) > 1
    # It keeps going in the same rhythm: every window of 7 has 5/1/1.
    more = seq + picks(p, 70)
    for i in range(len(more) - 7):
        assert Counter(more[i : i + 7]) == {"a": 5, "b": 1, "c": 1}, more[i : i + 7]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=6), st.integers(1, 3))
def test_round_robin_is_exactly_proportional_per_cycle(weights: list[int], cycles: int) -> None:
    p = pool("round_robin", weights)
    total = sum(weights)
    counts = Counter(picks(p, total * cycles))
    assert counts == {s.name: s.weight * cycles for s in p.servers}


def test_round_robin_equal_weights_takes_turns() -> None:
    p = pool("round_robin", (1, 1, 1))
    seq = picks(p, 9)
    assert all(Counter(seq[i : i + 3]) == {"a": 1, "b": 1, "c": 1} for i in (0, 3, 6))


def test_round_robin_skips_excluded_and_down_servers() -> None:
    p = pool("round_robin", (1, 1, 1))
    server(p, "b").up = False
    assert set(picks(p, 10)) == {"a", "c"}
    assert {name_of(p, None, [server(p, "a")]) for _ in range(5)} == {"c"}
    assert p.choose(None, [server(p, "a"), server(p, "c")], now=0.0) is None
    server(p, "b").up = True
    assert set(picks(p, 6)) == {"a", "b", "c"}


# -- least connections -----------------------------------------------------------


def test_least_conn_picks_the_least_loaded_server() -> None:
    p = pool("least_conn", (1, 1, 1))
    set_active(p, a=3, b=1, c=2)
    assert picks(p, 3) == ["b", "b", "b"]  # without acquire nothing changes


def test_least_conn_compares_load_per_unit_of_weight() -> None:
    p = pool("least_conn", (1, 4))
    set_active(p, a=1, b=3)  # a: 1.0 per weight, b: 0.75
    assert name_of(p, None) == "b"
    set_active(p, b=2)  # b: 1.25
    assert name_of(p, None) == "a"


def test_least_conn_with_weights_fills_in_proportion() -> None:
    p = pool("least_conn", (1, 2, 3))
    assert Counter(picks(p, 600, hold=True)) == {"a": 100, "b": 200, "c": 300}


def test_least_conn_spreads_a_burst_on_an_idle_pool() -> None:
    p = pool("least_conn", (1, 1, 1, 1))
    first = picks(p, 4, hold=True)
    assert sorted(first) == ["a", "b", "c", "d"]
    assert Counter(picks(p, 400, hold=True)) == {"a": 100, "b": 100, "c": 100, "d": 100}
    assert [s.active for s in p.servers] == [101, 101, 101, 101]


def test_least_conn_spreads_ties_even_without_acquire() -> None:
    # Several handshakes may choose before any of them connects.
    p = pool("least_conn", (1, 1, 1))
    assert Counter(picks(p, 30)) == {"a": 10, "b": 10, "c": 10}


def test_least_conn_skips_excluded_and_down_servers() -> None:
    p = pool("least_conn", (1, 1, 1))
    set_active(p, c=5)
    server(p, "a").up = False
    assert set(picks(p, 10)) == {"b"}
    assert p.choose(None, [server(p, "b")], now=0.0) is server(p, "c")
    assert p.choose(None, [server(p, "b"), server(p, "c")], now=0.0) is None


def test_every_algorithm_returns_none_when_everything_is_excluded_or_down() -> None:
    for balance in ("round_robin", "least_conn", "hash"):
        p = pool(balance, (1, 2))
        for key in (None, b"k"):
            assert p.choose(key, p.servers, now=0.0) is None
        for s in p.servers:
            s.up = False
        assert p.choose(b"k", now=0.0) is None
        assert p.choose(None, now=0.0) is None
    assert LeastConn().choose((), None, (), 0.0) is None
    assert RoundRobin().choose((), None, (), 0.0) is None
    assert RendezvousHash().choose((), b"k", (), 0.0) is None


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(["round_robin", "least_conn", "hash"]),
    st.lists(st.integers(1, 5), min_size=1, max_size=6),
    st.data(),
)
def test_exclude_is_honoured_by_every_algorithm(
    balance: Balance, weights: list[int], data: st.DataObject
) -> None:
    p = pool(balance, weights)
    excluded = data.draw(st.sets(st.sampled_from(p.servers)))
    for i in range(20):
        chosen = p.choose(str(i).encode() if i % 2 else None, excluded, now=0.0)
        if len(excluded) == len(p.servers):
            assert chosen is None
        else:
            assert chosen is not None and chosen not in excluded


# -- rendezvous hashing ------------------------------------------------------------

NAMES = ("alpha", "beta", "gamma", "delta", "epsilon")


def hash_choices(keys: Sequence[bytes], names: Sequence[str] = NAMES) -> list[str]:
    p = pool("hash", [1] * len(names), names=names)
    return [name_of(p, k) for k in keys]


def test_same_key_same_server_across_pool_instances() -> None:
    keys = [f"user-{i}".encode() for i in range(300)]
    first = hash_choices(keys)
    assert hash_choices(keys) == first
    assert hash_choices(keys[::-1]) == first[::-1]  # no state carried between keys
    assert len(set(first)) == len(NAMES)  # and the keys do spread


def test_same_key_same_server_in_another_process() -> None:
    keys = [f"user-{i}".encode() for i in range(300)]
    # The same pool, built from the effective config a worker would receive.
    data = {
        "routes": [{"pool": "p"}],
        "pools": {
            "p": {
                "balance": "hash",
                "hash_key": "client_ip",
                "servers": [
                    {"name": n, "address": f"10.0.0.{i + 1}", "ports": [8080]}
                    for i, n in enumerate(NAMES)
                ],
            }
        },
    }
    script = (
        "import json, sys\n"
        "from shardproxy.policy.registry import PoolRegistry\n"
        "from shardproxy.config import from_mapping\n"
        "data, keys = json.loads(sys.argv[1])\n"
        "p = PoolRegistry(from_mapping(data).pools[0])\n"
        "print(json.dumps([p.choose(k.encode(), now=0.0).name for k in keys]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashes differ from this process's
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps([data, [k.decode() for k in keys]])],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    assert json.loads(result.stdout) == hash_choices(keys)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(NAMES), min_size=2, max_size=5, unique=True),
    st.data(),
)
def test_removing_a_server_only_moves_its_own_keys(names: list[str], data: st.DataObject) -> None:
    removed = data.draw(st.sampled_from(names))
    rest = [n for n in names if n != removed]
    keys = [f"k{i}".encode() for i in range(200)]
    before = hash_choices(keys, names)
    after = hash_choices(keys, rest)
    for b, a in zip(before, after, strict=True):
        if b != removed:
            assert a == b
    assert removed not in after
    # Taking it down or excluding it has the same effect as removing it.
    p = pool("hash", [1] * len(names), names=names)
    gone = server(p, removed)
    assert [name_of(p, k, [gone]) for k in keys] == after
    gone.up = False
    assert [name_of(p, k) for k in keys] == after


def test_hash_weights_are_roughly_proportional() -> None:
    p = pool("hash", (1, 3))
    counts = Counter(name_of(p, f"client-{i}".encode()) for i in range(10_000))
    assert 0.70 <= counts["b"] / 10_000 <= 0.80


def test_hash_equal_weights_spread_evenly() -> None:
    p = pool("hash", (1, 1, 1, 1))
    counts = Counter(name_of(p, f"client-{i}".encode()) for i in range(8000))
    assert all(1700 <= n <= 2300 for n in counts.values()), counts


def test_hash_ignores_load() -> None:
    p = pool("hash", (1, 1, 1))
    chosen = p.choose(b"sticky", now=0.0)
    assert chosen is not None
    for e in chosen.endpoints:
        for _ in range(50):
            e.acquire()
    assert p.choose(b"sticky", now=0.0) is chosen


def test_hash_without_a_key_falls_back_to_least_conn() -> None:
    p = pool("hash", (1, 1, 1))
    set_active(p, a=2, b=0, c=1)
    assert [s for s in (p.choose(None, now=0.0) for _ in range(5))] == [server(p, "b")] * 5
    q = pool("hash", (1, 1, 1))
    assert Counter(picks(q, 300, hold=True)) == {"a": 100, "b": 100, "c": 100}


# -- extract_hash_key ------------------------------------------------------------------

Headers = Sequence[tuple[bytes, bytes]]


def key_of(key: HashKey | None, headers: Headers = (), target: bytes = b"/") -> bytes | None:
    return extract_hash_key(key, list(headers), target, "192.0.2.7")


def test_no_hash_key_configured() -> None:
    assert key_of(None, [(b"x-user-id", b"1")], b"/?room=1") is None


def test_client_ip() -> None:
    assert key_of(HashKey("client_ip")) == b"192.0.2.7"
    assert extract_hash_key(HashKey("client_ip"), [], b"/", "2001:db8::1") == b"2001:db8::1"


def test_header() -> None:
    # The configured name is lower-cased by config, as h11 lower-cases names.
    (pc,) = from_mapping(
        {
            "routes": [{"pool": "p"}],
            "pools": {
                "p": {
                    "balance": "hash",
                    "hash_key": "header:X-User-Id",
                    "servers": [{"address": "10.0.0.1", "ports": [1]}],
                }
            },
        }
    ).pools
    hk = pc.hash_key
    assert key_of(hk, [(b"host", b"a"), (b"x-user-id", b"42")]) == b"42"
    assert key_of(hk, [(b"host", b"a")]) is None
    assert key_of(hk, [(b"x-user-id", b"")]) == b""
    # Several values: all of them, in order, so that they cannot collide
    # with a request that carries just one.
    both = key_of(hk, [(b"x-user-id", b"1"), (b"host", b"a"), (b"x-user-id", b"2")])
    assert both == b"1,2"
    assert key_of(hk, [(b"x-user-id", b"2"), (b"x-user-id", b"1")]) != both


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"cookie", b"sid=abc")], b"abc"),
        ([(b"cookie", b"theme=dark; sid=abc; lang=en")], b"abc"),
        ([(b"cookie", b"theme=dark;sid=abc")], b"abc"),
        ([(b"cookie", b"xsid=1; sidx=2; sid=3")], b"3"),  # exact name, not a prefix
        ([(b"cookie", b"SID=1; sid=2")], b"2"),  # names are case-sensitive
        ([(b"cookie", b"sid=YWJj==; a=b")], b"YWJj=="),  # '=' inside the value
        ([(b"cookie", b"a=1"), (b"cookie", b"sid=abc")], b"abc"),  # several headers
        ([(b"cookie", b"theme=dark")], None),
        ([(b"x-sid", b"abc")], None),
        ([], None),
        # Malformed cookies next to ours do not hide it.
        ([(b"cookie", b"a=1; garbage; sid=abc")], b"abc"),
        ([(b"cookie", b'prefs={"a": 1}; sid=abc')], b"abc"),
        ([(b"cookie", b"a b c"), (b"cookie", b"sid=abc")], b"abc"),
        ([(b"cookie", b";;; =; sid")], None),
    ],
)
def test_cookie(headers: Headers, expected: bytes | None) -> None:
    assert key_of(HashKey("cookie", "sid"), headers) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/chat?room=lobby", b"lobby"),
        (b"/chat?a=1&room=lobby&b=2", b"lobby"),
        (b"/chat?room=a%20b", b"a b"),
        (b"/chat?room=", b""),  # present but blank
        (b"/chat?room", b""),
        (b"/chat", None),
        (b"/chat?rooms=1&xroom=2", None),
        (b"/room/lobby", None),
        (b"http://example.com/chat?room=lobby", b"lobby"),  # absolute-form target
    ],
)
def test_query(target: bytes, expected: bytes | None) -> None:
    assert key_of(HashKey("query", "room"), [], target) == expected


def test_extracted_keys_route_consistently() -> None:
    p = pool("hash", (1, 1, 1, 1))
    hk = HashKey("cookie", "sid")
    one = key_of(hk, [(b"cookie", b"a=1; sid=user-7")])
    two = key_of(hk, [(b"cookie", b"sid=user-7; b=2")])
    assert one == two
    assert p.choose(one, now=0.0) is p.choose(two, now=0.0)
