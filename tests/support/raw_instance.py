"""An instance that records the exact bytes the proxy sends it, for hostile-input tests.

A listening socket on 127.0.0.1 served by a thread per connection (in the test's
own process, over real sockets). It splits what arrives into requests with its
own strict, minimal reading of RFC 9112 (a head up to CRLF CRLF; a body by
Content-Length or chunked, nothing else), records each one with the raw bytes
and answers with a scripted response chosen by the request's path.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Seen:
    """One request as the instance read it."""

    conn: int  # connection number, from 1
    head: bytes  # request line to the empty line, CRLFs included
    body: bytes  # the body as framed on the wire (chunk syntax kept)

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def path(self) -> str:
        return self.line.split(b" ")[1].decode("latin-1")

    def fields(self, name: str) -> list[bytes]:
        """Every value of field `name` (case-insensitive), in order."""
        low = name.lower().encode()
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            n, sep, v = line.partition(b":")
            if sep and n.lower() == low:
                out.append(v.strip())
        return out

    def names(self) -> list[str]:
        return [
            line.partition(b":")[0].decode("latin-1").lower()
            for line in self.head.split(b"\r\n")[1:]
            if line
        ]


@dataclass
class RawInstance:
    """Start with `start()`; `responses` maps a path to the raw bytes answered to it."""

    responses: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    raw: dict[int, bytearray] = field(default_factory=dict)  # every byte, per connection
    tunnel_echo: bool = True  # after a 101, echo what arrives
    # path -> handler(socket, request) that answers itself; False ends the connection
    handlers: dict[str, Callable[[socket.socket, Seen], bool]] = field(default_factory=dict)

    def start(self) -> RawInstance:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.cond = threading.Condition()
        self.conns = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[Seen]:
        """The first `n` requests, once that many arrived (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.seen)} requests arrived, expected {n}: {self.seen}"
                self.cond.wait(left)
            return list(self.seen[:n])

    def reset(self) -> None:
        with self.cond:
            self.seen.clear()
            self.responses.clear()
            self.handlers.clear()

    def bytes_of(self, conn: int) -> bytes:
        with self.cond:
            return bytes(self.raw.get(conn, b""))

    def _accept(self) -> None:
        while not self.stopped:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self.conns += 1
                n = self.conns
                self.raw[n] = bytearray()
            threading.Thread(target=self._serve, args=(s, n), daemon=True).start()

    def _serve(self, s: socket.socket, n: int) -> None:
        buf = bytearray()

        def more() -> bool:
            try:
                data = s.recv(65536)
            except OSError:
                return False
            if data:
                with self.cond:
                    self.raw[n] += data
                    self.cond.notify_all()
                buf.extend(data)
            return bool(data)

        with s:
            s.settimeout(30)
            while True:
                while b"\r\n\r\n" not in buf:
                    if not more():
                        return
                end = buf.index(b"\r\n\r\n") + 4
                head = bytes(buf[:end])
                del buf[:end]
                seen = Seen(n, head, b"")
                body = self._body(seen, buf, more)
                if body is None:
                    return
                seen.body = body
                with self.cond:
                    self.seen.append(seen)
                    self.cond.notify_all()
                path = seen.path.split("?")[0]
                handler = self.handlers.get(path)
                if handler is not None:
                    if handler(s, seen):
                        continue
                    return
                answer = self.responses.get(path, OK)
                try:
                    s.sendall(answer)
                except OSError:
                    return
                if answer.startswith(b"HTTP/1.1 101"):
                    while self.tunnel_echo and (buf or more()):
                        with contextlib.suppress(OSError):
                            s.sendall(bytes(buf))
                        buf.clear()
                    return
                if b"connection: close" in answer.lower():
                    return

    @staticmethod
    def _body(seen: Seen, buf: bytearray, more: object) -> bytes | None:
        assert callable(more)
        cl = seen.fields("content-length")
        te = seen.fields("transfer-encoding")
        if te:
            out = bytearray()
            while True:
                while b"\r\n" not in buf:
                    if not more():
                        return None
                eol = buf.index(b"\r\n")
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                need = eol + 2 + size + 2 if size else eol + 2
                while len(buf) < need:
                    if not more():
                        return None
                out += buf[:need]
                del buf[:need]
                if size == 0:
                    while b"\r\n" not in buf:
                        if not more():
                            return None
                    eol = buf.index(b"\r\n")
                    out += buf[: eol + 2]
                    del buf[: eol + 2]
                    return bytes(out)
        if cl:
            length = int(cl[0])
            while len(buf) < length:
                if not more():
                    return None
            body = bytes(buf[:length])
            del buf[:length]
            return body
        return b""
