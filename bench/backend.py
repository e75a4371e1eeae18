"""A cheap WebSocket echo backend for benchmarks.

``python -m bench.backend --port P --procs N [--host 127.0.0.1] [--lifetime S]``

The parent binds the port (without listening, to reserve it), forks N
children and prints ``ready <port>`` once every child listens on its own
``SO_REUSEPORT`` socket; the kernel spreads connections over the children.
Each child is one plain ``select.epoll`` loop: per connection a socket and a
small ``__slots__`` record. It answers the RFC 6455 handshake (101 with
Sec-WebSocket-Accept; anything else gets 400 and is closed), then echoes:
data frames come back unmasked with their opcode and FIN bit, a Ping gets a
Pong, a Close is answered with a Close and the connection is closed, EOF is
answered by closing.

Echoing is cheap on purpose, so that the backend is never what a benchmark
measures: a read that held only whole data frames, on a connection with
nothing buffered, is remembered with the bytes it was answered with (at most
``ECHO_CACHE`` small reads per process). A generator that sends the same
masked frame again and again (the ping-pong) is then answered with one dict
lookup and one send, and the answer is still the real echo of those bytes.

Bounded: every process stops on SIGTERM/SIGINT, when its parent goes away,
or after ``--lifetime`` seconds, whichever comes first. At exit each child
writes one line of counts to stderr.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import socket
import sys
import time

from . import wire

RECV_SIZE = 65536
ACCEPTS_PER_EVENT = 256
MAX_OUT = 4 << 20  # stop reading a connection whose unsent echo exceeds this
POLL_TIMEOUT = 0.5
ECHO_CACHE = 256  # reads remembered with their echo, per process
ECHO_CACHE_READ = 1024  # only reads up to this size are remembered

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT

RESPONSE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)
RESPONSE_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Conn:
    __slots__ = ("buf", "closing", "mask", "open", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = b""  # unsent bytes
        self.open = False  # handshake done
        self.closing = False  # close once ``out`` is sent
        self.mask = _IN


class EchoServer:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.stopping = False
        self.echoes: dict[bytes, tuple[bytes, int]] = {}  # read → (its echo, frames)
        self.counts = {"accepted": 0, "upgraded": 0, "rejected": 0, "frames": 0, "closed": 0}

    def serve(self, deadline: float, parent: int) -> None:
        lfd = self.listener.fileno()
        self.ep.register(lfd, _IN)
        next_check = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_check:
                if os.getppid() != parent:
                    break  # orphaned: the bench that started us is gone
                next_check = now + 1.0
            try:
                events = self.ep.poll(POLL_TIMEOUT, 1024)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    self._accept()
                else:
                    c = self.conns.get(fd)
                    if c is not None:
                        self._event(fd, c, ev)
        for fd in list(self.conns):
            self._close(fd)
        self.ep.close()
        self.listener.close()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    print(f"backend {os.getpid()}: accept: {e.strerror}", file=sys.stderr)
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = Conn(sock)
            self.ep.register(sock.fileno(), _IN)
            self.counts["accepted"] += 1

    def _event(self, fd: int, c: Conn, ev: int) -> None:
        if ev & _OUT and c.out:
            self._send(fd, c, b"")
            if fd not in self.conns:
                return
        if ev & (_IN | select.EPOLLERR | select.EPOLLHUP) and c.mask & _IN:
            try:
                data = c.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self._close(fd)
                return
            if not data:
                self._close(fd)
                return
            fresh = c.open and not c.buf  # the read starts at a frame boundary
            if fresh and (hit := self.echoes.get(data)) is not None:
                self.counts["frames"] += hit[1]
                self._send(fd, c, hit[0])
                return
            c.buf += data
            try:
                self._process(fd, c, data if fresh else None)
            except wire.FrameError:
                self._close(fd)
        elif ev & (select.EPOLLERR | select.EPOLLHUP) and not c.out:
            self._close(fd)

    def _process(self, fd: int, c: Conn, fresh: bytes | None = None) -> None:
        """Answer what ``c.buf`` holds; ``fresh`` is the read, when it began
        at a frame boundary (then its echo may be remembered)."""
        if not c.open:
            head = wire.split_head(c.buf)
            if head is None:
                return
            key = wire.header(head, b"sec-websocket-key")
            upgrade = (wire.header(head, b"upgrade") or b"").lower()
            if not head.startswith(b"GET ") or key is None or upgrade != b"websocket":
                self.counts["rejected"] += 1
                c.closing = True
                self._send(fd, c, RESPONSE_400)
                return
            c.open = True
            self.counts["upgraded"] += 1
            self._send(fd, c, RESPONSE_101 % wire.accept_for(key))
            if fd not in self.conns:
                return
        out = []
        data_only = True
        while (frame := wire.parse(c.buf)) is not None:
            fin, opcode, payload = frame
            self.counts["frames"] += 1
            if opcode == wire.OP_CLOSE:
                out.append(wire.encode(wire.OP_CLOSE, payload[:125], mask=False))
                c.closing = True
                c.buf.clear()
                break
            if opcode == wire.OP_PING:
                out.append(wire.encode(wire.OP_PONG, payload, mask=False))
            elif opcode != wire.OP_PONG:
                out.append(wire.encode(opcode, payload, mask=False, fin=fin))
            data_only = data_only and opcode in (wire.OP_CONT, wire.OP_TEXT, wire.OP_BINARY)
        if not (out or c.closing):
            return
        echo = b"".join(out)
        if (
            fresh is not None
            and data_only
            and not c.closing
            and not c.buf  # the read held whole frames only: its echo is a function of it
            and len(fresh) <= ECHO_CACHE_READ
            and len(self.echoes) < ECHO_CACHE
        ):
            self.echoes[fresh] = (echo, len(out))
        self._send(fd, c, echo)

    def _send(self, fd: int, c: Conn, data: bytes) -> None:
        data = c.out + data if c.out else data
        sent = 0
        if data:
            try:
                sent = c.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(fd)
                return
        c.out = data[sent:]
        if not c.out and c.closing:
            self._close(fd)
            return
        mask = (_OUT if c.out else 0) | (_IN if len(c.out) < MAX_OUT and not c.closing else 0)
        if mask != c.mask:
            self.ep.modify(fd, mask or _OUT)
            c.mask = mask

    def _close(self, fd: int) -> None:
        c = self.conns.pop(fd, None)
        if c is None:
            return
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        c.sock.close()
        self.counts["closed"] += 1


def listen_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    if listen:
        s.listen(4096)
        s.setblocking(False)
    return s


def _child(host: str, port: int, deadline: float, parent: int, ready_w: int) -> None:
    server: EchoServer | None = None

    def stop(signum: int, frame: object) -> None:
        if server is not None:
            server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wire.raise_nofile()
    server = EchoServer(listen_socket(host, port, listen=True))
    os.write(ready_w, b"r")
    os.close(ready_w)
    server.serve(deadline, parent)
    counts = " ".join(f"{k}={v}" for k, v in server.counts.items())
    print(f"backend {os.getpid()} port {port}: {counts}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--lifetime", type=float, default=3600.0, help="seconds before exiting")
    args = p.parse_args(argv)
    if not 1 <= args.procs <= 64:
        p.error("--procs must be 1-64")
    wire.raise_nofile()
    deadline = time.monotonic() + args.lifetime
    reserve = listen_socket(args.host, args.port, listen=False)  # holds the port for the group
    port = reserve.getsockname()[1]
    ready_r, ready_w = os.pipe()
    me = os.getpid()
    children: list[int] = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:  # child: plain Python, no threads, so forking is safe
            os.close(ready_r)
            reserve.close()
            code = 0
            try:
                _child(args.host, port, deadline, me, ready_w)
            except BaseException as e:
                print(f"backend child failed: {e!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        children.append(pid)
    os.close(ready_w)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    got = b""
    ready_by = time.monotonic() + 10.0
    while len(got) < args.procs and time.monotonic() < ready_by and not stopping:
        r, _, _ = select.select([ready_r], [], [], 0.2)
        if r:
            chunk = os.read(ready_r, 64)
            if not chunk:
                break
            got += chunk
    os.close(ready_r)
    reserve.close()  # the children's sockets keep the port now
    if len(got) == args.procs:
        print(f"ready {port}", flush=True)
    else:
        print(f"failed {len(got)}/{args.procs} processes listening", flush=True)
        stopping = True

    alive = set(children)
    killed_at: float | None = None
    while alive:
        if stopping or time.monotonic() >= deadline:
            if killed_at is None:
                for pid in alive:
                    _signal(pid, signal.SIGTERM)
                killed_at = time.monotonic()
            elif time.monotonic() - killed_at > 5.0:
                for pid in alive:
                    _signal(pid, signal.SIGKILL)
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            alive.discard(pid)
            if not stopping:  # a child died on its own: stop the rest too
                stopping = True
            continue
        time.sleep(0.1)
    return 0 if len(got) == args.procs else 1


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
