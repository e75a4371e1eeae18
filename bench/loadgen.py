"""A websocket client generator for benchmarks, driven over stdin/stdout.

``python -m bench.loadgen --mode MODE --target 127.0.0.1:8080 --count 9000 --sources 127.0.11.1/32``

One process, one ``select.epoll`` loop. It opens ``--count`` websockets to
the target, each from one of ``--sources`` consecutive 127.x source addresses
(``IP_BIND_ADDRESS_NO_PORT`` is set before ``bind((addr, 0))``, so the kernel
picks the port at connect time, keeping 4-tuples unique without reserving
ports host-wide). A handshake is real: a random Sec-WebSocket-Key, and the
answer must be 101 with the matching Sec-WebSocket-Accept within
``--handshake-timeout``. A connection costs this process one descriptor:
``--count`` must stay 64 below RLIMIT_NOFILE (≈ 19,900 here); run several
processes for more. ``--give-up-after K`` stops launching new connects once K
have failed (the rest count as failed with reason ``gave-up``), so that a
target that has hit a wall ends the run in seconds instead of one handshake
timeout per remaining client.

Modes, and the protocol with the orchestrator (one line each way; ``→`` is
what this process says, ``←`` what it is told):

``idle`` (default): open with ≤ ``--concurrency`` handshakes in flight, then hold.

    → (when done opening)  open <ok> <failed> <seconds> <reasons as JSON>
    ← verify <k>           k random open connections send a masked text frame
    → verify <ok> <failed> ... and each must get exactly that payload echoed
    ← status
    → status <open> <dropped> <unexpected>   (dropped = closed by the peer)
    ← quit                 close every connection (FIN) and exit
    → bye <open>

``pingpong``: open as in idle (→ ``open …``), then every tunnel keeps exactly
one binary message of ``--size`` bytes in flight: send, wait for the echo,
send again. ``← go`` starts, ``← mark`` starts the measured window (counters
and the latency histogram restart), ``← stop`` ends it; in-flight echoes are
awaited (≤ 2 s), then ``→ result <JSON>`` and the process exits.

``handshake``: ``→ ready``, ``← go``; then ``--count`` clients with ≤
``--concurrency`` in flight each connect, upgrade, send a Close frame and
shut down their sending side (the client's FIN goes first, so TIME_WAIT lands
here, not on the proxy), read until the peer's EOF and close. ``→ result
<JSON>``; then it waits for ``quit`` (or EOF, or the end of ``--hold``), so
that the scenario's CPU meter still finds the process when it stops (an
exit right after the result raced with it on a loaded machine).

``spike``: the sockets are created and bound first; ``→ ready``, ``← go``;
then every connect is started at once (no concurrency cap) and each client
gets ``--handshake-timeout``. ``→ result <JSON>``; then the connections are
held as in idle (``verify``/``status``/``quit``).

A result's latencies (connect start → 101 verified; or a ping-pong round
trip) are a :class:`bench.histogram.Histogram` in integer microseconds.
Failure reasons are ``<phase>:<what>`` strings (``connect:ECONNREFUSED``,
``recv:ECONNRESET``, ``status:503``, ``bad-accept``, ``handshake-timeout``,
``close:timeout``, ``echo:mismatch``…), counted.

Pings from the peer are answered with Pongs. The process exits by itself at
the end of ``--hold`` seconds (counted from its start) or when stdin closes.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any

from . import wire
from .histogram import Histogram

RECV_SIZE = 65536
VERIFY_TIMEOUT = 10.0
DRAIN_TIMEOUT = 2.0  # pingpong: how long to await echoes in flight at "stop"

CONNECTING, SENT, OPEN, CLOSING = 0, 1, 2, 3

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP


class Commands:
    """Lines from the orchestrator on a descriptor (stdin), read as they come."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""
        self.eof = False

    def read(self) -> list[list[str]]:
        """Complete command lines now readable, split into words."""
        chunk = os.read(self.fd, 4096)
        if not chunk:
            self.eof = True
        self.pending += chunk
        out = []
        while b"\n" in self.pending:
            line, _, self.pending = self.pending.partition(b"\n")
            words = line.decode().split()
            if words:
                out.append(words)
        return out

    def wait(self, word: str, deadline: float) -> bool:
        """Block until the command ``word`` (True), or EOF/deadline (False)."""
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.fd], [], [], left)
            if r and any(w[0] == word for w in self.read()):
                return True
        return False


class Conn:
    __slots__ = (
        "accept",
        "buf",
        "deadline",
        "expect",
        "request",
        "sent",
        "sock",
        "started",
        "state",
    )

    def __init__(
        self, sock: socket.socket, request: bytes, accept: bytes, started: float, deadline: float
    ):
        self.sock = sock
        self.state = CONNECTING
        self.request = request
        self.accept = accept
        self.started = started  # connect() called (monotonic seconds)
        self.deadline = deadline
        self.buf = bytearray()
        self.expect: bytes | None = None  # frame we wait to see echoed
        self.sent = 0  # pingpong: perf_counter_ns of the message in flight, 0 if none


# A client's Close (RFC 6455 §5.5.1), status 1000, masked once and reused.
CLOSE_FRAME = wire.encode(wire.OP_CLOSE, struct.pack("!H", 1000), mask=True)


def source_addresses(spec: str) -> list[str]:
    """``127.0.11.1/32`` → 32 consecutive addresses starting at 127.0.11.1."""
    first, _, count = spec.partition("/")
    start = ipaddress.IPv4Address(first)
    n = int(count or 1)
    addrs = [str(start + i) for i in range(n)]
    for a in addrs:
        if not ipaddress.IPv4Address(a).is_loopback:
            raise ValueError(f"source address {a} is not in 127.0.0.0/8")
    return addrs


def _errname(e: OSError | int) -> str:
    code = e if isinstance(e, int) else (e.errno or 0)
    return errno.errorcode.get(code, str(code))


class LoadGen:
    def __init__(
        self,
        target: tuple[str, int],
        sources: list[str],
        *,
        path: str = "/",
        host_header: str | None = None,
        churn: bool = False,
        close_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.sources = sources
        self.path = path
        self.host_header = host_header or f"{target[0]}:{target[1]}"
        self.churn = churn  # after the 101: Close, FIN, await EOF, close (handshake mode)
        self.close_timeout = close_timeout
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}  # every connection, any state
        self.pending: dict[int, Conn] = {}  # handshakes (and churn closes) in flight
        # created and bound ahead, with their requests (spike mode): (socket, request, accept)
        self.spare: list[tuple[socket.socket, bytes, bytes]] = []
        self.opened = 0  # open now
        self.upgraded = 0  # 101s verified, ever
        self.failed = 0  # before the 101
        self.close_failed = 0  # churn: after the 101
        self.closed_clean = 0  # churn: Close sent, peer's EOF seen
        self.reasons: Counter[str] = Counter()
        self.latency = Histogram()  # connect() → 101 verified, µs
        self.close_latency = Histogram()  # churn: Close and FIN sent → the peer's EOF, µs
        self.last_upgrade = 0.0  # monotonic time of the latest 101
        self.dropped = 0  # open connections the peer closed
        self.unexpected = 0  # frames nobody asked for
        self.verifying: set[int] = set()
        self.verify_ok = 0
        self.verify_failed = 0
        self._next_source = 0

    # -- opening --------------------------------------------------------------

    def prepare(self, count: int) -> None:
        """Create and bind ``count`` sockets and their requests now, so that
        opening is only connects."""
        for _ in range(count):
            self.spare.append((self._socket(), *self._request()))

    def _request(self) -> tuple[bytes, bytes]:
        """An upgrade request with a fresh random key, and the accept it must get."""
        key = wire.new_key()
        request = (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        return request, wire.accept_for(key)

    def _socket(self) -> socket.socket:
        src = self.sources[self._next_source % len(self.sources)]
        self._next_source += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_IP, wire.IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((src, 0))
        except OSError:
            s.close()
            raise
        return s

    def open(
        self,
        count: int,
        concurrency: int,
        handshake_timeout: float,
        deadline: float,
        give_up: int = 0,
    ) -> float:
        """Open ``count`` websockets (in churn mode: open and close them);
        returns the seconds it took. With ``give_up`` > 0, no new connect is
        started once that many have failed; those never started fail as
        ``gave-up``."""
        started = time.monotonic()
        launched = 0
        next_sweep = 0.0
        while launched < count or self.pending:
            now = time.monotonic()
            if give_up and self.failed >= give_up and launched < count:
                self.reasons["gave-up"] += count - launched
                self.failed += count - launched
                launched = count
            if now >= deadline:
                if launched < count:
                    self.reasons["open-deadline"] += count - launched
                    self.failed += count - launched
                self._sweep(float("inf"))  # everything in flight fails
                break
            while len(self.pending) < concurrency and launched < count:
                launched += 1
                self._launch(handshake_timeout)
            for fd, ev in self.ep.poll(0.05, 1024):
                c = self.conns.get(fd)
                if c is not None:
                    self._event(fd, c, ev)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 0.25
        return time.monotonic() - started

    def _launch(self, handshake_timeout: float) -> None:
        if self.spare:
            s, request, accept = self.spare.pop()
        else:
            try:
                s = self._socket()
            except OSError as e:
                self._fail(f"socket:{_errname(e)}")
                return
            request, accept = self._request()
        now = time.monotonic()
        try:
            err = s.connect_ex(self.target)
        except OSError as e:
            err = e.errno or -1
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._fail(f"connect:{_errname(err)}")
            return
        c = Conn(s, request, accept, now, now + handshake_timeout)
        self.conns[s.fileno()] = c
        self.pending[s.fileno()] = c
        self.ep.register(s.fileno(), _OUT)

    def _fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] += 1

    def _drop_handshake(self, fd: int, c: Conn, reason: str) -> None:
        """End a connection still in ``pending``; an empty ``reason`` is a clean churn close."""
        del self.conns[fd]
        del self.pending[fd]
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        c.sock.close()
        if c.state != CLOSING:
            self._fail(reason)
        elif reason:
            self.close_failed += 1
            self.reasons[reason] += 1
        else:
            self.closed_clean += 1

    def _sweep(self, now: float) -> None:
        for fd, c in list(self.pending.items()):
            if c.deadline <= now:
                reason = ("connect-timeout", "handshake-timeout", "", "close:timeout")[c.state]
                self._drop_handshake(fd, c, reason)

    def _event(self, fd: int, c: Conn, ev: int) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop_handshake(fd, c, f"connect:{_errname(err)}")
                return
            try:
                sent = c.sock.send(c.request)
            except OSError as e:
                self._drop_handshake(fd, c, f"send:{_errname(e)}")
                return
            if sent < len(c.request):  # a ~150-byte head; never partial in practice
                c.request = c.request[sent:]
                return
            c.request = b""
            c.state = SENT
            self.ep.modify(fd, _IN)
            return
        try:
            data = c.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            error: str | None = _errname(e)
        else:
            error = None
        if c.state == SENT:
            if not data:
                self._drop_handshake(fd, c, f"recv:{error}" if error else "eof-before-101")
                return
            c.buf += data
            self._head(fd, c)
        elif c.state == CLOSING:  # the peer's Close frame, then its EOF
            if not data:
                if error is None:
                    self.close_latency.add(int((time.monotonic() - c.started) * 1e6))
                self._drop_handshake(fd, c, f"close:{error}" if error else "")
        elif not data:  # OPEN
            self._lose(fd, c)
        else:
            c.buf += data
            self._frames(fd, c)

    def _head(self, fd: int, c: Conn) -> None:
        """The response head, once complete: 101 with the right accept, or a failure."""
        try:
            head = wire.split_head(c.buf)
        except wire.FrameError:
            self._drop_handshake(fd, c, "response-head-too-large")
            return
        if head is None:
            return
        status = head.split(b" ", 2)[1:2]
        if status != [b"101"]:
            code = status[0].decode("latin-1") if status else "?"
            self._drop_handshake(fd, c, f"status:{code}")
            return
        if wire.header(head, b"sec-websocket-accept") != c.accept:
            self._drop_handshake(fd, c, "bad-accept")
            return
        now = time.monotonic()
        self.latency.add(int((now - c.started) * 1e6))
        self.last_upgrade = now
        self.upgraded += 1
        if self.churn:
            self._start_close(fd, c, now)
            return
        c.state = OPEN
        del self.pending[fd]
        self.opened += 1
        if c.buf:
            self._frames(fd, c)

    def _start_close(self, fd: int, c: Conn, now: float) -> None:
        """Close, then FIN: the client closes first, so TIME_WAIT lands on our side."""
        c.state = CLOSING
        c.started = now  # from here: the close's latency
        c.deadline = now + self.close_timeout
        c.buf.clear()
        try:
            c.sock.send(CLOSE_FRAME)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._drop_handshake(fd, c, f"close:{_errname(e)}")

    def summary(self, seconds: float) -> dict[str, Any]:
        """What a handshake or spike run found (the ``result`` line)."""
        return {
            "upgraded": self.upgraded,
            "failed": self.failed,
            "close_failed": self.close_failed,
            "closed_clean": self.closed_clean,
            "open": self.opened,
            "reasons": dict(self.reasons),
            "seconds": round(seconds, 6),
            "latency_us": self.latency.to_json(),
            "close_latency_us": self.close_latency.to_json(),
        }

    # -- holding --------------------------------------------------------------

    def _frames(self, fd: int, c: Conn) -> None:
        while True:
            try:
                frame = wire.parse(c.buf)
            except wire.FrameError:
                self._lose(fd, c)
                return
            if frame is None:
                return
            _, opcode, payload = frame
            if opcode == wire.OP_PING:
                self._send(fd, c, wire.encode(wire.OP_PONG, payload, mask=True))
            elif opcode == wire.OP_CLOSE:
                self._lose(fd, c)
                return
            elif opcode == wire.OP_PONG:
                pass
            elif c.expect is not None and opcode == wire.OP_TEXT:
                ok = payload == c.expect
                c.expect = None
                self.verifying.discard(fd)
                if ok:
                    self.verify_ok += 1
                else:
                    self.verify_failed += 1
            else:
                self.unexpected += 1

    def _send(self, fd: int, c: Conn, data: bytes) -> None:
        try:
            sent = c.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):  # tiny frames on an idle socket: short means broken
            self._lose(fd, c)

    def _lose(self, fd: int, c: Conn) -> None:
        """An open connection ended (closed by the peer, or broken)."""
        if fd not in self.conns:
            return
        del self.conns[fd]
        if fd in self.verifying:
            self.verifying.discard(fd)
            self.verify_failed += 1
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        c.sock.close()
        self.opened -= 1
        self.dropped += 1

    def start_verify(self, k: int) -> None:
        self.verify_ok = self.verify_failed = 0
        open_fds = [fd for fd, c in self.conns.items() if c.state == OPEN]
        for fd in random.sample(open_fds, min(k, len(open_fds))):
            c = self.conns.get(fd)
            if c is None:  # lost while an earlier sample was sent
                self.verify_failed += 1
                continue
            c.expect = f"verify {fd} {os.urandom(8).hex()}".encode()
            self.verifying.add(fd)
            self._send(fd, c, wire.encode(wire.OP_TEXT, c.expect, mask=True))

    def finish_verify(self) -> None:
        for fd in self.verifying:
            c = self.conns.get(fd)
            if c is not None:
                c.expect = None
            self.verify_failed += 1
        self.verifying.clear()

    def close_all(self) -> None:
        for fd, c in self.conns.items():
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            c.sock.close()
        self.conns.clear()
        for s, _, _ in self.spare:
            s.close()
        self.spare.clear()
        self.ep.close()

    def hold(self, hold_deadline: float, commands: Commands) -> None:
        """Serve commands until quit, EOF or the deadline."""
        self.ep.register(commands.fd, _IN)
        verify_deadline: float | None = None
        while True:
            now = time.monotonic()
            if now >= hold_deadline:
                _say(f"expired after hold; closing {self.opened}")
                return
            if verify_deadline is not None and (not self.verifying or now >= verify_deadline):
                self.finish_verify()
                _say(f"verify {self.verify_ok} {self.verify_failed}")
                verify_deadline = None
            timeout = min(1.0, hold_deadline - now)
            for fd, ev in self.ep.poll(timeout, 1024):
                if fd == commands.fd:
                    for words in commands.read():
                        if words[0] == "quit":
                            return
                        if words[0] == "verify":
                            self.start_verify(int(words[1]) if len(words) > 1 else 100)
                            verify_deadline = time.monotonic() + VERIFY_TIMEOUT
                        elif words[0] == "status":
                            _say(f"status {self.opened} {self.dropped} {self.unexpected}")
                        else:
                            _say(f"error unknown command {words[0]!r}")
                    if commands.eof:
                        return  # the orchestrator is gone
                    continue
                c = self.conns.get(fd)
                if c is not None:
                    if ev & _ERR and not ev & _IN:
                        self._lose(fd, c)
                    else:
                        self._event(fd, c, ev)

    # -- ping-pong ------------------------------------------------------------

    def pingpong(self, size: int, commands: Commands, deadline: float) -> dict[str, Any]:
        """Keep one binary message of ``size`` bytes in flight on every open
        tunnel (see the module notes for ``go``/``mark``/``stop``)."""
        payload = os.urandom(size)
        frame = wire.encode(wire.OP_BINARY, payload, mask=True)  # masked once, reused
        echo = wire.encode(wire.OP_BINARY, payload, mask=False)  # what must come back
        flen = len(frame)
        conns = {fd: c for fd, c in self.conns.items() if c.state == OPEN}
        tunnels = len(conns)
        self.ep.register(commands.fd, _IN)
        clock = time.perf_counter_ns
        hist = Histogram()
        trips = 0
        sending = counting = expired = False
        marked = stopped = 0
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                expired = True
                break
            if drain_until is not None and (
                now >= drain_until or not any(c.sent for c in conns.values())
            ):
                break
            for fd, _ev in self.ep.poll(min(0.5, deadline - now), 1024):
                c = conns.get(fd)
                if c is None:
                    if fd != commands.fd:
                        continue
                    for words in commands.read():
                        if words[0] == "go":
                            sending = True
                            for fd2, c2 in list(conns.items()):
                                if not c2.sent:
                                    c2.sent = clock()
                                    self._pp_send(conns, fd2, c2, frame)
                        elif words[0] == "mark":
                            counting, trips, hist, marked = True, 0, Histogram(), clock()
                        elif words[0] == "stop":
                            counting = sending = False
                            stopped = clock()
                            drain_until = time.monotonic() + DRAIN_TIMEOUT
                        elif words[0] == "quit":
                            drain_until = 0.0
                    if commands.eof:
                        drain_until = 0.0  # the orchestrator is gone
                    continue
                try:
                    data = c.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self._pp_lose(conns, fd, c, f"echo:{_errname(e)}")
                    continue
                t = clock()
                # The fast path: the whole echo in one read, nothing buffered.
                if (data != echo or c.buf or not c.sent) and not self._pp_collect(
                    conns, fd, c, data, payload
                ):
                    continue
                if counting:
                    trips += 1
                    hist.add((t - c.sent) // 1000)
                if sending:
                    c.sent = t
                    try:
                        if c.sock.send(frame) != flen:
                            self._pp_lose(conns, fd, c, "echo:short-send")
                    except OSError as e:
                        self._pp_lose(conns, fd, c, f"echo:{_errname(e)}")
                else:
                    c.sent = 0
        return {
            "tunnels": tunnels,
            "round_trips": trips,
            "window_s": (stopped - marked) / 1e9 if marked and stopped else None,
            "lost": tunnels - len(conns),
            "reasons": dict(self.reasons),
            "latency_us": hist.to_json(),
            "expired": expired,
        }

    def _pp_send(self, conns: dict[int, Conn], fd: int, c: Conn, frame: bytes) -> None:
        try:
            if c.sock.send(frame) == len(frame):
                return
            reason = "echo:short-send"
        except OSError as e:
            reason = f"echo:{_errname(e)}"
        self._pp_lose(conns, fd, c, reason)

    def _pp_collect(
        self, conns: dict[int, Conn], fd: int, c: Conn, data: bytes, payload: bytes
    ) -> bool:
        """The slow path: True once the echo is complete. A partial echo waits;
        Pings are answered; an EOF, a Close or anything else ends the tunnel."""
        if not data:
            self._pp_lose(conns, fd, c, "echo:eof")
            return False
        c.buf += data
        done = False
        while True:
            try:
                frame = wire.parse(c.buf)
            except wire.FrameError:
                frame = (True, -1, b"")
            if frame is None:
                return done
            _, opcode, body = frame
            if opcode == wire.OP_PING:
                self._pp_send(conns, fd, c, wire.encode(wire.OP_PONG, body, mask=True))
            elif opcode == wire.OP_PONG:
                pass
            elif opcode == wire.OP_BINARY and body == payload and c.sent and not done:
                done = True
            else:
                self._pp_lose(
                    conns, fd, c, "echo:close" if opcode == wire.OP_CLOSE else "echo:mismatch"
                )
                return False
            if fd not in conns:
                return False

    def _pp_lose(self, conns: dict[int, Conn], fd: int, c: Conn, reason: str) -> None:
        if conns.pop(fd, None) is not None:
            self.reasons[reason] += 1
            self._lose(fd, c)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


MODES = ("idle", "pingpong", "handshake", "spike")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, default="idle")
    p.add_argument("--target", required=True, help="host:port of the proxy (or backend)")
    p.add_argument("--count", type=int, required=True, help="websockets (≤ RLIMIT_NOFILE - 64)")
    p.add_argument("--sources", default="127.0.11.1/32", help="FIRST/COUNT source addresses")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight at most")
    p.add_argument("--handshake-timeout", type=float, default=15.0)
    p.add_argument("--close-timeout", type=float, default=10.0, help="handshake: Close → EOF")
    p.add_argument("--size", type=int, default=64, help="pingpong: message payload bytes")
    p.add_argument("--open-timeout", type=float, default=300.0, help="seconds to open them all")
    p.add_argument("--hold", type=float, default=900.0, help="seconds from start, then exit")
    p.add_argument(
        "--give-up-after", type=int, default=0, help="failures after which no connect starts (0)"
    )
    p.add_argument("--path", default="/")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    at_once = args.concurrency if args.mode == "handshake" else args.count
    if not 0 < args.count <= 10**6 or args.give_up_after < 0:
        p.error("--count must be 1-1000000 and --give-up-after not negative")
    if not 0 <= args.size <= wire.MAX_PAYLOAD:
        p.error(f"--size must be 0-{wire.MAX_PAYLOAD}")
    nofile = wire.raise_nofile()
    if nofile < at_once + 64:
        p.error(f"RLIMIT_NOFILE {nofile} is too low for {at_once} connections")
    started = time.monotonic()
    hold_deadline = started + args.hold
    gen = LoadGen(
        (host, int(port)),
        source_addresses(args.sources),
        path=args.path,
        churn=args.mode == "handshake",
        close_timeout=args.close_timeout,
    )
    commands = Commands(sys.stdin.fileno())
    try:
        if args.mode in ("idle", "pingpong"):
            seconds = gen.open(
                args.count,
                args.concurrency,
                args.handshake_timeout,
                min(started + args.open_timeout, hold_deadline),
                args.give_up_after,
            )
            _say(
                f"open {gen.opened} {gen.failed} {seconds:.3f} "
                f"{json.dumps(dict(gen.reasons), separators=(',', ':'))}"
            )
            if args.mode == "idle":
                gen.hold(hold_deadline, commands)
            else:
                result = gen.pingpong(args.size, commands, hold_deadline)
                _say("result " + json.dumps(result, separators=(",", ":")))
        else:
            if args.mode == "spike":
                gen.prepare(args.count)
            _say("ready")
            if commands.wait("go", hold_deadline):
                t0 = time.monotonic()
                seconds = gen.open(
                    args.count,
                    at_once,
                    args.handshake_timeout,
                    min(t0 + args.open_timeout, hold_deadline),
                    args.give_up_after,
                )
                result = gen.summary(seconds)
                result["last_upgrade_s"] = round(max(0.0, gen.last_upgrade - t0), 6)
                _say("result " + json.dumps(result, separators=(",", ":")))
                gen.hold(hold_deadline, commands)
    except KeyboardInterrupt:
        pass
    finally:
        n = gen.opened
        gen.close_all()
    _say(f"bye {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
