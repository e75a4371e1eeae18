"""The peers shardproxy is measured against: HAProxy and nginx from Debian's
packages (installed by ``scripts/install-bench-peers``), each run in the
foreground from its own binary with a config generated to match shardproxy's
setup: same backend, same number of workers (nginx) or threads (HAProxy), no
idle timeout on tunnels shorter than an hour. They follow the
:class:`bench.targets.Target` shape.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import resource
import shutil
import socket
import subprocess
from typing import Any

import psutil

from .procs import BenchError, TargetBase

INSTALL_HINT = "run scripts/install-bench-peers"
# Asked of listen(); Linux silently caps it at net.core.somaxconn.
LISTEN_BACKLOG = 65535
# Tunnels must never idle out during a run.
TUNNEL_TIMEOUT = "1h"
# shardproxy's log levels → nginx error_log levels (nginx's "info" logs every
# client close: more than shardproxy logs at "info")
NGINX_LEVELS = {"debug": "info", "info": "warn", "warning": "warn", "error": "error"}


def fd_hard_limit() -> int:
    """RLIMIT_NOFILE's hard limit (what a child may raise its soft limit to)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else int(hard)


def find_binary(name: str) -> str:
    """Path of a peer's binary (``/usr/sbin`` included); BenchError if missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise BenchError(f"{name} not found; {INSTALL_HINT}")
    return found


def accepts(address: tuple[str, int], timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``address`` is accepted (closed at once)."""
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def package_version(package: str) -> str | None:
    """The installed Debian package's version, if dpkg knows it."""
    try:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


class _Peer(TargetBase):
    """A proxy run from its own binary with a generated config, in the
    foreground, its output in ``<workdir>/<name>.log``. Subclasses say how to
    check the config, how to start, and which process does what."""

    name = "peer"
    binary = ""
    config_file = ""
    package = ""

    def config_text(self) -> str:
        raise NotImplementedError

    def check_command(self) -> list[str]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def _workers_up(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        find_binary(self.binary)  # a clear message if missing
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        check = subprocess.run(
            self.check_command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode != 0:
            out = (check.stdout + check.stderr).strip()
            raise BenchError(f"{self.name} rejected the config {self.config_path}: {out}")
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the bench is the bench's to handle
        )

    def events(self) -> list[dict[str, Any]]:
        """Structured log events: peers have none (their log is plain text)."""
        return []

    def _ready(self) -> bool:
        """Every worker is up and the listen address accepts."""
        return self._workers_up() and accepts(self.address)

    @staticmethod
    def is_worker(role: str) -> bool:
        return role.startswith("worker")

    def limits(self) -> dict[str, Any]:
        """Descriptor limits the run works under (recorded with the version)."""
        return {"fd_limit_per_process": fd_hard_limit()}

    def _version_text(self) -> str:
        r = subprocess.run(
            [find_binary(self.binary), "-v"], capture_output=True, text=True, timeout=30
        )
        return (r.stdout + r.stderr).strip()

    def _parse_version(self, text: str) -> str | None:
        raise NotImplementedError

    def version(self) -> dict[str, Any]:
        text = self._version_text()
        out: dict[str, Any] = {
            "name": self.name,
            "version": self._parse_version(text),
            "package": self.package,
            "package_version": package_version(self.package),
            "binary": find_binary(self.binary),
            "limits": self.limits(),
        }
        if out["version"] is None:
            raise BenchError(f"cannot read {self.name}'s version from {text!r}")
        return out


class HAProxy(_Peer):
    """HAProxy in master-worker mode, in the foreground (``-W -db``): a master
    and ONE worker process with ``nbthread = workers`` threads. SIGTERM to the
    master stops the worker and the master exits 0.

    One process holds every tunnel, 2 descriptors each, so under a per-process
    descriptor limit of L it carries at most about L/2 tunnels (≈ 10,000 here).
    ``maxconn`` is set far above that, with ``ulimit-n`` = L and ``no
    strict-limits`` so that it starts anyway (it logs an ALERT that the limit
    is too low) and a run shows how far it gets.
    """

    name = "haproxy"
    binary = "haproxy"
    config_file = "haproxy.cfg"
    package = "haproxy"
    maxconn = 100_000

    def config_text(self) -> str:
        lh, lp = self.listen
        logging = self.access_log or self.log_level.lower() == "debug"
        log = "    log stdout format raw local0 info\n" if logging else ""
        opt_log = "    log global\n    option httplog\n" if logging else ""
        return (
            "# generated by bench/targets.py for one benchmark run\n"
            "global\n"
            f"    maxconn {self.maxconn}\n"
            f"    ulimit-n {fd_hard_limit()}\n"
            "    no strict-limits\n"
            f"    nbthread {self.workers}\n"
            f"{log}"
            "\ndefaults\n"
            "    mode http\n"
            f"{opt_log}"
            f"    maxconn {self.maxconn}\n"
            "    timeout connect 5s\n"
            f"    timeout client {TUNNEL_TIMEOUT}\n"
            f"    timeout server {TUNNEL_TIMEOUT}\n"
            f"    timeout tunnel {TUNNEL_TIMEOUT}\n"
            "    timeout http-request 10s\n"
            "\nfrontend bench\n"
            f"    bind {_host(lh)}:{lp} backlog {LISTEN_BACKLOG}\n"
            f"    maxconn {self.maxconn}\n"
            "    default_backend echo\n"
            "\nbackend echo\n"
            f"{self._servers()}"
        )

    def _servers(self) -> str:
        """One ``server`` line; with upstream source addresses, one per address,
        each with its own ``source``, all to the same backend: how an operator
        takes HAProxy past one source address's ports to one host and port."""
        bh, bp = self.backend
        u = self.upstream
        if not u.sources:
            return f"    server echo {_host(bh)}:{bp} maxconn 0\n"
        ports = "" if u.port_range == "auto" else f":{u.port_range}"
        return "    balance leastconn\n" + "".join(
            f"    server echo-{i} {_host(bh)}:{bp} maxconn 0 source {_host(a)}{ports}\n"
            for i, a in enumerate(u.sources, 1)
        )

    def plan(self) -> dict[str, Any]:
        """The generated config's arithmetic, in the shape of ``shardproxy
        plan --json``'s total: server lines x ports per source address to one
        endpoint, against one process's descriptors (2 per tunnel)."""
        first, last = self.upstream.ports()
        sources = list(self.upstream.sources)
        ports = last - first + 1
        tuples = max(1, len(sources)) * ports
        descriptors = fd_hard_limit() // 2
        limits = {"tuples": tuples, "descriptors": descriptors, "max_connections": self.maxconn}
        binding = min(limits, key=lambda k: limits[k])
        bh, bp = self.backend
        return {
            "workers": 1,
            "threads": self.workers,
            "servers": max(1, len(sources)),
            "sources": sources,
            "endpoints": [f"{bh}:{bp}"],
            "port_range": {"first": first, "last": last},
            "total": {**limits, "limit": limits[binding], "binding": binding},
        }

    def check_command(self) -> list[str]:
        return [find_binary(self.binary), "-c", "-f", str(self.config_path)]

    def command(self) -> list[str]:
        return [find_binary(self.binary), "-W", "-db", "-f", str(self.config_path)]

    def _workers_up(self) -> bool:
        procs = self.processes()
        try:
            return len(procs) >= 2 and procs[1].num_threads() >= self.workers
        except psutil.Error:
            return False

    def role(self, p: psutil.Process) -> str:
        if self.proc is not None and p.pid == self.proc.pid:
            return "master"
        return "worker"

    def limits(self) -> dict[str, Any]:
        fds = fd_hard_limit()
        return {
            "fd_limit_per_process": fds,
            "maxconn": self.maxconn,
            "processes_holding_tunnels": 1,
            "max_tunnels_by_fds": fds // 2,
        }

    def _parse_version(self, text: str) -> str | None:
        m = re.search(r"HA-?Proxy version (\d+(?:\.\d+)*)", text)
        return m.group(1) if m else None


class Nginx(_Peer):
    """nginx with ``master_process on``, ``daemon off`` and ``workers``
    worker processes, everything (pid, error log, temp dirs) under the
    workdir (``-p workdir -c nginx.conf``). SIGTERM to the master is nginx's
    fast shutdown; the master exits 0.

    ``worker_connections`` counts both sides of a tunnel, so a worker holds at
    most ``worker_connections / 2`` tunnels (≈ 10,000 here); ``reuseport``
    gives each worker its own listening socket, so the kernel spreads
    connections evenly (no accept mutex, no thundering herd).
    """

    name = "nginx"
    binary = "nginx"
    config_file = "nginx.conf"
    package = "nginx-light"

    def config_text(self) -> str:
        if self.upstream.sources:
            raise BenchError("nginx: the bench writes no per-source upstream config for nginx")
        (lh, lp), (bh, bp) = self.listen, self.backend
        fds = fd_hard_limit()
        level = NGINX_LEVELS.get(self.log_level.lower(), "warn")
        user = ""
        if os.geteuid() == 0:  # otherwise workers would run as nobody
            pw = pwd.getpwuid(0)
            user = f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};\n"
        temps = "".join(
            f"    {kind}_temp_path temp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            "# generated by bench/targets.py for one benchmark run\n"
            f"{user}"
            "daemon off;\n"
            "master_process on;\n"
            f"worker_processes {self.workers};\n"
            f"worker_rlimit_nofile {fds};\n"
            "pid nginx.pid;\n"
            f"error_log nginx-error.log {level};\n"
            "\nevents {\n"
            f"    worker_connections {fds};\n"
            "    multi_accept on;\n"
            "    use epoll;\n"
            "}\n"
            "\nhttp {\n"
            f"    access_log {'access.log' if self.access_log else 'off'};\n"
            f"{temps}"
            "    client_header_timeout 10s;\n"
            "\n    upstream backend {\n"
            f"        server {_host(bh)}:{bp} max_fails=0;\n"
            "    }\n"
            "\n    server {\n"
            f"        listen {_host(lh)}:{lp} backlog={LISTEN_BACKLOG} reuseport;\n"
            "        location / {\n"
            "            proxy_pass http://backend;\n"
            "            proxy_http_version 1.1;\n"
            "            proxy_set_header Upgrade $http_upgrade;\n"
            '            proxy_set_header Connection "upgrade";\n'
            "            proxy_connect_timeout 5s;\n"
            f"            proxy_read_timeout {TUNNEL_TIMEOUT};\n"
            f"            proxy_send_timeout {TUNNEL_TIMEOUT};\n"
            "            proxy_buffering off;\n"
            "        }\n"
            "    }\n"
            "}\n"
        )

    def start(self) -> None:
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        super().start()

    def _base(self) -> list[str]:
        return [find_binary(self.binary), "-p", f"{self.workdir}/", "-c", self.config_file]

    def check_command(self) -> list[str]:
        return [*self._base(), "-t", "-q"]

    def command(self) -> list[str]:
        return self._base()

    def _workers_up(self) -> bool:
        n = 0
        for p in self.processes()[1:]:
            try:
                if "worker process" in " ".join(p.cmdline()):
                    n += 1
            except psutil.Error:
                continue
        return n >= self.workers

    def role(self, p: psutil.Process) -> str:
        if self.proc is not None and p.pid == self.proc.pid:
            return "master"
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            return "gone"
        if "worker process" not in title:
            return "child"  # e.g. a cache manager (none with this config)
        workers = []
        for q in self.processes()[1:]:
            try:
                if "worker process" in " ".join(q.cmdline()):
                    workers.append(q.pid)
            except psutil.Error:
                continue
        workers.sort()
        return f"worker-{workers.index(p.pid)}" if p.pid in workers else "worker"

    def log_tail(self, n: int) -> list[str]:
        lines = []
        for path in (self.log_path, self.workdir / "nginx-error.log"):
            try:
                lines += path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
        return lines[-n:]

    def limits(self) -> dict[str, Any]:
        fds = fd_hard_limit()
        return {
            "fd_limit_per_process": fds,
            "worker_connections": fds,
            "processes_holding_tunnels": self.workers,
            "max_tunnels_by_fds": self.workers * (fds // 2),
        }

    def _parse_version(self, text: str) -> str | None:
        m = re.search(r"nginx/(\d+(?:\.\d+)*)", text)
        return m.group(1) if m else None


def _host(host: str) -> str:
    """An address as a config's ``host:port`` wants it (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
