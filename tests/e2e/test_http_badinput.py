"""Bad input over real sockets: the right 4xx/5xx, a clean close, and no worker lost."""

from __future__ import annotations

import socket
import time

import pytest
from proxyctl import Client, Proxy, Upstream, request_bytes, wait_until

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(30)]

H = b"Host: hello.test\r\n"


def still_serving(proxy: Proxy, before: list[int]) -> None:
    """A fresh connection is served and the same two workers are still there."""
    r = proxy.get("/after-bad-input")
    assert r.status == 200, f"next good connection not served: {r}"
    assert proxy.serving_pids() == before, "a worker died or was replaced"


def refused(proxy: Proxy, raw: bytes, status: int) -> None:
    """Send `raw` whole; expect `status`, then a clean close, then normal service."""
    before = proxy.serving_pids()
    with Client(proxy.port) as c:
        c.send(raw)
        r = c.response()
        assert r.status == status, f"sent {raw[:200]!r}, got {r}"
        c.expect_clean_close()
    still_serving(proxy, before)


@pytest.mark.parametrize(
    "raw",
    [
        b"this is not http\r\n\r\n",
        b"GET / HTTP/1.1 junk\r\n" + H + b"\r\n",
        b"GET /\x00x HTTP/1.1\r\n" + H + b"\r\n",
        b"GET / HTTQ/1.1\r\n" + H + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    ],
    ids=["words", "trailing-junk", "nul-in-target", "bad-version", "tls-hello"],
)
def test_malformed_request_line_is_400(proxy: Proxy, raw: bytes) -> None:
    """A malformed request line gets 400 and a clean close."""
    refused(proxy, raw, 400)


@pytest.mark.parametrize(
    "line",
    [b"NoColonHere", b"Bad Name: x", b": no-name", b"X-A\x01: 1", b"X-B: a\x00b"],
    ids=["no-colon", "space-in-name", "empty-name", "ctl-in-name", "nul-in-value"],
)
def test_malformed_header_line_is_400(proxy: Proxy, line: bytes) -> None:
    """A malformed header line gets 400 and a clean close."""
    refused(proxy, b"GET / HTTP/1.1\r\n" + H + line + b"\r\n\r\n", 400)


def test_obs_fold_is_400(proxy: Proxy) -> None:
    """A header line folded onto the next (obs-fold, leading space) gets 400."""
    refused(proxy, b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n  continued\r\n\r\n", 400)


def test_obs_fold_with_tab_is_400(proxy: Proxy) -> None:
    """A header line folded with a leading tab gets 400."""
    refused(proxy, b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n\tcontinued\r\n\r\n", 400)


def test_head_over_64k_in_one_header_is_431(proxy: Proxy) -> None:
    """A request head over 64 KiB (one huge header) gets 431 and a clean close."""
    raw = b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    refused(proxy, raw, 431)


def test_head_over_64k_in_many_headers_is_431(proxy: Proxy) -> None:
    """A head over 64 KiB made of 80 one-KiB headers gets 431 and a clean close."""
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1024) for i in range(80))
    refused(proxy, b"GET / HTTP/1.1\r\n" + H + lines + b"\r\n", 431)


def test_unterminated_head_over_64k_is_431_without_waiting(proxy: Proxy) -> None:
    """A head that passes 64 KiB without ending gets 431 at once, not after a timeout."""
    raw = b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (80 * 1024)
    before = proxy.serving_pids()
    with Client(proxy.port) as c:
        c.send(raw)
        t0 = time.monotonic()
        r = c.response(timeout=3)
        assert r.status == 431, r
        assert time.monotonic() - t0 < 2
        c.expect_clean_close()
    still_serving(proxy, before)


def test_head_just_under_64k_is_served(proxy: Proxy) -> None:
    """A 60 KiB request head is under the limit and is proxied."""
    raw = request_bytes("GET", "/big-head", headers=[("X-Big", "a" * (60 * 1024))], close=True)
    r = proxy.request(raw)
    assert r.status == 200, r


def test_101_headers_is_431(proxy: Proxy) -> None:
    """A request with 101 header fields (over the 100 limit) gets 431."""
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(100))  # + Host = 101
    refused(proxy, b"GET / HTTP/1.1\r\n" + H + lines + b"\r\n", 431)


def test_100_headers_is_served(proxy: Proxy) -> None:
    """A request with exactly 100 header fields is within the limit and proxied."""
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(98))  # + Host + Connection = 100
    r = proxy.request(b"GET / HTTP/1.1\r\n" + H + lines + b"Connection: close\r\n\r\n")
    assert r.status == 200, r


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ],
    ids=["cl-first", "te-first"],
)
def test_content_length_and_transfer_encoding_is_400(proxy: Proxy, headers: bytes) -> None:
    """A request with both Content-Length and Transfer-Encoding (smuggling) gets 400."""
    refused(proxy, b"POST / HTTP/1.1\r\n" + H + headers + b"\r\n0\r\n\r\n", 400)


@pytest.mark.parametrize(
    "headers",
    [b"Content-Length: 5\r\nContent-Length: 6\r\n", b"Content-Length: 5, 6\r\n"],
    ids=["two-fields", "one-list"],
)
def test_two_different_content_lengths_is_400(proxy: Proxy, headers: bytes) -> None:
    """Two different Content-Length values get 400."""
    refused(proxy, b"POST / HTTP/1.1\r\n" + H + headers + b"\r\nhello!", 400)


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1e3", b"+5"])
def test_invalid_content_length_is_400(proxy: Proxy, value: bytes) -> None:
    """A Content-Length that is not a plain decimal gets 400."""
    refused(proxy, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: " + value + b"\r\n\r\n", 400)


def test_chunked_not_last_transfer_coding_is_400(proxy: Proxy) -> None:
    """A request whose Transfer-Encoding does not end in chunked cannot be framed: 400."""
    raw = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
    refused(proxy, raw, 400)


def test_two_host_headers_is_400(proxy: Proxy) -> None:
    """Two Host fields are refused with 400 (RFC 9112 section 3.2 says MUST)."""
    refused(proxy, b"GET / HTTP/1.1\r\n" + H + b"Host: other.test\r\n\r\n", 400)


def test_bad_chunk_size_in_one_write_is_400(proxy: Proxy) -> None:
    """A bad chunk size sent with the head gets 400: no response byte has left yet, so the
    proxy can still blame the client (502 would blame the instance, which did nothing wrong)."""
    te = b"Transfer-Encoding: chunked\r\n\r\n"
    raw = b"POST /c HTTP/1.1\r\n" + H + te + b"zz\r\nhello\r\n0\r\n\r\n"
    refused(proxy, raw, 400)


def test_bad_chunk_size_after_head_was_forwarded_is_400(proxy: Proxy, upstream: Upstream) -> None:
    """A bad chunk size arriving after the head went upstream still gets 400 and a close:
    the instance is still waiting for the body, so no response has started and the fault
    is the client's; 502 would be wrong because the instance never failed."""
    before = proxy.serving_pids()
    tag = f"badchunk{time.monotonic_ns()}"
    with Client(proxy.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = f"POST /slowread?pause=0&tag={tag} HTTP/1.1\r\n".encode()
        c.send(head + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        # The instance has the head and the first chunk before the bad chunk is sent.
        assert wait_until(
            lambda: upstream.stats()["tags"].get(tag, {}).get("received") == 5, timeout=5
        ), f"the instance never got the head and first chunk: {upstream.stats()['tags']}"
        c.send(b"zz\r\nworld\r\n0\r\n\r\n")
        r = c.response()
        assert r.status == 400, r
        c.expect_clean_close()
    still_serving(proxy, before)


def test_upstream_garbage_is_502(proxy: Proxy) -> None:
    """An instance answering non-HTTP bytes gets the client a prompt 502, then service."""
    before = proxy.serving_pids()
    with Client(proxy.port) as c:
        c.send(request_bytes("GET", "/garbage"))
        t0 = time.monotonic()
        r = c.response(timeout=5)
        assert r.status == 502, r
        assert time.monotonic() - t0 < 3, "502 waited for the upstream to close"
        if "close" in r.tokens("connection"):
            c.expect_clean_close()
        else:
            c.send(request_bytes("GET", "/same-conn-after-502"))
            assert c.response().status == 200
    still_serving(proxy, before)


def test_bad_input_byte_by_byte_is_400(proxy: Proxy) -> None:
    """A malformed header line fed one byte per write is still a 400 and a clean close."""
    before = proxy.serving_pids()
    raw = b"GET / HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n"
    with Client(proxy.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(len(raw)):
                c.send(raw[i : i + 1])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise AssertionError(f"proxy reset while the request was still arriving: {e}") from e
        r = c.response()
        assert r.status == 400, r
        c.expect_clean_close()
    still_serving(proxy, before)
