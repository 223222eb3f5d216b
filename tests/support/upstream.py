"""A controllable HTTP/1.1 upstream for end-to-end tests, run as a subprocess.

`python tests/support/upstream.py --listen 127.0.0.1:0` prints `READY 127.0.0.1:PORT`.
The path picks the behaviour (see `Handler.dispatch`); the default echoes the
request as JSON. Blocking sockets, one thread per connection: slow on purpose,
fully controllable, and independent of the proxy's own HTTP code.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import socket
import sys
import threading
import time
from urllib.parse import parse_qsl, urlsplit

MAX_HEAD = 1 << 20
STATS_PATH = "/_stats"
RELEASE_PATH = "/_release"
HOLD_MAX = 120.0  # seconds a /hold waits for its release at most (?max= overrides)
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2048))  # 64 KiB


def pattern(offset: int, n: int) -> bytes:
    """`n` bytes of the deterministic download pattern starting at `offset`."""
    out = bytearray()
    size = len(_BLOCK)
    while n > 0:
        start = offset % size
        piece = _BLOCK[start : start + n]
        out += piece
        offset += len(piece)
        n -= len(piece)
    return bytes(out)


def pattern_sha256(n: int) -> str:
    """The sha256 hex digest of the first `n` pattern bytes."""
    h = hashlib.sha256()
    done = 0
    while done < n:
        piece = pattern(done, min(1 << 20, n - done))
        h.update(piece)
        done += len(piece)
    return h.hexdigest()


class Closed(Exception):
    """The peer closed the connection before a complete request."""


class State:
    """Counters shared by every connection thread, reported on /_stats."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_conn = 0
        self.open = 0  # connections open now, /_stats ones excluded
        self.accepted = 0
        self.tags: dict[str, dict[str, object]] = {}
        self.gates: dict[str, threading.Event] = {}  # /hold tag -> set by /_release

    def tag(self, name: str, **values: object) -> None:
        with self.lock:
            self.tags.setdefault(name, {}).update(values)

    def count(self, name: str, key: str) -> None:
        """Add one to the `key` counter of tag `name` (shown on /_stats)."""
        with self.lock:
            t = self.tags.setdefault(name, {})
            t[key] = int(str(t.get(key, 0))) + 1

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(name, threading.Event())


class Conn:
    """Buffered reads on one accepted socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self, n: int = 65536) -> None:
        data = self.sock.recv(n)
        if not data:
            raise Closed
        self.buf += data

    def read_head(self) -> bytes | None:
        """The next request head (without the blank line), None on a clean EOF."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("head too big")
            try:
                self.fill()
            except Closed:
                if self.buf:
                    raise
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill(max(65536, n - len(self.buf)))
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_some(self, limit: int) -> bytes:
        if not self.buf:
            self.fill(limit)
        out, self.buf = self.buf[:limit], self.buf[limit:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("line too long")
            self.fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line


class Request:
    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.method, self.target, self.version = lines[0].decode("latin-1").split(" ", 2)
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            self.headers.append((name, value.strip(" \t")))
        url = urlsplit(self.target)
        self.path = url.path
        self.query = dict(parse_qsl(url.query))

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def tokens(self, name: str) -> set[str]:
        out: set[str] = set()
        for n, v in self.headers:
            if n.lower() == name.lower():
                out |= {t.strip().lower() for t in v.split(",") if t.strip()}
        return out


def _reason(status: int) -> str:
    return {
        100: "Continue",
        101: "Switching Protocols",
        200: "OK",
        204: "No Content",
        304: "Not Modified",
        400: "Bad Request",
        404: "Not Found",
        500: "Internal Server Error",
    }.get(status, "Whatever")


class Handler:
    """Serves one connection until it closes; one request at a time."""

    def __init__(self, sock: socket.socket, addr: tuple[str, int], state: State) -> None:
        self.sock = sock
        self.peer = f"{addr[0]}:{addr[1]}"
        self.conn = Conn(sock)
        self.state = state
        with state.lock:
            state.next_conn += 1
            self.conn_id = state.next_conn
        self.conn_req = 0
        self.counted = False

    def run(self) -> None:
        try:
            self.serve()
        except (Closed, OSError, ValueError):
            pass
        finally:
            if self.counted:
                with self.state.lock:
                    self.state.open -= 1
            with contextlib.suppress(OSError):
                self.sock.close()

    def serve(self) -> None:
        while True:
            head = self.conn.read_head()
            if head is None:
                return
            req = Request(head)
            if not self.counted and req.path not in (STATS_PATH, RELEASE_PATH):
                self.counted = True
                with self.state.lock:
                    self.state.open += 1
            self.conn_req += 1
            if not self.dispatch(req):
                return

    # -- request bodies ----------------------------------------------------

    def body_chunks(self, req: Request, chunk: int = 65536):
        """Yield the request body as it arrives (Content-Length or chunked)."""
        self.framing = "none"
        self.trailers: list[tuple[str, str]] = []
        te = req.get("transfer-encoding")
        if te is not None and "chunked" in te.lower():
            self.framing = "chunked"
            while True:
                size_line = self.conn.read_line()
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:
                        line = self.conn.read_line()
                        if not line:
                            return
                        n, _, v = line.decode("latin-1").partition(":")
                        self.trailers.append((n, v.strip()))
                left = size
                while left:
                    data = self.conn.read_some(min(left, chunk))
                    left -= len(data)
                    yield data
                if self.conn.read_exact(2) != b"\r\n":
                    raise ValueError("bad chunk end")
        cl = req.get("content-length")
        if cl is not None:
            self.framing = "length"
            left = int(cl)
            while left:
                data = self.conn.read_some(min(left, chunk))
                left -= len(data)
                yield data

    def consume_body(
        self,
        req: Request,
        pause: float = 0.0,
        delay: float = 0.0,
        chunk: int = 65536,
        tag: str | None = None,
    ) -> tuple[int, str]:
        if pause:
            time.sleep(pause)
        h = hashlib.sha256()
        n = 0
        for data in self.body_chunks(req, chunk):
            h.update(data)
            n += len(data)
            if tag:
                self.state.tag(tag, received=n)
            if delay:
                time.sleep(delay)
        return n, h.hexdigest()

    # -- responses ---------------------------------------------------------

    def send_head(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        lines += [f"{n}: {v}" for n, v in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def respond(
        self,
        req: Request,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> bool:
        """Send a whole response; False when the connection must close after it."""
        q = req.query
        hs = [("Content-Type", content_type), *list(headers or [])]
        close = q.get("connclose") == "1" or "close" in req.tokens("connection")
        if close:
            hs.append(("Connection", "close"))
        if q.get("te") == "chunked":
            hs.append(("Transfer-Encoding", "chunked"))
            self.send_head(status, hs)
            if req.method != "HEAD":
                step = max(1, len(body) // 3)
                for i in range(0, len(body), step):
                    piece = body[i : i + step]
                    self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.sock.sendall(b"0\r\n\r\n")
        else:
            hs.append(("Content-Length", str(len(body))))
            self.send_head(status, hs, body if req.method != "HEAD" else b"")
        if q.get("close") == "1":  # close silently, as if an idle timeout hit
            return False
        return not close

    def dispatch(self, req: Request) -> bool:
        p = req.path
        if p == STATS_PATH:
            return self.stats(req)
        if p == RELEASE_PATH:
            return self.release(req)
        if p == "/hold":
            return self.hold(req)
        if p == "/garbage":
            return self.garbage(req)
        if p == "/hang":
            return self.hang(req)
        if p == "/slowread":
            return self.slowread(req)
        if p == "/big":
            return self.big(req)
        if p == "/closedelim":
            return self.closedelim(req)
        if p == "/ws":
            return self.websocket(req)
        if p.startswith("/status/"):
            return self.status(req, int(p.rsplit("/", 1)[1]))
        if p == "/hop":
            return self.hop(req)
        if p == "/trickle":
            return self.trickle(req)
        return self.echo(req)

    def expect_continue(self, req: Request) -> bool:
        if (req.get("expect") or "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            return True
        return False

    def echo(self, req: Request, status: int = 200) -> bool:
        delay = float(req.query.get("delay", "0"))
        sent_continue = self.expect_continue(req)
        n, digest = self.consume_body(req)
        if delay:
            time.sleep(delay)
        info = {
            "method": req.method,
            "target": req.target,
            "path": req.path,
            "version": req.version,
            "headers": req.headers,
            "body_len": n,
            "body_sha256": digest,
            "framing": self.framing,
            "trailers": self.trailers,
            "conn_id": self.conn_id,
            "conn_req": self.conn_req,
            "peer": self.peer,
            "sent_continue": sent_continue,
        }
        body = json.dumps(info).encode()
        return self.respond(req, status, body)

    def stats(self, req: Request) -> bool:
        self.consume_body(req)
        with self.state.lock:
            info = {
                "open": self.state.open,
                "accepted": self.state.next_conn,
                "tags": self.state.tags,
            }
            body = json.dumps(info).encode()
        return self.respond(req, 200, body)

    def hold(self, req: Request) -> bool:
        """Answer only once `/_release?tag=` came for this request's tag (or after `max`
        seconds, HOLD_MAX by default). /_stats counts per tag `held` (arrived) and
        `answered`: held - answered are waiting now. The body says whether the release
        came."""
        tag = req.query.get("tag", "")
        self.consume_body(req)
        gate = self.state.gate(tag)
        self.state.count(tag, "held")
        released = gate.wait(float(req.query.get("max", HOLD_MAX)))
        self.state.count(tag, "answered")
        body = json.dumps({"tag": tag, "released": released}).encode()
        return self.respond(req, 200, body)

    def release(self, req: Request) -> bool:
        """Let every /hold of `tag` answer, now and from now on."""
        self.consume_body(req)
        self.state.gate(req.query.get("tag", "")).set()
        return self.respond(req, 200, b"{}")

    def garbage(self, req: Request) -> bool:
        self.consume_body(req)
        self.sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\nthis is not http at all\r\n\r\n")
        self.wait_eof(float(req.query.get("hold", "10")))
        return False

    def hang(self, req: Request) -> bool:
        """Read the request, never answer; note when the proxy gives up on us."""
        tag = req.query.get("tag")
        if tag:
            self.state.tag(tag, hung=True, closed=False)
        self.consume_body(req)
        self.wait_eof(float(req.query.get("hold", "30")))
        if tag:
            self.state.tag(tag, closed=True)
        return False

    def wait_eof(self, hold: float) -> None:
        self.sock.settimeout(hold)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def slowread(self, req: Request) -> bool:
        """Pause, then read the upload in small slow reads; echo what arrived."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        q = req.query
        sent_continue = self.expect_continue(req)
        n, digest = self.consume_body(
            req,
            pause=float(q.get("pause", "2")),
            delay=float(q.get("delay", "0")),
            chunk=int(q.get("chunk", "65536")),
            tag=q.get("tag"),
        )
        info = {
            "body_len": n,
            "body_sha256": digest,
            "framing": self.framing,
            "sent_continue": sent_continue,
        }
        return self.respond(req, 200, json.dumps(info).encode())

    def big(self, req: Request) -> bool:
        """Stream `bytes` pattern bytes; blocking sendall is the backpressure.
        `step` bytes per send (64 KiB), `pause` ms between sends (0). With `hold_at`
        and `tag`: stop after that many bytes (tag `held_at` set) until /_release?tag=
        (at most HOLD_MAX seconds), then send the rest."""
        self.consume_body(req)
        q = req.query
        total = int(q.get("bytes", "0"))
        step = int(q.get("step", "65536"))
        pause = float(q.get("pause", "0")) / 1000
        tag = q.get("tag")
        hold_at = int(q.get("hold_at", "-1")) if tag else -1
        chunked = q.get("chunked") == "1"
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        hs = [("Content-Type", "application/octet-stream")]
        hs.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total)))
        self.send_head(200, hs)
        if req.method == "HEAD":
            return True
        sent = 0
        while sent < total:
            if sent == hold_at and tag:
                self.state.tag(tag, held_at=sent)
                self.state.gate(tag).wait(HOLD_MAX)
            if pause and sent:
                time.sleep(pause)
            n = min(step, total - sent)
            if sent < hold_at:
                n = min(n, hold_at - sent)
            piece = pattern(sent, n)
            if chunked:
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.sock.sendall(piece)
            sent += len(piece)
            if tag:
                self.state.tag(tag, sent=sent)
        if chunked:
            self.sock.sendall(b"0\r\n\r\n")
        if tag:
            self.state.tag(tag, done=True)
        return True

    def closedelim(self, req: Request) -> bool:
        """A response with neither Content-Length nor chunked: the body ends at close."""
        self.consume_body(req)
        total = int(req.query.get("bytes", "1000"))
        self.send_head(200, [("Content-Type", "application/octet-stream")])
        self.sock.sendall(pattern(0, total))
        return False

    def websocket(self, req: Request) -> bool:
        key = req.get("sec-websocket-key") or ""
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if "upgrade" not in req.tokens("connection") or (req.get("upgrade") or "").lower() != (
            "websocket"
        ):
            return self.respond(req, 400, b"not an upgrade\n", content_type="text/plain")
        self.send_head(
            101,
            [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", accept),
                ("X-Seen-Connection", req.get("connection") or ""),
                ("X-Seen-Upgrade", req.get("upgrade") or ""),
            ],
        )
        if self.conn.buf:
            self.sock.sendall(self.conn.buf)
            self.conn.buf = b""
        self.sock.settimeout(30)
        while True:
            data = self.sock.recv(65536)
            if not data:
                return False
            self.sock.sendall(data)

    def status(self, req: Request, status: int) -> bool:
        self.consume_body(req)
        if status == 204:
            self.send_head(204, [("X-Status", "204")])
            return True
        if status == 304:
            # Content-Length of a 304 describes the representation: no body follows.
            self.send_head(304, [("ETag", '"v1"'), ("Content-Length", "1234")])
            return True
        return self.respond(req, status, b"status %d\n" % status, content_type="text/plain")

    def hop(self, req: Request) -> bool:
        """A response carrying hop-by-hop headers the proxy must strip."""
        self.consume_body(req)
        body = b"hop body\n"
        self.send_head(
            200,
            [
                ("Content-Type", "text/plain"),
                ("Connection", "X-Hop-Resp, keep-alive"),
                ("X-Hop-Resp", "secret"),
                ("Keep-Alive", "timeout=77"),
                ("Proxy-Connection", "keep-alive"),
                ("Proxy-Authenticate", "Basic realm=upstream"),
                ("Upgrade", "h2c"),
                ("X-End", "kept"),
                ("Content-Length", str(len(body))),
            ],
            body,
        )
        return True

    def trickle(self, req: Request) -> bool:
        """A chunked response that sends one small chunk every `interval` seconds."""
        self.consume_body(req)
        interval = float(req.query.get("interval", "0.2"))
        count = int(req.query.get("count", "100"))
        self.send_head(200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")])
        for i in range(count):
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(b"tick%d\n" % i), b"tick%d\n" % i))
            time.sleep(interval)
        self.sock.sendall(b"0\r\n\r\n")
        return True


def serve(listener: socket.socket, state: State) -> None:
    while True:
        sock, addr = listener.accept()
        with state.lock:
            state.accepted += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Handler(sock, addr, state).run, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(1024)
    state = State()
    bound = listener.getsockname()
    print(f"READY {bound[0]}:{bound[1]}", flush=True)
    try:
        serve(listener, state)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
