"""Process memory snapshots, waiting for them to settle, and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil

from shardproxy.control.addrplan import read_system_port_range

Snapshot = dict[str, Any]


def snapshot(procs: list[psutil.Process], role: Callable[[psutil.Process], str]) -> Snapshot:
    """RSS (and USS, descriptors) of each process and their sums.

    RSS is what BENCH.md specifies; USS (memory unique to the process) is
    recorded next to it because it does not count shared library pages.
    """
    rows = []
    for p in procs:
        try:
            with p.oneshot():
                full = p.memory_full_info()
                rows.append(
                    {
                        "pid": p.pid,
                        "role": role(p),
                        "rss": full.rss,
                        "uss": full.uss,
                        "fds": p.num_fds(),
                    }
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    rows.sort(key=lambda r: r["role"])
    return {
        "rss": sum(r["rss"] for r in rows),
        "uss": sum(r["uss"] for r in rows),
        "fds": sum(r["fds"] for r in rows),
        "processes": rows,
        "time": time.time(),
    }


def settle(
    take: Callable[[], Snapshot],
    *,
    fds_at_least: int | None = None,
    fds_at_most: int | None = None,
    window: int = 5,
    interval: float = 0.5,
    tolerance: int = 64 * 1024,
    timeout: float = 60.0,
) -> tuple[Snapshot, dict[str, Any]]:
    """Sample until the descriptor count is where it should be and the summed
    RSS of the last ``window`` samples varies by at most ``tolerance`` bytes.

    Returns the last sample and how settling went (samples, seconds, settled).
    """
    started = time.monotonic()
    samples: list[Snapshot] = []
    settled = False
    while True:
        s = take()
        samples.append(s)
        fds_ok = (fds_at_least is None or s["fds"] >= fds_at_least) and (
            fds_at_most is None or s["fds"] <= fds_at_most
        )
        recent = [x["rss"] for x in samples[-window:]]
        if fds_ok and len(recent) == window and max(recent) - min(recent) <= tolerance:
            settled = True
            break
        if time.monotonic() - started >= timeout:
            break
        time.sleep(interval)
    return s, {
        "settled": settled,
        "samples": len(samples),
        "seconds": round(time.monotonic() - started, 2),
        "rss_trace": [x["rss"] for x in samples[-(2 * window) :]],
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count() or 0
    first, last = read_system_port_range()
    return {
        "cores": os.cpu_count(),
        "cores_usable": cpus_usable,
        "cpu_model": model,
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ip_local_port_range": f"{first}-{last}",
        "page_size": os.sysconf("SC_PAGE_SIZE"),
    }


def sockstat() -> dict[str, int]:
    """``TCP: inuse … tw … mem …`` from /proc/net/sockstat (mem is in pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()[1:]
                return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
    return {}


# socket-related slab caches: the socket itself (TCP), its inode, its file,
# its epoll registration, its dentry, and TIME_WAIT leftovers
SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "eventpoll_epi", "dentry", "tw_sock_TCP")


def slabinfo(names: tuple[str, ...] = SOCKET_SLABS) -> dict[str, int] | None:
    """Bytes in use (active objects x object size) of the named slab caches
    from /proc/slabinfo (root only); None when it cannot be read."""
    try:
        with open("/proc/slabinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        words = line.split()
        if words and words[0] in names:
            out[words[0]] = int(words[1]) * int(words[3])
    return out


def connections_to(host: str, port: int, timeout: float = 60.0) -> dict[str, Any]:
    """Established TCP connections to ``host:port`` as the kernel lists them
    (``ss``, filtered in the kernel), counted by source address."""
    try:
        r = subprocess.run(
            ["ss", "-Htn", "state", "established", "dst", f"{host}:{port}"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
    by_source: Counter[str] = Counter()
    for line in r.stdout.splitlines():
        words = line.split()  # Recv-Q Send-Q Local:Port Peer:Port
        if len(words) >= 4:
            by_source[words[2].rpartition(":")[0]] += 1
    return {"total": sum(by_source.values()), "by_source": dict(sorted(by_source.items()))}
