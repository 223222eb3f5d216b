"""Writes held to the end of the loop iteration (proxy.worker.batch), and the deadline sweep,
with the real client and upstream protocols over recording transports and a real uvloop
loop (no sockets)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import uvloop

from proxy.config import loads
from proxy.telemetry.metrics import WHERE_BATCH, WHERE_SWEEP, WorkerStats
from proxy.worker.client import ClientConnection
from proxy.worker.client_io import HOLD_MAX
from proxy.worker.context import WorkerContext
from proxy.worker.upstream import UpstreamConnection

CONFIG = """
[node]
id = "t"
[table]
name = "batch-test"
[[app]]
name = "a"
hosts = ["a.test"]
[[instance]]
app = "a"
id = "a1"
address = "127.0.0.1:9"
"""

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Recorder:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, lines: list[bytes]) -> None:
        self.writes.append(b"".join(lines))

    def get_extra_info(self, key: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if key == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class World:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        cfg = loads(CONFIG)
        self.ctx = WorkerContext(self.loop, cfg, WorkerStats(["a"], 0, 1, 1), None)
        self.ups: list[tuple[UpstreamConnection, Recorder]] = []
        for _ in range(2):
            up = UpstreamConnection(self.ctx.pool, "127.0.0.1:9")
            ut = Recorder()
            up.connection_made(ut)  # type: ignore[arg-type]
            self.ctx.pool.put(up)
            self.ups.append((up, ut))

    def client(self) -> tuple[object, Recorder]:
        c = ClientConnection(self.ctx, False)
        t = Recorder()
        c.connection_made(t)
        return c, t

    def end_iteration(self) -> None:
        """Run the loop until the callbacks ready now have run."""
        self.loop.run_until_complete(_yield())


async def _yield() -> None:
    pass


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.loop.close()


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode()


def test_request_heads_wait_for_the_end_of_the_iteration(world: World) -> None:
    """Two clients' requests handled in one iteration: nothing reaches the instance until
    the iteration ends, then each connection gets its head in one write."""
    (c1, _), (c2, _) = world.client(), world.client()
    c1.data_received(_request("/one"))  # type: ignore[attr-defined]
    c2.data_received(_request("/two"))  # type: ignore[attr-defined]
    assert [ut.writes for _, ut in world.ups] == [[], []]
    world.end_iteration()
    heads = sorted(w for _, ut in world.ups for w in ut.writes)
    assert len(heads) == 2 and all(len(ut.writes) == 1 for _, ut in world.ups), heads
    assert heads[0].startswith(b"GET /one ") and heads[1].startswith(b"GET /two "), heads


def test_responses_wait_for_the_end_of_the_iteration(world: World) -> None:
    """A response read from the instance is written to the client when the iteration ends,
    whole, in one write; the pooled connection is free again at once."""
    c, ct = world.client()
    c.data_received(_request("/r"))  # type: ignore[attr-defined]
    world.end_iteration()
    up = next(u for u, ut in world.ups if ut.writes)
    up.data_received(RESPONSE)
    assert ct.writes == []
    world.end_iteration()
    assert len(ct.writes) == 1, ct.writes
    assert ct.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and ct.writes[0].endswith(b"\r\n\r\nok")


def test_own_answer_follows_held_response(world: World) -> None:
    """Pipelined: a proxied answer still held, then the proxy's own 404 for the next
    request: the held bytes are written first."""
    c, ct = world.client()
    c.data_received(_request("/first") + b"GET /x HTTP/1.1\r\nHost: nope.test\r\n\r\n")  # type: ignore[attr-defined]
    world.end_iteration()
    up = next(u for u, ut in world.ups if ut.writes)
    up.data_received(RESPONSE)  # finishes /first, then answers /x itself
    assert len(ct.writes) == 2, ct.writes
    assert ct.writes[0].startswith(b"HTTP/1.1 200 OK") and ct.writes[1].startswith(
        b"HTTP/1.1 404 "
    ), ct.writes


def test_body_follows_its_held_head(world: World) -> None:
    """A request body written right away goes after its held head, never before."""
    c, _ = world.client()
    c.data_received(  # type: ignore[attr-defined]
        b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello"
    )
    ut = next(ut for _, ut in world.ups if ut.writes)
    assert ut.writes[0].startswith(b"POST /p ") and ut.writes[-1] == b"hello", ut.writes
    world.end_iteration()
    assert ut.writes[-1] == b"hello" and len(ut.writes) == 2, ut.writes


def test_held_bytes_are_bounded(world: World) -> None:
    """Response bytes are held up to HOLD_MAX: reads that bring more are written at once
    (a slow client's backpressure must see them); the last small one waits."""
    c, ct = world.client()
    c.data_received(_request("/big"))  # type: ignore[attr-defined]
    world.end_iteration()
    up = next(u for u, ut in world.ups if ut.writes)
    piece = b"%x\r\n%s\r\n" % (40000, b"x" * 40000)
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + piece)
    assert ct.writes == []
    up.data_received(piece)
    assert len(ct.writes) == 1 and len(ct.writes[0]) > HOLD_MAX, [len(w) for w in ct.writes]
    up.data_received(b"0\r\n\r\n")
    assert len(ct.writes) == 1, [len(w) for w in ct.writes]
    world.end_iteration()
    assert len(ct.writes) == 2 and ct.writes[1] == b"0\r\n\r\n", [len(w) for w in ct.writes]


class Finished(Recorder):
    """A transport whose write end is shut: uvloop raises on write() after write_eof()."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("Cannot call write() after write_eof()")

    def writelines(self, lines: list[bytes]) -> None:
        raise RuntimeError("Cannot call writelines() after write_eof()")


def _answered_client(world: World, transport: Recorder) -> object:
    c = ClientConnection(world.ctx, False)
    c.connection_made(transport)
    c.data_received(_request("/r"))  # type: ignore[attr-defined]
    world.end_iteration()
    up = next(u for u, ut in world.ups if ut.writes and getattr(u.exchange, "conn", None) is c)
    up.data_received(RESPONSE)  # held for the end of the iteration
    return c


def test_a_held_write_that_raises_closes_only_its_connection(world: World) -> None:
    """One client's held write raises: it is counted and that connection closed; the other
    client's held response is still written at the end of the same iteration."""
    bad, good = Finished(), Recorder()
    _answered_client(world, bad)
    _answered_client(world, good)
    world.end_iteration()
    assert len(good.writes) == 1 and good.writes[0].startswith(b"HTTP/1.1 200 OK"), good.writes
    assert bad.closing
    assert world.ctx.stats.internal_errors[WHERE_BATCH] == 1


def test_sweep_survives_a_deadline_that_raises(world: World) -> None:
    """A connection whose timeout handling raises is counted and closed; the sweep goes on
    and the other connections past their deadline still get their 408."""
    bad = Finished()
    goods = [Recorder() for _ in range(3)]
    conns = []
    for t in [bad, *goods]:
        c = ClientConnection(world.ctx, False)
        c.connection_made(t)
        conns.append(c)
    now = world.loop.time()
    for c in conns:
        c.deadline = now - 1.0  # type: ignore[attr-defined]  # past: a request head is late
    world.ctx.sweep()
    for t in goods:
        assert t.writes and t.writes[0].startswith(b"HTTP/1.1 408 "), t.writes
    assert bad.closing
    assert world.ctx.stats.internal_errors[WHERE_SWEEP] == 1
