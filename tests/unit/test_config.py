"""Tests for shardproxy.config: TOML → frozen, validated objects.

Every error is checked for *where* it points (the full key path and the file)
as much as for *that* it happens: an operator reads only the one line.
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from configs import GOOD_TOML, write
from hypothesis import given, settings
from hypothesis import strategies as st
from tlscerts import TestCA

from shardproxy import config
from shardproxy.config import (
    ConfigError,
    Endpoint,
    HashKey,
    format_duration,
    from_mapping,
    parse_duration,
)

SOURCE = "test.toml"


def minimal(**pool: Any) -> dict[str, Any]:
    """The smallest valid config, with optional overrides of the pool table."""
    return {
        "routes": [{"pool": "chat"}],
        "pools": {"chat": {"servers": [{"address": "10.0.1.5", "ports": [8080]}], **pool}},
    }


def with_proxy(**proxy: Any) -> dict[str, Any]:
    return {**minimal(), "proxy": proxy}


def with_server(**server: Any) -> dict[str, Any]:
    return minimal(servers=[{"address": "10.0.1.5", "ports": [8080], **server}])


def error(data: Any, key: str, *fragments: str) -> ConfigError:
    """Parse ``data``; it must fail at exactly ``key`` with every fragment in the reason."""
    with pytest.raises(ConfigError) as info:
        from_mapping(data, SOURCE)
    e = info.value
    assert e.source == SOURCE
    assert e.key == key, str(e)
    assert str(e) == f"{SOURCE}: {key}: {e.reason}"
    assert "\n" not in str(e)
    for fragment in fragments:
        assert fragment in e.reason, str(e)
    return e


# -- defaults and the effective config ---------------------------------------


def test_minimal_config_gets_the_documented_defaults() -> None:
    c = from_mapping(minimal(), SOURCE)
    p = c.proxy
    assert p.listen == (Endpoint("0.0.0.0", 8080),)
    assert p.workers == len(os.sched_getaffinity(0))
    assert p.header_timeout == 10.0
    assert p.max_header_bytes == 16384
    assert p.connect_timeout == 3.0
    assert p.response_timeout == 10.0
    assert p.max_connections is None
    assert c.log.level == "info"
    (route,) = c.routes
    assert (route.host, route.path_prefix, route.pool) == ("*", "/", "chat")
    (pool,) = c.pools
    assert pool.balance == "least_conn"
    assert pool.hash_key is None
    (server,) = pool.servers
    assert server.weight == 1
    assert server.name == "10.0.1.5"
    assert server.endpoints == (Endpoint("10.0.1.5", 8080),)
    assert c.pool("chat") is pool
    with pytest.raises(KeyError):
        c.pool("nope")


def test_workers_auto_counts_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert from_mapping(with_proxy(workers="auto")).proxy.workers == 3


def test_explicit_values_are_kept() -> None:
    c = from_mapping(
        with_proxy(
            workers=4,
            header_timeout="250ms",
            max_header_bytes=4096,
            connect_timeout="2m",
            response_timeout="1h",
            max_connections=5000,
        )
    )
    assert (c.proxy.workers, c.proxy.max_header_bytes, c.proxy.max_connections) == (4, 4096, 5000)
    assert (c.proxy.header_timeout, c.proxy.connect_timeout, c.proxy.response_timeout) == (
        0.25,
        120.0,
        3600.0,
    )


def test_load_reads_a_file_and_remembers_its_name(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    c = config.load(path)
    assert c.source == path
    assert c.proxy.listen == (Endpoint("127.0.0.1", 9000), Endpoint("::1", 9000))
    assert c.proxy.header_timeout == 1.5
    assert c.pool("chat").hash_key == HashKey("header", "x-user-id")
    assert [s.name for s in c.pool("chat").servers] == ["a", "10.0.1.6"]
    assert c.pool("other").servers[0].name == "[::1]"
    assert [r.pool for r in c.routes] == ["chat", "other"]


def test_to_dict_round_trips_through_toml(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, GOOD_TOML))
    d = c.to_dict()
    assert from_mapping(d) == c
    assert from_mapping(tomllib.loads(tomli_w.dumps(d))) == c
    assert d["proxy"]["max_connections"] == "auto"
    assert d["pools"]["chat"]["hash_key"] == "header:x-user-id"
    assert "hash_key" not in d["pools"]["other"]


def test_to_dict_round_trips_with_tls(tmp_path: Path) -> None:
    """TLS profiles, TLS listeners and a pool's TLS, with relative paths
    and the certificates' names left out: the effective config has them
    absolute and filled in, and parses back to the same objects."""
    ca = TestCA(tmp_path)
    chat = ca.issue(["chat.example.com", "*.example.com"], stem="chat")
    api = ca.issue(["api.example.com"], key_type="rsa", stem="api")
    client = ca.issue([], common_name="shardproxy", client=True, stem="client")
    data = tomllib.loads(GOOD_TOML)
    data["proxy"]["listen"] = [
        "127.0.0.1:9000",
        {"address": "127.0.0.1:9443", "tls": "edge"},
        {"address": "[::1]:9443", "tls": "mtls", "accept_proxy": True},
    ]
    data["proxy"]["trusted_proxies"] = ["10.0.0.0/8"]
    data["tls"] = {
        "edge": {"certificates": [{"cert": "chat.pem", "key": "chat.key"}, {
            "cert": "api.pem", "key": "api.key", "names": ["API.example.com"]
        }]},
        "mtls": {
            "certificates": [{"cert": "chat.pem", "key": "chat.key", "names": ["*.example.com"]}],
            "min_version": "1.3",
            "session_tickets": 0,
            "strict_sni": True,
            "client_ca": ca.ca_file.name,
            "verify_client": "required",
        },
    }  # fmt: skip
    data["pools"]["chat"]["tls"] = {
        "ca_file": ca.ca_file.name,
        "cert": "client.pem",
        "key": "client.key",
    }
    data["pools"]["other"].update(balance="hash", hash_key="client_cert", tls={"verify": False})
    c = config.load(write(tmp_path, tomli_w.dumps(data)))
    d = c.to_dict()
    assert from_mapping(d) == c
    assert from_mapping(tomllib.loads(tomli_w.dumps(d))) == c
    assert from_mapping(d).to_dict() == d
    assert [f["names"] for f in d["tls"]["edge"]["certificates"]] == [
        ["chat.example.com", "*.example.com"],
        ["api.example.com"],
    ]
    assert d["tls"]["edge"]["certificates"][0]["cert"] == str(chat.cert)
    assert d["tls"]["edge"]["certificates"][1]["key"] == str(api.key)
    assert d["pools"]["chat"]["tls"]["cert"] == str(client.cert)
    assert d["proxy"]["listen"][2] == {"address": "[::1]:9443", "accept_proxy": True, "tls": "mtls"}
    assert c.pool("other").hash_key == HashKey("client_cert")


# Valid configs, generated. Each raw value is written in one of the forms an
# operator may use (durations in any unit, IPv6 in long form, names omitted).

_names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
_header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True)


@st.composite
def _duration_text(draw: st.DrawFn) -> str:
    ms = draw(st.integers(1, 10**9))
    forms = [f"{ms}ms", f"{Decimal(ms) / 1000}s"]
    if ms % 6000 == 0:
        forms.append(f"{Decimal(ms) / 60000}m")
    if ms % 360_000 == 0:
        forms.append(f"{Decimal(ms) / 3_600_000}h")
    return draw(st.sampled_from(forms))


@st.composite
def _ip_text(draw: st.DrawFn) -> str:
    ip = draw(st.ip_addresses())
    return ip.exploded if draw(st.booleans()) else str(ip)


@st.composite
def _listen(draw: st.DrawFn) -> list[str]:
    pairs = draw(
        st.lists(
            st.tuples(st.ip_addresses(), st.integers(1, 65535)),
            min_size=1,
            max_size=4,
            unique_by=lambda t: (t[0].compressed, t[1]),
        )
    )
    return [f"[{ip.exploded}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip, port in pairs]


@st.composite
def _pool(draw: st.DrawFn) -> dict[str, Any]:
    addresses = draw(st.lists(st.ip_addresses(), min_size=1, max_size=5, unique=True))
    servers = []
    for i, ip in enumerate(addresses):
        server: dict[str, Any] = {
            "address": draw(st.sampled_from([str(ip), ip.exploded])),
            "ports": draw(st.lists(st.integers(1, 65535), min_size=1, max_size=4, unique=True)),
        }
        if draw(st.booleans()):
            server["name"] = f"s{i}"
        if draw(st.booleans()):
            server["weight"] = draw(st.integers(1, 1000))
        servers.append(server)
    pool: dict[str, Any] = {"servers": servers}
    balance = draw(st.sampled_from([None, "round_robin", "least_conn", "hash"]))
    if balance is not None:
        pool["balance"] = balance
    if balance == "hash":
        pool["hash_key"] = draw(
            st.one_of(
                st.just("client_ip"),
                st.builds(
                    lambda kind, name: f"{kind}:{name}",
                    st.sampled_from(["header", "cookie", "query"]),
                    _header_names,
                ),
            )
        )
    return pool


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    pools = draw(st.dictionaries(_names, _pool(), min_size=1, max_size=3))
    routes = [
        {
            "host": draw(
                st.sampled_from(["*", "example.com", "*.example.com", "A.Example.COM", "x_y-1"])
            ),
            "path_prefix": "/" + draw(st.from_regex(r"[a-z0-9/_-]{0,10}", fullmatch=True)),
            "pool": draw(st.sampled_from(sorted(pools))),
        }
        for _ in range(draw(st.integers(1, 4)))
    ]
    proxy: dict[str, Any] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "listen": _listen(),
        "workers": st.one_of(st.just("auto"), st.integers(1, 1024)),
        "header_timeout": _duration_text(),
        "max_header_bytes": st.integers(1024, 1 << 20),
        "connect_timeout": _duration_text(),
        "response_timeout": _duration_text(),
        "max_connections": st.one_of(st.just("auto"), st.integers(1, 10_000_000)),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            proxy[key] = draw(strategy)
    data: dict[str, Any] = {"routes": routes, "pools": pools}
    if proxy:
        data["proxy"] = proxy
    if draw(st.booleans()):
        data["log"] = {"level": draw(st.sampled_from(config.LOG_LEVELS))}
    return data


@settings(max_examples=150, deadline=None)
@given(valid_configs())
def test_to_dict_round_trips_for_any_valid_config(data: dict[str, Any]) -> None:
    c = from_mapping(data, SOURCE)
    d = c.to_dict()
    assert from_mapping(d) == c
    # What `check` prints and the supervisor sends to workers goes through TOML.
    assert from_mapping(tomllib.loads(tomli_w.dumps(d))) == c
    # The effective config is a fixed point: defaults filled in, forms canonical.
    assert from_mapping(d).to_dict() == d
    assert [p.name for p in c.pools] == list(data["pools"])
    assert len(c.routes) == len(data["routes"])


# -- durations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.5m", 30.0),
        ("2.675s", 2.675),
        (" 3 s ", 3.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert from_mapping(with_proxy(connect_timeout=text)).proxy.connect_timeout == seconds


@pytest.mark.parametrize(
    "text", ["10", "ten", "", "-1s", "10 seconds", "1e3s", ".5s", "10S", "0.0001s", "1.5ms"]
)
def test_bad_durations_name_the_key(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
    for key in ("header_timeout", "connect_timeout", "response_timeout"):
        error(with_proxy(**{key: text}), f"proxy.{key}", repr(text))


@pytest.mark.parametrize("text", ["0s", "0ms", "0.0h"])
def test_zero_duration_is_refused_where_a_positive_one_is_required(text: str) -> None:
    assert parse_duration(text) == 0.0
    error(with_proxy(header_timeout=text), "proxy.header_timeout", "greater than zero")


def test_duration_must_be_a_string() -> None:
    error(with_proxy(header_timeout=10), "proxy.header_timeout", "must be a string", "10")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (10.0, "10s"), (90.0, "90s"), (120.0, "2m"), (7200.0, "2h"), (1.5, "1500ms")],
)
def test_format_duration_uses_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(0, 10**12))
def test_format_then_parse_gives_back_any_millisecond_duration(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == seconds


@given(_duration_text())
def test_parse_then_format_then_parse_is_stable(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == seconds


# -- the file itself -----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == path
    assert str(info.value) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: ")
    assert "directory" in info.value.reason


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[proxy]\nworkers = \n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: TOML syntax error: ")
    assert "line 2" in str(info.value)
    assert "\n" not in str(info.value)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[log]\nlevel = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert "UTF-8" in info.value.reason


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[proxy]\nlisen = []\n", "proxy.lisen"),
        ("[log]\nlevle = 'info'\n", "log.levle"),
        ("[[routes]]\npool = 'chat'\nprefix = '/'\n", "routes[1].prefix"),
        ("[pools.other]\nservers = [{address = '10.0.0.1', ports = [1]}]\nbalanse = 'hash'\n",
         "pools.other.balanse"),
        ("[pools.other]\nservers = [{address = '10.0.0.1', ports = [1]},"
         " {address = '10.0.0.2', port = [1]}]\n",
         "pools.other.servers[1].port"),
    ],
)  # fmt: skip
def test_unknown_keys_are_named_with_their_full_path_and_file(
    tmp_path: Path, snippet: str, key: str
) -> None:
    base = (
        "[[routes]]\npool = 'chat'\n[pools.chat]\nservers = [{address = '10.0.0.1', ports = [1]}]\n"
    )
    path = write(tmp_path, snippet + base if snippet.startswith("bogus") else base + snippet)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    e = info.value
    assert (e.source, e.key) == (path, key)
    assert str(e).startswith(f"{path}: {key}: unknown key")


def test_bad_value_in_a_file_names_file_and_full_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[[routes]]\npool = 'chat'\n[pools.chat]\nservers = [\n"
        "  {address = '10.0.0.1', ports = [8080]},\n"
        "  {address = '10.0.0.2', ports = [70000]},\n]\n",
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: pools.chat.servers[1].ports[0]: ")
    assert "70000" in str(info.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"proxy": [], **minimal()}, "proxy"),
        ({"log": "debug", **minimal()}, "log"),
        ({"routes": {"pool": "chat"}, "pools": minimal()["pools"]}, "routes"),
        ({"routes": ["chat"], "pools": minimal()["pools"]}, "routes[0]"),
        ({"routes": [{"pool": "chat"}], "pools": ["chat"]}, "pools"),
        ({"routes": [{"pool": "chat"}], "pools": {"chat": []}}, "pools.chat"),
        (minimal(servers={"address": "10.0.0.1"}), "pools.chat.servers"),
        (minimal(servers=["10.0.0.1:80"]), "pools.chat.servers[0]"),
    ],
)
def test_wrong_shapes_are_named(data: dict[str, Any], key: str) -> None:
    error(data, key, "must be")


# -- [proxy] -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:8080", Endpoint("127.0.0.1", 8080)),
        ("0.0.0.0:1", Endpoint("0.0.0.0", 1)),
        ("[::1]:8080", Endpoint("::1", 8080)),
        ("[::]:65535", Endpoint("::", 65535)),
        ("[0:0:0:0:0:0:0:1]:80", Endpoint("::1", 80)),
    ],
)
def test_valid_listen_addresses(text: str, endpoint: Endpoint) -> None:
    assert from_mapping(with_proxy(listen=[text])).proxy.listen == (endpoint,)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("localhost:8080", "host names are not resolved"),
        ("example.com:80", "host names are not resolved"),
        ("127.0.0.1", "ip:port"),
        ("::1:8080", "ip:port"),
        (":8080", "ip:port"),
        ("127.0.0.1:", "ip:port"),
        ("127.0.0.1:0", "1-65535"),
        ("127.0.0.1:70000", "1-65535"),
        ("[::1]:0", "1-65535"),
        ("999.1.1.1:80", "IP address"),
    ],
)
def test_invalid_listen_addresses(text: str, fragment: str) -> None:
    error(with_proxy(listen=["127.0.0.1:1", text]), "proxy.listen[1]", fragment)


@pytest.mark.parametrize(
    "listen",
    [
        ["127.0.0.1:80", "127.0.0.2:80", "127.0.0.1:80"],
        ["127.0.0.1:80", "[::1]:80", "[0::0001]:80"],
    ],
)
def test_duplicate_listen_addresses(listen: list[str]) -> None:
    error(with_proxy(listen=listen), "proxy.listen[2]", "twice")


def test_listen_needs_a_non_empty_array_of_addresses() -> None:
    error(with_proxy(listen=[]), "proxy.listen", "at least one")
    error(with_proxy(listen="127.0.0.1:80"), "proxy.listen", "must be an array")
    error(with_proxy(listen=[8080]), "proxy.listen[0]", 'must be "ip:port" or a table')


@pytest.mark.parametrize("workers", [1, 1024, "auto"])
def test_valid_workers(workers: int | str) -> None:
    c = from_mapping(with_proxy(workers=workers))
    assert c.proxy.workers == (len(os.sched_getaffinity(0)) if workers == "auto" else workers)


@pytest.mark.parametrize(
    ("workers", "fragment"),
    [
        (0, "between 1 and 1024"),
        (1025, "between 1 and 1024"),
        (-1, "between 1 and 1024"),
        (True, "boolean"),
        ("4", "must be an integer"),
        ("AUTO", "must be an integer"),
        (2.0, "must be an integer"),
    ],
)
def test_invalid_workers(workers: Any, fragment: str) -> None:
    error(with_proxy(workers=workers), "proxy.workers", fragment)


def test_max_header_bytes_and_max_connections_ranges() -> None:
    error(with_proxy(max_header_bytes=1023), "proxy.max_header_bytes", "between")
    error(with_proxy(max_header_bytes=(1 << 20) + 1), "proxy.max_header_bytes", "between")
    error(with_proxy(max_connections=0), "proxy.max_connections", "between")
    error(with_proxy(max_connections=False), "proxy.max_connections", "boolean")
    error(with_proxy(max_connections="none"), "proxy.max_connections", "must be an integer")
    assert from_mapping(with_proxy(max_connections="auto")).proxy.max_connections is None


def test_log_level() -> None:
    for level in config.LOG_LEVELS:
        assert from_mapping({**minimal(), "log": {"level": level}}).log.level == level
    error({**minimal(), "log": {"level": "verbose"}}, "log.level", "'verbose'")
    error({**minimal(), "log": {"level": 1}}, "log.level", "must be a string")


def test_listeners_with_proxy_protocol_and_pools_that_send_it() -> None:
    data = {
        **minimal(),
        "proxy": {
            "listen": ["127.0.0.1:80", {"address": "[::1]:81", "accept_proxy": True}],
            "trusted_proxies": ["10.0.0.0/8", "2001:db8::1"],
        },
    }
    c = from_mapping(data)
    assert c.proxy.listen == (Endpoint("127.0.0.1", 80), Endpoint("::1", 81))
    assert c.proxy.accept_proxy == frozenset({Endpoint("::1", 81)})
    assert [str(n) for n in c.proxy.trusted_proxies] == ["10.0.0.0/8", "2001:db8::1/128"]
    assert from_mapping(c.to_dict()) == c  # what check prints reads back the same
    proxy = data["proxy"]
    for bad, key, says in (
        ({**proxy, "trusted_proxies": []}, "proxy.trusted_proxies", "is required"),
        ({**proxy, "trusted_proxies": ["10.0.0.0/33"]}, "proxy.trusted_proxies[0]", "CIDR"),
        ({"listen": [{"accept_proxy": True}]}, "proxy.listen[0].address", "is required"),
        ({"listen": [{"address": "1.2.3.4:1", "accept_proxy": 1}]},
         "proxy.listen[0].accept_proxy", "true or false"),
        ({"listen": [{"address": "1.2.3.4:1", "proxy": True}]}, "proxy.listen[0].proxy",
         "unknown key"),
        ({"listen": [80]}, "proxy.listen[0]", "ip:port"),
    ):  # fmt: skip
        error({**minimal(), "proxy": bad}, key, says)
    pool = minimal()["pools"]["chat"]
    sends = from_mapping({**minimal(), "pools": {"chat": {**pool, "send_proxy": "v2"}}})
    assert sends.pools[0].send_proxy == "v2" and from_mapping(sends.to_dict()) == sends
    error({**minimal(), "pools": {"chat": {**pool, "send_proxy": "v1"}}},
          "pools.chat.send_proxy", 'must be "v2"')  # fmt: skip


def test_log_error_budget_and_route_sampling() -> None:
    c = from_mapping(minimal())
    assert (c.log.error_rate, c.log.error_burst, c.routes[0].access_sample) == (20, 100, 1.0)
    c = from_mapping({**minimal(), "log": {"error_rate": 0, "error_burst": 1}})
    assert (c.log.error_rate, c.log.error_burst) == (0, 1)
    error({**minimal(), "log": {"error_rate": -1}}, "log.error_rate", "between 0 and")
    error({**minimal(), "log": {"error_burst": 0}}, "log.error_burst", "between 1 and")
    route = minimal()["routes"][0]
    for value, kept in ((0, 0.0), (0.25, 0.25), (1, 1.0)):
        data = {**minimal(), "routes": [{**route, "access_sample": value}]}
        assert from_mapping(data).routes[0].access_sample == kept
    for bad, says in ((1.5, "from 0 to 1, got 1.5"), (True, "a number"), ("all", "a number")):
        data = {**minimal(), "routes": [{**route, "access_sample": bad}]}
        error(data, "routes[0].access_sample", says)


# -- [[routes]] ----------------------------------------------------------------


def routes(*items: dict[str, Any]) -> dict[str, Any]:
    return {"routes": list(items), "pools": minimal()["pools"]}


def test_routes_are_required() -> None:
    error({"pools": minimal()["pools"]}, "routes", "at least one")
    error(routes(), "routes", "at least one")


def test_pools_are_required() -> None:
    error({"routes": [{"pool": "chat"}]}, "pools", "at least one")
    error({"routes": [{"pool": "chat"}], "pools": {}}, "pools", "at least one")


def test_route_must_name_a_known_pool() -> None:
    error(routes({"host": "*"}), "routes[0].pool", "required")
    e = error(routes({"pool": "chat"}, {"pool": "caht"}), "routes[1].pool", "'caht'")
    assert "chat" in e.reason  # the pools that do exist


@pytest.mark.parametrize(
    ("host", "stored"),
    [
        ("*", "*"),
        ("a.example.com", "a.example.com"),
        ("*.example.com", "*.example.com"),
        ("A.Example.COM", "a.example.com"),
        ("localhost", "localhost"),
    ],
)
def test_valid_route_hosts(host: str, stored: str) -> None:
    assert from_mapping(routes({"host": host, "pool": "chat"})).routes[0].host == stored


@pytest.mark.parametrize(
    "host", ["a:80", "*a", "a.*.com", "**", "*.", "", "a b", "example.com/", "*example.com"]
)
def test_invalid_route_hosts(host: str) -> None:
    error(routes({"pool": "chat"}, {"host": host, "pool": "chat"}), "routes[1].host", "*.domain")


def test_path_prefix_must_start_with_a_slash() -> None:
    (route,) = from_mapping(routes({"path_prefix": "/chat/", "pool": "chat"})).routes
    assert route.path_prefix == "/chat/"
    for prefix in ("chat", "", "*"):
        error(routes({"path_prefix": prefix, "pool": "chat"}), "routes[0].path_prefix", "/")


# -- [pools] -------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["round_robin", "least_conn"])
def test_balance_values(balance: str) -> None:
    assert from_mapping(minimal(balance=balance)).pools[0].balance == balance


@pytest.mark.parametrize("balance", ["roundrobin", "LEAST_CONN", "random", ""])
def test_invalid_balance(balance: str) -> None:
    e = error(minimal(balance=balance), "pools.chat.balance", repr(balance))
    assert "round_robin" in e.reason


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("header:X-User-Id", HashKey("header", "x-user-id")),
        ("cookie:sid", HashKey("cookie", "sid")),
        ("cookie:SID", HashKey("cookie", "SID")),  # cookie names are case-sensitive
        ("query:room", HashKey("query", "room")),
        ("client_ip", HashKey("client_ip")),
    ],
)
def test_hash_key_forms(text: str, parsed: HashKey) -> None:
    pool = from_mapping(minimal(balance="hash", hash_key=text)).pools[0]
    assert pool.hash_key == parsed
    assert str(parsed) == (text.lower() if text.startswith("header:") else text)


@pytest.mark.parametrize(
    "text", ["header", "header:", "cookie:", "query", "client_ip:x", "ip", "body:x", ":x", ""]
)
def test_invalid_hash_keys(text: str) -> None:
    error(minimal(balance="hash", hash_key=text), "pools.chat.hash_key", repr(text))


def test_hash_key_is_required_with_hash_and_only_then() -> None:
    error(minimal(balance="hash"), "pools.chat.hash_key", "required")
    error(minimal(hash_key="client_ip"), "pools.chat.hash_key", "only applies")
    error(minimal(balance="round_robin", hash_key="client_ip"), "pools.chat.hash_key")


# -- servers -------------------------------------------------------------------


def test_server_address_is_an_ip_literal() -> None:
    assert from_mapping(with_server(address="::0001")).pools[0].servers[0].address == "::1"
    e = error(with_server(address="backend.internal"), "pools.chat.servers[0].address")
    assert "host names are not resolved" in e.reason
    error(with_server(address="10.0.0.1:8080"), "pools.chat.servers[0].address", "IP address")
    error(minimal(servers=[{"ports": [1]}]), "pools.chat.servers[0].address", "required")


def test_ports() -> None:
    ports = from_mapping(with_server(ports=[1, 8080, 65535])).pools[0].servers[0].ports
    assert ports == (1, 8080, 65535)
    error(with_server(ports=[]), "pools.chat.servers[0].ports", "at least one")
    error(with_server(ports=[8080, 8080]), "pools.chat.servers[0].ports", "twice")
    error(with_server(ports=[8080, 0]), "pools.chat.servers[0].ports[1]", "1 and 65535")
    error(with_server(ports=[65536]), "pools.chat.servers[0].ports[0]", "65536")
    error(with_server(ports=["80"]), "pools.chat.servers[0].ports[0]", "must be an integer")
    error(with_server(ports=8080), "pools.chat.servers[0].ports", "must be an array")
    error(minimal(servers=[{"address": "10.0.0.1"}]), "pools.chat.servers[0].ports", "required")


def test_weight() -> None:
    for weight in (1, 1000):
        assert from_mapping(with_server(weight=weight)).pools[0].servers[0].weight == weight
    for bad in (0, 1001, -5):
        error(with_server(weight=bad), "pools.chat.servers[0].weight", str(bad))
    error(with_server(weight=True), "pools.chat.servers[0].weight", "boolean")
    error(with_server(weight=1.5), "pools.chat.servers[0].weight", "must be an integer")


def test_servers_are_required() -> None:
    error(minimal(servers=[]), "pools.chat.servers", "at least one")
    error({"routes": [{"pool": "chat"}], "pools": {"chat": {}}}, "pools.chat.servers")


def test_duplicate_server_names_in_a_pool() -> None:
    named = [
        {"name": "a", "address": "10.0.0.1", "ports": [1]},
        {"name": "b", "address": "10.0.0.2", "ports": [1]},
        {"name": "a", "address": "10.0.0.3", "ports": [1]},
    ]
    error(minimal(servers=named), "pools.chat.servers[2].name", "'a'", "twice")
    # Without names, the (canonical) address is the name.
    same_address = [
        {"address": "::1", "ports": [1]},
        {"address": "0::1", "ports": [2]},
    ]
    error(minimal(servers=same_address), "pools.chat.servers[1].name", "twice")


def test_same_server_name_in_two_pools_is_fine() -> None:
    data = minimal()
    data["pools"]["other"] = data["pools"]["chat"]
    c = from_mapping(data)
    assert [p.servers[0].name for p in c.pools] == ["10.0.1.5", "10.0.1.5"]


# -- [upstream] ----------------------------------------------------------------


def with_upstream(**upstream: Any) -> dict[str, Any]:
    return {**minimal(), "upstream": upstream}


def test_upstream_defaults_let_the_kernel_choose() -> None:
    u = from_mapping(minimal()).upstream
    assert u.source_addresses == ()
    assert u.port_range is None  # "auto": the system's range, read at start
    assert u.port_allocator == "auto"


def test_upstream_values_are_kept_and_round_trip() -> None:
    c = from_mapping(
        with_upstream(
            source_addresses=["10.0.0.10", "10.0.0.11"],
            port_range=" 1024 - 65535 ",
            port_allocator="userspace",
        )
    )
    assert c.upstream.source_addresses == ("10.0.0.10", "10.0.0.11")
    assert c.upstream.port_range == config.PortRange(1024, 65535)
    assert len(c.upstream.port_range) == 64512
    assert c.upstream.port_allocator == "userspace"
    d = c.to_dict()
    assert d["upstream"] == {
        "source_addresses": ["10.0.0.10", "10.0.0.11"],
        "port_range": "1024-65535",
        "port_allocator": "userspace",
    }
    assert from_mapping(tomllib.loads(tomli_w.dumps(d))) == c


@pytest.mark.parametrize("text", ["1024", "a-b", "1024-", "0-100", "2000-1000", "1-70000", ""])
def test_invalid_port_ranges(text: str) -> None:
    error(with_upstream(port_range=text), "upstream.port_range", repr(text))


def test_port_range_must_be_a_string() -> None:
    error(with_upstream(port_range=1024), "upstream.port_range", "must be a string")


def test_port_range_needs_a_port_per_worker() -> None:
    data = {**with_upstream(port_range="40000-40002"), "proxy": {"workers": 4}}
    error(data, "upstream.port_range", "3 ports cannot be cut into 4 slices")
    data["proxy"] = {"workers": 3}
    assert len(from_mapping(data).upstream.port_range or ()) == 3


def test_invalid_source_addresses() -> None:
    error(with_upstream(source_addresses="10.0.0.1"), "upstream.source_addresses", "array")
    error(
        with_upstream(source_addresses=["10.0.0.1", "host.example"]),
        "upstream.source_addresses[1]",
        "must be an IP address",
    )
    error(
        with_upstream(source_addresses=["10.0.0.1", "10.0.0.1"]),
        "upstream.source_addresses[1]",
        "listed twice",
    )
    error(with_upstream(source_addresses=["0.0.0.0"]), "upstream.source_addresses[0]", "kernel")


def test_port_allocator_values() -> None:
    for name in config.ALLOCATORS:
        assert from_mapping(with_upstream(port_allocator=name)).upstream.port_allocator == name
    error(with_upstream(port_allocator="bpf"), "upstream.port_allocator", "'bpf'")


def test_a_backend_needs_a_source_address_of_its_family() -> None:
    data = with_upstream(source_addresses=["10.0.0.10"])
    data["pools"]["chat"]["servers"].append({"address": "fd00::5", "ports": [8080]})
    error(data, "pools.chat.servers[1].address", "IPv6 backend fd00::5", "no IPv6 address")
    data["upstream"]["source_addresses"].append("fd00::10")
    assert len(from_mapping(data).upstream.source_addresses) == 2


def test_endpoints_are_listed_once_across_pools() -> None:
    data = minimal()
    data["pools"]["other"] = {"servers": [{"address": "10.0.1.5", "ports": [8080, 8081]}]}
    assert from_mapping(data).endpoints() == (
        Endpoint("10.0.1.5", 8080),
        Endpoint("10.0.1.5", 8081),
    )


# -- [lifecycle] ---------------------------------------------------------------


def test_lifecycle_defaults_and_values() -> None:
    lc = from_mapping(minimal()).lifecycle
    assert (lc.drain_timeout, lc.close_spread, lc.close_wait) == (60.0, 30.0, 5.0)
    data = {**minimal(), "lifecycle": {"close_spread": "0s", "close_wait": "250ms"}}
    lc = from_mapping(data).lifecycle
    assert (lc.close_spread, lc.close_wait) == (0.0, 0.25)
    assert from_mapping(data).to_dict()["lifecycle"]["close_wait"] == "250ms"


def test_lifecycle_errors_name_the_key() -> None:
    error({**minimal(), "lifecycle": {"drain_timeout": "0s"}}, "lifecycle.drain_timeout", "zero")
    error({**minimal(), "lifecycle": {"close_wait": "soon"}}, "lifecycle.close_wait", "'soon'")
    error({**minimal(), "lifecycle": {"spread": "1s"}}, "lifecycle.spread", "unknown key")


# -- [pools.NAME.health] -------------------------------------------------------


def test_health_defaults_and_round_trip() -> None:
    c = from_mapping(minimal(health={"kind": "websocket", "path": "/ws"}))
    h = c.pools[0].health
    assert h is not None
    assert (h.kind, h.path, h.expect, h.interval, h.timeout, h.rise, h.fall) == (
        "websocket",
        "/ws",
        200,
        2.0,
        1.0,
        2,
        3,
    )
    assert h.on_server_down == "keep"
    assert from_mapping(tomllib.loads(tomli_w.dumps(c.to_dict()))) == c
    assert from_mapping(minimal()).pools[0].health is None


@pytest.mark.parametrize(
    ("health", "key", "fragment"),
    [
        ({}, "pools.chat.health.kind", "is required"),
        ({"kind": "icmp"}, "pools.chat.health.kind", "'icmp'"),
        ({"kind": "http", "path": "health"}, "pools.chat.health.path", "must start"),
        ({"kind": "http", "expect": 700}, "pools.chat.health.expect", "between"),
        ({"kind": "tcp", "rise": 0}, "pools.chat.health.rise", "between"),
        ({"kind": "tcp", "fall": "3"}, "pools.chat.health.fall", "integer"),
        ({"kind": "tcp", "interval": "0s"}, "pools.chat.health.interval", "zero"),
        (
            {"kind": "tcp", "interval": "1s", "timeout": "2s"},
            "pools.chat.health.timeout",
            "interval",
        ),
        ({"kind": "tcp", "on_server_down": "drop"}, "pools.chat.health.on_server_down", "drop"),
        ({"kind": "tcp", "port": 80}, "pools.chat.health.port", "unknown key"),
    ],
)
def test_health_errors_name_the_key(health: dict[str, Any], key: str, fragment: str) -> None:
    error(minimal(health=health), key, fragment)


def test_reload_drain_after_is_never_or_a_duration() -> None:
    assert from_mapping(minimal()).lifecycle.reload_drain_after is None
    data = {**minimal(), "lifecycle": {"reload_drain_after": "10m"}}
    assert from_mapping(data).lifecycle.reload_drain_after == 600.0
    assert from_mapping(from_mapping(data).to_dict()) == from_mapping(data)
    assert from_mapping(minimal()).to_dict()["lifecycle"]["reload_drain_after"] == "never"
    error(
        {**minimal(), "lifecycle": {"reload_drain_after": "later"}},
        "lifecycle.reload_drain_after",
        "'later'",
    )


def test_keepalive_defaults_and_errors() -> None:
    k = from_mapping(minimal()).keepalive
    assert (k.tcp_idle, k.tcp_interval, k.tcp_count) == (60.0, 10.0, 6)
    assert from_mapping({**minimal(), "keepalive": {"tcp_idle": "0s"}}).keepalive.tcp_idle == 0
    error({**minimal(), "keepalive": {"tcp_count": 0}}, "keepalive.tcp_count", "between")
    error({**minimal(), "keepalive": {"tcp_interval": "0s"}}, "keepalive.tcp_interval", "zero")
    assert (k.ping_interval, k.ping_timeout) == (0.0, 10.0)
    pings = from_mapping({**minimal(), "keepalive": {"ping_interval": "30s"}}).keepalive
    assert pings.ping_interval == 30.0
    error({**minimal(), "keepalive": {"ping_timeout": "0s"}}, "keepalive.ping_timeout", "zero")
    error({**minimal(), "keepalive": {"ping": "30s"}}, "keepalive.ping", "unknown")


def test_admin_listener_is_off_unless_set() -> None:
    a = from_mapping(minimal()).admin
    assert (a.listen, a.token) == (None, "")
    data = {**minimal(), "admin": {"listen": "127.0.0.1:9900", "token": "t"}}
    a = from_mapping(data).admin
    assert (a.listen, a.token) == (Endpoint("127.0.0.1", 9900), "t")
    assert from_mapping(from_mapping(data).to_dict()) == from_mapping(data)
    error({**minimal(), "admin": {"listen": "localhost:9900"}}, "admin.listen", "IP address")
    clash = {**minimal(), "admin": {"listen": "0.0.0.0:8080"}}
    error(clash, "admin.listen", "also in proxy.listen")


def test_log_file_is_stdout_or_an_absolute_path() -> None:
    assert from_mapping(minimal()).log.file == ""
    data = {**minimal(), "log": {"file": "/var/log/shardproxy.log"}}
    assert from_mapping(data).log.file == "/var/log/shardproxy.log"
    error({**minimal(), "log": {"file": "shardproxy.log"}}, "log.file", "absolute path")
