"""Tests for shardproxy.addrplan (the arithmetic, pure) and the host probes,
and for the tuple spaces of shardproxy.upstream."""

from __future__ import annotations

import itertools
import os
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardproxy.config import ConfigError, Endpoint, PortRange, from_mapping
from shardproxy.control import addrplan
from shardproxy.control.addrplan import Host, cut_slices, make_plan, port_range_option
from shardproxy.engine.upstream import Exhausted, TupleSpace

SOURCE = "plan.toml"
SYSTEM = PortRange(32768, 60999)


def host(**kw: Any) -> Host:
    facts: dict[str, Any] = {
        "port_range": SYSTEM,
        "reserved_ports": frozenset(),
        "kernel_allocator": True,
        "kernel_reason": "this kernel has IP_LOCAL_PORT_RANGE",
        "unbindable": (),
        "nofile": 20_000,
        "memory": 24 << 30,
    }
    return Host(**{**facts, **kw})


def cfg(workers: int = 2, listen: str = "127.0.0.1:8080", **upstream: Any) -> Any:
    return from_mapping(
        {
            "proxy": {"workers": workers, "listen": [listen]},
            "upstream": upstream,
            "routes": [{"pool": "a"}, {"path_prefix": "/b", "pool": "b"}],
            "pools": {
                "a": {"servers": [{"address": "10.0.1.5", "ports": [8080, 8081]}]},
                # 10.0.1.5:8081 again: an endpoint counts once whatever pools use it
                "b": {"servers": [{"address": "10.0.1.5", "ports": [8081]}]},
            },
        },
        SOURCE,
    )


# -- slices ---------------------------------------------------------------------


@given(st.integers(1, 65535), st.integers(0, 65534), st.integers(1, 64))
def test_slices_are_disjoint_contiguous_and_cover_the_range(
    first: int, length: int, workers: int
) -> None:
    last = min(65535, first + length)
    ports = PortRange(first, last)
    if workers > len(ports):
        with pytest.raises(ValueError):
            cut_slices(ports, workers)
        return
    slices = cut_slices(ports, workers)
    assert len(slices) == workers
    assert slices[0].first == first and slices[-1].last == last
    for a, b in itertools.pairwise(slices):
        assert b.first == a.last + 1
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(ports)


def test_port_range_option_packs_first_low_and_last_high() -> None:
    (value,) = struct.unpack("=I", port_range_option(PortRange(40000, 65535)))
    assert value & 0xFFFF == 40000
    assert value >> 16 == 65535


# -- the plan -------------------------------------------------------------------


def test_capacity_is_sources_times_slice_ports_times_endpoints() -> None:
    plan = make_plan(
        cfg(source_addresses=["127.0.3.1", "127.0.3.2"], port_range="40000-40099"), host()
    )
    assert plan.endpoints == (Endpoint("10.0.1.5", 8080), Endpoint("10.0.1.5", 8081))
    assert plan.slices == (PortRange(40000, 40049), PortRange(40050, 40099))
    assert [w.tuples for w in plan.per_worker] == [2 * 50 * 2, 2 * 50 * 2]
    assert plan.total.tuples == 400
    assert plan.total.binding == "tuples"
    assert plan.total.limit == 400
    assert plan.port_range_from == "config"
    d = plan.to_dict()
    assert d["slices"][1] == {
        "slot": 1,
        "first": 40050,
        "last": 40099,
        "ports": 50,
        "usable_ports": 50,
        "tuples": 200,
        "descriptors": (20_000 - 64) // 2,
        "memory": (24 << 30) // plan.bytes_per_tunnel // 2,
        "max_connections": None,
        "limit": 200,
        "binding": "tuples",
    }


def test_defaults_use_the_system_range_and_the_kernels_source() -> None:
    plan = make_plan(cfg(workers=4), host())
    assert plan.sources == (addrplan.AUTO_SOURCE,)
    assert plan.port_range == SYSTEM and plan.port_range_from == "system"
    assert sum(len(s) for s in plan.slices) == len(SYSTEM)
    assert plan.total.tuples == len(SYSTEM) * 2
    assert plan.allocator == "kernel"


def test_descriptors_bind_first_with_a_wide_plan() -> None:
    sources = [f"127.0.3.{i}" for i in range(1, 11)]
    plan = make_plan(cfg(source_addresses=sources), host())
    assert plan.total.tuples == 10 * len(SYSTEM) * 2
    assert plan.total.binding == "descriptors"
    assert plan.total.limit == 2 * ((20_000 - 64) // 2)


def test_max_connections_and_memory_can_bind() -> None:
    data = cfg().to_dict()
    data["proxy"]["max_connections"] = 7
    c = from_mapping(data)
    assert make_plan(c, host()).total.binding == "max_connections"
    assert make_plan(c, host()).total.limit == 14
    small = make_plan(cfg(), host(memory=100 * 9404))
    assert small.total.binding == "memory"
    assert small.total.limit == 100


def test_listen_and_reserved_ports_in_the_range_are_left_out() -> None:
    plan = make_plan(
        cfg(listen="127.0.0.1:40010", port_range="40000-40099"),
        host(reserved_ports=frozenset({40060, 40061, 50000})),
    )
    assert plan.excluded == (40010, 40060, 40061)
    assert plan.excluded_in(plan.slices[1]) == [40060, 40061]
    assert [w.tuples for w in plan.per_worker] == [49 * 2, 48 * 2]
    assert "excluded     40010, 40060, 40061" in addrplan.describe(plan)


def test_an_unbindable_source_is_named_by_its_index() -> None:
    with pytest.raises(ConfigError) as e:
        make_plan(
            cfg(source_addresses=["127.0.3.1", "192.0.2.7"]),
            host(unbindable=(("192.0.2.7", "bind: Cannot assign requested address"),)),
        )
    assert str(e.value) == (
        f"{SOURCE}: upstream.source_addresses[1]: 192.0.2.7 cannot be used as a source "
        "address on this host (bind: Cannot assign requested address)"
    )


@pytest.mark.parametrize("text", ["1024-65535", "32767-40000", "60000-61000"])
def test_a_range_outside_the_system_range_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_plan(cfg(port_range=text), host())
    assert e.value.key == "upstream.port_range"
    assert f"{text} is not inside the system range 32768-60999" in e.value.reason


def test_a_system_range_too_small_for_the_workers_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        make_plan(cfg(workers=4), host(port_range=PortRange(40000, 40002)))
    assert e.value.key == "upstream.port_range"
    assert "3 ports (40000-40002) cannot be cut into 4 slices" in e.value.reason


def test_allocator_choice() -> None:
    old = host(kernel_allocator=False, kernel_reason="this kernel lacks IP_LOCAL_PORT_RANGE")
    assert make_plan(cfg(), host()).allocator == "kernel"
    auto_old = make_plan(cfg(), old)
    assert (auto_old.allocator, auto_old.allocator_reason) == (
        "userspace",
        "auto: this kernel lacks IP_LOCAL_PORT_RANGE",
    )
    assert make_plan(cfg(port_allocator="userspace"), host()).allocator == "userspace"
    with pytest.raises(ConfigError) as e:
        make_plan(cfg(port_allocator="kernel"), old)
    assert e.value.key == "upstream.port_allocator"
    assert "use auto or userspace" in e.value.reason


def test_describe_shows_the_arithmetic_and_the_binding_limit() -> None:
    text = addrplan.describe(
        make_plan(
            cfg(source_addresses=["127.0.3.1", "127.0.3.2"], port_range="40000-40099"), host()
        )
    )
    assert "2 x 50 x 2 = 200" in text
    assert "2 x 100 x 2 = 400" in text
    assert "This instance can hold 400 tunnels; the binding limit is tuples." in text


# -- the host -------------------------------------------------------------------


def test_reserved_ports_file_format(tmp_path: Any) -> None:
    path = tmp_path / "reserved"
    path.write_text("8080,9000-9002\n")
    assert addrplan.read_reserved_ports(str(path)) == {8080, 9000, 9001, 9002}
    path.write_text("\n")
    assert addrplan.read_reserved_ports(str(path)) == frozenset()


def test_system_port_range_is_read() -> None:
    first, last = addrplan.read_system_port_range()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert f"{first}\t{last}" == f.read().strip().replace(" ", "\t")


def test_every_loopback_address_binds_and_a_foreign_one_does_not() -> None:
    assert addrplan.test_bind("127.0.3.9") is None
    assert addrplan.test_bind("127.200.1.1") is None
    why = addrplan.test_bind("192.0.2.1")  # TEST-NET-1: never local; nothing is sent
    assert why is not None and "Cannot assign requested address" in why


def test_kernel_probe_matches_the_kernel_version() -> None:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    supported, reason = addrplan.probe_kernel_allocator()
    assert supported == ((major, minor) >= (6, 3)), reason


# -- tuple spaces ---------------------------------------------------------------


def test_tuple_space_hands_ports_out_in_order_and_reuses_them_last() -> None:
    space = TupleSpace("127.0.3.1", Endpoint("127.0.0.1", 9000), PortRange(100, 104), frozenset())
    assert space.capacity == 5
    taken = [space.take_port() for _ in range(3)]
    assert taken == [100, 101, 102]
    space.give_port(101)
    assert [space.take_port() for _ in range(3)] == [103, 104, 101]
    with pytest.raises(Exhausted):
        space.take_port()


def test_tuple_space_skips_excluded_ports() -> None:
    space = TupleSpace("auto", Endpoint("127.0.0.1", 9000), PortRange(100, 104), frozenset({101}))
    assert space.capacity == 4
    assert space.address is None  # the kernel chooses
    assert [space.take_port() for _ in range(4)] == [100, 102, 103, 104]
