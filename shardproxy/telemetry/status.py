"""``shardproxy status``: a one-screen view of a running instance, from its
admin listener's /stats and /servers (the config file says where that is).
Rates are the difference of two /stats samples over the time between them
(workers report once a second, so a rate is exact to about a second's
worth of events)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from shardproxy.config import Config


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


def _counters(stats: dict[str, Any]) -> dict[str, float]:
    totals = stats.get("totals", {})
    out = {
        "opened": totals.get("tunnels", 0),
        "closed": sum(totals.get("closed", {}).values()),
        "rejected": sum(totals.get("rejected", {}).values()),
        "bytes up": totals.get("bytes", {}).get("up", 0),
        "bytes down": totals.get("bytes", {}).get("down", 0),
    }
    for w in stats["workers"]:
        out[_worker_name(w)] = w.get("opened", 0)
    return out


def rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, float]:
    """Per second between two /stats samples: opened, closed, rejected,
    bytes up and down (of ended tunnels), and tunnels opened per worker."""
    old, new = _counters(before), _counters(after)
    return {k: max(0.0, (v - old.get(k, 0)) / seconds) for k, v in new.items()}


def _worker_name(w: dict[str, Any]) -> str:
    gen = w.get("generation", 1)
    return f"{w['slot']}" + ("" if gen == 1 else f".{gen}")


def render(
    stats: dict[str, Any],
    servers: list[dict[str, Any]],
    health: dict[str, Any],
    per_second: dict[str, float] | None = None,
) -> str:
    """The screen, as text; ``per_second`` from :func:`rates`, if known."""
    totals = stats.get("totals", {})
    r = per_second or {}
    lines = [
        f"shardproxy: {health.get('status', '?')}  "
        f"tunnels {stats['tunnels']:,} / capacity {stats['capacity']:,}  "
        f"handshakes in flight {stats['handshakes']:,}  "
        f"opened {totals.get('tunnels', 0):,}  restarts {stats.get('restarts', 0)}  "
        f"reloads {sum(stats.get('reloads', {}).values())}",
        "per second: "
        + (
            f"opened {r['opened']:,.1f}  closed {r['closed']:,.1f}  "
            f"rejected {r['rejected']:,.1f}  "
            f"bytes up {r['bytes up']:,.0f}  down {r['bytes down']:,.0f} (of ended tunnels)"
            if per_second is not None
            else "(from the next refresh on)"
        ),
        "",
        f"{'worker':<10}{'tunnels':>10}{'handshakes':>12}{'capacity':>10}{'rss MiB':>10}"
        f"{'opened/s':>10}",
    ]
    processes = stats.get("processes", {})
    for w in stats["workers"]:
        name = _worker_name(w)
        rss = processes.get(f"worker-{name}", {}).get("rss", 0) / 2**20
        opened = f"{r[name]:,.1f}" if name in r else "-"
        lines.append(
            f"{name:<10}{w['tunnels']:>10,}{w['handshakes']:>12,}{w['capacity']:>10,}{rss:>10.1f}"
            f"{opened:>10}"
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


class Screen:
    """Successive screens of one instance; each one's rates are since the last."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._last: tuple[float, dict[str, Any]] | None = None

    def sample(self) -> None:
        """Take a /stats sample for the next screen's rates."""
        self._last = (time.monotonic(), fetch(self.cfg, "/stats"))

    def __call__(self) -> str:
        now, stats = time.monotonic(), fetch(self.cfg, "/stats")
        per_second = None
        if self._last is not None and now > self._last[0]:
            per_second = rates(self._last[1], stats, now - self._last[0])
        self._last = (now, stats)
        return render(stats, fetch(self.cfg, "/servers"), fetch(self.cfg, "/healthz"), per_second)


def once(cfg: Config, interval: float) -> str:
    """One screen, its rates taken over ``interval`` seconds."""
    screen = Screen(cfg)
    screen.sample()
    time.sleep(interval)
    return screen()


def watch(cfg: Config, interval: float) -> None:
    """Refresh the screen every ``interval`` seconds until interrupted."""
    screen = Screen(cfg)
    while True:
        text = screen()
        print("\x1b[H\x1b[2J" + text + f"\n\n(every {interval:g}s; Ctrl-C quits)", flush=True)
        time.sleep(interval)
