"""deploy/anycast: BIRD announces the service prefix while /healthz is 200
and withdraws it at a drain, before the first tunnel is closed. Two BIRDs
in network namespaces (a router and a node running shardproxy) hold a real
BGP session; the router's table is what is checked."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from conftest import REPO, needs_namespaces

ROOT = REPO
ANYCAST = ROOT / "deploy" / "anycast"
ROUTER, NODE = "spbgp-router", "spbgp-node"
SERVICE = "198.18.1.1"  # the values deploy/anycast/bird.conf defines
pytestmark = needs_namespaces


def test_the_shipped_config_parses() -> None:
    bird = shutil.which("bird", path="/usr/sbin:/sbin:/usr/bin")
    assert bird, "bird2 is installed by scripts/install-ha-deps"
    out = subprocess.run([bird, "-p", "-c", str(ANYCAST / "bird.conf")], capture_output=True)
    assert out.returncode == 0, out.stderr


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    def remove() -> None:
        for ns in (ROUTER, NODE):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                subprocess.run(["kill", "-KILL", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    remove()
    try:
        for ns in (ROUTER, NODE):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "eth0", "netns", ROUTER, "type", "veth", "peer", "name", "eth0",
           "netns", NODE)  # fmt: skip
        for ns, address in ((ROUTER, "198.18.2.1/24"), (NODE, "198.18.2.2/24")):
            sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", NODE, "addr", "add", f"{SERVICE}/32", "dev", "lo")
        yield
    finally:
        remove()


def announced(router_socket: Path) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", ROUTER, "birdc", "-s", str(router_socket), "show", "route",
         f"{SERVICE}/32"],
        capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    return f"{SERVICE}/32" in out and "unicast" in out


def established(router_socket: Path) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", ROUTER, "birdc", "-s", str(router_socket), "show", "protocols",
         "node"],
        capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    return "Established" in out


def wait(predicate: Callable[[], bool], limit: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < limit, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.time()


def test_announced_while_healthy_withdrawn_before_the_drain(tmp_path: Path) -> None:
    router_conf = tmp_path / "router.conf"
    router_conf.write_text(
        "router id 198.18.2.1;\nprotocol device {}\n"
        "protocol bgp node { local as 65000; neighbor 198.18.2.2 as 65010;\n"
        "  ipv4 { import all; export none; }; }\n"
    )
    config = tmp_path / "node.toml"
    config.write_text(
        f'[proxy]\nlisten = ["{SERVICE}:8080"]\nworkers = 1\n'
        '[lifecycle]\ndrain_delay = "4s"\nclose_spread = "0s"\n'
        '[admin]\nlisten = "127.0.0.1:9900"\n'
        '[[routes]]\npool = "p"\n[pools.p]\nservers = [{ address = "127.0.0.1", ports = [9] }]\n'
    )
    log = tmp_path / "node.log"
    with namespaces(), open(log, "wb") as out:
        run = ["ip", "netns", "exec"]
        procs = [
            subprocess.Popen([*run, ROUTER, "bird", "-f", "-c", str(router_conf),
                              "-s", str(tmp_path / "router.ctl"), "-P", str(tmp_path / "r.pid")]),
            subprocess.Popen([*run, NODE, "bird", "-f", "-c", str(ANYCAST / "bird.conf"),
                              "-s", str(tmp_path / "node.ctl"), "-P", str(tmp_path / "n.pid")]),
            subprocess.Popen([*run, NODE, str(ANYCAST / "anycast-healthcheck"), "127.0.0.1:9900",
                              str(tmp_path / "node.ctl"), "0.2"], stdout=subprocess.DEVNULL),
        ]  # fmt: skip
        try:
            wait(lambda: established(tmp_path / "router.ctl"), 60, "the BGP session")
            time.sleep(1)  # the check ran a few times: no shardproxy, nothing announced
            assert not announced(tmp_path / "router.ctl")
            proxy = subprocess.Popen(
                [*run, NODE, sys.executable, "-m", "shardproxy", "run", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            procs.append(proxy)
            wait(lambda: announced(tmp_path / "router.ctl"), 60, "the route at the router")
            proxy.send_signal(signal.SIGTERM)
            withdrawn = wait(lambda: not announced(tmp_path / "router.ctl"), 10, "withdrawal")
            assert proxy.wait(30) == 0
        finally:
            for p in procs:
                p.kill()
                p.wait()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    drains = [e for e in events if e["event"]["action"] == "drain-start"]
    assert drains, "the worker never started draining"
    started = datetime.fromisoformat(drains[0]["@timestamp"]).timestamp()
    assert withdrawn < started  # the router stopped routing here before any close
