"""PNG charts of a comparison (``bench/compare.py``), drawn with matplotlib's
Agg canvas (no display, no pyplot state):

- :func:`memory_chart`: RSS delta of each target's processes against tunnels
  held while the idle scenario opens them (its ``rss_curve``), one line per
  target;
- :func:`latency_chart`: grouped bars of pingpong round-trip p50/p99/p99.9
  and handshake connect → 101 p50/p99, one bar per target, log scale.

Each returns False (and writes nothing) when the comparison holds nothing to draw.
``python -m bench.charts results/compare-<stamp>.json`` draws them again from
a saved comparison, next to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

COLORS = {
    "shardproxy": "#1f77b4",
    "shardproxy-pure": "#9467bd",
    "haproxy": "#d62728",
    "nginx": "#2ca02c",
    "direct": "#7f7f7f",
}
DPI = 120


def _color(target: str, i: int) -> str:
    return COLORS.get(target, f"C{i + 4}")


def _title_suffix(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return f"{m['cores']} cores, Linux {m['kernel']}{' (quick run)' if doc['quick'] else ''}"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")


def memory_chart(doc: dict[str, Any], path: Path) -> bool:
    idle = doc["runs"].get("idle") or {}
    lines = {t: r["figures"]["rss_curve"] for t, r in idle.items() if r["figures"].get("rss_curve")}
    if not lines:
        return False
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, (t, points) in enumerate(lines.items()):
        pts = sorted(points)
        xs = [p[0] for p in pts]
        ys = [p[1] / 2**20 for p in pts]
        per = idle[t]["figures"].get("user_memory_per_tunnel_bytes")
        label = t if per is None else f"{t} ({per / 1024:,.2f} KiB per tunnel)"
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.8, color=_color(t, i), label=label)
    ax.set_title(f"Proxy memory against idle tunnels held\n{_title_suffix(doc)}")
    ax.set_xlabel("idle tunnels held (≈ (descriptors - descriptors before) / 2)")
    ax.set_ylabel("RSS of all proxy processes - RSS before (MiB)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(title="target (settled figure)", loc="upper left")
    _save(fig, path)
    return True


# (scenario, figure key, bar label)
LATENCY_BARS = (
    ("pingpong", "rtt_p50_us", "p50"),
    ("pingpong", "rtt_p99_us", "p99"),
    ("pingpong", "rtt_p99.9_us", "p99.9"),
    ("handshake", "latency_p50_us", "p50"),
    ("handshake", "latency_p99_us", "p99"),
)
PANELS = {
    "pingpong": "ping-pong round trip",
    "handshake": "handshake: connect → 101",
}


def _short(us: float) -> str:
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.3g} ms"
    return f"{us / 1e6:.3g} s"


def latency_chart(doc: dict[str, Any], path: Path) -> bool:
    runs = doc["runs"]
    panels = [s for s in PANELS if runs.get(s)]
    if not panels:
        return False
    targets: list[str] = doc["targets"]
    fig = Figure(figsize=(5 + 3 * len(panels), 5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / len(targets)
    drawn = False
    for ax, scenario in zip(axes, panels, strict=True):
        bars = [(key, label) for s, key, label in LATENCY_BARS if s == scenario]
        for i, t in enumerate(targets):
            r = runs[scenario].get(t)
            xs, ys = [], []
            for j, (key, _) in enumerate(bars):
                v = (r or {}).get("figures", {}).get(key)
                if v:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(float(v))
            if not xs:
                continue
            drawn = True
            rects = ax.bar(xs, ys, width * 0.92, color=_color(t, i), label=t)
            ax.bar_label(rects, labels=[_short(y) for y in ys], fontsize=7, rotation=90,
                         padding=2)  # fmt: skip
        ax.set_yscale("log")
        ticks = FuncFormatter(lambda v, _: _short(v))
        ax.yaxis.set_major_formatter(ticks)
        ax.yaxis.set_minor_formatter(ticks)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(bars)), [label for _, label in bars])
        ax.set_title(PANELS[scenario])
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (log scale)")
        ax.grid(True, axis="y", which="both", alpha=0.25)
        ax.margins(y=0.25)
        ax.legend(loc="upper left", fontsize=8)
    if not drawn:
        return False
    fig.suptitle(f"Latency percentiles per target — {_title_suffix(doc)}")
    _save(fig, path)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].endswith(".json"):
        print("usage: python -m bench.charts compare-<stamp>.json", file=sys.stderr)
        return 2
    source = Path(argv[0])
    doc = json.loads(source.read_text())
    for name, draw in (("memory", memory_chart), ("latency", latency_chart)):
        path = source.with_name(f"{source.stem}-{name}.png")
        print(f"{name}: {path if draw(doc, path) else 'nothing to draw'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
