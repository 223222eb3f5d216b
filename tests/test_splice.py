"""proxy.splice.Splicer on real loopback TCP sockets: bytes arrive whole and in order,
a full client socket hands the rest back, EOF and a reset source stop the loop."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from proxy.splice import Splicer, available

pytestmark = pytest.mark.skipif(not available(), reason="no os.splice on this platform")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(upstream writer, proxy's upstream side, proxy's client side, client reader)."""
    up_w, up_r = tcp_pair()
    cl_w, cl_r = tcp_pair()
    for s in (up_r, cl_w):
        s.setblocking(False)
    yield up_w, up_r, cl_w, cl_r
    for s in (up_w, up_r, cl_w, cl_r):
        s.close()


def read_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    s.settimeout(5)
    while len(out) < n:
        b = s.recv(n - len(out))
        assert b, f"EOF after {len(out)} of {n} bytes"
        out += b
    return bytes(out)


def test_moves_what_the_source_holds_and_stops_at_want(sockets) -> None:
    up_w, up_r, cl_w, cl_r = sockets
    sp = Splicer()
    body = os.urandom(100_000) + b"NEXT"
    up_w.sendall(body)
    moved_total = 0
    # The source may hold the bytes in pieces: splice until `want` is reached.
    for _ in range(1000):
        moved, stuck = sp.move(up_r.fileno(), cl_w.fileno(), 100_000 - moved_total)
        assert stuck == b""
        moved_total += moved
        if moved_total == 100_000:
            break
    assert moved_total == 100_000
    assert read_exactly(cl_r, 100_000) == body[:100_000]
    assert up_r.recv(16) == b"NEXT"  # never past `want`
    sp.close()


def test_nothing_to_read_is_drained_with_nothing_moved(sockets) -> None:
    _, up_r, cl_w, _ = sockets
    sp = Splicer()
    assert sp.move(up_r.fileno(), cl_w.fileno(), 1000) == (0, b"")
    sp.close()


def test_a_full_client_socket_gives_the_rest_back_in_order(sockets) -> None:
    up_w, up_r, cl_w, cl_r = sockets
    cl_w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    cl_r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sp = Splicer()
    size = 2_000_000
    body = os.urandom(size)
    up_w.setblocking(False)
    sent = 0
    stuck_all = bytearray()
    moved_total = 0
    for _ in range(10_000):
        if sent < size:
            with contextlib.suppress(BlockingIOError):
                sent += up_w.send(body[sent : sent + 65536])
        want = size - moved_total - len(stuck_all)
        moved, stuck = sp.move(up_r.fileno(), cl_w.fileno(), want)
        moved_total += moved
        if stuck:
            stuck_all += stuck
            break
    assert stuck_all, "a 4 KiB client buffer never filled"
    delivered = read_exactly(cl_r, moved_total)
    assert delivered + bytes(stuck_all) == body[: moved_total + len(stuck_all)]
    sp.close()


def test_eof_from_the_source_stops_the_loop(sockets) -> None:
    up_w, up_r, cl_w, cl_r = sockets
    sp = Splicer()
    up_w.sendall(b"x" * 5000)
    up_w.close()
    moved_total = 0
    for _ in range(100):
        moved, stuck = sp.move(up_r.fileno(), cl_w.fileno(), 10_000)
        assert stuck == b""
        moved_total += moved
        if moved == 0:
            break
    assert moved_total == 5000
    assert read_exactly(cl_r, 5000) == b"x" * 5000
    sp.close()
