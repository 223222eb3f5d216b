"""A blocking HTTP/2 client for tests: the h2 library over a real socket (TLS with ALPN
h2, or plaintext with prior knowledge), and raw frames for the hostile cases.

Everything it waits for has a deadline; it reads until a condition holds.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

HOST = "127.0.0.1"


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # RST_STREAM error code from the proxy

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H2Client:
    """One HTTP/2 connection to the proxy."""

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext | None = None,
        sni: str | None = "hello.test",
        timeout: float = 10.0,
        settings: dict[int, int] | None = None,
        auto_ack: bool = True,
        host: str = HOST,
        source: str | None = None,
    ) -> None:
        src = (source, 0) if source is not None else None
        raw = socket.create_connection((host, port), timeout=timeout, source_address=src)
        if ctx is not None:
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname=sni)
            assert isinstance(self.sock, ssl.SSLSocket)
            self.alpn = self.sock.selected_alpn_protocol()
        else:
            self.sock = raw
            self.alpn = "h2c"
        self.timeout = timeout
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(cfg)
        if settings:
            self.conn.update_settings(settings)  # type: ignore[arg-type]
        self.conn.initiate_connection()
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.auto_ack = auto_ack  # give flow-control credit back as DATA arrives
        self.events: list[Any] = []
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # requests ------------------------------------------------------------------------
    def start(
        self,
        path: str = "/echo",
        method: str = "GET",
        authority: str = "hello.test",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *(headers or []),
        ]
        self.responses[sid] = Response()
        self.conn.send_headers(sid, fields, end_stream=end and not body)
        if body:
            self.send_body(sid, body, end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        """Send `body` within the windows the proxy grants (reading its frames meanwhile)."""
        view = memoryview(body)
        deadline = time.monotonic() + self.timeout
        while view:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.read_once(deadline)
                continue
            n = min(window, len(view))
            self.conn.send_data(sid, bytes(view[:n]), end_stream=end and n == len(view))
            view = view[n:]
            self.flush()
        if end and not body:
            self.conn.end_stream(sid)
            self.flush()

    def request(self, path: str = "/echo", **kw: Any) -> Response:
        sid = self.start(path, **kw)
        return self.wait(sid)

    def wait(self, sid: int) -> Response:
        r = self.responses[sid]
        self.read_until(lambda: r.ended or r.reset is not None or self.closed)
        return r

    # reading -------------------------------------------------------------------------
    def read_until(self, cond: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("the proxy did not get there in time")
            if self.closed:
                return
            self.read_once(deadline)

    def read_once(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        for ev in events:
            self.events.append(ev)
            self.on_event(ev)
        try:
            self.flush()
        except OSError:
            self.closed = True

    def on_event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            r = self.responses.setdefault(ev.stream_id, Response())
            r.headers = list(ev.headers)
            r.status = int(dict(ev.headers)[b":status"])
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            pass
        elif isinstance(ev, h2.events.DataReceived):
            r = self.responses.setdefault(ev.stream_id, Response())
            r.body += ev.data
            if self.auto_ack and ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.responses.setdefault(ev.stream_id, Response()).trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.responses.setdefault(ev.stream_id, Response()).ended = True
        elif isinstance(ev, h2.events.StreamReset):
            self.responses.setdefault(ev.stream_id, Response()).reset = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def wait_goaway(self, timeout: float | None = None) -> h2.events.ConnectionTerminated:
        self.read_until(lambda: self.goaway is not None or self.closed, timeout)
        assert self.goaway is not None, "the connection closed without GOAWAY"
        return self.goaway
