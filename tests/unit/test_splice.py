"""proxy.worker.splice.Splicer on real loopback TCP sockets: bytes arrive whole and in order,
the caller's held bytes go first, a full client socket hands the rest back, EOF and a
reset source stop the loop."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import termios
from collections.abc import Iterator

import pytest
from ci_policy import skip_or_fail

from proxy.worker.splice import Splicer, available

if not available():
    skip_or_fail("no os.splice on this platform (Linux, Python >= 3.10)", allow_module_level=True)


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


def small_buffers(sender: socket.socket, receiver: socket.socket) -> None:
    """4 KiB socket buffers: the client's path fills up quickly."""
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


def assert_pipe_empty(sp: Splicer) -> None:
    """The worker's pipe holds no byte (FIONREAD on its read end): the promise that lets
    one pipe serve every connection."""
    n = array.array("i", [0])
    fcntl.ioctl(sp.r, termios.FIONREAD, n, True)
    assert n[0] == 0, f"{n[0]} bytes left in the pipe between calls"


def assert_next_connection_gets_only_its_bytes(sp: Splicer) -> None:
    """A move for another connection after a stuck one delivers exactly that connection's
    bytes: nothing a previous client refused leaks into it."""
    up_w, up_r = tcp_pair()
    cl_w, cl_r = tcp_pair()
    with up_w, up_r, cl_w, cl_r:
        up_r.setblocking(False)
        cl_w.setblocking(False)
        body = b"next connection " * 64
        up_w.sendall(body)
        taken = 0
        for _ in range(1000):
            n, stuck = sp.move(up_r.fileno(), cl_w.fileno(), len(body) - taken)
            assert stuck == b""
            taken += n
            if taken == len(body):
                break
        assert taken == len(body)
        assert read_exactly(cl_r, len(body)) == body
        assert_pipe_empty(sp)


def read_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    s.settimeout(5)
    while len(out) < n:
        b = s.recv(n - len(out))
        assert b, f"EOF after {len(out)} of {n} bytes"
        out += b
    return bytes(out)


def test_moves_what_the_source_holds_and_stops_at_want(sockets) -> None:
    """Bytes reach the client whole and in order, and never more than `want` leave the source."""
    up_w, up_r, cl_w, cl_r = sockets
    sp = Splicer()
    body = os.urandom(100_000) + b"NEXT"
    up_w.sendall(body)
    moved_total = 0
    # The source may hold the bytes in pieces: splice until `want` is reached.
    for _ in range(1000):
        taken, stuck = sp.move(up_r.fileno(), cl_w.fileno(), 100_000 - moved_total)
        assert stuck == b""
        moved_total += taken
        if moved_total == 100_000:
            break
    assert moved_total == 100_000
    assert read_exactly(cl_r, 100_000) == body[:100_000]
    assert up_r.recv(16) == b"NEXT"  # never past `want`
    sp.close()


def test_nothing_to_read_is_drained_with_nothing_moved(sockets) -> None:
    """A source with nothing to read moves nothing and hands nothing back."""
    _, up_r, cl_w, _ = sockets
    sp = Splicer()
    assert sp.move(up_r.fileno(), cl_w.fileno(), 1000) == (0, b"")
    sp.close()


def test_a_full_client_socket_gives_the_rest_back_in_order(sockets) -> None:
    """What a full client socket refuses comes back as the in-order tail; the pipe is left empty."""
    up_w, up_r, cl_w, cl_r = sockets
    small_buffers(cl_w, cl_r)
    sp = Splicer()
    size = 2_000_000
    body = os.urandom(size)
    up_w.setblocking(False)
    sent = 0
    stuck_all = b""
    taken_total = 0
    for _ in range(10_000):
        if sent < size:
            with contextlib.suppress(BlockingIOError):
                sent += up_w.send(body[sent : sent + 65536])
        taken, stuck_all = sp.move(up_r.fileno(), cl_w.fileno(), size - taken_total)
        taken_total += taken
        if stuck_all:
            break
    assert stuck_all, "a 4 KiB client buffer never filled"
    delivered = read_exactly(cl_r, taken_total - len(stuck_all))
    assert delivered + stuck_all == body[:taken_total]
    assert_pipe_empty(sp)
    assert_next_connection_gets_only_its_bytes(sp)
    sp.close()


def test_held_bytes_go_first_then_the_body(sockets) -> None:
    """The caller's held bytes reach the client before the spliced body."""
    up_w, up_r, cl_w, cl_r = sockets
    sp = Splicer()
    head = [b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n", memoryview(b"first bytes")]
    body = os.urandom(50_000 - len(b"first bytes"))
    up_w.sendall(body + b"NEXT")
    taken, stuck = sp.move(up_r.fileno(), cl_w.fileno(), len(body), head)
    assert stuck == b""
    taken_total = taken
    for _ in range(1000):
        if taken_total == len(body):
            break
        taken, stuck = sp.move(up_r.fileno(), cl_w.fileno(), len(body) - taken_total)
        assert stuck == b""
        taken_total += taken
    expected = b"".join(head) + body
    assert read_exactly(cl_r, len(expected)) == expected
    assert up_r.recv(16) == b"NEXT"
    sp.close()


def test_held_bytes_go_even_when_the_source_has_nothing(sockets) -> None:
    """Held bytes are delivered even when the source has nothing to give."""
    _, up_r, cl_w, cl_r = sockets
    sp = Splicer()
    assert sp.move(up_r.fileno(), cl_w.fileno(), 1000, [b"head ", b"and more"]) == (0, b"")
    assert read_exactly(cl_r, 13) == b"head and more"
    sp.close()


def test_held_bytes_a_full_client_socket_refuses_come_back_first(sockets) -> None:
    """Held bytes a full client refuses come back first, in order, and the pipe is left empty."""
    up_w, up_r, cl_w, cl_r = sockets
    small_buffers(cl_w, cl_r)
    sp = Splicer()
    # Fill the client's path until the socket takes nothing more.
    filler = 0
    with contextlib.suppress(BlockingIOError):
        for _ in range(10_000):
            filler += cl_w.send(b"f" * 65536)
    head = [b"H" * 3000]
    up_w.sendall(b"b" * 20_000)
    taken, stuck = sp.move(up_r.fileno(), cl_w.fileno(), 20_000, head)
    assert stuck, "the full client socket took everything"
    whole = b"H" * 3000 + b"b" * taken
    sent = len(whole) - len(stuck)
    assert stuck == whole[sent:]  # the tail, in order
    assert read_exactly(cl_r, filler + sent) == b"f" * filler + whole[:sent]
    assert_pipe_empty(sp)
    assert_next_connection_gets_only_its_bytes(sp)
    sp.close()


def test_eof_from_the_source_stops_the_loop(sockets) -> None:
    """EOF on the source ends the loop after every byte before it was delivered."""
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
