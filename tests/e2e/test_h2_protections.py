"""HTTP/2 on a plaintext listener with prior knowledge (`[listen] h2c = true`), and the
protections an internet-facing HTTP/2 server needs, each tried with real frames over a
real socket against a real proxy (2 workers) and a real HTTP/1.1 upstream: rapid reset,
CONTINUATION flood, HPACK bomb, SETTINGS and PING floods, max_concurrent_streams, a
response stuck at a zero window, malformed requests, connection-specific fields and a
content-length that disagrees with the DATA. Each ends in the RFC's error and is counted.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import pytest
from h2client import H2Client
from h2raw import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RawH2,
    request_fields,
)
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, WindowUpdateFrame
from proxyctl import Proxy, ProxyConfig, Upstream, stop_proxies

pytestmark = pytest.mark.request_path

STREAMS = 5


@pytest.fixture(scope="module")
def h2c_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """h2c on the plaintext listener; small thresholds so that each attack is short."""
    cfg = ProxyConfig(
        upstream=upstream.address,
        listen_extra={"h2c": True},
        http2={
            "max_concurrent_streams": STREAMS,
            "reset_burst": 40,
            "reset_rate": 5.0,
            "flood_burst": 40,
            "flood_rate": 5.0,
            "stall_timeout": 1.0,
        },
    )
    p = Proxy(cfg, tmp_path_factory.mktemp("h2c"))
    yield p
    stop_proxies([p])


def series(event: str) -> str:
    return f'edgeproxy_http2_events_total{{event="{event}"}}'


def raw(p: Proxy, **kw: object) -> RawH2:
    return RawH2(p.cfg.port, **kw)  # type: ignore[arg-type]


def test_h2c_prior_knowledge_and_http11_share_the_listener(h2c_proxy: Proxy) -> None:
    """The preface makes the connection HTTP/2 (X-Forwarded-Proto http); an HTTP/1.1
    request on the same listener is still HTTP/1.1."""
    with H2Client(h2c_proxy.cfg.port, None) as c:
        r = c.request("/echo", headers=[(b"accept", b"x")])
    assert r.status == 200 and b'"HTTP/1.1"' in r.body
    assert b'["X-Forwarded-Proto", "http"]' in r.body
    with socket.create_connection(("127.0.0.1", h2c_proxy.cfg.port), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")


def test_rapid_reset_ends_in_enhance_your_calm_and_no_upstream_work(
    h2c_proxy: Proxy, upstream: Upstream
) -> None:
    """Streams opened and reset in a loop (CVE-2023-44487): past the reset budget the
    connection gets GOAWAY ENHANCE_YOUR_CALM, and the instance never saw those requests."""
    before = h2c_proxy.metric(series("rapid_reset"))
    with raw(h2c_proxy) as c:
        sid = 1
        try:
            for _ in range(300):
                hold = request_fields("/hold?tag=rapid-reset&max=5")
                c.send(c.headers(sid, hold) + c.rst(sid))
                sid += 2
        except OSError:
            pass  # closed by the proxy mid-loop: what we are after
        g = c.goaway()
    assert g is not None and g.error_code == ENHANCE_YOUR_CALM
    assert h2c_proxy.wait_metric(series("rapid_reset"), before + 1) >= before + 1
    held = upstream.stats()["tags"].get("rapid-reset", {}).get("held", 0)
    assert held <= 2  # a HEADERS and its RST split across two reads, at most rarely


def test_continuation_flood_is_bounded(h2c_proxy: Proxy) -> None:
    """A header block that never ends (CONTINUATION after CONTINUATION, CVE-2024-27316
    class) ends in a connection error (GOAWAY PROTOCOL_ERROR) once 64 frames are held,
    not in memory growing, and is counted as a flood."""
    before = h2c_proxy.metric(series("continuation_flood"))
    with raw(h2c_proxy) as c:
        block = c.enc.encode(request_fields())
        f = HeadersFrame(1)
        f.data = block
        f.flags.add("END_STREAM")
        out = f.serialize()
        try:
            c.send(out)
            for _ in range(200):
                c.send(c.continuation(1, b"\x40\x01a\x01b" * 200))
        except OSError:
            pass
        g = c.goaway()
    assert g is not None and g.error_code == PROTOCOL_ERROR
    assert h2c_proxy.wait_metric(series("continuation_flood"), before + 1) >= before + 1


def test_hpack_bomb_is_refused(h2c_proxy: Proxy) -> None:
    """A small header block that decodes past max_header_list_size (one big field in the
    dynamic table, referenced again and again) ends in GOAWAY ENHANCE_YOUR_CALM."""
    before = h2c_proxy.metric(series("hpack_bomb"))
    with raw(h2c_proxy) as c:
        enc = Encoder()
        big = (b"x-bomb", b"a" * 3000)
        block = enc.encode([*request_fields(), big] + [big] * 60)
        assert len(block) < 4000  # the bomb: ~180 KB decoded from a few KB
        f = HeadersFrame(1)
        f.data = block
        f.flags.add("END_STREAM")
        f.flags.add("END_HEADERS")
        c.send(f.serialize())
        g = c.goaway()
    assert g is not None and g.error_code == ENHANCE_YOUR_CALM
    assert h2c_proxy.wait_metric(series("hpack_bomb"), before + 1) >= before + 1


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_ping_and_settings_floods(h2c_proxy: Proxy, kind: str) -> None:
    """PINGs (or SETTINGS) past the flood budget end in GOAWAY ENHANCE_YOUR_CALM."""
    before = h2c_proxy.metric(series(f"{kind}_flood"))
    with raw(h2c_proxy) as c:
        frame = c.ping() if kind == "ping" else c.settings({4: 65535})
        try:
            for _ in range(20):
                c.send(frame * 25)
        except OSError:
            pass
        g = c.goaway()
    assert g is not None and g.error_code == ENHANCE_YOUR_CALM
    assert h2c_proxy.wait_metric(series(f"{kind}_flood"), before + 1) >= before + 1


def test_streams_past_max_concurrent_are_refused(h2c_proxy: Proxy, upstream: Upstream) -> None:
    """With max_concurrent_streams busy, one more stream gets RST_STREAM REFUSED_STREAM
    (nothing of it processed); the others are answered and the connection lives on."""
    with raw(h2c_proxy) as c:
        sids = [1 + 2 * i for i in range(STREAMS + 1)]
        out = b"".join(c.headers(s, request_fields("/hold?tag=max-streams&max=10")) for s in sids)
        c.send(out)
        status, code = c.stream_end(sids[-1])
        assert code == REFUSED_STREAM and status is None
        upstream.release("max-streams")
        for s in sids[:-1]:
            assert c.stream_end(s)[0] == 200
        c.send(c.headers(99, request_fields("/echo")))
        assert c.stream_end(99)[0] == 200


def test_a_response_stuck_at_a_zero_window_is_reset(h2c_proxy: Proxy) -> None:
    """A client that opens no window (SETTINGS_INITIAL_WINDOW_SIZE 0, no WINDOW_UPDATE)
    gets RST_STREAM CANCEL after [http2] stall_timeout, and is counted."""
    before = h2c_proxy.metric(series("stalled"))
    with raw(h2c_proxy, settings={4: 0}) as c:
        c.send(c.headers(1, request_fields("/big?bytes=1000000")))
        status, code = c.stream_end(1, timeout=10)
    assert status == 200 and code == CANCEL
    assert h2c_proxy.wait_metric(series("stalled"), before + 1) >= before + 1


@pytest.mark.parametrize(
    ("extra", "event"),
    [
        ([(b":path", b"/again")], "malformed"),
        ([(b"x-Upper", b"1")], "malformed"),
        ([(b"x-a", b"1\r\nx-b: 2")], "malformed"),
        ([(b"connection", b"close")], "connection_specific"),
        ([(b"transfer-encoding", b"chunked")], "connection_specific"),
        ([(b"te", b"gzip")], "connection_specific"),
        ([(b"upgrade", b"websocket")], "connection_specific"),
        ([(b"keep-alive", b"5")], "connection_specific"),
        ([(b"proxy-connection", b"close")], "connection_specific"),
    ],
)
def test_malformed_streams_are_reset_and_the_connection_lives(
    h2c_proxy: Proxy, extra: list[tuple[bytes, bytes]], event: str
) -> None:
    """Bad pseudo-header fields, names, values and connection-specific fields (RFC 9113
    8.2, 8.3): RST_STREAM PROTOCOL_ERROR for that stream; the next stream is served."""
    before = h2c_proxy.metric(series(event))
    with raw(h2c_proxy) as c:
        c.send(c.headers(1, request_fields("/echo") + extra))
        assert c.stream_end(1) == (None, PROTOCOL_ERROR)
        c.send(c.headers(3, request_fields("/echo")))
        assert c.stream_end(3)[0] == 200
    assert h2c_proxy.wait_metric(series(event), before + 1) >= before + 1


def test_missing_pseudo_header_is_reset(h2c_proxy: Proxy) -> None:
    """A request without :path is malformed: RST_STREAM PROTOCOL_ERROR."""
    with raw(h2c_proxy) as c:
        c.send(
            c.headers(
                1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"hello.test")]
            )
        )
        assert c.stream_end(1) == (None, PROTOCOL_ERROR)


@pytest.mark.parametrize(("length", "sent"), [(10, 5), (4, 8)])
def test_content_length_that_disagrees_with_data_is_reset(
    h2c_proxy: Proxy, length: int, sent: int
) -> None:
    """content-length vs the DATA sent (fewer, or more): RST_STREAM PROTOCOL_ERROR
    (RFC 9113 8.1.1), a stream error: the next stream on the connection is served."""
    before = h2c_proxy.metric(series("content_length"))
    with raw(h2c_proxy) as c:
        cl = (b"content-length", str(length).encode())
        fields = [*request_fields("/echo", method="POST"), cl]
        c.send(c.headers(1, fields, end_stream=False) + c.data(1, b"z" * sent, end_stream=True))
        _status, code = c.stream_end(1)
        assert code == PROTOCOL_ERROR
        c.send(c.headers(3, request_fields("/echo")))
        assert c.stream_end(3)[0] == 200
    assert h2c_proxy.wait_metric(series("content_length"), before + 1) >= before + 1


def test_request_body_credit_follows_what_the_instance_reads(h2c_proxy: Proxy) -> None:
    """An instance that reads nothing for 3 s: the proxy grants the client credit
    (WINDOW_UPDATE) only as the body is written upstream, so the client can send a few
    MB (kernel buffers) of the 64 MiB it has, not all of it (without that bound, all of
    it: measured); once the instance reads, all that was sent arrives."""

    total = 64 * 1024 * 1024
    with RawH2(h2c_proxy.cfg.port, timeout=60) as c:
        fields = request_fields("/slowread?pause=3&chunk=1048576", method="POST")
        c.send(c.headers(1, fields, end_stream=False))
        conn_window = stream_window = 65535
        seen = 0  # WINDOW_UPDATE frames accounted for
        sent = 0
        frame = c.data(1, b"u" * 16384)

        def credit() -> None:
            nonlocal conn_window, stream_window, seen
            for f in c.frames[seen:]:
                if isinstance(f, WindowUpdateFrame):
                    if f.stream_id == 0:
                        conn_window += f.window_increment
                    elif f.stream_id == 1:
                        stream_window += f.window_increment
            seen = len(c.frames)

        observe_until = time.monotonic() + 2.0  # well inside the instance's 3 s pause
        while time.monotonic() < observe_until:
            credit()
            k = min(conn_window, stream_window, total - sent, 1 << 20) // 16384
            if k > 0:  # whole frames, up to 1 MiB in one write
                c.send(frame * k)
                sent += k * 16384
                conn_window -= k * 16384
                stream_window -= k * 16384
            else:
                with contextlib.suppress(TimeoutError):
                    c.read_until(lambda: len(c.frames) > seen, timeout=0.2)
        assert sent < 8_000_000, f"the client could send {sent} bytes to a stalled instance"
        c.send(c.data(1, b"", end_stream=True))  # the body ends here (no length was given)
        status, code = c.stream_end(1, timeout=30)
        assert status == 200 and code is None
        body = b"".join(f.data for f in c.frames if isinstance(f, DataFrame) and f.stream_id == 1)
    assert json.loads(body)["body_len"] == sent  # what was credited all arrived
