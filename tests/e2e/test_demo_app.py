"""The demo app, run as a real subprocess on 127.0.0.1 (uvloop and the stdlib loop)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.demo.app import pattern_bytes, websocket_accept

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


class Demo:
    """One `python -m proxy.demo.app` process; `port` is known once it printed READY."""

    def __init__(self, instance: str, loop: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.demo.app", "--id", instance, "--listen", f"{HOST}:0",
             "--loop", loop],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("READY "), f"demo app did not start: {line!r}"
        self.port = int(line.split()[1].rpartition(":")[2])

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc


class Conn:
    """A blocking client socket with a read buffer and tiny HTTP/1.1 response reader."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(20)
        self.sock.connect((HOST, port))
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            assert self._fill(), f"EOF before {sep!r}; have {self.buf[:200]!r}"
        out, _, self.buf = self.buf.partition(sep)
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._fill(), f"EOF after {len(self.buf)} of {n} bytes"
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        lines = self.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if head or status == 101:
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self.until(b"\r\n"), 16)
                if size == 0:
                    assert self.until(b"\r\n") == b""
                    return status, headers, body
                body += self.exact(size)
                assert self.exact(2) == b"\r\n"
        return status, headers, self.exact(int(headers["content-length"]))

    def at_eof(self) -> bool:
        return not self.buf and not self._fill()


def get(port: int, target: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    with Conn(port) as c:
        c.send(f"GET {target} HTTP/1.1\r\nHost: demo\r\n{extra}\r\n".encode())
        return c.response()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def demo(request: pytest.FixtureRequest) -> Iterator[Demo]:
    """One demo process per event loop, shared by the module's tests."""
    d = Demo("hello-1", request.param)
    yield d
    assert d.stop() == 0


@pytest.fixture
def fresh_demo() -> Iterator[Callable[[], Demo]]:
    """A private demo process for tests that read /stats."""
    started: list[Demo] = []

    def make() -> Demo:
        started.append(Demo("stats-1", "uvloop"))
        return started[-1]

    yield make
    for d in started:
        assert d.stop() == 0


def test_plain_get_names_the_instance(demo: Demo) -> None:
    """Any path answers 200 `instance <id>` with an X-Instance header."""
    status, headers, body = get(demo.port, "/any/path")
    assert (status, body, headers["x-instance"]) == (200, b"instance hello-1\n", "hello-1")


@pytest.mark.parametrize("split", ["whole", "lines", "bytes"])
def test_request_fed_in_pieces(demo: Demo, split: str) -> None:
    """A request head split into lines or single bytes parses the same as whole."""
    raw = b"GET /x HTTP/1.1\r\nHost: demo\r\nX-A: 1\r\n\r\n"
    if split == "whole":
        pieces = [raw]
    elif split == "lines":
        pieces = raw.splitlines(keepends=True)
    else:
        pieces = [raw[i : i + 1] for i in range(len(raw))]
    with Conn(demo.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for p in pieces:
            c.send(p)
        assert c.response()[2] == b"instance hello-1\n"


def test_pipelined_requests_answer_in_order(demo: Demo) -> None:
    """Pipelined requests, one of them sleeping, are answered in order on one connection."""
    with Conn(demo.port) as c:
        c.send(
            b"GET /?sleep=100&bytes=5 HTTP/1.1\r\nHost: d\r\n\r\n"
            b"HEAD /?bytes=7 HTTP/1.1\r\nHost: d\r\n\r\n"
            b"GET /headers HTTP/1.1\r\nHost: d\r\nX-Order: 3\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: d\r\n\r\n"
        )
        assert c.response()[2] == pattern_bytes(5)
        status, headers, _ = c.response(head=True)
        assert (status, headers["content-length"]) == (200, "7")
        assert ["X-Order", "3"] in json.loads(c.response()[2])["headers"]
        assert c.response()[2] == b"instance hello-1\n"
        c.send(b"GET /again HTTP/1.1\r\nHost: d\r\n\r\n")
        assert c.response()[0] == 200


def test_sleep_delays_the_answer(demo: Demo) -> None:
    """?sleep=MS holds the response at least MS milliseconds."""
    t0 = time.monotonic()
    assert get(demo.port, "/?sleep=150")[0] == 200
    assert time.monotonic() - t0 >= 0.15


def test_http10_closes(demo: Demo) -> None:
    """An HTTP/1.0 request is answered with Connection: close and the socket closes."""
    with Conn(demo.port) as c:
        c.send(b"GET / HTTP/1.0\r\n\r\n")
        _, headers, body = c.response()
        assert headers["connection"] == "close" and body == b"instance hello-1\n"
        assert c.at_eof()


def test_connection_close_is_honoured(demo: Demo) -> None:
    """Connection: close on an HTTP/1.1 request closes after the answer."""
    with Conn(demo.port) as c:
        c.send(b"GET /?bytes=3 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        assert c.response()[2] == pattern_bytes(3)
        assert c.at_eof()


@pytest.mark.parametrize("chunked", [False, True])
def test_bytes_body(demo: Demo, chunked: bool) -> None:
    """?bytes=N answers exactly the N-byte pattern, chunked when ?chunked=1."""
    n = 200_001
    status, headers, body = get(demo.port, f"/?bytes={n}&chunked={int(chunked)}")
    assert status == 200 and body == pattern_bytes(n)
    assert ("transfer-encoding" in headers) == chunked


def test_chunked_plain_body(demo: Demo) -> None:
    """?chunked=1 alone sends the instance text chunked."""
    _, headers, body = get(demo.port, "/?chunked=1")
    assert headers["transfer-encoding"] == "chunked" and body == b"instance hello-1\n"


def test_bad_bytes_is_400(demo: Demo) -> None:
    """A malformed ?bytes gets 400 and keeps the connection usable."""
    with Conn(demo.port) as c:
        c.send(b"GET /?bytes=lots HTTP/1.1\r\nHost: d\r\n\r\nGET / HTTP/1.1\r\nHost: d\r\n\r\n")
        assert c.response()[0] == 400
        assert c.response()[0] == 200


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_post_body_hash_and_echo(demo: Demo, framing: str) -> None:
    """A POST body (Content-Length or chunked) is hashed, and echoed with ?echo=1."""
    payload = bytes(range(256)) * 1000
    if framing == "length":
        req = b"POST /?echo=1 HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n" % len(payload)
        req += payload
    else:
        req = b"POST /?echo=1 HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
        for i in range(0, len(payload), 70_000):
            part = payload[i : i + 70_000]
            req += b"%x\r\n%s\r\n" % (len(part), part)
        req += b"0\r\n\r\n"
    with Conn(demo.port) as c:
        c.send(req + b"PUT / HTTP/1.1\r\nHost: d\r\nContent-Length: 3\r\n\r\nabc")
        _, headers, body = c.response()
        assert headers["x-body-sha256"] == hashlib.sha256(payload).hexdigest()
        assert body == payload
        _, headers, body = c.response()
        assert headers["x-body-sha256"] == hashlib.sha256(b"abc").hexdigest()
        assert body == b"instance hello-1\n"


def test_headers_reports_the_head_as_received(demo: Demo) -> None:
    """/headers answers method, target and the header list in order, case and repeats kept."""
    status, _, body = get(demo.port, "/headers?q=1", "x-Mixed-Case: a\r\nX-Dup: 1\r\nX-Dup: 2\r\n")
    head = json.loads(body)
    assert status == 200 and head["method"] == "GET" and head["path"] == "/headers?q=1"
    assert head["headers"] == [
        ["Host", "demo"],
        ["x-Mixed-Case", "a"],
        ["X-Dup", "1"],
        ["X-Dup", "2"],
    ]


def test_websocket_handshake_then_echo(demo: Demo) -> None:
    """/ws answers 101 with the RFC 6455 accept key, then echoes bytes unchanged."""
    rfc_key, rfc_accept = (
        b"dGhlIHNhbXBsZSBub25jZQ==",
        b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
    )  # RFC 6455 1.3
    assert websocket_accept(rfc_key) == rfc_accept
    key = base64.b64encode(b"0123456789abcdef").decode()
    with Conn(demo.port) as c:
        early = b"\x81\x85\x00\x00\x00\x00hello"  # a frame sent along with the handshake
        c.send(
            f"GET /ws HTTP/1.1\r\nHost: d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            + early
        )
        status, headers, _ = c.response()
        assert status == 101
        assert headers["sec-websocket-accept"] == websocket_accept(key.encode()).decode()
        assert c.exact(len(early)) == early
        big = bytes(range(256)) * 4096
        c.send(big)
        assert c.exact(len(big)) == big


def test_ws_without_upgrade_is_400(demo: Demo) -> None:
    """/ws without an Upgrade header is a 400, not a tunnel."""
    assert get(demo.port, "/ws")[0] == 400


def test_garbage_gets_400_and_close(demo: Demo) -> None:
    """An unparseable request gets 400 with Connection: close, then the socket closes."""
    with Conn(demo.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: d\r\nContent-Length: nope\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 400 and headers["connection"] == "close"
        assert c.at_eof()


def _stats(port: int, reset: bool = False) -> dict[str, object]:
    data = json.loads(get(port, "/stats?reset=1" if reset else "/stats")[2])
    assert isinstance(data, dict)
    return data


def _wait_stats(port: int, ok: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        s = _stats(port)
        if ok(s):
            return s
        assert time.monotonic() < deadline, f"stats never matched: {s}"


def test_stats_counts_concurrency_and_ids(fresh_demo: Callable[[], Demo]) -> None:
    """/stats counts concurrent requests from head to response end and lists X-Request-Ids."""
    d = fresh_demo()
    conns = [Conn(d.port) for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            c.send(f"GET /?sleep=5000 HTTP/1.1\r\nHost: d\r\nX-Request-Id: r{i}\r\n\r\n".encode())
        s = _wait_stats(d.port, lambda s: s["current"] == 3)
        assert s["instance"] == "stats-1" and s["requests"] == 3
        assert sorted(s["ids"]) == ["r0", "r1", "r2"]  # type: ignore[call-overload]
    finally:
        for c in conns:
            c.sock.close()
    s = _wait_stats(d.port, lambda s: s["current"] == 0)  # a client gone ends its requests
    assert s["max_concurrency"] == 3
    _stats(d.port, reset=True)
    assert get(d.port, "/", "X-Request-Id: after\r\n")[0] == 200
    s = _stats(d.port)
    assert (s["requests"], s["ids"], s["max_concurrency"]) == (1, ["after"], 1)


def test_slow_reader_is_not_buffered(fresh_demo: Callable[[], Demo]) -> None:
    """A 10 MiB answer to a reader that does not read pauses writing instead of buffering."""
    d = fresh_demo()
    n = 10 * 1024 * 1024
    with Conn(d.port, rcvbuf=16384) as c:
        c.send(b"GET /?bytes=%d HTTP/1.1\r\nHost: d\r\n\r\n" % n)
        s = _wait_stats(d.port, lambda s: s["write_pauses"] >= 1)  # type: ignore[operator]
        assert s["current"] == 1
        status, _, body = c.response()
        assert status == 200 and len(body) == n and body == pattern_bytes(n)
    s = _stats(d.port)
    assert s["max_write_buffer"] < 1024 * 1024, s  # type: ignore[operator]
