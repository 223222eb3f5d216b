"""Hostile clients and instances: the attacker's bytes over real sockets to a running proxy.

Each test sends what an attacker would and checks both what the instance received
(tests/support/raw_instance.py records every byte) and what the client got back: one
framing, one Host, the proxy's own forwarding fields, nothing smuggled behind an
upgrade or a hop-by-hop token, and no capacity held by bad timing.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxyctl import Client, Proxy, ProxyConfig, request_bytes, stop_proxies, wait_until
from raw_instance import RawInstance, Seen

pytestmark = [pytest.mark.timeout(60), pytest.mark.request_path]

TRUSTED = "127.0.0.2"  # [trust] forwarded_from of the proxy below


@pytest.fixture(scope="module")
def raw() -> Iterator[RawInstance]:
    inst = RawInstance().start()
    yield inst
    inst.stop()


@pytest.fixture(scope="module")
def hostile_proxy(tmp_path_factory: pytest.TempPathFactory, raw: RawInstance) -> Iterator[Proxy]:
    """One 2-worker proxy in front of the recording instance, trusting 127.0.0.2."""
    started: list[Proxy] = []
    cfg = ProxyConfig(
        upstream=raw.address,
        trust={"forwarded_from": [f"{TRUSTED}/32"]},
        timeouts={"tunnel_idle": 1.0, "abandoned": 1.0},
        limits={"pipeline_depth": 8},
        extra_apps=[{"name": "cut", "hosts": ["cut.test"], "soft_limit": 20, "hard_limit": 25}],
        extra_instances=[{"app": "cut", "id": "cut-1", "address": raw.address}],
    )
    p = Proxy(cfg, tmp_path_factory.mktemp("hostile"))
    started.append(p)
    yield p
    stop_proxies(started)


@pytest.fixture
def px(hostile_proxy: Proxy, raw: RawInstance) -> Proxy:
    raw.reset()
    return hostile_proxy


def only(seen: list[Seen], path: str) -> Seen:
    hits = [s for s in seen if s.path.split("?")[0] == path]
    assert len(hits) == 1, f"expected one request for {path}, the instance saw {seen}"
    return hits[0]


def no_request_like(raw: RawInstance, needle: bytes) -> None:
    """No request line containing `needle` ever reached the instance, as a head."""
    for s in raw.seen:
        assert needle not in s.line, f"smuggled request reached the instance: {s}"


# -- framing and Connection tokens (RFC 9110 7.6.1, RFC 9112 6) -----------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: hello.test\r\n\r\n"


@pytest.mark.parametrize(
    "connection",
    [b"Content-Length", b"close, Content-Length", b"keep-alive, content-length, host"],
)
def test_connection_naming_content_length_keeps_the_framing(
    px: Proxy, raw: RawInstance, connection: bytes
) -> None:
    """A Connection token naming Content-Length does not drop it: the body stays a body."""
    head = b"POST /cl HTTP/1.1\r\nHost: hello.test\r\nConnection: %b\r\nContent-Length: %d\r\n\r\n"
    with Client(px.port) as c:
        c.send(head % (connection, len(SMUGGLED)) + SMUGGLED)
        r = c.response()
        assert r.status == 200, r
    s = only(raw.wait_requests(1), "/cl")
    assert s.fields("content-length") == [b"%d" % len(SMUGGLED)], s
    assert s.fields("host") == [b"hello.test"], s
    assert s.body == SMUGGLED, s
    # The pooled connection was not poisoned: the next request is the only one after it.
    assert px.get("/after").status == 200
    seen = raw.wait_requests(2)
    assert [x.path for x in seen] == ["/cl", "/after"], seen
    no_request_like(raw, b"/smuggled")


def test_connection_naming_host_and_forwarding_fields_is_ignored(
    px: Proxy, raw: RawInstance
) -> None:
    """Connection: Host, X-Forwarded-For drops neither: one Host, the proxy's own X-F-F."""
    r = px.request(
        request_bytes(
            "GET",
            "/host",
            headers=[("Connection", "Host, X-Forwarded-For, X-Drop"), ("X-Drop", "1")],
        )
    )
    assert r.status == 200, r
    s = only(raw.wait_requests(1), "/host")
    assert s.fields("host") == [b"hello.test"], s
    assert s.fields("x-forwarded-for") == [b"127.0.0.1"], s
    assert s.fields("x-drop") == [] and s.fields("connection") == [], s


def test_response_connection_naming_content_length_keeps_its_framing(
    px: Proxy, raw: RawInstance
) -> None:
    """An instance's Connection: content-length does not unframe the response."""
    raw.responses["/rcl"] = (
        b"HTTP/1.1 200 OK\r\nConnection: content-length, x-secret\r\nX-Secret: s\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    with Client(px.port) as c:
        c.send(request_bytes("GET", "/rcl"))
        r = c.response()
        assert r.status == 200 and r.body == b"hello", r
        assert r.header("content-length") == "5" and r.header("x-secret") is None, r
        c.send(request_bytes("GET", "/next"))  # the same client connection still in step
        r2 = c.response()
        assert r2.status == 200 and r2.body == b"ok", r2


def test_http10_with_transfer_encoding_is_refused_and_closed(px: Proxy, raw: RawInstance) -> None:
    """RFC 9112 6.1: HTTP/1.0 with Transfer-Encoding is faulty framing: 400, then close."""
    with Client(px.port) as c:
        c.send(
            b"POST /te10 HTTP/1.0\r\nHost: hello.test\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        )
        r = c.response()
        assert r.status == 400, r
        c.expect_clean_close()
    assert raw.seen == []


def test_transfer_codings_other_than_chunked_are_refused(px: Proxy, raw: RawInstance) -> None:
    """A request body coded gzip then chunked is refused with 501, never forwarded re-coded."""
    with Client(px.port) as c:
        c.send(
            b"POST /gz HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        r = c.response()
        assert r.status == 501, r
        c.expect_clean_close()
    assert raw.seen == []


def test_response_transfer_codings_are_declared_again(px: Proxy, raw: RawInstance) -> None:
    """An instance's gzip, chunked response reaches the client still declared gzip, chunked."""
    raw.responses["/rgz"] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    with Client(px.port) as c:
        c.send(request_bytes("GET", "/rgz"))
        r = c.response()
    assert r.status == 200 and r.body == b"abc", r
    assert r.header("transfer-encoding") == "gzip, chunked", r


@pytest.mark.parametrize(
    ("raw_head", "status"),
    [
        (b"GET / HTTP/2.0\r\nHost: hello.test\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: hello.test@evil.test\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: hello.test/../x\r\n\r\n", 400),
        (b"GET ftp://hello.test/ HTTP/1.1\r\nHost: hello.test\r\n\r\n", 400),
        (b"GET http://user@hello.test/ HTTP/1.1\r\nHost: hello.test\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: hello.test\r\n\r\n", 400),
        (b"CONNECT hello.test:443 HTTP/1.1\r\nHost: hello.test:443\r\n\r\n", 405),
    ],
)
def test_ambiguous_heads_are_refused(
    px: Proxy, raw: RawInstance, raw_head: bytes, status: int
) -> None:
    """Versions, Hosts and targets an instance could read two ways are refused, then closed."""
    with Client(px.port) as c:
        c.send(raw_head + SMUGGLED)
        r = c.response()
        assert r.status == status, r
        c.expect_clean_close()
    assert raw.seen == []


def test_request_trailers_are_not_forwarded(px: Proxy, raw: RawInstance) -> None:
    """Trailer fields of a chunked request (a Host among them) end the body and go no further."""
    with Client(px.port) as c:
        c.send(
            b"POST /trl HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nHost: evil.test\r\nX-Trailer: 1\r\n\r\n"
        )
        r = c.response()
        assert r.status == 200, r
    s = only(raw.wait_requests(1), "/trl")
    assert s.body == b"3\r\nabc\r\n0\r\n\r\n", s
    assert s.fields("host") == [b"hello.test"], s


# -- absolute-form targets (RFC 9112 3.2.2) -----------------------------------------


def test_absolute_form_is_routed_by_its_authority(px: Proxy, raw: RawInstance) -> None:
    """The URI's authority wins over Host: routed by it, forwarded in origin-form with it."""
    r = px.request(b"GET http://HELLO.test/p?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert r.status == 200, r
    s = only(raw.wait_requests(1), "/p")
    assert s.line == b"GET /p?q=1 HTTP/1.1", s
    assert s.fields("host") == [b"HELLO.test"], s
    assert s.fields("x-forwarded-host") == [b"HELLO.test"], s
    r = px.request(b"GET http://nope.test/ HTTP/1.1\r\nHost: hello.test\r\n\r\n")
    assert r.status == 404, r
    assert len(raw.seen) == 1


# -- forwarding fields ----------------------------------------------------------------

SPOOF = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.test"),
    ("X-Forwarded-Port", "1"),
    ("Forwarded", "for=203.0.113.7;proto=https"),
]


def test_forwarding_fields_from_a_client_are_replaced(px: Proxy, raw: RawInstance) -> None:
    """A client outside [trust] forwarded_from gets the proxy's forwarding fields, not its own."""
    r = px.request(request_bytes("GET", "/fwd", headers=SPOOF))
    assert r.status == 200, r
    s = only(raw.wait_requests(1), "/fwd")
    assert s.fields("x-forwarded-for") == [b"127.0.0.1"], s
    assert s.fields("x-forwarded-proto") == [b"http"], s
    assert s.fields("x-forwarded-host") == [b"hello.test"], s
    assert s.fields("x-forwarded-port") == [str(px.port).encode()], s
    assert s.fields("forwarded") == [], s


def test_underscored_names_of_owned_fields_are_dropped(px: Proxy, raw: RawInstance) -> None:
    """X_Forwarded_For and kin, which CGI-style servers read as the real fields, never arrive."""
    sent = [
        ("X_Forwarded_For", "198.51.100.1"),
        ("X_Forwarded_Host", "evil.test"),
        ("My_Field", "1"),
    ]
    r = px.request(request_bytes("GET", "/under#frag", headers=sent))
    assert r.status == 200, r
    s = only(raw.wait_requests(1), "/under")
    assert s.line == b"GET /under HTTP/1.1", s  # and no fragment (RFC 9112 3.2.1)
    assert "x_forwarded_for" not in s.names() and "x_forwarded_host" not in s.names(), s
    assert s.fields("my_field") == [b"1"], s  # an ordinary underscored field goes on


def test_forwarding_fields_from_a_trusted_client_are_kept(px: Proxy, raw: RawInstance) -> None:
    """A client in [trust] forwarded_from keeps its fields; X-Forwarded-For gets its address."""
    with socket.socket() as sock:  # closed even if bind or connect fails
        sock.bind((TRUSTED, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", px.port))
        sock.sendall(request_bytes("GET", "/tfwd", headers=SPOOF, close=True))
        got = b""
        while data := sock.recv(65536):
            got += data
    assert got.startswith(b"HTTP/1.1 200"), got
    s = only(raw.wait_requests(1), "/tfwd")
    assert s.fields("x-forwarded-for") == [b"203.0.113.7, " + TRUSTED.encode()], s
    assert s.fields("x-forwarded-proto") == [b"https"], s
    assert s.fields("x-forwarded-host") == [b"evil.test"], s
    assert s.fields("x-forwarded-port") == [b"1"], s
    assert s.fields("forwarded") == [b"for=203.0.113.7;proto=https"], s


# -- upgrades ---------------------------------------------------------------------------

WS_HEAD = (
    b"GET %b HTTP/1.1\r\nHost: hello.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_bytes_behind_an_upgrade_wait_for_the_101(px: Proxy, raw: RawInstance) -> None:
    """Bytes after an upgrade head are not relayed when the instance declines (no 101)."""
    with Client(px.port) as c:
        c.send(WS_HEAD % b"/declined" + SMUGGLED)
        r = c.response()
        assert r.status == 200 and r.body == b"ok", r
        c.expect_clean_close()
    s = only(raw.wait_requests(1), "/declined")
    assert raw.bytes_of(s.conn) == s.head, raw.bytes_of(s.conn)
    no_request_like(raw, b"/smuggled")


def test_a_granted_upgrade_relays_both_ways_after_the_101(px: Proxy, raw: RawInstance) -> None:
    """After the instance's 101, the bytes sent with the head and later ones cross both ways."""
    raw.responses["/ws"] = SWITCH
    with Client(px.port) as c:
        c.send(WS_HEAD % b"/ws" + b"frame-1")
        status, *_ = c.read_head()
        assert status == 101
        c.send(b"frame-2")
        got = c.buf
        deadline = time.monotonic() + 5
        while len(got) < len(b"frame-1frame-2") and time.monotonic() < deadline:
            got += c.sock.recv(65536)
        assert got == b"frame-1frame-2", got
    s = only(raw.wait_requests(1), "/ws")
    assert raw.bytes_of(s.conn) == s.head + b"frame-1frame-2"


def test_an_idle_tunnel_is_closed(px: Proxy, raw: RawInstance) -> None:
    """A tunnel with no byte either way for [timeouts] tunnel_idle (1 s here) is closed."""
    raw.responses["/ws"] = SWITCH
    with Client(px.port, timeout=10) as c:
        c.send(WS_HEAD % b"/ws")
        status, *_ = c.read_head()
        assert status == 101
        closed, got = c.closed_within(10)
        assert closed and got == b"", got


def test_an_upgrade_that_is_not_allowed_is_served_as_plain_http(
    px: Proxy, raw: RawInstance
) -> None:
    """h2c is never tunnelled: the request is served without it and the next one follows."""
    with Client(px.port) as c:
        c.send(
            b"GET /h2c HTTP/1.1\r\nHost: hello.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
            + request_bytes("GET", "/after-h2c")
        )
        assert c.response().status == 200
        assert c.response().status == 200
    seen = raw.wait_requests(2)
    assert [x.path for x in seen] == ["/h2c", "/after-h2c"], seen
    assert seen[0].fields("upgrade") == [] and seen[0].fields("connection") == [], seen[0]


def test_an_upgrade_with_a_body_is_refused(px: Proxy, raw: RawInstance) -> None:
    """An upgrade request that also has a body could be read two ways: 400, nothing forwarded."""
    with Client(px.port) as c:
        c.send(
            b"GET /wsb HTTP/1.1\r\nHost: hello.test\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
        )
        r = c.response()
        assert r.status == 400, r
        c.expect_clean_close()
    assert raw.seen == []


# -- capacity held by bad timing ---------------------------------------------------------


def test_pipelined_requests_are_bounded_and_all_answered_in_order(
    px: Proxy, raw: RawInstance
) -> None:
    """A flood of pipelined requests is parsed at most pipeline_depth at a time, all answered."""
    release = threading.Event()

    def hold(s: socket.socket, seen: Seen) -> bool:
        release.wait(20)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")
        return True

    raw.handlers["/hold"] = hold
    n = 300
    flood = request_bytes("GET", "/hold") + b"".join(
        request_bytes("GET", f"/p{i}") for i in range(n)
    )
    with Client(px.port, timeout=20) as c:
        c.send(flood)
        raw.wait_requests(1)
        # Every worker publishes its in-flight count each second: watch two rounds.
        peak = 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            m = re.findall(r'edgeproxy_inflight_requests\{worker="\d+"\} (\d+)', px.metrics())
            peak = max([peak, *map(int, m)])
            time.sleep(0.2)
        release.set()
        bodies = [c.response().body for _ in range(n + 1)]
    assert 1 <= peak <= 8 + 1, f"{peak} requests queued on one connection (depth 8)"
    assert bodies == [b"held"] + [b"ok"] * n
    assert [x.path for x in raw.wait_requests(n + 1)] == ["/hold"] + [f"/p{i}" for i in range(n)]


def test_an_abandoned_endless_response_is_cut_after_the_grace(px: Proxy, raw: RawInstance) -> None:
    """The instance's answer to a client that left is read for [timeouts] abandoned, no longer."""
    start = threading.Event()
    cut = threading.Event()

    def endless(s: socket.socket, seen: Seen) -> bool:
        start.wait(20)
        try:
            s.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(600):  # bounded: 30 s of events
                s.sendall(b"6\r\nevent\n\r\n")
                time.sleep(0.05)
        except OSError:
            cut.set()
        return False

    raw.handlers["/events"] = endless
    with Client(px.port) as c:
        c.send(request_bytes("GET", "/events"))
        raw.wait_requests(1)
    assert not px.wait_no_client_connections(timeout=5)  # the proxy saw the client leave
    start.set()  # only now does the instance answer
    assert cut.wait(10), "the proxy kept reading an abandoned endless response"


def test_a_response_that_fits_the_buffer_frees_the_instance_before_a_slow_client_reads(
    tmp_path: Path, raw: RawInstance
) -> None:
    """With [limits] response_buffer larger than a response, the instance is done before the
    client reads a byte, and its upstream connection serves the next request."""
    raw.reset()
    size = 8 << 20
    body = bytes(range(256)) * (size // 256)
    finished = threading.Event()

    def big(s: socket.socket, seen: Seen) -> bool:
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
        finished.set()
        return True

    raw.handlers["/big"] = big
    started: list[Proxy] = []
    try:
        p = Proxy(
            ProxyConfig(upstream=raw.address, workers=1, limits={"response_buffer": 32 << 20}),
            tmp_path,
        )
        started.append(p)
        with Client(p.port, rcvbuf=4096, timeout=20) as slow:
            slow.send(request_bytes("GET", "/big"))
            assert finished.wait(15), "the instance is still held by the slow client"
            # The instance wrote it all; the proxy has read it all once the connection is
            # back in its pool (the gauge is published about once a second).
            idle = p.wait_metric('edgeproxy_upstream_idle_connections{worker="0"}', 1, 15)
            assert idle == 1, "the response never left the instance's connection"
            assert p.get("/next").status == 200
            seen = raw.wait_requests(2)
            assert seen[1].conn == seen[0].conn, "the upstream connection was not released"
            r = slow.response(timeout=20)
            assert r.body == body
    finally:
        stop_proxies(started)


# -- an instance's stray bytes -------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\ngarbage!",
    ],
)
def test_bytes_after_a_response_never_reach_the_next_exchange(
    px: Proxy, raw: RawInstance, answer: bytes
) -> None:
    """An instance that sends more than one response's bytes: the extra never reaches anyone,
    and its connection is not reused."""
    raw.responses["/stray"] = answer
    for _ in range(3):  # whichever worker and pooled connection the next requests land on
        with Client(px.port) as c:
            c.send(request_bytes("GET", "/stray"))
            r = c.response()
            assert r.status == 200 and r.body == b"ok", r
            c.send(request_bytes("GET", "/next"))
            r2 = c.response()
            assert r2.status == 200 and r2.body == b"ok", r2
    seen = raw.wait_requests(6)
    for a, b in zip(seen[::2], seen[1::2], strict=True):
        assert (a.path, b.path) == ("/stray", "/next")
        assert b.conn != a.conn, "a connection that sent stray bytes was reused"


def test_a_response_cut_mid_body_is_counted_once(px: Proxy, raw: RawInstance) -> None:
    """A response the instance cuts short is one 5xx in /metrics, not two answers."""

    def cut(s: socket.socket, seen: Seen) -> bool:
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        return False

    def counts() -> dict[str, int]:
        pat = r'edgeproxy_requests_total\{app="cut",class="(\dxx)"\} (\d+)'
        return {k: int(v) for k, v in re.findall(pat, px.metrics())}

    raw.handlers["/cut"] = cut
    with Client(px.port) as c:
        c.send(request_bytes("GET", "/cut", host="cut.test"))
        with pytest.raises((EOFError, AssertionError, ConnectionError)):
            c.response()
    # Both counts (the cut and the close) are made before the next request is read.
    assert px.get("/after-cut", host="cut.test").status == 200
    assert wait_until(lambda: sum(counts().values()) >= 2, 5)  # published every second
    got = counts()
    assert (got["5xx"], got["2xx"], sum(got.values())) == (1, 1, 2), got
