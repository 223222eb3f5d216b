"""Every wait has a timeout: upstream connect, response headers, client head, idle, request."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from ci_policy import skip_or_fail
from proxyctl import HOST, Client, Proxy, Upstream, request_bytes, wait_until

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(40)]

Factory = Callable[..., Proxy]


def no_leaks(proxy: Proxy) -> None:
    """Within a bounded wait the proxy holds no client connection and both workers live.

    Checked twice: in the kernel (/proc/net/tcp) and in what the workers report in
    `status --json` (per-worker "open_connections", published about once a second).
    """
    left = proxy.wait_no_client_connections(timeout=5)
    assert not left, f"proxy still holds client connections: {left}"
    ws: list = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ws = proxy.workers()
        if sum(w.get("open_connections", 0) for w in ws) == 0:
            break
        time.sleep(0.2)
    assert all("open_connections" in w for w in ws), f"no open_connections in status: {ws}"
    assert sum(w["open_connections"] for w in ws) == 0, f"status still counts connections: {ws}"
    assert len([w for w in ws if w["state"] == "serving"]) == 2, ws


def test_client_gone_mid_download_frees_the_upstream(
    proxy_factory: Factory, upstream: Upstream
) -> None:
    """A client that vanishes mid-download makes the proxy drop that upstream connection."""
    p = proxy_factory()
    tag = f"gone{time.monotonic_ns()}"
    with Client(p.port, rcvbuf=64 * 1024) as c:
        c.send(request_bytes("GET", f"/big?bytes={256 << 20}&tag={tag}"))
        assert c.read_head(timeout=5)[0] == 200
        c.sock.recv(65536)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and upstream.stats()["tags"][tag].get("done") is None:
        if upstream.stats()["open"] == 0:
            break
        time.sleep(0.05)
    st = upstream.stats()
    assert not st["tags"][tag].get("done"), "the whole 256 MiB was pulled for a gone client"
    assert st["open"] == 0, f"upstream connection kept after the client left: {st}"
    no_leaks(p)


def test_client_gone_while_waiting_closes_the_upstream(
    proxy_factory: Factory, upstream: Upstream
) -> None:
    """A client that disconnects while the instance is still thinking frees that connection.

    As nginx (proxy_ignore_client_abort off) and Envoy do: an abandoned exchange must not
    hold an instance's connection, and its slot under hard_limit, for upstream_response."""
    p = proxy_factory(timeouts={"upstream_response": 30})
    tag = f"left{time.monotonic_ns()}"
    with Client(p.port) as c:
        c.send(request_bytes("GET", f"/hang?tag={tag}"))
        assert wait_until(lambda: upstream.stats()["tags"].get(tag, {}).get("hung"), 10), (
            "the request never reached the instance"
        )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not upstream.stats()["tags"][tag].get("closed"):
        time.sleep(0.05)
    assert upstream.stats()["tags"][tag].get("closed"), "upstream kept waiting for a gone client"
    no_leaks(p)


@contextlib.contextmanager
def full_backlog() -> Iterator[str]:
    """A listening socket whose accept queue is full: further SYNs are dropped."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        lst.bind((HOST, 0))
        lst.listen(0)
        addr = lst.getsockname()
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(s)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(addr)
        time.sleep(0.1)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(addr)
            skip_or_fail("kernel accepted a connection over a full backlog")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield f"{addr[0]}:{addr[1]}"
    finally:
        for s in fillers:
            s.close()
        lst.close()


def test_upstream_connect_timeout_is_504(proxy_factory: Factory) -> None:
    """An instance whose SYNs go unanswered gets the client a 504 after the connect timeout."""
    with full_backlog() as addr:
        p = proxy_factory(upstream=addr, timeouts={"connect": 0.5})
        with Client(p.port) as c:
            t0 = time.monotonic()
            c.send(request_bytes("GET", "/"))
            r = c.response(timeout=8)
            took = time.monotonic() - t0
            assert r.status == 504, r
            assert 0.4 < took < 5, f"504 after {took:.2f}s with connect = 0.5s"
        no_leaks(p)


def test_upstream_refused_is_502(proxy_factory: Factory) -> None:
    """An instance address where nothing listens gets the client a 502, promptly."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound, not listening: connect is refused
        p = proxy_factory(upstream=f"{HOST}:{port}")
        t0 = time.monotonic()
        r = p.get("/")
        assert r.status == 502, r
        assert time.monotonic() - t0 < 3
        no_leaks(p)


def test_upstream_response_timeout_is_504(proxy_factory: Factory, upstream: Upstream) -> None:
    """An instance that reads the request and never answers gets the client a 504."""
    p = proxy_factory(timeouts={"upstream_response": 0.7})
    tag = f"hang{time.monotonic_ns()}"
    with Client(p.port) as c:
        t0 = time.monotonic()
        c.send(request_bytes("GET", f"/hang?tag={tag}"))
        r = c.response(timeout=8)
        took = time.monotonic() - t0
        assert r.status == 504, r
        assert 0.6 < took < 5, f"504 after {took:.2f}s with upstream_response = 0.7s"
        if "close" in r.tokens("connection"):
            c.expect_clean_close()
        else:  # a 504 that keeps the connection must leave it usable
            c.send(request_bytes("GET", "/after-504", close=True))
            r2 = c.response()
            assert r2.status == 200, (r, r2)
    assert p.get("/after-504").status == 200
    no_leaks(p)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not upstream.stats()["tags"][tag].get("closed"):
        time.sleep(0.05)
    assert upstream.stats()["tags"][tag].get("closed"), "hung upstream connection left open"


def test_slowloris_head_gets_408_or_close(proxy_factory: Factory) -> None:
    """Half a request head and then silence: 408 (or nothing) and a clean close in time."""
    p = proxy_factory(timeouts={"client_header": 0.7})
    with Client(p.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: hello.test\r\nX-Slow: ")
        t0 = time.monotonic()
        closed, got = c.closed_within(5)
        took = time.monotonic() - t0
        assert closed, f"not closed within 5s (client_header = 0.7s); got {got!r}"
        assert 0.5 < took < 4, f"closed after {took:.2f}s"
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got
    no_leaks(p)


def test_slowloris_trickle_cannot_extend_header_deadline(proxy_factory: Factory) -> None:
    """A head trickled one byte per 0.1 s is cut off at client_header, not kept alive."""
    p = proxy_factory(timeouts={"client_header": 1.0})
    raw = b"GET / HTTP/1.1\r\nHost: hello.test\r\n" + b"X-Slow: " + b"a" * 200
    with Client(p.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        cut = None
        for i in range(len(raw)):
            c.sock.settimeout(0.1)
            try:
                data = c.sock.recv(4096, socket.MSG_PEEK)
            except TimeoutError:
                data = None
            if data is not None:  # the proxy answered or closed
                cut = time.monotonic() - t0
                break
            c.sock.settimeout(2)
            c.send(raw[i : i + 1])
        assert cut is not None, "proxy kept a trickling head alive for 20 s"
        assert cut < 3, f"cut off after {cut:.2f}s with client_header = 1s"
        closed, got = c.closed_within(3)
        assert closed, got
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got
    no_leaks(p)


def test_idle_keep_alive_connection_is_closed_quietly(proxy_factory: Factory) -> None:
    """An idle keep-alive connection is closed after client_idle with no bytes sent."""
    p = proxy_factory(timeouts={"client_idle": 0.7})
    with Client(p.port) as c:
        c.send(request_bytes("GET", "/idle"))
        assert c.response().status == 200
        t0 = time.monotonic()
        closed, got = c.closed_within(5)
        took = time.monotonic() - t0
        assert closed, f"idle connection not closed within 5s; got {got!r}"
        # Bytes here would be read as the answer to the client's next request.
        assert got == b"", f"unsolicited bytes on an idle connection: {got!r}"
        assert 0.5 < took < 4, f"closed after {took:.2f}s with client_idle = 0.7s"
    no_leaks(p)


def test_connection_that_never_sends_is_closed(proxy_factory: Factory) -> None:
    """A connection that sends nothing at all is closed within the header/idle timeouts."""
    p = proxy_factory(timeouts={"client_idle": 0.7, "client_header": 0.7})
    with Client(p.port) as c:
        closed, got = c.closed_within(5)
        assert closed, "silent connection kept open"
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got
    no_leaks(p)


def test_idle_timeout_does_not_cut_a_slow_response(proxy_factory: Factory) -> None:
    """client_idle applies between requests only: a 1.5 s upstream answer still arrives."""
    p = proxy_factory(timeouts={"client_idle": 0.5, "upstream_response": 5})
    with Client(p.port) as c:
        c.send(request_bytes("GET", "/slow?delay=1.5"))
        r = c.response(timeout=5)
        assert r.status == 200, r
    no_leaks(p)


def test_whole_request_timeout_on_slow_headers_is_504(proxy_factory: Factory) -> None:
    """A request whose answer takes longer than the whole-request timeout gets a 504."""
    p = proxy_factory(timeouts={"request": 1.0, "upstream_response": 10})
    with Client(p.port) as c:
        t0 = time.monotonic()
        c.send(request_bytes("GET", "/slow?delay=4"))
        r = c.response(timeout=8)
        took = time.monotonic() - t0
        assert r.status == 504, r
        assert took < 3, f"504 after {took:.2f}s with request = 1s"
    no_leaks(p)


def test_whole_request_timeout_mid_body_closes(proxy_factory: Factory) -> None:
    """A response still trickling at the whole-request timeout is cut: the client connection
    closes before the last chunk, so the client sees an incomplete response, not a whole one."""
    p = proxy_factory(timeouts={"request": 1.0, "upstream_response": 10})
    with Client(p.port) as c:
        c.send(request_bytes("GET", "/trickle?interval=0.2&count=100"))
        status, *_ = c.read_head(timeout=3)
        assert status == 200
        t0 = time.monotonic()
        closed, got = c.closed_within(6)
        took = time.monotonic() - t0
        assert closed, f"trickling response not cut within 6s (request = 1s); got {got[-80:]!r}"
        assert took < 3, f"cut after {took:.2f}s"
        assert not (c.buf + got).endswith(b"0\r\n\r\n"), "response completed; nothing was cut"
    no_leaks(p)
