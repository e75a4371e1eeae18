"""``shardproxy status``: a one-screen view of a running instance, from its
admin listener's /stats and /servers (the config file says where that is)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from .config import Config


class StatusError(Exception):
    """The instance cannot be asked; ``str()`` says why in one line."""


def fetch(cfg: Config, path: str) -> Any:
    admin = cfg.admin
    if admin.listen is None:
        raise StatusError(f"{cfg.source}: [admin] listen is not set: nothing to ask")
    request = urllib.request.Request(f"http://{admin.listen}{path}")
    if admin.token:
        request.add_header("Authorization", f"Bearer {admin.token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 503 and path == "/healthz":
            return json.loads(e.read())
        raise StatusError(f"admin listener {admin.listen} answered {e.code} for {path}") from None
    except (urllib.error.URLError, OSError) as e:
        raise StatusError(f"cannot reach the admin listener {admin.listen}: {e}") from None


def render(stats: dict[str, Any], servers: list[dict[str, Any]], health: dict[str, Any]) -> str:
    """The screen, as text."""
    totals = stats.get("totals", {})
    lines = [
        f"shardproxy: {health.get('status', '?')}  "
        f"tunnels {stats['tunnels']:,} / capacity {stats['capacity']:,}  "
        f"handshakes in flight {stats['handshakes']:,}  "
        f"opened {totals.get('tunnels', 0):,}  restarts {stats.get('restarts', 0)}  "
        f"reloads {sum(stats.get('reloads', {}).values())}",
        "",
        f"{'worker':<10}{'tunnels':>10}{'handshakes':>12}{'capacity':>10}{'rss MiB':>10}",
    ]
    processes = stats.get("processes", {})
    for w in stats["workers"]:
        gen = w.get("generation", 1)
        name = f"{w['slot']}" + ("" if gen == 1 else f".{gen}")
        rss = processes.get(f"worker-{name}", {}).get("rss", 0) / 2**20
        lines.append(
            f"{name:<10}{w['tunnels']:>10,}{w['handshakes']:>12,}{w['capacity']:>10,}{rss:>10.1f}"
        )
    lines += ["", f"{'source':<18}{'endpoint':<24}{'used':>10}{'capacity':>10}{'headroom':>10}"]
    for u in stats.get("upstream", []):
        free = u["capacity"] - u["used"]
        pct = 100 * free / u["capacity"] if u["capacity"] else 0
        lines.append(
            f"{u['source']:<18}{u['endpoint']:<24}{u['used']:>10,}{u['capacity']:>10,}{pct:>9.1f}%"
        )
    lines += ["", f"{'pool/server':<30}{'admin':<8}endpoints"]
    for s in servers:
        endpoints = ", ".join(f"{e['endpoint']} {e['health']}" for e in s["endpoints"])
        lines.append(f"{s['pool'] + '/' + s['server']:<30}{s['admin']:<8}{endpoints}")
    return "\n".join(lines)


def screen(cfg: Config) -> str:
    return render(fetch(cfg, "/stats"), fetch(cfg, "/servers"), fetch(cfg, "/healthz"))


def watch(cfg: Config, interval: float) -> None:
    """Refresh the screen every ``interval`` seconds until interrupted."""
    while True:
        text = screen(cfg)
        print("\x1b[H\x1b[2J" + text + f"\n\n(every {interval:g}s; Ctrl-C quits)", flush=True)
        time.sleep(interval)
