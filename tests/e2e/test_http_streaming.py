"""Streaming through the proxy with backpressure both ways, on real sockets."""

from __future__ import annotations

import hashlib
import select
import time
from collections.abc import Callable

import pytest
from proxyctl import Client, Proxy, Upstream, request_bytes
from upstream import pattern, pattern_sha256

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(60)]

MiB = 1 << 20
# What the workers' resident memory may grow by while one transfer is stalled: a few
# write buffers' high-water marks, the splice pipe and allocator slack. Kernel socket
# buffers are not in a process's RSS, so this is the proxy's own buffering alone; a
# proxy that held the stalled body (tens of MiB) would exceed it several times over.
OWN_BUFFER_ALLOWANCE = 8 * MiB


def workers_rss(proxy: Proxy) -> int:
    """Resident memory of the proxy's serving workers together (VmRSS, /proc/<pid>/status)."""
    total = 0
    for pid in proxy.serving_pids():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def wait_steady(read: Callable[[], int], timeout: float = 15.0) -> int:
    """Poll `read` until it gives the same non-zero value twice 0.3 s apart (a transfer
    that has stopped moving); its last value."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = read()
        if now == last and now > 0:
            return now
        last = now
    raise AssertionError(f"the transfer never stopped moving (at {last} bytes)")


def slow(c: Client) -> None:
    """Make `c` a slow reader: 16 KiB per recv, 1 ms before each."""
    c.recv_size = 16 * 1024
    c.read_delay = 0.001


@pytest.mark.parametrize("chunked", [False, True])
def test_10mib_download_to_slow_reader_is_intact(proxy: Proxy, chunked: bool) -> None:
    """A 10 MiB streamed download read slowly by the client arrives byte for byte."""
    n = 10 * MiB
    with Client(proxy.port, timeout=20, rcvbuf=64 * 1024) as c:
        c.send(request_bytes("GET", f"/big?bytes={n}&chunked={int(chunked)}"))
        time.sleep(1.0)
        slow(c)
        r = c.response(timeout=15)
    assert r.status == 200, r
    assert len(r.body) == n
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(n)


@pytest.mark.parametrize("chunked", [False, True])
def test_download_backpressure_stops_the_upstream(
    proxy: Proxy, upstream: Upstream, chunked: bool
) -> None:
    """When the client stops reading, the proxy stops reading the upstream and holds no more
    than a bounded buffer of its own (its workers' RSS barely grows)."""
    n = 96 * MiB
    tag = f"dl{time.monotonic_ns()}"
    rss0 = workers_rss(proxy)
    with Client(proxy.port, timeout=20, rcvbuf=64 * 1024) as c:
        c.send(request_bytes("GET", f"/big?bytes={n}&chunked={int(chunked)}&tag={tag}"))
        status, _, _, _, raw = c.read_head(timeout=5)
        assert status == 200, raw
        sent = wait_steady(lambda: int(upstream.stats()["tags"].get(tag, {}).get("sent", 0)))
        grown = workers_rss(proxy) - rss0
        assert sent < n, "the upstream sent everything while the client read nothing"
        assert grown < OWN_BUFFER_ALLOWANCE, (
            f"the workers grew by {grown / MiB:.1f} MiB while the client read nothing "
            f"(upstream sent {sent / MiB:.1f} MiB): the proxy buffers instead of applying "
            "backpressure"
        )
        c.buf = raw + b"\r\n\r\n" + c.buf  # read it again through the framing reader
        r = c.response(timeout=20)
    assert r.status == 200, r
    assert r.body[: 64 * 1024] == pattern(0, 64 * 1024)
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(n)


@pytest.mark.parametrize("chunked", [False, True])
def test_big_upload_arrives_intact(proxy: Proxy, chunked: bool) -> None:
    """A 20 MiB upload (Content-Length or chunked) reaches the upstream intact."""
    n = 20 * MiB
    headers = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(n))]
    with Client(proxy.port, timeout=20) as c:
        c.send(request_bytes("POST", "/upload", headers=headers))
        h = hashlib.sha256()
        step = 256 * 1024
        for off in range(0, n, step):
            piece = pattern(off, min(step, n - off))
            h.update(piece)
            c.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            c.send(b"0\r\n\r\n")
        r = c.response(timeout=20)
    assert r.status == 200, r
    assert r.json()["body_len"] == n
    assert r.json()["body_sha256"] == h.hexdigest()


def test_upload_to_slow_reader_applies_backpressure(proxy: Proxy, upstream: Upstream) -> None:
    """While the upstream reads nothing, the client cannot push the upload into the proxy:
    the proxy's own buffer (its workers' RSS) stays bounded."""
    n = 96 * MiB
    tag = f"ul{time.monotonic_ns()}"
    pause = 2.5
    rss0 = workers_rss(proxy)
    with Client(proxy.port, timeout=20, sndbuf=64 * 1024) as c:
        c.send(
            request_bytes(
                "POST", f"/slowread?pause={pause}&tag={tag}", headers=[("Content-Length", str(n))]
            )
        )
        c.sock.setblocking(False)
        sent = 0
        stop_at = time.monotonic() + pause - 0.5
        h = hashlib.sha256()
        while sent < n and time.monotonic() < stop_at:
            r, w, _ = select.select([c.sock], [c.sock], [], 0.05)
            if r:  # an answer before the upload is done: it can only be a refusal
                c.sock.setblocking(True)
                early = c.response(timeout=5)
                raise AssertionError(f"proxy answered after {sent} upload bytes: {early}")
            if not w:
                continue
            piece = pattern(sent, min(256 * 1024, n - sent))
            try:
                k = c.sock.send(piece)
            except BlockingIOError:
                continue
            h.update(piece[:k])
            sent += k
        grown = workers_rss(proxy) - rss0
        assert sent < n, "the client pushed the whole upload while the upstream read nothing"
        assert grown < OWN_BUFFER_ALLOWANCE, (
            f"the workers grew by {grown / MiB:.1f} MiB while the upstream read nothing "
            f"(client pushed {sent / MiB:.1f} MiB): the proxy buffers the upload instead "
            "of pausing the client"
        )
        c.sock.setblocking(True)
        c.sock.settimeout(20)
        while sent < n:
            piece = pattern(sent, min(256 * 1024, n - sent))
            c.send(piece)
            h.update(piece)
            sent += len(piece)
        r = c.response(timeout=20)
    assert r.status == 200, r
    assert r.json()["body_len"] == n
    assert r.json()["body_sha256"] == h.hexdigest()


SPLICE_SIZES = [0, 1, 16383, 16384, 16385, 32768 + 7, 65536, 65536 + 1, 1_000_001]


def test_sized_bodies_around_the_splice_threshold_in_sequence(proxy: Proxy) -> None:
    """Content-Length bodies just under, at and over the sizes where the proxy stops copying
    and splices socket to socket: each arrives whole, in order, on one keep-alive connection."""
    with Client(proxy.port, timeout=10) as c:
        for n in SPLICE_SIZES:
            c.send(request_bytes("GET", f"/big?bytes={n}"))
            r = c.response(timeout=10)
            assert r.status == 200, (n, r)
            assert len(r.body) == n
            assert r.body == pattern(0, n), f"body of {n} bytes differs"


def test_sized_bodies_pipelined_arrive_in_order(proxy: Proxy) -> None:
    """Pipelined requests for big and small bodies: answered in order, none spliced into
    the middle of another (a spliced body must never overtake bytes still buffered)."""
    sizes = SPLICE_SIZES + list(reversed(SPLICE_SIZES))
    with Client(proxy.port, timeout=10) as c:
        c.send(b"".join(request_bytes("GET", f"/big?bytes={n}") for n in sizes))
        for n in sizes:
            r = c.response(timeout=10)
            assert r.status == 200, (n, r)
            assert r.body == pattern(0, n), f"body of {n} bytes differs"


def test_sized_body_arriving_in_pieces(proxy: Proxy) -> None:
    """A big body the upstream sends in 7000-byte pieces 2 ms apart: the proxy splices
    what is there, waits for more, and the client gets every byte once, in order."""
    n = 300_000
    with Client(proxy.port, timeout=10) as c:
        for _ in range(2):
            c.send(request_bytes("GET", f"/big?bytes={n}&step=7000&pause=2"))
            r = c.response(timeout=10)
            assert r.status == 200, r
            assert r.body == pattern(0, n)
