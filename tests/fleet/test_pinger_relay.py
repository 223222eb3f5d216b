"""Pins the latency relay: UDP and TCP delayed by the configured one-way times, loopback only."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pinger.relay import Relay, Route, loopback


@pytest.fixture
def echo() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A UDP and a TCP echo server on 127.0.0.5, served by threads."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.5", 0))
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.5", 0))
    t.listen(8)
    stop = threading.Event()

    def udp() -> None:
        u.settimeout(0.2)
        while not stop.is_set():
            try:
                d, a = u.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            u.sendto(d, a)

    def tcp() -> None:
        t.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = t.accept()
            except (TimeoutError, OSError):
                continue
            with c:
                c.settimeout(5)
                while data := c.recv(65536):
                    c.sendall(data)

    threads = [threading.Thread(target=f, daemon=True) for f in (udp, tcp)]
    for th in threads:
        th.start()
    yield u, t
    stop.set()
    for th in threads:
        th.join(timeout=2)
    u.close()
    t.close()


def _udp_rtts(addr: tuple[str, int], n: int) -> list[float]:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    out = []
    with c:
        for i in range(n):
            t = time.monotonic()
            c.sendto(b"%d" % i, addr)
            assert c.recvfrom(64)[0] == b"%d" % i
            out.append((time.monotonic() - t) * 1000)
    return out


def test_udp_round_trip_is_the_two_one_way_delays(echo: tuple[socket.socket, ...]) -> None:
    """Through a 10 ms / 15 ms route, a datagram round trip takes 25 ms (+1 ms at most)."""
    r = Relay([Route("udp", ("127.0.0.6", 0), echo[0].getsockname(), 0.010, 0.015)])
    r.start()
    try:
        rtts = sorted(_udp_rtts(r.udp[0].address, 15))
    finally:
        r.close()
    assert 25.0 <= rtts[len(rtts) // 2] <= 26.0, rtts
    assert rtts[0] >= 25.0, rtts


def test_tcp_stream_is_delayed_both_ways(echo: tuple[socket.socket, ...]) -> None:
    """A TCP echo through a 10 ms / 10 ms route answers after ~20 ms, bytes intact and in order."""
    r = Relay([Route("tcp", ("127.0.0.6", 0), echo[1].getsockname(), 0.010, 0.010)])
    r.start()
    try:
        with socket.create_connection(r.tcp[0].address, timeout=5) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = time.monotonic()
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
            took = (time.monotonic() - t) * 1000
            payload = bytes(range(256)) * 1000
            c.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += c.recv(65536)
            assert got == payload
    finally:
        r.close()
    assert 20.0 <= took <= 30.0, took


def test_seeded_loss_drops_the_configured_share(echo: tuple[socket.socket, ...]) -> None:
    """With loss 0.3 and a fixed seed, about 30 % of 400 datagrams never come back."""
    r = Relay([Route("udp", ("127.0.0.6", 0), echo[0].getsockname(), 0, 0, 0.3)], seed=11)
    r.start()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(0.02)  # the echo answers in well under 1 ms: a dropped datagram costs 20 ms
    seen: set[bytes] = set()
    try:
        for i in range(400):
            c.sendto(b"%d" % i, r.udp[0].address)
            with contextlib.suppress(TimeoutError):
                seen.add(c.recvfrom(64)[0])
        c.settimeout(0.2)
        while True:  # stragglers
            try:
                seen.add(c.recvfrom(64)[0])
            except TimeoutError:
                break
    finally:
        c.close()
        r.close()
    back = len(seen)
    lost = r.udp[0].lost
    assert 0.25 <= lost / 400 <= 0.35, lost
    assert back == 400 - lost


@pytest.mark.parametrize(
    "spec", ["udp,10.0.0.1:1,127.0.0.2:1,1,1", "tcp,127.0.0.2:1,8.8.8.8:53,1,1"]
)
def test_routes_outside_loopback_are_refused(spec: str) -> None:
    """A route that names any address outside 127.0.0.0/8 is refused before binding."""
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        Route.parse(spec)
    with pytest.raises(ValueError):
        loopback(("192.168.1.1", 80))
