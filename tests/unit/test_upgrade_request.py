"""UpgradeRequest's header lookups: the one-pass lookup a tunnel's placement
uses gives what the two lookups give, for any headers (repeated, absent, in
any order, any value)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardproxy.protocol.upgrade import UpgradeRequest

names = st.sampled_from([b"user-agent", b"x-forwarded-for", b"host", b"x-forwarded-proto"])
values = (
    st.binary(max_size=20)
    | st.ip_addresses().map(lambda a: str(a).encode())
    | st.lists(st.ip_addresses().map(lambda a: str(a).encode()), min_size=1, max_size=3).map(
        b" , ".join
    )
)


@given(st.lists(st.tuples(names, values), max_size=6))
def test_the_one_pass_lookup_is_the_two_lookups(headers: list[tuple[bytes, bytes]]) -> None:
    request = UpgradeRequest(b"GET", b"/", tuple(headers), tuple(headers), host="h", path="/")
    both = request.user_agent_and_forwarded_ip()
    assert both == (request.user_agent(), request.forwarded_ip())
