"""The built-in demo app: a small HTTP/1.1 server that proxies can be tested against.

Owns the demo behaviours (`instance <id>`, ?sleep, ?bytes, ?chunked, body echo,
/headers, /ws echo, /stats). It is a test and demo fixture that runs as its own
process: it must not import proxy internals beyond config-free helpers, and the plain
`GET /` answer must stay precomputed bytes so it never bottlenecks a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import cast
from urllib.parse import parse_qsl

import httptools
import orjson

CHUNK = 64 * 1024
_LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\n"
_PATTERN = _LINE * (CHUNK // len(_LINE))
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SPECIAL = (b"/headers", b"/ws", b"/stats")
MAX_IDS = 10_000  # /stats keeps the last this many X-Request-Id values
_MAX_QUEUE = 32  # pipelined requests buffered before reading pauses
_REASONS = {200: b"OK", 400: b"Bad Request", 405: b"Method Not Allowed"}


def pattern_bytes(n: int) -> bytes:
    """The body that `?bytes=n` answers (a repeating 64-byte line)."""
    return (_PATTERN * (n // CHUNK + 1))[:n]


def websocket_accept(key: bytes) -> bytes:
    """RFC 6455 Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


class DemoState:
    """What one demo process shares across its connections (counters, canned bytes)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.id_bytes = instance_id.encode()
        self.text = b"instance %s\n" % self.id_bytes
        self.plain = {
            (head, keep): _head(200, self.id_bytes, b"text/plain", len(self.text), keep_alive=keep)
            + (b"" if head else self.text)
            for head in (False, True)
            for keep in (False, True)
        }
        self.current = 0
        self.max_concurrency = 0
        self.requests = 0
        self.ids: deque[str] = deque(maxlen=MAX_IDS)
        self.write_pauses = 0
        self.max_write_buffer = 0

    def stats(self) -> bytes:
        return orjson.dumps(
            {
                "instance": self.instance_id,
                "max_concurrency": self.max_concurrency,
                "current": self.current,
                "requests": self.requests,
                "ids": list(self.ids),
                "write_pauses": self.write_pauses,
                "max_write_buffer": self.max_write_buffer,
            }
        )

    def reset(self) -> None:
        self.max_concurrency = self.current
        self.requests = 0
        self.ids.clear()
        self.write_pauses = 0
        self.max_write_buffer = 0


def _head(
    status: int,
    instance: bytes,
    content_type: bytes,
    length: int | None,
    *,
    keep_alive: bool,
    extra: bytes = b"",
) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s\r\nX-Instance: %s\r\n%s%s\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        content_type,
        framing,
        instance,
        extra,
        b"" if keep_alive else b"Connection: close\r\n",
    )


class _Request:
    """One parsed request waiting for (or getting) its response."""

    __slots__ = ("body", "body_len", "counted", "error", "headers", "keep_alive", "method",
                 "sha", "upgrade", "url", "version")  # fmt: skip

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.counted = False
        self.sha: hashlib._Hash | None = None
        self.body: list[bytes] | None = None
        self.body_len = 0
        self.error = 0


class DemoProtocol(asyncio.Protocol):
    """One client connection: parse, queue pipelined requests, answer them in order."""

    def __init__(self, state: DemoState) -> None:
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._req = _Request()
        self._queue: deque[_Request] = deque()
        self._busy = False  # a response is sleeping or streaming
        self._open = 0  # requests of this connection counted in state.current
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._read_paused = False
        self._parsing = True  # False after a parse error or an upgrade
        self._tunnel = False  # after a 101: echo every byte
        self._held = bytearray()  # bytes after an upgrade, before its 101 went out
        self._closing = False
        self._eof = False
        self._stream: tuple[_Request, memoryview | None, int, bool] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._state.current -= self._open
        self._open = 0
        self._queue.clear()
        self._stream = None
        self._transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._state.write_pauses += 1
        if self._tunnel and self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._tunnel and self._transport is not None:
            self._transport.resume_reading()
        elif self._stream is not None and self._pump():
            self._next()

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            assert self._transport is not None
            self._transport.write(data)
            return
        if not self._parsing:
            if self._queue or self._busy:
                self._held += data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._parsing = False
            self._held += data[e.args[0] :]
        except httptools.HttpParserError:
            self._parsing = False
            bad = _Request()
            bad.error = 400
            bad.keep_alive = False
            self._queue.append(bad)
        self._next()

    def eof_received(self) -> bool:
        self._eof = True
        return bool(self._queue or self._busy)  # half-close: finish pipelined answers first

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._req = _Request()

    def on_url(self, url: bytes) -> None:
        self._req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._req.headers.append((name, value))
        if len(name) == 12 and name.lower() == b"x-request-id":
            self._state.ids.append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        req = self._req
        p = self._parser
        req.method = p.get_method()
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive() and req.version == "1.1"
        req.upgrade = p.should_upgrade()
        if not req.url.startswith(b"/stats"):
            req.counted = True
            self._open += 1
            st = self._state
            st.requests += 1
            st.current += 1
            st.max_concurrency = max(st.max_concurrency, st.current)

    def on_body(self, body: bytes) -> None:
        req = self._req
        if req.sha is None:
            req.sha = hashlib.sha256()
            if b"echo=1" in req.url:
                req.body = []
        req.sha.update(body)
        req.body_len += len(body)
        if req.body is not None:
            req.body.append(body)

    def on_message_complete(self) -> None:
        req = self._req
        if (
            not self._busy
            and not self._queue
            and not req.upgrade
            and req.body_len == 0
            and req.url not in _SPECIAL
            and b"?" not in req.url
            and req.method in (b"GET", b"HEAD")
        ):  # the fast path: canned bytes
            assert self._transport is not None
            self._transport.write(self._state.plain[req.method == b"HEAD", req.keep_alive])
            self._finish(req)
            return
        self._queue.append(req)
        if len(self._queue) > _MAX_QUEUE and not self._read_paused and self._transport:
            self._read_paused = True
            self._transport.pause_reading()

    # answering, in order

    def _next(self) -> None:
        while self._queue and not self._busy and not self._closing:
            req = self._queue.popleft()
            sleep_ms = self._sleep_ms(req)
            if sleep_ms > 0:
                self._busy = True
                self._timer = self._loop.call_later(sleep_ms / 1000, self._after_sleep, req)
                break
            self._respond(req)
        if self._read_paused and len(self._queue) < _MAX_QUEUE // 4 and self._transport:
            self._read_paused = False
            self._transport.resume_reading()
        if self._eof and not self._queue and not self._busy and self._transport:
            self._closing = True
            self._transport.close()

    @staticmethod
    def _sleep_ms(req: _Request) -> float:
        if b"sleep=" not in req.url:
            return 0.0
        try:
            return max(0.0, float(_query(req).get("sleep", "0")))
        except ValueError:
            return 0.0

    def _after_sleep(self, req: _Request) -> None:
        self._timer = None
        self._busy = False
        self._respond(req)
        self._next()

    def _respond(self, req: _Request) -> None:
        t = self._transport
        if t is None:
            return
        st = self._state
        if req.error:
            t.write(_head(400, st.id_bytes, b"text/plain", 12, keep_alive=False) + b"bad request\n")
            self._finish(req)
            return
        path, _, _ = req.url.partition(b"?")
        query = _query(req)
        head = req.method == b"HEAD"
        if req.method == b"CONNECT":
            req.keep_alive = False
            self._plain(req, 405, b"no CONNECT here\n")
        elif path == b"/ws":
            self._websocket(req)
        elif req.upgrade:  # not ours to tunnel: answer, then close
            req.keep_alive = False
            self._plain(req, 200, st.text)
        elif path == b"/stats":
            stats = st.stats()
            if query.get("reset") == "1":
                st.reset()
            self._plain(req, 200, stats, b"application/json")
        elif path == b"/headers":
            self._plain(req, 200, _headers_json(req), b"application/json")
        else:
            try:
                nbytes = int(query["bytes"]) if "bytes" in query else -1
            except ValueError:
                nbytes = -2
            if nbytes < -1:
                self._plain(req, 400, b"bytes must be a non-negative integer\n")
                return
            extra = b""
            body: bytes | None = st.text
            if req.sha is not None or req.method in (b"POST", b"PUT", b"PATCH"):
                sha = req.sha.hexdigest() if req.sha is not None else hashlib.sha256().hexdigest()
                extra = b"X-Body-Sha256: %s\r\nX-Body-Length: %d\r\n" % (
                    sha.encode(),
                    req.body_len,
                )
                if query.get("echo") == "1":
                    body = b"".join(req.body or ())
            ctype = b"text/plain"
            if nbytes >= 0:
                body, ctype = None, b"application/octet-stream"
            length = nbytes if body is None else len(body)
            chunked = query.get("chunked") == "1" and req.version == "1.1"
            framing = None if chunked else length
            t.write(_head(200, st.id_bytes, ctype, framing, keep_alive=req.keep_alive, extra=extra))
            if head or (length == 0 and not chunked):
                self._finish(req)
                return
            self._busy = True
            self._stream = (req, None if body is None else memoryview(body), length, chunked)
            self._pump()

    def _plain(self, req: _Request, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
        assert self._transport is not None
        out = _head(status, self._state.id_bytes, ctype, len(body), keep_alive=req.keep_alive)
        self._transport.write(out if req.method == b"HEAD" else out + body)
        self._finish(req)

    def _pump(self) -> bool:
        """Write the streamed body while the transport takes it; True when finished."""
        assert self._stream is not None and self._transport is not None
        req, view, remaining, chunked = self._stream
        t = self._transport
        st = self._state
        sent = (len(view) if view is not None else 0) - remaining
        while remaining > 0 and not self._write_paused:
            n = min(CHUNK, remaining)
            piece = view[sent : sent + n] if view is not None else _PATTERN[:n]
            if chunked:
                t.write(b"%x\r\n" % n)
                t.write(piece)
                t.write(b"\r\n")
            else:
                t.write(piece)
            remaining -= n
            sent += n
            size = t.get_write_buffer_size()
            st.max_write_buffer = max(st.max_write_buffer, size)
        if remaining > 0:
            self._stream = (req, view, remaining, chunked)
            return False
        if chunked:
            t.write(b"0\r\n\r\n")
        self._stream = None
        self._busy = False
        self._finish(req)
        return True

    def _websocket(self, req: _Request) -> None:
        assert self._transport is not None
        key = _header(req, b"sec-websocket-key")
        if not req.upgrade or (_header(req, b"upgrade") or b"").lower() != b"websocket" or not key:
            req.keep_alive = req.keep_alive and not req.upgrade
            self._plain(req, 400, b"expected a WebSocket upgrade\n")
            return
        self._transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\nX-Instance: %s\r\n\r\n"
            % (websocket_accept(key.strip()), self._state.id_bytes)
        )
        req.keep_alive = True
        self._finish(req)
        self._tunnel = True
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            self._transport.write(held)

    def _finish(self, req: _Request) -> None:
        if req.counted:
            req.counted = False
            self._open -= 1
            self._state.current -= 1
        if not req.keep_alive and self._transport is not None:
            self._closing = True
            self._queue.clear()
            self._transport.close()


def _query(req: _Request) -> dict[str, str]:
    _, _, raw = req.url.partition(b"?")
    return dict(parse_qsl(raw.decode("latin-1"))) if raw else {}


def _header(req: _Request, name: bytes) -> bytes | None:
    for k, v in req.headers:
        if k.lower() == name:
            return v
    return None


def _headers_json(req: _Request) -> bytes:
    return orjson.dumps(
        {
            "method": req.method.decode("latin-1"),
            "path": req.url.decode("latin-1"),
            "version": req.version,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
        }
    )


async def serve(instance_id: str, host: str, port: int) -> asyncio.Server:
    """Start listening; the caller owns the returned server."""
    state = DemoState(instance_id)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: DemoProtocol(state), host, port, reuse_address=True)


async def _run(instance_id: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await serve(instance_id, host, port)
    bound = server.sockets[0].getsockname()
    print(f"READY {bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m proxy.demo.app --id hello-1 --listen 127.0.0.1:9001`."""
    ap = argparse.ArgumentParser(prog="python -m proxy.demo.app", description=__doc__)
    ap.add_argument("--id", required=True, help="instance id, echoed in every answer")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any)")
    ap.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                    help="event loop (auto: uvloop when installed)")  # fmt: skip
    args = ap.parse_args(argv)
    host, sep, port = str(args.listen).rpartition(":")
    if not sep or not port.isdigit():
        ap.error(f"--listen {args.listen!r} is not host:port")
    host = host.strip("[]")
    factory = None
    if args.loop != "asyncio":
        try:
            import uvloop  # optional: the stdlib loop works too

            factory = uvloop.new_event_loop
        except ImportError:
            if args.loop == "uvloop":
                raise
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_run(str(args.id), host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
