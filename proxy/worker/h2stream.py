"""One HTTP/2 stream as the request path's client side: what an exchange writes to.

Owns, per stream, what proxy.worker.client does per HTTP/1.1 connection: the request
body towards the upstream (DATA acknowledged to the client only as it is written
upstream, so the client's window is the bound of what is held), the response as
HEADERS and DATA within the client's flow-control window (the upstream's reading
paused while too much waits for it, a stream stuck at a zero window reset after
`[http2] stall_timeout`), and the end of the stream (END_STREAM, or RST_STREAM).
The exchange (proxy.worker.exchange) is the same object HTTP/1.1 uses: routing,
admission, retries and answers are its. It must not read the socket or handle
connection-level frames: proxy.worker.h2conn does.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError

from proxy.core.conn_state import CLOSE, MADE, NEW, START, step
from proxy.core.h2_head import (
    CONTENT_LENGTH,
    extra_fields,
    local_fields,
    response_fields,
    trailer_fields,
)
from proxy.core.headers import BAD_CODING, CHUNK_END, CHUNKED, LENGTH, NO_BODY, chunk
from proxy.worker.client_io import ClientIO
from proxy.worker.exchange import Abandoned, ClientExchange

if TYPE_CHECKING:
    import asyncio

    from h2.connection import H2Connection

    from proxy.core.request import Request
    from proxy.core.request_head import Front
    from proxy.worker.context import WorkerContext
    from proxy.worker.upstream import UpstreamConnection

_CONTINUE: Final = b"HTTP/1.1 100 "
_STATUS_100: Final = [(b":status", b"100")]
LOW_WATER: Final = 16384  # response bytes waiting for the window below which the upstream reads


class StreamOwner(Protocol):
    """What a stream needs of its connection (proxy.worker.h2conn.H2Front)."""

    ctx: WorkerContext
    h2: H2Connection
    sni_app: str | None
    tls: bool
    backhaul: bool
    front: Front
    transport: asyncio.Transport | None
    dirty: list[H2Stream]
    write_paused: bool

    def ack(self, sid: int, n: int) -> None: ...
    def flush_soon(self) -> None: ...
    def malformed(self, s: H2Stream, kind: str) -> None: ...
    def count_stall(self) -> None: ...
    def request_done(self, r: Request) -> None: ...
    def stream_closed(self, s: H2Stream) -> None: ...


class H2Stream(ClientIO):
    """The client side of one request that came as HTTP/2 stream `sid` of `conn`."""

    __slots__ = (
        "closing",
        "conn",
        "ended",
        "ex",
        "fin_sent",
        "owed",
        "pending",
        "pending_size",
        "remote_done",
        "sid",
        "stall_at",
        "trailers",
        "up_held",
    )

    def __init__(self, conn: StreamOwner, sid: int, r: Request) -> None:
        ClientIO.__init__(self, conn.ctx, conn.backhaul, conn.sni_app, conn.tls)
        self.conn = conn
        self.sid = sid
        self.front = conn.front
        self.transport = conn.transport  # for the exchange's "is the client there"
        self.queue.append(r)
        self.phase = step(NEW, MADE)
        self.ex: ClientExchange | None = None
        self.pending: deque[bytes | memoryview] = deque()  # response bytes waiting for the window
        self.pending_size = 0
        self.closing = False  # answered: END_STREAM once what is pending is sent
        self.ended = False  # END_STREAM sent, or the stream reset: nothing more to do
        self.fin_sent = False  # END_STREAM went out (with the last DATA, or alone)
        self.remote_done = r.complete  # the client's END_STREAM came
        self.owed = 0  # request bytes received and not yet acknowledged (WINDOW_UPDATE)
        self.stall_at = 0.0  # loop time a response stuck at a zero window is reset
        self.up_held = False  # the upstream's reading paused: too much waits for the window
        self.trailers: list[tuple[bytes, bytes]] = []  # the instance's, sent at the end

    # the request -------------------------------------------------------------------
    def start(self) -> None:
        """The request goes on its way, as an HTTP/1.1 request would."""
        r = self.queue[0]
        ctx = self.ctx
        now = ctx.loop.time()
        r.started = now
        self.enter(START, now + ctx.timeouts.request)
        ex = self.ex = ClientExchange(self, r)
        ex.route()

    def refuse(self, status: int, reason: str) -> None:
        """A well-formed request the proxy answers itself (431, 405, 400 ...)."""
        r = self.queue[0]
        r.started = self.ctx.loop.time()
        self.enter(START, r.started + self.ctx.timeouts.request)
        self.ctx.bad_request(status)
        ClientExchange(self, r).local_response(status, f"edgeproxy: {reason}\n")

    def on_data(self, data: bytes, flow: int) -> None:
        """DATA from the client: on to the upstream, or held until it is there."""
        r = self.queue[0] if self.queue else None
        if r is None or self.ended or r.complete or not data:
            # Answered already: dropped (window returned). No payload (padding alone):
            # nothing to relay, and an empty chunk would end a chunked body upstream.
            self.conn.ack(self.sid, flow)
            return
        size = r.body_size + len(data)
        if 0 <= r.content_length < size:
            self.conn.malformed(self, CONTENT_LENGTH)
            return
        if not r.body_size:
            r.body_first = self.ctx.loop.time()
        r.body_size = size
        framed = chunk(data) if r.framing == CHUNKED else data
        up = self.up
        if up is not None and r.sent and not r.hold:
            up.write(framed)
            if r.replayable:
                r.body.append(framed)
                # Kept for a retry only up to one stream window (not [limits]
                # replay_body_bytes as over HTTP/1.1): a connection carries up to
                # max_concurrent_streams of these at once.
                if r.body_size > self.ctx.config.http2.initial_window:
                    r.replayable = False
                    r.body.clear()
            if self.paused:
                self.owed += flow  # the upstream takes no more now: the client waits too
            else:
                self.conn.ack(self.sid, flow)
        else:
            r.body.append(framed)  # bounded by the stream's window: nothing is acknowledged
            self.owed += flow

    def on_end(self) -> None:
        """The client's END_STREAM: the request is complete."""
        self.remote_done = True
        r = self.queue[0] if self.queue else None
        if r is None or self.ended or r.complete:
            return
        if r.content_length >= 0 and r.body_size != r.content_length:
            self.conn.malformed(self, CONTENT_LENGTH)
            return
        r.complete = True
        if r.body_size:
            r.body_last = self.ctx.loop.time()
        if r.framing == CHUNKED:
            up = self.up
            if up is not None and r.sent and not r.hold:
                up.write(CHUNK_END)
                if r.replayable:
                    r.body.append(CHUNK_END)
            else:
                r.body.append(CHUNK_END)

    def pause(self, why: int) -> None:
        self.paused |= why

    def resume(self, why: int) -> None:
        """Reading resumes: what was received meanwhile is acknowledged now."""
        self.paused &= ~why
        if not self.paused and self.owed and not self.ended:
            n, self.owed = self.owed, 0
            self.conn.ack(self.sid, n)

    # the response ------------------------------------------------------------------
    def response_head(
        self,
        up: UpstreamConnection,
        status: int,
        head_only: bool,
        keep: bool,
        http10: bool,
        extra: bytes,
    ) -> tuple[int, bool, int]:
        """As HTTP/1.1's, but the head goes out as a HEADERS frame now (its bytes, HPACK
        compressed, are not counted: 0)."""
        if status == 101 or up.codings:
            return BAD_CODING, False, 0  # a switch or a transfer coding HTTP/2 cannot carry
        fields = response_fields(status, up.fields, up.conn_tokens)
        if extra:  # to a peer (backhaul): X-Edgeproxy-Load, read by its edge
            fields += extra_fields(extra)
        self.send_head(fields)
        if head_only or status in (204, 304):
            return NO_BODY, True, 0
        return LENGTH, True, 0  # anything but CHUNKED: the body's bytes go on as DATA

    def response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailer_fields(fields)

    def respond_local(
        self, status: int, text: str, extra: bytes, close: bool, head_only: bool
    ) -> int:
        body = text.encode()
        self.send_head(local_fields(status, len(body), extra))
        if head_only:
            return 0
        self.out.append(body)
        return len(body)

    def send_head(self, fields: list[tuple[bytes, bytes]]) -> None:
        if self.ended:
            return
        try:
            self.conn.h2.send_headers(self.sid, fields)
        except StreamClosedError:
            self.gone()
            return
        self.conn.flush_soon()

    def write(self, data: bytes) -> None:
        """An interim answer: 100 Continue goes on as a 100 HEADERS (others are dropped)."""
        if data.startswith(_CONTINUE) and not self.ended:
            try:
                self.conn.h2.send_headers(self.sid, _STATUS_100)
            except StreamClosedError:
                return
            self.conn.flush_soon()

    def flush_soon(self) -> None:
        """Held response bytes go on as DATA when the loop's iteration ends."""
        if self.out and not self.queued:
            self.queued = True
            self.conn.dirty.append(self)
            self.conn.flush_soon()

    def flush_out(self) -> None:
        """Held response bytes go on as DATA now (as far as the window allows)."""
        self.queued = False
        self.take_out()
        self.push()
        self.conn.flush_soon()

    def take_out(self) -> None:
        """What the exchange held for the client joins what waits for the window (kept
        as given: the upstream hands over bytes, or views of bytes it copied, never views
        of a buffer it reuses)."""
        out = self.out
        if out:
            pending = self.pending
            for data in out:
                if data:
                    pending.append(data)
                    self.pending_size += len(data)
            out.clear()

    def push(self) -> None:
        """Send what waits, within the stream's and the connection's windows; END_STREAM
        with the last of it once the exchange is over."""
        if self.ended:
            return
        h = self.conn.h2
        sid = self.sid
        pending = self.pending
        try:
            while pending:
                window = h.local_flow_control_window(sid)
                if window <= 0:
                    break
                data = pending[0]
                n = min(len(data), window, h.max_outbound_frame_size)
                if n < len(data):
                    # Frame-sized pieces of a big read, without copying its rest each time.
                    mv = data if type(data) is memoryview else memoryview(data)
                    pending[0] = mv[n:]
                    data = mv[:n]
                else:
                    pending.popleft()
                self.pending_size -= n
                last = self.closing and not pending and not self.trailers
                h.send_data(sid, data, end_stream=last)
                if last:
                    self.fin_sent = True
            if self.closing and not pending:
                self.end()
                return
        except StreamClosedError:
            self.gone()
            return
        self.stall_at = (
            self.ctx.loop.time() + self.ctx.config.http2.stall_timeout if pending else 0.0
        )
        self.hold_upstream(self.pending_size > self.ctx.limits.response_buffer)

    def hold_upstream(self, held: bool) -> None:
        """Pause (or resume) reading the response while too much waits for the window."""
        if held == self.up_held:
            return
        if not held and self.pending_size > LOW_WATER:
            return
        self.up_held = held
        self.write_paused = held or self.conn.write_paused
        up = self.up
        if up is not None:
            up.pause_reading(self.write_paused)

    def end(self) -> None:
        """The last DATA went (with END_STREAM, or END_STREAM alone now)."""
        h = self.conn.h2
        sid = self.sid
        try:
            if not self.fin_sent:
                self.fin_sent = True
                if self.trailers:
                    h.send_headers(sid, self.trailers, end_stream=True)
                else:
                    h.end_stream(sid)
            if not self.remote_done:
                # RFC 9113 8.1: a complete answer may end a request whose body is still
                # coming: RST_STREAM NO_ERROR, and its DATA is no longer wanted.
                h.reset_stream(sid, ErrorCodes.NO_ERROR)
        except StreamClosedError:
            pass
        self.ended = True
        self.stall_at = 0.0
        self.give_back()
        self.conn.stream_closed(self)

    def give_back(self) -> None:
        """Request bytes never acknowledged go back to the connection's window."""
        if self.owed:
            n, self.owed = self.owed, 0
            self.conn.ack(self.sid, n)

    def finish(self, r: Request, status: int) -> None:
        """The exchange is over: the response ends once its bytes are sent."""
        self.ctx.done(r, status)
        if self.queue and self.queue[0] is r:
            self.queue.popleft()
        self.conn.request_done(r)
        self.ex = None
        self.closing = True
        self.phase = step(self.phase, CLOSE)
        self.flush_out()

    # ends that are not an answer ---------------------------------------------------------
    def abort(self) -> None:
        """The exchange cut the response (an upstream lost mid-answer): RST_STREAM."""
        self.reset(ErrorCodes.INTERNAL_ERROR)

    def close(self) -> None:
        self.reset(ErrorCodes.INTERNAL_ERROR)

    def reset(self, code: int) -> None:
        """End the stream now with RST_STREAM `code`; its upstream work stops."""
        if not self.ended:
            with contextlib.suppress(StreamClosedError):
                self.conn.h2.reset_stream(self.sid, code)
            self.conn.flush_soon()
        self.gone()

    def gone(self) -> None:
        """The stream is over without an answer finished (reset either way, connection
        lost): the upstream is cut, or left to answer into nothing within a grace when
        the whole request reached it (as HTTP/1.1 does for a client that left)."""
        self.ended = True
        self.stall_at = 0.0
        self.phase = step(self.phase, CLOSE)
        self.give_back()
        self.pending.clear()
        self.out.clear()
        up = self.up
        self.up = None
        ctx = self.ctx
        q = self.queue
        r = q[0] if q else None
        if up is not None:
            if r is not None and r.sent and r.complete and not r.responded:
                q.popleft()
                deadline = ctx.loop.time() + ctx.timeouts.abandoned
                up.abandon(Abandoned(ctx, r, deadline), deadline)
                self.conn.request_done(r)
            else:
                up.abort()
        for req in q:
            ctx.done(req, 499 if not req.responded else 200)
            self.conn.request_done(req)
        q.clear()
        self.ex = None
        self.conn.stream_closed(self)

    def on_deadline(self, now: float) -> None:
        """[timeouts] request passed, or the response waited on a zero window too long."""
        if self.stall_at and now >= self.stall_at:
            self.conn.count_stall()
            self.reset(ErrorCodes.CANCEL)
            return
        self.deadline = 0.0
        r = self.queue[0] if self.queue else None
        ex = self.ex
        if r is not None and not r.responded and ex is not None:
            ex.local_response(504, "edgeproxy: request took too long\n")
        else:
            self.reset(ErrorCodes.CANCEL)

    def connection_paused(self, paused: bool) -> None:
        """The connection's transport asked to stop (or go on) writing."""
        self.write_paused = paused or self.up_held
        up = self.up
        if up is not None:
            up.pause_reading(self.write_paused)
