"""A websocket client generator for benchmarks, driven over stdin/stdout.

``python -m bench.loadgen --target 127.0.0.1:8080 --count 9000 --sources 127.0.11.1/32``

One process, one ``select.epoll`` loop. It opens ``--count`` websockets to
the target with at most ``--concurrency`` handshakes in flight, each from one
of ``--sources`` consecutive 127.x source addresses (``IP_BIND_ADDRESS_NO_PORT``
is set before ``bind((addr, 0))``, so the kernel picks the port at connect
time, keeping 4-tuples unique without reserving ports host-wide). A handshake
is real: a random Sec-WebSocket-Key, and the answer must be 101 with the
matching Sec-WebSocket-Accept within ``--handshake-timeout``.

Protocol with the orchestrator, one line each way:

    → (when done opening)  open <ok> <failed> <seconds> <reasons as JSON>
    ← verify <k>           k random open connections send a masked text frame
    → verify <ok> <failed> ... and each must get exactly that payload echoed
    ← status
    → status <open> <dropped> <unexpected>   (dropped = closed by the peer)
    ← quit                 close every connection (FIN) and exit
    → bye <open>

Pings from the peer are answered with Pongs. The process exits by itself at
the end of ``--hold`` seconds (counted from its start) or when stdin closes.
Keep it to ≤ 9,000 connections per process (≈ 18,000 descriptor headroom);
run several processes for more.
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
import sys
import time
from collections import Counter

from . import wire

RECV_SIZE = 65536
VERIFY_TIMEOUT = 10.0

CONNECTING, SENT, OPEN = 0, 1, 2

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP


class Conn:
    __slots__ = ("accept", "buf", "deadline", "expect", "request", "sock", "state")

    def __init__(self, sock: socket.socket, request: bytes, accept: bytes, deadline: float):
        self.sock = sock
        self.state = CONNECTING
        self.request = request
        self.accept = accept
        self.deadline = deadline
        self.buf = bytearray()
        self.expect: bytes | None = None  # frame we wait to see echoed


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


class LoadGen:
    def __init__(
        self,
        target: tuple[str, int],
        sources: list[str],
        *,
        path: str = "/",
        host_header: str | None = None,
    ) -> None:
        self.target = target
        self.sources = sources
        self.path = path
        self.host_header = host_header or f"{target[0]}:{target[1]}"
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}  # every connection, any state
        self.pending: dict[int, Conn] = {}  # handshakes in flight
        self.opened = 0
        self.failed = 0
        self.reasons: Counter[str] = Counter()
        self.dropped = 0  # open connections the peer closed
        self.unexpected = 0  # frames nobody asked for
        self.verifying: set[int] = set()
        self.verify_ok = 0
        self.verify_failed = 0
        self._next_source = 0

    # -- opening --------------------------------------------------------------

    def open(
        self, count: int, concurrency: int, handshake_timeout: float, deadline: float
    ) -> float:
        """Open ``count`` websockets; returns the seconds it took."""
        started = time.monotonic()
        launched = 0
        next_sweep = 0.0
        while self.opened + self.failed < count:
            now = time.monotonic()
            if now >= deadline:
                if launched < count:
                    self.reasons["open-deadline"] += count - launched
                    self.failed += count - launched
                self._sweep(float("inf"))  # everything in flight fails
                break
            while len(self.pending) < concurrency and launched < count:
                launched += 1
                self._launch(now + handshake_timeout)
            for fd, ev in self.ep.poll(0.05, 1024):
                c = self.conns.get(fd)
                if c is not None:
                    self._event(fd, c, ev)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 0.25
        return time.monotonic() - started

    def _launch(self, deadline: float) -> None:
        src = self.sources[self._next_source % len(self.sources)]
        self._next_source += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_IP, wire.IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((src, 0))
            err = s.connect_ex(self.target)
        except OSError as e:
            s.close()
            self._fail(f"socket:{errno.errorcode.get(e.errno or 0, e.errno)}")
            return
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._fail(f"connect:{errno.errorcode.get(err, err)}")
            return
        key = wire.new_key()
        request = (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        c = Conn(s, request, wire.accept_for(key), deadline)
        self.conns[s.fileno()] = c
        self.pending[s.fileno()] = c
        self.ep.register(s.fileno(), _OUT)

    def _fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] += 1

    def _drop_handshake(self, fd: int, c: Conn, reason: str) -> None:
        del self.conns[fd]
        del self.pending[fd]
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        c.sock.close()
        self._fail(reason)

    def _sweep(self, now: float) -> None:
        for fd, c in list(self.pending.items()):
            if c.deadline <= now:
                reason = "handshake-timeout" if c.state == SENT else "connect-timeout"
                self._drop_handshake(fd, c, reason)

    def _event(self, fd: int, c: Conn, ev: int) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop_handshake(fd, c, f"connect:{errno.errorcode.get(err, err)}")
                return
            try:
                sent = c.sock.send(c.request)
            except OSError as e:
                self._drop_handshake(fd, c, f"send:{errno.errorcode.get(e.errno or 0, e.errno)}")
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
            reason = f"recv:{errno.errorcode.get(e.errno or 0, e.errno)}"
        else:
            reason = "eof-before-101"
        if c.state == SENT:
            if not data:
                self._drop_handshake(fd, c, reason)
                return
            c.buf += data
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
            c.state = OPEN
            del self.pending[fd]
            self.opened += 1
            if c.buf:
                self._frames(fd, c)
            return
        # OPEN
        if not data:
            self._lose(fd, c)
            return
        c.buf += data
        self._frames(fd, c)

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
        self.ep.close()

    def hold(self, hold_deadline: float, commands: int) -> None:
        """Serve commands from stdin (fd ``commands``) until quit, EOF or the deadline."""
        self.ep.register(commands, _IN)
        pending = b""
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
                if fd == commands:
                    chunk = os.read(commands, 4096)
                    if not chunk:
                        return  # the orchestrator is gone
                    pending += chunk
                    while b"\n" in pending:
                        line, _, pending = pending.partition(b"\n")
                        words = line.decode().split()
                        if not words:
                            continue
                        if words[0] == "quit":
                            return
                        if words[0] == "verify":
                            self.start_verify(int(words[1]) if len(words) > 1 else 100)
                            verify_deadline = time.monotonic() + VERIFY_TIMEOUT
                        elif words[0] == "status":
                            _say(f"status {self.opened} {self.dropped} {self.unexpected}")
                        else:
                            _say(f"error unknown command {words[0]!r}")
                    continue
                c = self.conns.get(fd)
                if c is not None:
                    if ev & _ERR and not ev & _IN:
                        self._lose(fd, c)
                    else:
                        self._event(fd, c, ev)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="host:port of the proxy (or backend)")
    p.add_argument("--count", type=int, required=True, help="websockets to open (≤ 9000)")
    p.add_argument("--sources", default="127.0.11.1/32", help="FIRST/COUNT source addresses")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight at most")
    p.add_argument("--handshake-timeout", type=float, default=15.0)
    p.add_argument("--open-timeout", type=float, default=300.0, help="seconds to open them all")
    p.add_argument("--hold", type=float, default=900.0, help="seconds from start, then exit")
    p.add_argument("--path", default="/")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not 0 < args.count <= 9500:
        p.error("--count must be 1-9500 (run more processes for more)")
    nofile = wire.raise_nofile()
    if nofile < args.count + 64:
        p.error(f"RLIMIT_NOFILE {nofile} is too low for {args.count} connections")
    started = time.monotonic()
    gen = LoadGen((host, int(port)), source_addresses(args.sources), path=args.path)
    try:
        seconds = gen.open(
            args.count,
            args.concurrency,
            args.handshake_timeout,
            min(started + args.open_timeout, started + args.hold),
        )
        _say(
            f"open {gen.opened} {gen.failed} {seconds:.3f} "
            f"{json.dumps(dict(gen.reasons), separators=(',', ':'))}"
        )
        gen.hold(started + args.hold, sys.stdin.fileno())
    except KeyboardInterrupt:
        pass
    finally:
        n = gen.opened
        gen.close_all()
    _say(f"bye {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
