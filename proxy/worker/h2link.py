"""One request's HTTP/2 stream to a peer node, as the transport of an UpstreamConnection.

Owns the translation at the stream's two ends, so the exchange drives an HTTP/2
backhaul stream exactly as it drives an HTTP/1.1 connection: the request head and body
the UpstreamConnection writes (HTTP/1.1 bytes, parsed again with httptools) go out as
HEADERS and DATA within the peer's windows (the exchange's writing paused while too
much waits), and the peer's HEADERS, DATA and trailers come back to it as one HTTP/1.1
response (its own framing, `Connection: close`: a stream is never pooled). DATA is
acknowledged as it is handed on, unless the exchange paused reading. It must not own
the connection (proxy.worker.h2peer) nor decide anything about the request.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Protocol

import httptools
from h2.errors import ErrorCodes

from proxy.core.headers import chunk
from proxy.worker.upstream import LOST_UNPROCESSED

if TYPE_CHECKING:
    import asyncio

    from proxy.worker.upstream import UpstreamConnection

HIGH_WATER: Final = 262144  # request bytes waiting for the peer's window: the exchange pauses
LOW_WATER: Final = 65536  # ... and resumes below this
# Fields that do not cross into HTTP/2 (RFC 9113 8.2.2), besides Host (:authority).
_DROP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
_REASONS: Final = {int(s): s.phrase.encode() for s in HTTPStatus}
_CLOSE: Final = b"connection: close\r\n"


Fields = list[tuple[bytes, bytes]]


class LinkOwner(Protocol):
    """What a stream needs of its connection (proxy.worker.h2peer.PeerConn)."""

    loop: asyncio.AbstractEventLoop
    scheme: bytes

    def send_headers(self, link: StreamLink, fields: Fields, end: bool) -> None: ...
    def send_data(self, sid: int, pending: deque[bytes], fin: bool) -> tuple[int, bool]: ...
    def ack(self, sid: int, n: int) -> None: ...
    def reset(self, sid: int, code: int) -> None: ...
    def forget(self, link: StreamLink) -> None: ...


class StreamLink:
    """Stream `sid` of `conn`, carrying the exchange of `up` (its transport)."""

    def __init__(self, conn: LinkOwner, sid: int, up: UpstreamConnection) -> None:
        self.conn = conn
        self.sid = sid  # 0 until the HEADERS go (PeerConn.send_headers)
        self.up = up
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.head_only = False  # a HEAD request: the response has no body
        self.pending: deque[bytes] = deque()  # request body waiting for the window
        self.pending_size = 0
        self.fin = False  # the request is complete: END_STREAM after what is pending
        self.fin_sent = False
        self.write_held = False  # the exchange was told to stop writing
        self.closing = False  # closed or lost: nothing more goes either way
        self.remote_done = False  # the peer's END_STREAM came
        self.responded = False  # a final response head came
        self.chunked = False  # the response goes to `up` chunked (no content-length)
        self.trailers: list[tuple[bytes, bytes]] = []
        self.reading_paused = False
        self.owed = 0  # response bytes handed on while paused, acknowledged on resume

    # the transport, as UpstreamConnection uses it ----------------------------------------
    def write(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:  # our own request bytes: not expected
            self.abort()
            return
        self.push()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        """The exchange is done with the stream: if it is still open, RST_STREAM CANCEL."""
        if self.closing:
            return
        if not (self.fin_sent and self.remote_done):
            self.conn.reset(self.sid, ErrorCodes.CANCEL)
        self.finish()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket of its own (nothing to splice), no TLS object

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.owed and not self.closing:
            n, self.owed = self.owed, 0
            self.conn.ack(self.sid, n)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    # the request (httptools callbacks on what the UpstreamConnection wrote) ---------------
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        self.head_only = method == b"HEAD"
        authority = b""
        body = False
        out: list[tuple[bytes, bytes]] = []
        for name, value in self.fields:
            if name == b"host":
                authority = value
            elif name == b"content-length":
                body = value != b"0"
            elif name == b"transfer-encoding":
                body = True
            if name in _DROP or (name == b"te" and value != b"trailers"):
                continue
            out.append((name, value))
        head = [
            (b":method", method),
            (b":scheme", self.conn.scheme),
            (b":authority", authority),
            (b":path", self.url),
        ]
        self.fields = []
        self.fin = not body
        self.conn.send_headers(self, head + out, not body)
        if not body:
            self.fin_sent = True

    def on_body(self, body: bytes) -> None:
        self.pending.append(body)
        self.pending_size += len(body)

    def on_message_complete(self) -> None:
        self.fin = True

    def push(self) -> None:
        """Send what waits within the windows; END_STREAM after the last of it."""
        if self.closing:
            return
        if not self.fin_sent and (self.pending or self.fin):
            sent, ended = self.conn.send_data(self.sid, self.pending, self.fin)
            self.pending_size -= sent
            self.fin_sent = ended
        if self.pending_size > HIGH_WATER and not self.write_held:
            self.write_held = True
            self.up.pause_writing()
        elif self.write_held and self.pending_size < LOW_WATER:
            self.write_held = False
            self.up.resume_writing()
        if self.fin_sent and self.remote_done:
            self.finish()

    # the response (the connection's events) -----------------------------------------
    def on_response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """A response head (final or 1xx); `ended`: it carried END_STREAM."""
        status = 0
        lines = []
        length = False
        for name, value in headers:
            if b"\r" in value or b"\n" in value:
                self.lost()  # a field HTTP/1.1 cannot carry: no response (502)
                return
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif name[:1] != b":":
                length = length or name == b"content-length"
                lines.append(name + b": " + value + b"\r\n")
        if not 100 <= status <= 599:
            self.lost()
            return
        final = status >= 200
        if ended and final:
            self.remote_done = True  # known before `up` sees the head (and maybe ends)
        if final:
            self.responded = True
            if not length and not self.head_only and status not in (204, 304):
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            lines.append(_CLOSE)
        reason = _REASONS.get(status, b"-")
        self.up.data_received(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(lines)))
        if ended and final:
            self.tail()

    def on_data(self, data: bytes, flow: int, ended: bool) -> None:
        """Response DATA; `ended`: it carried END_STREAM."""
        if self.closing or not self.responded:
            self.conn.ack(self.sid, flow)
            return
        if ended:
            self.remote_done = True
        if data:
            self.up.data_received(chunk(data) if self.chunked else data)
        if self.reading_paused:
            self.owed += flow
        else:
            self.conn.ack(self.sid, flow)
        if ended:
            self.tail()

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = headers
        self.on_end()

    def on_end(self) -> None:
        """The peer's END_STREAM (alone, or after trailers): the response is complete."""
        if self.remote_done or self.closing:
            return
        self.remote_done = True
        self.tail()

    def tail(self) -> None:
        """The end of the response towards `up` (the last chunk and trailers)."""
        if self.closing:
            return
        if self.chunked:
            tail = [b"0\r\n"]
            for name, value in self.trailers:
                if name[:1] != b":" and b"\r" not in value and b"\n" not in value:
                    tail.append(name + b": " + value + b"\r\n")
            tail.append(b"\r\n")
            self.up.data_received(b"".join(tail))
        if self.fin_sent:
            self.finish()

    def lost(self, unprocessed: bool = False) -> None:
        """The stream ended without a (whole) response: reset by the peer, refused, or
        the connection went. The exchange hears it as a connection lost; `unprocessed`:
        the peer said nothing of it was processed (or nothing of it left), then as a
        refused connect (retried whatever the method)."""
        if self.closing:
            return
        if not self.remote_done:
            self.conn.reset(self.sid, ErrorCodes.CANCEL)
        self.finish(unprocessed)

    def finish(self, unprocessed: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        self.pending.clear()
        self.conn.forget(self)
        up = self.up
        loop = self.conn.loop
        ex = up.exchange
        if unprocessed and ex is not None and not self.responded:
            up.exchange = None
            up.pool.open.discard(up)
            loop.call_soon(ex.upstream_lost, up, LOST_UNPROCESSED)
            return
        # As asyncio reports a closed transport: on the next iteration.
        loop.call_soon(up.connection_lost, None)
