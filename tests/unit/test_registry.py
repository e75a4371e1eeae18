"""The runtime server registry (policy/registry.py): servers added, removed
and reweighted while a worker runs, and weights as a function of time."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.config import Balance, HashKey, PoolConfig, ServerConfig
from shardproxy.policy.registry import MIN_RAMP_SHARE, PoolRegistry


def server(name: str, weight: int = 1, port: int = 8080) -> ServerConfig:
    return ServerConfig(name=name, address="10.0.0.1", ports=(port,), weight=weight)


def registry(balance: Balance = "round_robin", *names: str) -> PoolRegistry:
    servers = tuple(server(n, port=8080 + i) for i, n in enumerate(names or ("a", "b")))
    hash_key = HashKey("client_ip") if balance == "hash" else None
    return PoolRegistry(PoolConfig(name="p", balance=balance, hash_key=hash_key, servers=servers))


def picks(p: PoolRegistry, n: int, now: float = 0.0, *, hold: bool = False) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        s = p.choose(None, now=now)
        assert s is not None
        if hold:
            s.endpoints[0].acquire()
        out[s.name] += 1
    return out


def test_the_configuration_fills_it_in_order() -> None:
    p = registry("round_robin", "a", "b", "c")
    assert [s.name for s in p.servers] == ["a", "b", "c"]
    assert "b" in p and p["b"].name == "b"
    assert [e.endpoint.port for e in p.endpoints()] == [8080, 8081, 8082]


def test_an_added_server_takes_its_share_at_once() -> None:
    p = registry("round_robin", "a", "b")
    p.add(server("c", port=9000))
    assert picks(p, 30) == {"a": 10, "b": 10, "c": 10}
    with pytest.raises(ValueError, match="server 'c' already"):
        p.add(server("c"))


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "hash"])
def test_a_removed_server_gets_no_tunnel_but_keeps_its_own(balance: Balance) -> None:
    p = registry(balance, "a", "b")
    a = p["a"]
    a.endpoints[0].acquire()  # a tunnel that stays
    removed = p.remove("a")
    assert removed is a and a.removed and not a.available
    assert "a" not in p and [s.name for s in p.servers] == ["b"]
    for i in range(20):
        chosen = p.choose(str(i).encode() if balance == "hash" else None, now=0.0)
        assert chosen is not None and chosen.name == "b"
    a.endpoints[0].release()  # the tunnel ends: the counts still add up
    assert (a.active, a.endpoints[0].active) == (0, 0)
    with pytest.raises(KeyError):
        p.remove("a")


def test_a_server_added_back_under_its_name_starts_with_its_own_counts() -> None:
    p = registry("least_conn", "a", "b")
    old = p["a"]
    old.endpoints[0].acquire()
    p.remove("a")
    new = p.add(server("a"))
    assert new is not old and new.active == 0 and old.active == 1
    # least-connections sees the new one empty and fills it first
    assert p.choose(None, now=0.0) is new


def test_reweight_moves_the_shares() -> None:
    p = registry("round_robin", "a", "b")
    p.reweight("a", 3)
    assert picks(p, 40) == {"a": 30, "b": 10}
    with pytest.raises(ValueError, match="positive"):
        p.reweight("a", 0)
    with pytest.raises(KeyError):
        p.reweight("zz", 1)


def test_a_ramping_weight_grows_linearly_to_the_weight() -> None:
    p = registry("round_robin", "a")
    s = p.add(server("b", weight=4), now=100.0, ramp=10.0)
    assert s.weight_at(100.0) == pytest.approx(4 * MIN_RAMP_SHARE)
    assert s.weight_at(102.5) == pytest.approx(1.0)
    assert s.weight_at(105.0) == pytest.approx(2.0)
    assert s.weight_at(110.0) == 4
    assert s.weight_at(200.0) == 4  # the ramp is over for good
    assert s.weight_at(101.0) == 4


@pytest.mark.parametrize("balance", ["round_robin", "least_conn"])
def test_balancing_follows_the_ramp(balance: Balance) -> None:
    p = registry(balance, "a")
    p.add(server("b"), now=0.0, ramp=10.0)
    # At 2.5 s of 10, b weighs 0.25 against a's 1: it gets a fifth.
    share = picks(p, 100, now=2.5, hold=True)
    assert share["b"] == pytest.approx(20, abs=2)
    # Once the ramp is over the two are even: least-connections now fills b.
    later = picks(p, 60, now=10.0, hold=True)
    total = share + later
    if balance == "least_conn":
        assert total["a"] == total["b"] == 80
    else:
        assert later == {"a": 30, "b": 30}


def test_hash_keys_move_to_a_ramping_server_gradually() -> None:
    p = registry("hash", "a", "b", "c")
    keys = [str(i).encode() for i in range(600)]
    p.add(server("d", port=9000), now=0.0, ramp=100.0)
    moved = []
    for now in (1.0, 25.0, 50.0, 100.0):
        moved.append(sum(p.choose(k, now=now).name == "d" for k in keys))  # type: ignore[union-attr]
    assert moved == sorted(moved)  # only ever more keys, as the weight grows
    assert moved[0] < 20 and moved[-1] == pytest.approx(150, abs=40)  # a quarter at the end


def test_set_health_and_drained_apply_per_server() -> None:
    p = registry("round_robin", "a", "b")
    a_ep = p["a"].endpoints[0]
    went = p.set_health({a_ep.endpoint})
    assert went == [a_ep] and not p["a"].available
    assert p.set_health({a_ep.endpoint}) == []  # already down
    p.set_health(set())
    p.set_drained(["b"])
    assert (p["a"].available, p["b"].available) == (True, False)


@given(st.lists(st.sampled_from(["add", "remove", "reweight"]), max_size=30), st.randoms())
def test_any_sequence_of_changes_keeps_the_registry_consistent(ops: list[str], rnd) -> None:  # type: ignore[no-untyped-def]
    p = registry("least_conn", "a")
    model = {"a"}
    n = 0
    for op in ops:
        name = rnd.choice(sorted(model)) if model else None
        if op == "add":
            n += 1
            p.add(server(f"s{n}", port=9000 + n))
            model.add(f"s{n}")
        elif op == "remove" and name is not None:
            p.remove(name)
            model.discard(name)
        elif op == "reweight" and name is not None:
            p.reweight(name, rnd.randint(1, 5))
        assert {s.name for s in p.servers} == model
        chosen = p.choose(None, now=0.0)
        assert (chosen is None) == (not model)
        assert chosen is None or chosen.name in model
