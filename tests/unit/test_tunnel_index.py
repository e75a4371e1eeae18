"""The worker's tunnel index (worker/tunnels.py): intrusive lists by
endpoint and by client address, checked against a plain model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardproxy.policy.admission import Admission
from shardproxy.worker.tunnels import TunnelIndex, TunnelRecord

ENDPOINTS = ("e0", "e1", "e2")  # stand-ins: the index only hashes them
CLIENTS = ("10.0.0.1", "10.0.0.2", "2001:db8::1")


def record(admission: Admission, client: str, endpoint: str) -> TunnelRecord:
    r = admission.lease(client)
    assert isinstance(r, TunnelRecord)
    r.endpoint = endpoint  # type: ignore[assignment]
    return r


def test_one_tunnel_in_and_out() -> None:
    admission = Admission(10, TunnelRecord)
    index = TunnelIndex()
    r = record(admission, "10.0.0.1", "e0")
    index.remove(r)  # not in: nothing happens
    index.add(r, 7)
    assert (len(index), r.tunnel) == (1, 7)
    assert index.of_endpoint("e0") == [r] and index.of_client("10.0.0.1") == [r]
    assert list(index.clients()) == ["10.0.0.1"]
    index.remove(r)
    index.remove(r)  # twice: still nothing
    assert len(index) == 0 and index.of_endpoint("e0") == [] and list(index.clients()) == []


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from(CLIENTS), st.sampled_from(ENDPOINTS)),
        max_size=60,
    ),
    st.randoms(),
)
def test_the_index_agrees_with_a_model(ops: list[tuple[bool, str, str]], rnd) -> None:  # type: ignore[no-untyped-def]
    admission = Admission(1000, TunnelRecord)
    index = TunnelIndex()
    live: list[TunnelRecord] = []
    for i, (add, client, endpoint) in enumerate(ops):
        if add or not live:
            r = record(admission, client, endpoint)
            index.add(r, i + 1)
            live.append(r)
        else:
            r = live.pop(rnd.randrange(len(live)))
            index.remove(r)
        assert len(index) == len(live)
        for e in ENDPOINTS:
            assert {x.tunnel for x in index.of_endpoint(e)} == {
                x.tunnel for x in live if x.endpoint == e
            }
        for c in CLIENTS:
            assert {x.tunnel for x in index.of_client(c)} == {
                x.tunnel for x in live if x.client_ip == c
            }
        assert set(index.clients()) == {x.client_ip for x in live}
