"""Userspace latency relay on loopback: UDP datagrams and TCP streams, delayed and lossy.

Owns the routes (listen -> target, one-way delay each direction, seeded datagram
loss) for tests, the demo and benches; `python -m pinger.relay --route ...` prints
READY. Threads with precise timed waits (the event loops here tick in ms). It
must only touch 127.0.0.0/8 and keeps every table bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import ipaddress
import random
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

Addr = tuple[str, int]
MAX_UDP_CLIENTS = 256  # source addresses one UDP route remembers (oldest forgotten first)
MAX_TCP_CONNS = 256
MAX_QUEUE = 100_000  # datagrams waiting for their time; more are dropped
CHUNK = 65536
SPIN = 0.0004  # seconds before a datagram's due time that delivery stops sleeping


def loopback(addr: Addr) -> Addr:
    """`addr` if its host is in 127.0.0.0/8, else ValueError."""
    if ipaddress.ip_address(addr[0]) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"{addr[0]} is not a 127.0.0.0/8 address")
    return addr


def _addr(raw: str) -> Addr:
    host, _, port = raw.rpartition(":")
    return loopback((host, int(port)))


@dataclass(frozen=True, slots=True)
class Route:
    """One relayed path: clients reach `listen`, the relay forwards to `target`."""

    kind: str  # "udp" | "tcp"
    listen: Addr
    target: Addr
    delay: float  # seconds, client -> target
    back_delay: float  # seconds, target -> client
    loss: float = 0.0  # share of datagrams dropped client -> target
    back_loss: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Route:
        """`udp|tcp,LISTEN,TARGET,DELAY_MS,BACK_MS[,LOSS[,BACK_LOSS]]`."""
        parts = spec.split(",")
        if len(parts) < 5 or parts[0] not in ("udp", "tcp"):
            raise ValueError(f"route {spec!r}: want udp|tcp,LISTEN,TARGET,DELAY_MS,BACK_MS[,LOSS]")
        loss = [float(x) for x in parts[5:7]] + [0.0, 0.0]
        r = cls(
            parts[0],
            _addr(parts[1]),
            _addr(parts[2]),
            float(parts[3]) / 1000,
            float(parts[4]) / 1000,
            loss[0],
            loss[1],
        )
        if not (0 <= r.loss <= 1 and 0 <= r.back_loss <= 1 and r.delay >= 0 <= r.back_delay):
            raise ValueError(f"route {spec!r}: loss must be 0..1, delays >= 0")
        return r


class _Delivery(threading.Thread):
    """Sends queued datagrams at their due time (monotonic), with a precise timed wait."""

    def __init__(self) -> None:
        super().__init__(name="relay-delivery", daemon=True)
        self.heap: list[tuple[float, int, socket.socket, bytes, Addr]] = []
        self.cond = threading.Condition()
        self.n = 0
        self.stopping = False
        self.dropped = 0
        self.sent = 0

    def push(self, due: float, sock: socket.socket, data: bytes, addr: Addr) -> None:
        with self.cond:
            if len(self.heap) >= MAX_QUEUE:
                self.dropped += 1
                return
            self.n += 1
            heapq.heappush(self.heap, (due, self.n, sock, data, addr))
            if self.heap[0][1] == self.n:
                self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping:
                    if self.heap:
                        left = self.heap[0][0] - time.monotonic()
                        if left <= SPIN:
                            break
                        self.cond.wait(left - SPIN)
                    else:
                        self.cond.wait(0.5)
                if self.stopping:
                    return
                due, _, sock, data, addr = heapq.heappop(self.heap)
            while time.monotonic() < due:  # a thread wakes ~150 us late: spin the rest
                pass
            try:
                sock.sendto(data, addr)
                self.sent += 1
            except OSError:
                self.dropped += 1

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()


_TIMESPEC = struct.Struct("@qq")
_SO_TIMESTAMPNS = 35  # Linux (asm-generic/socket.h); Python 3.11 does not name it
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)


def _timestamped(sock: socket.socket) -> socket.socket:
    """Ask the kernel to stamp each datagram's arrival (the delay counts from there)."""
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    return sock


def _arrival(anc: list[tuple[int, int, bytes]]) -> float:
    """Monotonic arrival time from the kernel's wall-clock stamp (now if there is none)."""
    mono, wall = time.monotonic(), time.time()
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            sec, ns = _TIMESPEC.unpack(data[: _TIMESPEC.size])
            sec, ns = int(sec), int(ns)
            return mono - max(0.0, wall - (sec + ns / 1e9))
    return mono


class _UdpRoute:
    """A listen socket and, per client source, an upstream socket towards the target."""

    def __init__(self, route: Route, sel: selectors.BaseSelector, rng: random.Random) -> None:
        self.route = route
        self.sel = sel
        self.rng = rng
        self.sock = _timestamped(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.bind(route.listen)
        self.sock.setblocking(False)
        self.address: Addr = self.sock.getsockname()
        self.clients: dict[Addr, socket.socket] = {}  # insertion order = age
        self.lost = 0
        sel.register(self.sock, selectors.EVENT_READ, (self, None))

    def upstream(self, client: Addr) -> socket.socket:
        up = self.clients.get(client)
        if up is None:
            if len(self.clients) >= MAX_UDP_CLIENTS:
                old_client, old = next(iter(self.clients.items()))
                del self.clients[old_client]
                self.sel.unregister(old)
                old.close()
            up = _timestamped(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            up.bind((self.address[0], 0))
            up.setblocking(False)
            self.clients[client] = up
            self.sel.register(up, selectors.EVENT_READ, (self, client))
        return up

    def readable(self, sock: socket.socket, client: Addr | None, out: _Delivery) -> None:
        r = self.route
        for _ in range(64):  # bounded: other sockets get their turn
            try:
                data, anc, _, src = sock.recvmsg(CHUNK, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP errors surface here on some kernels: nothing to relay
            now = _arrival(anc)
            if client is None:  # client -> target
                if r.loss and self.rng.random() < r.loss:
                    self.lost += 1
                    continue
                out.push(now + r.delay, self.upstream(src), data, r.target)
            else:  # target -> client, back through the listen socket
                if r.back_loss and self.rng.random() < r.back_loss:
                    self.lost += 1
                    continue
                out.push(now + r.back_delay, self.sock, data, client)

    def close(self) -> None:
        for s in [self.sock, *self.clients.values()]:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(s)
            s.close()


class _Pipe(threading.Thread):
    """One direction of a relayed TCP connection: read, wait out the delay, write."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        super().__init__(name="relay-pipe", daemon=True)
        self.src, self.dst, self.delay = src, dst, delay
        self.q: deque[tuple[float, bytes]] = deque()
        self.cond = threading.Condition()
        self.writer = threading.Thread(target=self._write, name="relay-pipe-w", daemon=True)
        self.done = False

    def run(self) -> None:
        self.writer.start()
        while True:
            try:
                data = self.src.recv(CHUNK)
            except OSError:
                data = b""
            with self.cond:
                self.q.append((time.monotonic() + self.delay, data))
                self.cond.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.q:
                    self.cond.wait()
                due, data = self.q[0]
                left = due - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.q.popleft()
            try:
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    break
                self.dst.sendall(data)
            except OSError:
                with contextlib.suppress(OSError):
                    self.src.shutdown(socket.SHUT_RDWR)
                break
        self.done = True


class _TcpRoute(threading.Thread):
    def __init__(self, route: Route) -> None:
        super().__init__(name="relay-tcp", daemon=True)
        self.route = route
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(route.listen)
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.address: Addr = self.sock.getsockname()
        self.conns: list[tuple[socket.socket, socket.socket, _Pipe, _Pipe]] = []
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                self._reap()
                continue
            except OSError:
                return
            self._reap()
            if len(self.conns) >= MAX_TCP_CONNS:
                client.close()
                continue
            try:
                up = socket.create_connection(self.route.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, up):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fwd = _Pipe(client, up, self.route.delay)
            back = _Pipe(up, client, self.route.back_delay)
            self.conns.append((client, up, fwd, back))
            fwd.start()
            back.start()

    def _reap(self) -> None:
        keep = []
        for c in self.conns:
            if c[2].done and c[3].done:
                c[0].close()
                c[1].close()
            else:
                keep.append(c)
        self.conns = keep

    def close(self) -> None:
        self.stopping = True
        self.sock.close()
        for client, up, _, _ in self.conns:
            for s in (client, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


class Relay:
    """Every route of one relay, started in background threads; `close()` stops them."""

    def __init__(self, routes: Sequence[Route], seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.delivery = _Delivery()
        self.udp: list[_UdpRoute] = []
        self.tcp: list[_TcpRoute] = []
        self.stopping = False
        self._rx = threading.Thread(target=self._receive, name="relay-rx", daemon=True)
        try:
            for r in routes:
                if r.kind == "udp":
                    self.udp.append(_UdpRoute(r, self.sel, self.rng))
                else:
                    self.tcp.append(_TcpRoute(r))
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[tuple[str, Addr]]:
        return [("udp", u.address) for u in self.udp] + [("tcp", t.address) for t in self.tcp]

    def start(self) -> None:
        self.delivery.start()
        self._rx.start()
        for t in self.tcp:
            t.start()

    def _receive(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.2):
                route, client = key.data
                route.readable(key.fileobj, client, self.delivery)

    def close(self) -> None:
        self.stopping = True
        self.delivery.stop()
        if self._rx.is_alive():
            self._rx.join(timeout=2)
        for u in self.udp:
            u.close()
        for t in self.tcp:
            t.close()
        self.sel.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pinger.relay", description=__doc__)
    ap.add_argument(
        "--route",
        action="append",
        required=True,
        help="udp|tcp,LISTEN,TARGET,DELAY_MS,BACK_MS[,LOSS[,BACK_LOSS]] (127.0.0.0/8 only)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the datagram loss")
    args = ap.parse_args(argv)
    try:
        routes = [Route.parse(s) for s in args.route]
        relay = Relay(routes, args.seed)
    except (ValueError, OSError) as e:
        print(f"relay: {e}", file=sys.stderr)
        return 2
    return serve(relay)


def serve(relay: Relay) -> int:
    """Run `relay` until SIGTERM or SIGINT, after a READY line naming its addresses."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relay.start()
    listed = " ".join(f"{k}={h}:{p}" for k, (h, p) in relay.addresses)
    print(f"READY relay {listed}", flush=True)
    while not stop.wait(1.0):
        pass
    relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
