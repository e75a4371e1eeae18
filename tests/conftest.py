"""Run a real ``shardproxy run`` subprocess for integration tests."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w
from engines import ENGINES, current
from peers import parse_json_lines

from shardproxy.engine.choice import COMPILED, ENGINE
from shardproxy.host.rlimits import raise_nofile_limit

START_TIMEOUT = 20.0
REPO = Path(__file__).resolve().parent.parent  # the checkout
# Tests are grouped by kind, one folder each; the folder is the marker
# (``pytest -m unit`` runs the unit tests alone, in seconds).
KINDS = ("unit", "engine", "e2e", "interop", "lab", "kit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        assert kind in KINDS, f"{item.nodeid}: a test belongs in one of {KINDS}"
        item.add_marker(kind)


# Some tests hold thousands of sockets in this process (clients and the
# websockets backend): use the whole descriptor allowance, as the proxy does.
raise_nofile_limit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_config(
    backends: list[int],
    *,
    port: int,
    workers: int = 2,
    proxy: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    one_server: bool = False,
    extra: str = "",
) -> str:
    """One pool "main" with a server per backend port on 127.0.0.1, or with
    ``one_server`` a single server listening on all of them."""
    proxy_table = {"listen": [f"127.0.0.1:{port}"], "workers": workers, **(proxy or {})}
    if one_server:
        servers = f'{{ name = "b", address = "127.0.0.1", ports = {backends} }}'
    else:
        servers = ", ".join(
            f'{{ name = "b{i}", address = "127.0.0.1", ports = [{p}] }}'
            for i, p in enumerate(backends)
        )
    tables = {"proxy": proxy_table, **({"upstream": upstream} if upstream else {})}
    return (
        f"{tomli_w.dumps(tables)}\n"
        '[[routes]]\nhost = "*"\npath_prefix = "/"\npool = "main"\n\n'
        f"[pools.main]\nservers = [{servers}]\n{extra}"
    )


class Proxy:
    """A running ``shardproxy run -c FILE`` and its JSON log."""

    def __init__(
        self, config_path: Path, port: int, workers: int, handshake_engine: str | None = None
    ) -> None:
        """``handshake_engine``: the one the workers must say they run when
        it is not the engine's own (a TLS listener's is the Python one)."""
        self.port = port
        self.workers = workers
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardproxy", "run", "-c", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._started(workers, handshake_engine)
        except BaseException:  # no one else holds it yet: a failed start leaves nothing running
            self.stop()
            raise

    def _started(self, workers: int, handshake_engine: str | None) -> None:
        """Every worker ready, on the engine the test asked for: the
        supervisor's worker-ready for each, and each worker's own, which
        says its engines (the two lines come in either order: a test that
        took worker_pids after the supervisor's alone once missed one)."""

        def ready(evs: list[dict[str, Any]]) -> bool:
            said = [e for e in evs if e.get("event", {}).get("action") == "worker-ready"]
            by_supervisor = sum(1 for e in said if e.get("process", {}).get("name") == "supervisor")
            slots = {
                e.get("shardproxy", {}).get("worker")
                for e in said
                if e.get("process", {}).get("name") == "worker"
            }
            return by_supervisor >= workers and len(slots) >= workers

        self.wait_for(ready, what="every worker ready")
        expected = "python" if os.environ.get("SHARDPROXY_PURE") == "1" else ENGINE
        engines = {
            e.get("shardproxy", {}).get("engine")
            for e in self.actions("worker-ready")
            if e.get("process", {}).get("name") == "worker"
        }
        assert engines == {expected}, f"workers run {engines}, not {expected!r}"
        handshakes = {
            e.get("shardproxy", {}).get("handshake_engine")
            for e in self.actions("worker-ready")
            if e.get("process", {}).get("name") == "worker"
        }
        expected = handshake_engine or expected
        assert handshakes == {expected}, f"workers' handshakes run {handshakes}, not {expected!r}"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        return parse_json_lines(self.log_path.read_text(errors="replace"))

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event", {}).get("action") == action]

    def wait_for(
        self,
        predicate: Callable[[list[dict[str, Any]]], Any],
        what: str,
        timeout: float = START_TIMEOUT,
    ) -> Any:
        """Poll the log until ``predicate(events)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate(self.events())
            if result:
                return result
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise AssertionError(f"timed out waiting for {what}; log tail:\n{tail}")

    def worker_pids(self) -> dict[int, int]:
        """slot → pid of the worker currently serving it."""
        pids: dict[int, int] = {}
        for e in self.actions("worker-ready"):
            if e.get("process", {}).get("name") == "worker":
                pids[e["shardproxy"]["worker"]] = e["process"]["pid"]
        return pids

    def rss(self) -> int:
        """Resident memory of the supervisor and every worker, in bytes."""
        parent = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])

    def stop(self, signum: int = signal.SIGQUIT) -> int:
        """Stop it (by default at once: SIGTERM would drain open tunnels over
        close_spread); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Factory: ``start_proxy(backend_ports, workers=2, port=0, proxy={...}, extra=...)``."""
    started: list[Proxy] = []

    def start(
        backends: list[int],
        *,
        workers: int = 2,
        port: int = 0,
        handshake_engine: str | None = None,
        **kw: Any,
    ) -> Proxy:
        port = port or free_port()
        path = tmp_path / f"shardproxy-{len(started)}.toml"
        path.write_text(toml_config(backends, port=port, workers=workers, **kw))
        proxy = Proxy(path, port, workers, handshake_engine)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def _why_no_namespaces() -> str | None:
    """Why this machine cannot build network namespaces, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = subprocess.run(["ip", "netns", "add", "splab-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "splab-probe"], capture_output=True)
    return None


_NO_NAMESPACES = _why_no_namespaces()
# The lab tests (test_ha.py, test_anycast.py) are skipped with the reason,
# never passed, where namespaces cannot be made.
needs_namespaces = pytest.mark.skipif(_NO_NAMESPACES is not None, reason=_NO_NAMESPACES or "")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The websockets client honours HTTP(S)_PROXY; the tests talk to loopback only.
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


# -- both engines ------------------------------------------------------------
# A module whose tests must run once per engine says
# ``pytestmark = pytest.mark.usefixtures("engine_kind")``; the harnesses
# build their engines from ``engines.current``. A white-box test of the
# Python engine's own objects is marked ``python_engine_only``.


@pytest.fixture(params=ENGINES)
def proxy_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The engine the proxies a test starts run: each of ENGINES in turn
    (SHARDPROXY_PURE=1 for the Python one). :class:`Proxy` checks that
    every worker says it runs the engine asked for.

    Every other end-to-end test runs the compiled engine only (the default
    where it was built). Those on both are the ones whose behaviour lives in
    the relay: e2e/test_proxy.py (frames, close codes, forwarded headers,
    2,000 clients, backpressure), test_keepalive.py (pings, Pong filtering,
    long frames), test_lifecycle.py (drain at frame boundaries, spread),
    test_reload.py (hand-over), interop/test_proxy_protocol.py, and single
    tests in test_supervisor.py (worker replacement after SIGKILL),
    test_metrics.py, test_health.py (Close 1001 when a server goes down),
    test_ecs.py (every access event field) and test_autobahn.py (Pongs of
    Autobahn's client stop at the proxy), and e2e/test_bad_input.py (every
    bad-input answer and timeout, through :func:`module_proxy_engine`).
    About three minutes of CI."""
    name: str = request.param
    _run_engine(monkeypatch, name)
    return name


@pytest.fixture(scope="module", params=ENGINES)
def module_proxy_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """:func:`proxy_engine` for a module whose tests share one proxy (a
    module-scoped fixture that depends on this one): the module's tests
    run once per engine."""
    name: str = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        _run_engine(monkeypatch, name)
        yield name


def _run_engine(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Proxies started from now on run engine ``name``."""
    if name == "compiled":
        if COMPILED is None:
            pytest.skip("the compiled engine was not built")
        monkeypatch.delenv("SHARDPROXY_PURE", raising=False)
    else:
        monkeypatch.setenv("SHARDPROXY_PURE", "1")


@pytest.fixture(params=ENGINES)
def engine_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """The engine a test runs: each of ENGINES in turn; no descriptor may be
    left open after it (the engine closes what it was given)."""
    name: str = request.param
    if name == "compiled":
        if COMPILED is None:
            pytest.skip("the compiled engine was not built")
        if request.node.get_closest_marker("python_engine_only"):
            pytest.skip("white-box test of the Python engine")
    current.name = name
    before = len(os.listdir("/proc/self/fd"))
    try:
        yield name
    finally:
        current.name = "python"
    # The tests' peers (helper servers in threads) may close their sockets a
    # moment after a test returned, this one's or an earlier one's (then
    # fewer are open after than before); a descriptor the engine leaked
    # stays open.
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()  # sockets a failed test's traceback held
        after = len(os.listdir("/proc/self/fd"))
        if after <= before or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert after <= before, f"{after - before} descriptors left open by the {name} engine's test"
