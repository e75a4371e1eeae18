"""WebSocket clients that hold tunnels to one URL and reconnect when one
ends, for the high-availability lab (bench/ha.py runs this inside the lab's
client network namespace).

    python -m bench.ha_client URL --tunnels N [--interval 1.0]

Each tunnel echoes a message every ``interval`` seconds (a missing echo
within ECHO_TIMEOUT counts as a blink) and, when it is closed, reconnects at
once and then every RETRY seconds until it succeeds. Prints ``{"event":
"ready"}`` once every tunnel is open; then each line on stdin is a command:
``report`` prints the figures so far as one JSON line, ``stop`` prints them
and exits. Bounded: it exits by itself after ``--limit`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ECHO_TIMEOUT = 5.0
RETRY = 0.2


class Figures:
    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.closes: Counter[str] = Counter()  # close code (or "none") → tunnels
        self.close_times: list[float] = []  # wall clock, when each close arrived
        self.reconnect_seconds: list[float] = []  # close → open again
        self.failed_attempts: Counter[str] = Counter()  # error → connect attempts
        self.echo_timeouts = 0
        self.waiting = 0  # closed, not reconnected yet

    def to_dict(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "opened": self.opened,
            "closes": dict(self.closes),
            "close_times": self.close_times,
            "reconnect_seconds": self.reconnect_seconds,
            "failed_attempts": dict(self.failed_attempts),
            "echo_timeouts": self.echo_timeouts,
            "waiting": self.waiting,
        }


async def _open(url: str, figures: Figures) -> ClientConnection:
    while True:
        try:
            return await connect(url, ping_interval=None, open_timeout=5, close_timeout=2)
        except (OSError, TimeoutError) as e:
            figures.failed_attempts[type(e).__name__] += 1
        except Exception as e:  # an HTTP refusal (503 during a drain…)
            figures.failed_attempts[type(e).__name__] += 1
        await asyncio.sleep(RETRY)


async def _echo_until_closed(ws: ClientConnection, interval: float, figures: Figures) -> None:
    await asyncio.sleep(random.uniform(0, interval))  # spread the echoes
    while True:
        await ws.send("ping")
        try:
            await asyncio.wait_for(ws.recv(), ECHO_TIMEOUT)
        except TimeoutError:
            figures.echo_timeouts += 1
        await asyncio.sleep(interval)


async def _tunnel(url: str, interval: float, figures: Figures, opened: asyncio.Event) -> None:
    ws = await _open(url, figures)
    figures.open += 1
    figures.opened += 1
    opened.set()
    while True:
        try:
            await _echo_until_closed(ws, interval, figures)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            figures.closes[str(code) if code is not None else "none"] += 1
        closed_at = time.time()
        figures.close_times.append(closed_at)
        figures.open -= 1
        figures.waiting += 1
        ws = await _open(url, figures)
        figures.waiting -= 1
        figures.open += 1
        figures.opened += 1
        figures.reconnect_seconds.append(time.time() - closed_at)


async def main(args: argparse.Namespace) -> None:
    figures = Figures()
    events = [asyncio.Event() for _ in range(args.tunnels)]
    tasks = []
    for event in events:
        tasks.append(asyncio.create_task(_tunnel(args.url, args.interval, figures, event)))
        await asyncio.sleep(0)  # let it start connecting
    await asyncio.gather(*(e.wait() for e in events))
    print(json.dumps({"event": "ready"}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        print(json.dumps({"event": "report", **figures.to_dict()}), flush=True)
        if line.strip() != "report":  # "stop", or stdin closed
            break
    for task in tasks:
        task.cancel()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ha_client")
    parser.add_argument("url")
    parser.add_argument("--tunnels", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--limit", type=float, default=600.0, help="exit after this many seconds")
    args = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(main(args), args.limit))
    except TimeoutError:
        sys.exit("ha_client: --limit reached")


if __name__ == "__main__":
    cli()
