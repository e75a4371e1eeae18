"""Configuration files for the tests: a full, valid one (every section
given) and a helper that writes one."""

from __future__ import annotations

from pathlib import Path


def write(tmp_path: Path, text: str, name: str = "shardproxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD_TOML = """\
[proxy]
listen = ["127.0.0.1:9000", "[::1]:9000"]
workers = 3
header_timeout = "1.5s"

[log]
level = "debug"

[[routes]]
host = "*.example.com"
path_prefix = "/chat"
pool = "chat"

[[routes]]
pool = "other"

[pools.chat]
balance = "hash"
hash_key = "header:X-User-Id"
servers = [
  { name = "a", address = "10.0.1.5", ports = [8080, 8081], weight = 2 },
  { address = "10.0.1.6", ports = [8080] },
]

[pools.other]
servers = [{ address = "::1", ports = [7000] }]
"""
