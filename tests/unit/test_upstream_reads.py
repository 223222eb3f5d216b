"""How much a response's first read takes (proxy.worker.upstream): the head and a small body in
one read; little more than the head on a connection whose last body was big, so that
the body stays in the socket for splice. Real protocols, recording transports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_batch import World, _request

from proxy.worker.upstream import HEAD_READ, HEAD_READ_BIG, SPLICE_MIN


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.loop.close()


def _exchange(world: World, response: bytes) -> tuple[int, bytes]:
    """One request through a client; `response` read in pieces the size the upstream
    connection's buffer asks for. Returns the first read's size and what the client
    got."""
    c, ct = world.client()
    c.data_received(_request("/x"))  # type: ignore[attr-defined]
    world.end_iteration()
    up = next(u for u, ut in world.ups if ut.writes and u.exchange is not None)
    sizes: list[int] = []
    at = 0
    while at < len(response):
        n = len(up.get_buffer(-1))
        sizes.append(n)
        up.data_received(response[at : at + n])
        at += n
    world.end_iteration()
    for _, ut in world.ups:
        ut.writes.clear()
    return sizes[0], b"".join(ct.writes)


def _response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def test_first_read_size_follows_the_last_body(world: World) -> None:
    world.ups[1][0].close()  # one connection: every exchange uses it
    big = bytes(i % 251 for i in range(4 * SPLICE_MIN))
    first, got = _exchange(world, _response(big))
    assert first == HEAD_READ and got.endswith(b"\r\n\r\n" + big)
    # After a big body the first read is small; head and body arrive whole all the same.
    first, got = _exchange(world, _response(big[::-1]))
    assert first == HEAD_READ_BIG and got.endswith(b"\r\n\r\n" + big[::-1])
    first, got = _exchange(world, _response(b"small"))
    assert first == HEAD_READ_BIG and got.endswith(b"\r\n\r\nsmall")
    # After a small body: a first read that takes a small or mid-size body whole.
    first, got = _exchange(world, _response(b"m" * 5000))
    assert first == HEAD_READ and got.endswith(b"\r\n\r\n" + b"m" * 5000)


def test_a_head_longer_than_the_small_read_arrives_whole(world: World) -> None:
    world.ups[1][0].close()
    _exchange(world, _response(b"b" * (2 * SPLICE_MIN)))
    cookie = b"Set-Cookie: " + b"c" * (3 * HEAD_READ_BIG) + b"\r\n"
    response = b"HTTP/1.1 200 OK\r\n" + cookie + b"Content-Length: 5\r\n\r\nhello"
    first, got = _exchange(world, response)
    assert first == HEAD_READ_BIG
    assert cookie in got and got.endswith(b"\r\n\r\nhello")
