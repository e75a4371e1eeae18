"""Child processes of the orchestrator, spoken to by lines; free ports."""

from __future__ import annotations

import errno
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from shardproxy.control.addrplan import read_system_port_range

REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The run cannot go on; ``str()`` says why."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pick_port(
    host: str = "127.0.0.1", lo: int = 20000, hi: int = 32000, avoid: set[int] | None = None
) -> int:
    """A port below the ephemeral range that nothing uses now, TIME_WAIT included.

    The test bind is made without SO_REUSEADDR, so a port with leftover
    TIME_WAIT tuples from an earlier run fails it and is skipped.
    """
    avoid = avoid or set()
    for _ in range(200):
        port = random.randint(lo, hi)
        if port in avoid:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            raise
        finally:
            s.close()
        return port
    raise BenchError(f"no free port found on {host} in {lo}-{hi}")


class LineProcess:
    """A child whose stdout is read line by line with timeouts, stdin written by line."""

    def __init__(self, name: str, argv: list[str], *, stdin: bool = True) -> None:
        self.name = name
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # passes through: diagnostics reach the operator
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self.seen: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str | None:
        """The next line, or None at EOF; raises BenchError on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:g}s")
            r, _, _ = select.select([self._fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode(errors="replace")
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode(errors="replace").rstrip("\r")
        self.seen.append(text)
        return text

    def expect(self, word: str, timeout: float) -> list[str]:
        """Read lines until one whose first word is ``word``; its words."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                code = self.proc.poll()
                raise BenchError(
                    f"{self.name}: ended (exit {code}) before saying {word!r}; "
                    f"last lines: {self.seen[-5:]}"
                )
            words = line.split(" ", 4)
            if words and words[0] == word:
                return words

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{self.name}: gone (exit {self.proc.poll()})") from None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Ask politely (closing stdin, then ``sig``), then kill; the exit code."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        return stop_process(self.proc, timeout, sig)


KILL_WAIT = 120.0  # seconds for a SIGKILLed process to be gone


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM, grace: float = 1.0
) -> int:
    """Wait ``grace`` seconds for it to leave on its own, then ``sig``, then
    SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: pid {proc.pid} ignored signal {sig}; killing", file=sys.stderr)
                proc.kill()
                # A killed process is gone once the kernel has torn down its
                # sockets: tens of thousands of them take many seconds on a
                # busy machine (beyond64k's generators at 500,000 tunnels).
                proc.wait(KILL_WAIT)
    for stream in (proc.stdout, proc.stdin):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    return proc.returncode


@dataclass(frozen=True)
class Upstream:
    """Where a proxy's upstream connections come from: the source addresses
    to spread them over (empty: the kernel's choice) and the port range
    (``"auto"``: the system's, or ``"FIRST-LAST"``). ``allocator`` is
    shardproxy's ``port_allocator``. The default is how every scenario but
    beyond64k runs: one source, nothing written to the configs."""

    sources: tuple[str, ...] = ()
    port_range: str = "auto"
    allocator: str = "auto"

    def ports(self) -> tuple[int, int]:
        """The range's first and last port (the system's for ``"auto"``)."""
        if self.port_range == "auto":
            return read_system_port_range()
        first, _, last = self.port_range.partition("-")
        return int(first), int(last)


class TargetBase:
    """What every benchmark target is given (see ``bench.targets.Target``):
    a private work directory, where to listen, the backend, how many workers,
    a log level, where upstream connections come from; its config and log
    live in the work directory."""

    name = "target"
    config_file = "target.conf"
    stop_signal = signal.SIGTERM  # the one that ends the target without delay

    def __init__(
        self,
        workdir: Path,
        *,
        listen: tuple[str, int],
        backend: tuple[str, int],
        workers: int,
        log_level: str = "info",
        access_log: bool = True,
        upstream: Upstream | None = None,
    ) -> None:
        if workers < 1:
            raise BenchError(f"{self.name}: workers must be >= 1, not {workers}")
        self.workdir = workdir
        self.listen = listen
        self.backend = backend
        self.workers = workers
        self.log_level = log_level
        self.access_log = access_log  # one line per connection, as operators run them
        self.upstream = upstream or Upstream()
        self.config_path = workdir / self.config_file
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect."""
        return self.listen

    def _ready(self) -> bool:
        """Whether the started target serves (each target says how it knows)."""
        raise NotImplementedError

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Until :meth:`_ready`; seconds waited. BenchError if the process
        exits first or the time runs out, with the end of its log."""
        assert self.proc is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited ({self.proc.returncode}) before it was ready: "
                    f"{self.log_tail(5)}"
                )
            if self._ready():
                return time.monotonic() - started
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready within {timeout:g}s: {self.log_tail(5)}")

    def plan(self) -> dict[str, Any] | None:
        """The upstream tuple arithmetic of the generated config (how many
        tunnels its source addresses, ports and descriptors allow); None when
        the target has nothing to say."""
        return None

    def log_tail(self, n: int) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return []

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """``stop_signal`` to the main process (open tunnels are cut), wait;
        SIGKILL after ``timeout``; then no child may outlive it. How it went."""
        if self.proc is None:
            return {"exit_code": None}
        started = time.monotonic()
        running = self.proc.poll() is None
        kids = self.processes()[1:]
        code = stop_process(self.proc, timeout, self.stop_signal, grace=0.0)
        leftovers = []
        for k in kids:  # workers must not outlive their parent
            try:
                k.wait(5)
            except psutil.TimeoutExpired:
                leftovers.append(k.pid)
                k.kill()
            except psutil.Error:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return {
            "exit_code": code,
            "was_running": running,
            "seconds": round(time.monotonic() - started, 2),
            "leftover_workers_killed": leftovers,
        }
