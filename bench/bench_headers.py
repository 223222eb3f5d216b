"""Micro-benchmarks of the per-request header work (run: pytest bench/bench_headers.py).

Request head: httptools parse + hop-by-hop filtering + X-Forwarded-* / Via build;
response head: filtering + framing decision. Figures go in the closing notes.
"""

from __future__ import annotations

import httptools
import pytest

from proxy.core.headers import ResponseHead
from proxy.core.request_head import FWD_APPEND, Front, RequestHead

REQ = (
    b"GET /index.html?x=1 HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n"
    b"X-Forwarded-For: 10.0.0.1\r\n\r\n"
)
RESP_HEADERS = [
    (b"Server", b"nginx/1.22.1"),
    (b"Date", b"Thu, 26 Nov 2026 17:00:00 GMT"),
    (b"Content-Type", b"application/octet-stream"),
    (b"Content-Length", b"13"),
    (b"Last-Modified", b"Thu, 26 Nov 2026 16:00:00 GMT"),
    (b"Connection", b"keep-alive"),
    (b"ETag", b'"6565f000-d"'),
    (b"Accept-Ranges", b"bytes"),
]


FRONT = Front(FWD_APPEND, b"127.0.0.1", b"http", b"8080")  # a trusted client: X-F-F appended


class _Sink(RequestHead):
    __slots__ = ()

    def on_headers_complete(self) -> None:
        pass


def test_request_head_parse_filter_build(benchmark: pytest.FixtureRequest) -> None:
    """Parse a typical browser-ish request with httptools and build the upstream head."""

    def run() -> bytes:
        head = _Sink()
        httptools.HttpRequestParser(head).feed_data(REQ)
        head.decide(b"GET", "1.1", False, True, frozenset())
        return head.build(FRONT)

    out = benchmark(run)  # type: ignore[operator]
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n" in out
    assert b"Connection" not in out


def test_request_head_filter_build_only(benchmark: pytest.FixtureRequest) -> None:
    """Only the edge's own header work: on_header callbacks and the build (no parsing)."""
    fields = [
        (b"Host", b"bench.test"),
        (b"User-Agent", b"wrk"),
        (b"Accept", b"*/*"),
        (b"Accept-Encoding", b"gzip"),
        (b"Connection", b"keep-alive"),
        (b"X-Forwarded-For", b"10.0.0.1"),
    ]

    def run() -> bytes:
        head = RequestHead()
        head.on_url(b"/index.html?x=1")
        for n, v in fields:
            head.on_header(n, v)
        head.decide(b"GET", "1.1", False, True, frozenset())
        return head.build(FRONT)

    out = benchmark(run)  # type: ignore[operator]
    assert out.startswith(b"GET /index.html?x=1 HTTP/1.1\r\n")


RESP_HEAD = (
    b"HTTP/1.1 200 OK\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in RESP_HEADERS) + b"\r\n"
)


def test_response_head_filter_build(benchmark: pytest.FixtureRequest) -> None:
    """Filter an nginx response head (one regex pass) and build the client's head."""

    def run() -> bytes:
        head = ResponseHead()
        head.take(RESP_HEAD)
        out, _, _ = head.build(200, False, True, False)
        return out

    out = benchmark(run)  # type: ignore[operator]
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection" not in out
    assert b"Content-Length: 13\r\n" in out and out.endswith(b"\r\n\r\n")
