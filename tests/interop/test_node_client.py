"""A second, independent client: Node's ``ws`` package, through a real
``shardproxy run`` to a ``websockets`` echo backend.

The client is ``tests/node/ws_client.mjs``; ``scripts/install-node-deps``
installs Node and its ``node_modules``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Proxy, free_port
from peers import WsBackend, parse_json_lines
from tlscerts import TestCA

NODE_DIR = REPO / "tests" / "node"
CLIENT = NODE_DIR / "ws_client.mjs"

# What the conversation in ws_client.mjs sends, counted as data messages (what
# the proxy's frame tracker counts): the ping, its pong and the close
# handshake are control frames, not messages.
CONVERSATION_MESSAGES = (
    2  # text echo: one ASCII, one non-ASCII
    + 1  # 100 KiB of random bytes
    + 1  # 5 MiB of random bytes
    + 50  # the back-to-back burst
)
CONVERSATION_CHECKS = [
    "open",
    "text-echo-ascii",
    "text-echo-non-ascii",
    "binary-echo-100KiB",
    "binary-echo-5MiB",
    "ping-pong",
    "burst-50-in-order",
    "close",
]
CLOSE_CODE = 4100
CONCURRENT = 200


def node() -> str:
    exe = shutil.which("node")
    if exe is None or not (NODE_DIR / "node_modules" / "ws" / "package.json").is_file():
        pytest.fail(
            f"node ({exe or 'not on PATH'}) or tests/node/node_modules/ws is missing: "
            "run scripts/install-node-deps",
            pytrace=False,
        )
    return exe


def run_client(
    exe: str, url: str, *args: str, env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ws_client.mjs (with ``env`` added to the environment); return
    its check lines and its summary line."""
    proc = subprocess.run(
        [exe, str(CLIENT), url, *args],
        cwd=NODE_DIR,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,  # the client has its own 20 s overall timeout
    )
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = parse_json_lines(proc.stdout)
    assert proc.returncode == 0, report
    assert lines and "check" not in lines[-1], report
    checks, summary = lines[:-1], lines[-1]
    assert summary["ok"] is True, report
    assert checks and all(c["ok"] is True for c in checks), report
    return checks, summary


def test_node_ws_conversation(start_proxy: Callable[..., Proxy]) -> None:
    exe = node()
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], workers=2)
        checks, summary = run_client(exe, proxy.url + "/echo")

        by_name = {c["check"]: c for c in checks}
        assert [c["check"] for c in checks] == CONVERSATION_CHECKS, checks
        assert by_name["close"]["code"] == CLOSE_CODE, by_name["close"]
        assert summary["sent"]["messages"] == CONVERSATION_MESSAGES, summary
        assert summary["received"]["messages"] == CONVERSATION_MESSAGES, summary
        # The backend saw the client's close code through the proxy.
        assert backend.wait_close_code(CLOSE_CODE), "the backend did not record 4100"
        assert backend.close_codes == [CLOSE_CODE]

    port = summary["local_port"]
    closed = proxy.wait_for(
        lambda evs: [
            e
            for e in evs
            if e.get("event", {}).get("action") == "tunnel-closed"
            and e.get("client", {}).get("port") == port
        ],
        f"the tunnel-closed event of client port {port}",
    )
    assert len(closed) == 1, closed
    sp = closed[0]["shardproxy"]
    assert closed[0]["url"]["path"] == "/echo", closed[0]
    assert sp["outcome"] == "closed", sp
    assert sp["close"]["client_code"] == CLOSE_CODE, sp
    assert sp["close"]["backend_code"] == CLOSE_CODE, sp
    assert sp["messages"]["up"] == CONVERSATION_MESSAGES, sp
    assert sp["messages"]["down"] == CONVERSATION_MESSAGES, sp


def test_node_ws_concurrent_connections(start_proxy: Callable[..., Proxy]) -> None:
    exe = node()
    with WsBackend() as backend:
        proxy = start_proxy([backend.port], workers=2)
        checks, _ = run_client(exe, proxy.url + "/echo", "--count", str(CONCURRENT))
        assert len(checks) == 1, checks
        assert checks[0]["succeeded"] == CONCURRENT, checks[0]

        closed = proxy.wait_for(
            lambda evs: (
                (c := [e for e in evs if e.get("event", {}).get("action") == "tunnel-closed"])
                and len(c) >= CONCURRENT
                and c
            ),
            f"{CONCURRENT} tunnel-closed events",
        )
    assert len(closed) == CONCURRENT
    outcomes = {
        (
            e["shardproxy"]["outcome"],
            e["shardproxy"]["close"]["client_code"],
            e["shardproxy"]["messages"]["up"],
            e["shardproxy"]["messages"]["down"],
        )
        for e in closed
    }
    assert outcomes == {("closed", 1000, 1, 1)}, outcomes


@pytest.mark.usefixtures("proxy_engine")  # on both engines: the relay's TLS path
def test_node_ws_conversation_over_wss(start_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    """The same conversation over wss://, Node trusting the tests' CA
    (NODE_EXTRA_CA_CERTS): 5 MiB messages cross many TLS records."""
    exe = node()
    ca = TestCA(tmp_path)
    leaf = ca.issue(["localhost"], stem="localhost")
    port = free_port()
    pair = f'{{ cert = "{leaf.cert}", key = "{leaf.key}" }}'
    with WsBackend() as backend:
        proxy = start_proxy(
            [backend.port],
            port=port,
            proxy={"listen": [{"address": f"127.0.0.1:{port}", "tls": "edge"}]},
            extra=f"\n[tls.edge]\ncertificates = [{pair}]\n",
            handshake_engine="python",
        )
        checks, summary = run_client(
            exe, f"wss://localhost:{port}/echo", env={"NODE_EXTRA_CA_CERTS": str(ca.ca_file)}
        )
        assert [c["check"] for c in checks] == CONVERSATION_CHECKS, checks
        assert summary["received"]["messages"] == CONVERSATION_MESSAGES, summary
        assert backend.wait_close_code(CLOSE_CODE), "the backend did not record 4100"
    closed = proxy.wait_for(lambda _: proxy.actions("tunnel-closed"), "the tunnel-closed event")
    assert closed[0]["tls"]["client"]["server_name"] == "localhost"
    assert closed[0]["shardproxy"]["messages"]["down"] == CONVERSATION_MESSAGES
