"""deploy/sysctl/60-shardproxy.conf: every key is explained, exists on this
kernel, has a value of the right shape, agrees with the systemd unit and the
supervisor, and the kernel accepts the per-network-namespace keys (applied
inside a throwaway network namespace, so the host is left alone)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from shardproxy.control.supervisor import LISTEN_BACKLOG

DEPLOY = REPO / "deploy"
SYSCTL_FILE = DEPLOY / "sysctl" / "60-shardproxy.conf"
UNIT = DEPLOY / "systemd" / "shardproxy.service"
PROC_SYS = Path("/proc/sys")
CONNTRACK_PROBE = PROC_SYS / "net" / "netfilter" / "nf_conntrack_max"
MODULE_NOTE = "only when the nf_conntrack module is loaded"

REQUIRED = {
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_tw_reuse",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "fs.file-max",
    "fs.nr_open",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_buckets",
}
TRIPLES = ("net.ipv4.tcp_mem", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem")

# Run inside the new network namespace: how each key looks from there.
PROBE = """
import json, os, sys
seen = {}
for key in sys.argv[1:]:
    path = "/proc/sys/" + key.replace(".", "/")
    if not os.path.exists(path):
        seen[key] = "missing"
    else:
        seen[key] = "writable" if os.access(path, os.W_OK) else "read-only"
print(json.dumps(seen))
"""


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    value: str  # whitespace normalised to single spaces
    optional: bool  # "-key = value": systemd-sysctl ignores a failure to set it
    comment: tuple[str, ...]  # the comment block just above it, "#" stripped
    line: int


def parse(text: str) -> list[Setting]:
    """sysctl.d syntax: "key = value" lines, "#" or ";" comments, blank lines.
    A comment block belongs to the key right below it; a blank line ends it."""
    settings: list[Setting] = []
    block: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            block = []
            continue
        if line.startswith(("#", ";")):
            block.append(line[1:].strip())
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"line {number}: neither a comment nor key = value: {raw!r}")
        key = key.strip()
        settings.append(
            Setting(
                key=key.removeprefix("-").strip(),
                value=" ".join(value.split()),
                optional=key.startswith("-"),
                comment=tuple(block),
                line=number,
            )
        )
        block = []
    return settings


def settings() -> dict[str, Setting]:
    return {s.key: s for s in parse(SYSCTL_FILE.read_text())}


def proc_path(key: str) -> Path:
    return PROC_SYS / key.replace(".", "/")


def is_conntrack(key: str) -> bool:
    return key.startswith("net.netfilter.nf_conntrack_")


def integers(value: str) -> list[int]:
    return [int(v) for v in value.split()]


def test_the_parser() -> None:
    parsed = parse("# a\n#\n# b\nx.y = 1  2\n\n# c\n\n-z.w=3\n")
    assert parsed == [
        Setting("x.y", "1 2", False, ("a", "", "b"), 4),
        Setting("z.w", "3", True, (), 8),
    ]
    with pytest.raises(ValueError, match="line 1"):
        parse("no equals sign\n")


def test_every_key_is_there_once_with_a_comment_block_just_above_it() -> None:
    parsed = parse(SYSCTL_FILE.read_text())
    keys = [s.key for s in parsed]
    assert len(keys) == len(set(keys)), "a key is set twice"
    assert set(keys) >= REQUIRED
    for s in parsed:
        text = " ".join(s.comment).strip()
        assert text, f"line {s.line}: {s.key} has no comment block just above it"


def test_every_key_exists_on_this_kernel() -> None:
    conntrack_loaded = CONNTRACK_PROBE.exists()
    for s in settings().values():
        if is_conntrack(s.key) and not conntrack_loaded:
            assert s.optional and MODULE_NOTE in " ".join(s.comment).lower(), (
                f"{s.key}: nf_conntrack is not loaded here, and the file does not "
                f"mark the key as module-dependent"
            )
            continue
        assert proc_path(s.key).exists(), f"{s.key}: no {proc_path(s.key)} on this kernel"


def test_the_conntrack_keys_are_marked_as_needing_the_module() -> None:
    """A leading "-" (systemd-sysctl skips the key while the module is not
    loaded) and a comment that says so, on whatever host."""
    conntrack = [s for s in settings().values() if is_conntrack(s.key)]
    assert conntrack
    for s in conntrack:
        assert s.optional, f"{s.key}: needs a leading '-' (module-dependent)"
        assert MODULE_NOTE in " ".join(s.comment).lower(), f"{s.key}: say {MODULE_NOTE!r}"
    assert all(not s.optional for s in settings().values() if not is_conntrack(s.key))


def test_the_values_have_the_right_shape() -> None:
    found = settings()
    for s in found.values():
        if s.key == "net.ipv4.ip_local_reserved_ports":
            assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", s.value), s.value
        elif s.key in TRIPLES:
            low, middle, high = integers(s.value)
            assert 0 < low <= middle <= high, f"{s.key}: {s.value} is not ascending"
        elif s.key == "net.ipv4.ip_local_port_range":
            first, last = integers(s.value)
            assert 1 <= first < last <= 65535
        else:
            (number,) = integers(s.value)  # fs.* and the rest: one integer
            assert number >= 0, s.key
    # tcp_mem is in pages: its hard limit must leave this host's RAM room.
    high_bytes = integers(found["net.ipv4.tcp_mem"].value)[2] * os.sysconf("SC_PAGE_SIZE")
    assert high_bytes < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # tcp_rmem/tcp_wmem are in bytes: min is at least one page.
    for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        assert integers(found[key].value)[0] >= 4096, key


def test_the_limits_agree_with_the_unit_and_the_supervisor() -> None:
    found = settings()
    unit = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    nr_open = int(found["fs.nr_open"].value)
    assert int(unit["LimitNOFILE"]) <= nr_open, "systemd cannot set LimitNOFILE above fs.nr_open"
    assert int(found["fs.file-max"].value) >= nr_open
    assert int(found["net.core.somaxconn"].value) >= LISTEN_BACKLOG
    assert int(found["net.ipv4.tcp_max_syn_backlog"].value) >= LISTEN_BACKLOG


def _unshare_or_skip(unshare: str, *command: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([unshare, "--net", *command], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and re.search(
        r"unshare failed|Operation not permitted|Permission denied", out.stderr
    ):
        pytest.skip(f"cannot create a network namespace here: {out.stderr.strip()}")
    return out


def test_the_kernel_accepts_the_per_namespace_keys(tmp_path: Path) -> None:
    unshare, sysctl = shutil.which("unshare"), shutil.which("sysctl")
    if unshare is None or sysctl is None:
        pytest.skip("unshare (util-linux) or sysctl (procps) is not installed")
    found = settings()
    net = [key for key in found if key.startswith("net.")]
    probe = _unshare_or_skip(unshare, sys.executable, "-c", PROBE, *net)
    assert probe.returncode == 0, probe.stderr
    seen: dict[str, str] = json.loads(probe.stdout)
    # Keys a fresh namespace has writable are per namespace: applying them
    # there tests them without touching the host. The others (tcp_mem, the
    # conntrack table) are host-wide and only checked above.
    per_ns = [key for key in net if seen[key] == "writable"]
    assert {"net.core.somaxconn", "net.ipv4.ip_local_port_range"} <= set(per_ns), seen
    conf = tmp_path / "per-namespace.conf"
    conf.write_text("".join(f"{key} = {found[key].value}\n" for key in per_ns))
    script = 'sysctl -p "$1" >/dev/null; shift; for key; do sysctl -n "$key"; done'
    out = _unshare_or_skip(unshare, "sh", "-ec", script, "sh", str(conf), *per_ns)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    applied = [" ".join(line.split()) for line in out.stdout.splitlines()]
    assert applied == [found[key].value for key in per_ns]
