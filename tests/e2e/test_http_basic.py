"""End-to-end request path over real sockets: routing, keep-alive, framing, headers."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest
from proxyctl import (
    Client,
    Proxy,
    Upstream,
    _proc_net_tcp,
    metric_value,
    request_bytes,
    wait_until,
)
from upstream import pattern, pattern_sha256

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(30)]


def test_get_is_proxied_to_the_instance(proxy: Proxy) -> None:
    """A GET for an app's host reaches its instance and the response comes back whole."""
    r = proxy.get("/hello?x=1")
    assert r.status == 200, r
    info = r.json()
    assert info["method"] == "GET"
    assert info["target"] == "/hello?x=1"
    assert info["version"] == "HTTP/1.1"


@pytest.mark.parametrize("host", ["HELLO.TEST", "Hello.Test:8080", "hello.test:1"])
def test_host_match_is_case_insensitive_and_ignores_port(proxy: Proxy, host: str) -> None:
    """Host picks the app case-insensitively, with any port ignored."""
    r = proxy.get("/", host=host)
    assert r.status == 200, r
    assert r.json()["path"] == "/"


def test_unknown_host_is_404_with_one_line_text_body(proxy: Proxy) -> None:
    """An unknown Host gets a 404 whose one-line text body says the host is unknown."""
    r = proxy.get("/", host="nope.test")
    assert r.status == 404, r
    assert (r.header("content-type") or "").startswith("text/plain"), r
    text = r.body.decode()
    assert text.count("\n") <= 1 and text.strip() and "\n" not in text.rstrip("\n"), r
    assert "nope.test" in text, r
    # "says the host is unknown": any wording that does, not one literal word
    assert "unknown" in text.lower() or "no app" in text.lower(), r


def test_missing_host_is_400_and_closes(proxy: Proxy) -> None:
    """An HTTP/1.1 request with no Host header gets 400 and the connection closes cleanly."""
    with Client(proxy.port) as c:
        c.send(b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n")
        r = c.response()
        assert r.status == 400, r
        c.expect_clean_close()


def test_keep_alive_serves_many_requests_on_one_connection(proxy: Proxy) -> None:
    """Sequential requests on one client connection are all answered, and it stays open."""
    with Client(proxy.port) as c:
        for i in range(5):
            c.send(request_bytes("GET", f"/ka/{i}"))
            r = c.response()
            assert r.status == 200, r
            assert r.json()["path"] == f"/ka/{i}"
            assert "close" not in r.tokens("connection"), r


def test_upstream_connection_is_reused(proxy: Proxy) -> None:
    """Requests on one client connection reuse one pooled upstream connection."""
    with Client(proxy.port) as c:
        seen = []
        for i in range(4):
            c.send(request_bytes("GET", f"/pool/{i}"))
            r = c.response()
            assert r.status == 200, r
            seen.append((r.json()["conn_id"], r.json()["conn_req"]))
    ids = {cid for cid, _ in seen}
    assert len(ids) == 1, f"upstream connections not reused: {seen}"


def test_pipelined_requests_answered_in_order(proxy: Proxy) -> None:
    """Pipelined requests sent in one write are answered in order, the slow first one too."""
    body = b"pipelined body"
    raw = (
        request_bytes("GET", "/p1?delay=0.3")
        + request_bytes("POST", "/p2", body=body)
        + request_bytes("HEAD", "/p3")
        + request_bytes("GET", "/p4")
    )
    with Client(proxy.port) as c:
        c.send(raw)
        r1 = c.response()
        r2 = c.response()
        r3 = c.response(method="HEAD")
        r4 = c.response()
    assert [r1.status, r2.status, r3.status, r4.status] == [200, 200, 200, 200]
    assert r1.json()["path"] == "/p1"
    assert r2.json()["path"] == "/p2"
    assert r2.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert r3.body == b""
    assert r4.json()["path"] == "/p4"


def test_many_pipelined_requests_in_one_write(proxy: Proxy) -> None:
    """300 small pipelined GETs written at once (~100 KiB) are all answered, in order."""
    pad = [("X-Pad", "p" * 300)]
    raw = b"".join(request_bytes("GET", f"/many/{i}", headers=pad) for i in range(300))
    assert len(raw) > 96 * 1024
    with Client(proxy.port, timeout=15) as c:
        c.send(raw)
        for i in range(300):
            r = c.response()
            assert r.status == 200, (i, r)
            assert r.json()["path"] == f"/many/{i}"


def test_pipelined_bytes_split_byte_by_byte(proxy: Proxy) -> None:
    """Two pipelined requests fed one byte per write are both answered in order."""
    raw = request_bytes("GET", "/b1") + request_bytes("GET", "/b2")
    with Client(proxy.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(raw)):
            c.send(raw[i : i + 1])
        assert c.response().json()["path"] == "/b1"
        assert c.response().json()["path"] == "/b2"


def test_pipelined_proxied_and_own_answers_keep_their_order(proxy: Proxy) -> None:
    """Proxied answers (written when the worker's loop iteration ends) and the proxy's own
    answers (404, then a 400 that closes) to pipelined requests leave in request order."""
    raw = (
        request_bytes("GET", "/o1")
        + request_bytes("GET", "/o2", host="nope.test")
        + request_bytes("GET", "/o3")
        + request_bytes("GET", "/o4")
        + request_bytes("GET", "/o5", host="nope.test")
        + b"GET /o6 HTTP/1.1\r\nUser-Agent: t\r\n\r\n"  # no Host: 400, then close
    )
    for _ in range(20):
        with Client(proxy.port) as c:
            c.send(raw)
            got = [c.response() for _ in range(6)]
            c.expect_clean_close()
        assert [r.status for r in got] == [200, 404, 200, 200, 404, 400], got
        assert [got[i].json()["path"] for i in (0, 2, 3)] == ["/o1", "/o3", "/o4"], got
        assert b"nope.test" in got[1].body and b"nope.test" in got[4].body, got


def test_content_length_request_body_arrives_intact(proxy: Proxy) -> None:
    """A Content-Length request body reaches the upstream byte for byte."""
    body = os.urandom(300_000)
    r = proxy.request(request_bytes("PUT", "/cl", body=body, close=True))
    assert r.status == 200, r
    info = r.json()
    assert info["body_len"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_arrives_intact(proxy: Proxy) -> None:
    """A chunked request body (with extensions and trailers) reaches the upstream intact."""
    pieces = [os.urandom(n) for n in (1, 100, 70_000, 3)]
    raw = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-T: 1\r\n\r\n"
    head = request_bytes("POST", "/chunked-up", headers=[("Transfer-Encoding", "chunked")])
    with Client(proxy.port) as c:
        c.send(head + raw)
        r = c.response()
    assert r.status == 200, r
    info = r.json()
    whole = b"".join(pieces)
    assert info["body_len"] == len(whole), info
    assert info["body_sha256"] == hashlib.sha256(whole).hexdigest()


def test_empty_chunked_request_body(proxy: Proxy) -> None:
    """A chunked request with only the last chunk is forwarded as an empty body."""
    head = request_bytes("POST", "/empty", headers=[("Transfer-Encoding", "chunked")])
    with Client(proxy.port) as c:
        c.send(head + b"0\r\n\r\n")
        r = c.response()
        assert r.status == 200, r
        assert r.json()["body_len"] == 0
        c.send(request_bytes("GET", "/after-empty"))
        assert c.response().json()["path"] == "/after-empty"


def test_chunked_response_arrives_intact(proxy: Proxy) -> None:
    """A chunked upstream response reaches the client with the same bytes, then keep-alive."""
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", "/big?bytes=300000&chunked=1"))
        r = c.response()
        assert r.status == 200, r
        assert len(r.body) == 300_000
        assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(300_000)
        c.send(request_bytes("GET", "/after-chunked"))
        assert c.response().json()["path"] == "/after-chunked"


def test_chunked_echo_response_on_keep_alive(proxy: Proxy) -> None:
    """An echo answered chunked in several chunks is reassembled to valid JSON."""
    with Client(proxy.port) as c:
        for i in range(3):
            c.send(request_bytes("GET", f"/te{i}?te=chunked"))
            r = c.response()
            assert r.status == 200, r
            assert r.json()["path"] == f"/te{i}"


def test_close_delimited_response_is_relayed(proxy: Proxy) -> None:
    """A response framed by the upstream closing is relayed whole, correctly framed."""
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", "/closedelim?bytes=200000"))
        r = c.response()
        assert r.status == 200, r
        assert r.body == pattern(0, 200_000)


def test_head_has_no_body_and_connection_stays_usable(proxy: Proxy) -> None:
    """HEAD gets the headers (with the length a GET would have) and no body bytes."""
    with Client(proxy.port) as c:
        c.send(request_bytes("HEAD", "/big?bytes=5000"))
        r = c.response(method="HEAD")
        assert r.status == 200, r
        assert r.header("content-length") == "5000", r
        c.send(request_bytes("GET", "/after-head"))
        r2 = c.response()
        assert r2.status == 200, r2
        assert r2.json()["path"] == "/after-head"


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(proxy: Proxy, status: int) -> None:
    """204 and 304 (even with a Content-Length) carry no body; the next request works."""
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", f"/status/{status}"))
        r = c.response()
        assert r.status == status, r
        c.send(request_bytes("GET", "/after-nobody"))
        r2 = c.response(timeout=3)
        assert r2.status == 200, (r, r2)
        assert r2.json()["path"] == "/after-nobody"


def test_expect_100_continue(proxy: Proxy) -> None:
    """With Expect: 100-continue the client gets 100 Continue before sending the body."""
    body = os.urandom(50_000)
    head = request_bytes(
        "POST",
        "/expect",
        headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )
    with Client(proxy.port) as c:
        c.send(head)
        status, _version, _, _, raw = c.read_head(timeout=3)
        assert status == 100, f"wanted 100 Continue before the body, got {raw!r}"
        assert raw.startswith(b"HTTP/1.1 100 "), raw
        c.send(body)
        r = c.response()
        assert r.status == 200, r
        assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_websocket_upgrade_is_tunnelled(proxy: Proxy) -> None:
    """Upgrade: websocket gets 101 from the instance, then bytes flow both ways."""
    head = request_bytes(
        "GET",
        "/ws",
        headers=[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    with Client(proxy.port) as c:
        c.send(head)
        r = c.response()
        assert r.status == 101, r
        assert r.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", r
        assert (r.header("upgrade") or "").lower() == "websocket", r
        assert "upgrade" in r.tokens("connection"), r
        assert r.header("x-seen-upgrade") == "websocket", "Upgrade not forwarded upstream"
        for msg in (b"\x81\x05hello", os.urandom(1), os.urandom(200_000)):
            c.send(msg)
            got = c.buf
            c.buf = b""
            deadline = time.monotonic() + 5
            while len(got) < len(msg) and time.monotonic() < deadline:
                c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = c.sock.recv(1 << 20)
                assert data, "tunnel closed early"
                got += data
            assert got == msg, f"echo mismatch: sent {len(msg)}, got {len(got)}"


def test_hop_by_hop_request_headers_are_dropped(proxy: Proxy) -> None:
    """Connection, what it names, Keep-Alive, TE, Trailer, Proxy-* and Upgrade stay here."""
    r = proxy.request(
        request_bytes(
            "GET",
            "/hop-req",
            headers=[
                ("Connection", "keep-alive, X-Custom-Hop"),
                ("X-Custom-Hop", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Trailer", "X-Tr"),
                ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"),
                ("X-Keep", "yes"),
            ],
        )
    )
    assert r.status == 200, r
    got = {n.lower(): v for n, v in r.json()["headers"]}
    for name in (
        "x-custom-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in got, f"{name} forwarded upstream: {got}"
    assert "x-custom-hop" not in got.get("connection", "").lower(), got
    assert got.get("x-keep") == "yes", got


def test_hop_by_hop_response_headers_are_dropped(proxy: Proxy) -> None:
    """Hop-by-hop headers of the upstream's response never reach the client."""
    r = proxy.get("/hop")
    assert r.status == 200, r
    assert r.body == b"hop body\n"
    names = r.names()
    for name in ("x-hop-resp", "proxy-connection", "proxy-authenticate", "upgrade"):
        assert name not in names, f"{name} relayed to the client: {r.headers}"
    assert "timeout=77" not in r.all("keep-alive"), r.headers
    assert "x-hop-resp" not in r.tokens("connection"), r.headers
    assert r.header("x-end") == "kept", r.headers


def test_forwarded_headers_and_via_are_added(proxy: Proxy) -> None:
    """The upstream sees X-Forwarded-For/Proto/Host and Via; Host is passed unchanged."""
    r = proxy.get("/fwd")
    assert r.status == 200, r
    hs = r.json()["headers"]
    get = {n.lower(): v for n, v in hs}
    assert get.get("x-forwarded-for") == "127.0.0.1", hs
    assert get.get("x-forwarded-proto") == "http", hs
    assert get.get("x-forwarded-host") == "hello.test", hs
    assert get.get("via", "").startswith("1.1 "), hs
    assert [v for n, v in hs if n.lower() == "host"] == ["hello.test"], hs


def test_x_forwarded_for_from_an_untrusted_client_is_replaced(proxy: Proxy) -> None:
    """A client outside [trust] forwarded_from cannot name hops: X-Forwarded-For is its address."""
    r = proxy.request(
        request_bytes("GET", "/xff", headers=[("X-Forwarded-For", "203.0.113.7")], close=True)
    )
    assert r.status == 200, r
    xff = [v for n, v in r.json()["headers"] if n.lower() == "x-forwarded-for"]
    assert xff == ["127.0.0.1"], xff


def test_silently_closed_pooled_connection_is_not_reused(proxy: Proxy, upstream: Upstream) -> None:
    """After the instance closes an idle pooled connection, the proxy drops it from its pool:
    the next GETs go on a new upstream connection with no retry of the dead one."""
    retried = 'edgeproxy_retries_total{reason="reset_before_response"}'
    ok = 'edgeproxy_requests_total{app="hello",class="2xx"}'
    m0 = proxy.metrics()
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", "/first?close=1"))
        r0 = c.response()
        assert r0.status == 200, r0
        # The instance closed its side; the proxy must close its own (no CLOSE_WAIT left).
        assert wait_until(lambda: not half_closed_by(upstream), timeout=5), (
            "the proxy keeps the connection the instance closed"
        )
        for i in range(3):
            c.send(request_bytes("GET", f"/next{i}"))
            r = c.response()
            assert r.status == 200, r
            assert r.json()["conn_id"] != r0.json()["conn_id"], r
    # Once the worker has published these four 2xx, the dead connection was never tried.
    assert proxy.wait_metric(ok, metric_value(m0, ok) + 4) >= metric_value(m0, ok) + 4
    assert proxy.metric(retried) == metric_value(m0, retried), proxy.metrics()


def half_closed_by(upstream: Upstream) -> list[str]:
    """Sockets of a process connected to the upstream that the upstream closed (CLOSE_WAIT)."""
    return [
        f"{local}->{remote}"
        for local, remote, st, inode in _proc_net_tcp()
        if remote == upstream.address and st == "08" and inode != "0"
    ]


def test_connection_close_from_client_is_honoured(proxy: Proxy) -> None:
    """A request with Connection: close gets its response, then a clean close."""
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", "/bye", close=True))
        r = c.response()
        assert r.status == 200, r
        c.expect_clean_close()


def test_http10_request_without_keep_alive_closes(proxy: Proxy) -> None:
    """An HTTP/1.0 request is answered and the connection then closes cleanly."""
    with Client(proxy.port) as c:
        c.send(b"GET /old HTTP/1.0\r\nHost: hello.test\r\n\r\n")
        r = c.response()
        assert r.status == 200, r
        assert r.json()["path"] == "/old"
        c.expect_clean_close()


def test_upstream_connection_close_is_not_reused(proxy: Proxy) -> None:
    """An upstream response with Connection: close is relayed and its connection not reused."""
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", "/cc1?connclose=1"))
        r1 = c.response()
        assert r1.status == 200, r1
        assert "close" not in r1.tokens("connection"), "upstream's close leaked to the client"
        c.send(request_bytes("GET", "/cc2"))
        r2 = c.response()
        assert r2.status == 200, r2
        assert r2.json()["conn_id"] != r1.json()["conn_id"]
