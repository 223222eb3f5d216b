"""Hand-built HTTP/2 frames over a real socket, for the hostile cases: no client state
machine in the way (hyperframe builds and parses frames, hpack encodes and decodes
header blocks, one encoder and decoder per connection as HPACK requires).

Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

HOST = "127.0.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 7 error codes.
NO_ERROR = 0
PROTOCOL_ERROR = 1
CANCEL = 8
ENHANCE_YOUR_CALM = 11
REFUSED_STREAM = 7


def request_fields(
    path: str = "/echo", authority: str = "hello.test", method: str = "GET"
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
    ]


class RawH2:
    """One connection: the preface and an empty SETTINGS sent at once (or `settings`)."""

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext | None = None,
        sni: str = "hello.test",
        settings: dict[int, int] | None = None,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.create_connection((HOST, port), timeout=timeout)
        if ctx is not None:
            ctx.set_alpn_protocols(["h2"])
            self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname=sni)
        else:
            self.sock = raw
        self.timeout = timeout
        self.enc = Encoder()
        self.dec = Decoder()
        self.buf = b""
        self.frames: list[Frame] = []
        self.closed = False
        s = SettingsFrame(0)
        if settings:
            s.settings = dict(settings)
        self.sock.sendall(PREFACE + s.serialize())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # building ------------------------------------------------------------------------
    def headers(
        self,
        sid: int,
        fields: list[tuple[bytes, bytes]],
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> bytes:
        f = HeadersFrame(sid)
        f.data = self.enc.encode(fields)
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        return f.serialize()

    @staticmethod
    def continuation(sid: int, block: bytes, end_headers: bool = False) -> bytes:
        f = ContinuationFrame(sid)
        f.data = block
        if end_headers:
            f.flags.add("END_HEADERS")
        return f.serialize()

    @staticmethod
    def data(sid: int, payload: bytes, end_stream: bool = False) -> bytes:
        f = DataFrame(sid)
        f.data = payload
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    @staticmethod
    def rst(sid: int, code: int = CANCEL) -> bytes:
        f = RstStreamFrame(sid)
        f.error_code = code
        return f.serialize()

    @staticmethod
    def ping(payload: bytes = b"12345678") -> bytes:
        f = PingFrame(0)
        f.opaque_data = payload
        return f.serialize()

    @staticmethod
    def settings(values: dict[int, int] | None = None) -> bytes:
        f = SettingsFrame(0)
        if values:
            f.settings = dict(values)
        return f.serialize()

    @staticmethod
    def window_update(sid: int, n: int) -> bytes:
        f = WindowUpdateFrame(sid)
        f.window_increment = n
        return f.serialize()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # reading -------------------------------------------------------------------------
    def read_until(self, cond: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not cond():
            if self.closed:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the proxy did not get there in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                chunk = b""
            except TimeoutError:
                continue
            if not chunk:
                self.closed = True
                return
            self.buf += chunk
            self._parse()

    def _parse(self) -> None:
        while len(self.buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            f.parse_body(memoryview(self.buf[9 : 9 + length]))
            self.buf = self.buf[9 + length :]
            if isinstance(f, HeadersFrame):
                f.decoded = self.dec.decode(f.data, raw=True)  # type: ignore[attr-defined]
            self.frames.append(f)

    def goaway(self, timeout: float | None = None) -> GoAwayFrame | None:
        """Read until the proxy's GOAWAY (or its close); the GOAWAY, if one came."""
        self.read_until(lambda: self.find(GoAwayFrame) is not None, timeout)
        got = self.find(GoAwayFrame)
        return got if isinstance(got, GoAwayFrame) else None

    def find(self, kind: type[Frame], sid: int | None = None) -> Any:
        for f in self.frames:
            if isinstance(f, kind) and (sid is None or f.stream_id == sid):
                return f
        return None

    def stream_end(self, sid: int, timeout: float | None = None) -> tuple[int | None, int | None]:
        """(the :status of stream `sid`, its RST_STREAM code) once it ended either way."""

        def ended() -> bool:
            for f in self.frames:
                if f.stream_id != sid:
                    continue
                if isinstance(f, RstStreamFrame) or "END_STREAM" in f.flags:
                    return True
            return False

        self.read_until(ended, timeout)
        status = None
        code = None
        for f in self.frames:
            if f.stream_id != sid:
                continue
            if isinstance(f, HeadersFrame) and status is None:
                for k, v in f.decoded:  # type: ignore[attr-defined]
                    if k == b":status" and v != b"100":
                        status = int(v)
            if isinstance(f, RstStreamFrame):
                code = f.error_code
        return status, code
