"""The client side of the request path: one asyncio protocol per accepted connection.

Owns parsing client requests (httptools), their queue (pipelining, bounded),
the request body towards the upstream, what happens after each answer
(keep-alive, the next request, closing), refusing bad requests and the
client-side timeouts. Each request's exchange (routing, the upstream, the
answer) is its own object (proxy.worker.exchange); the transport side that
both use is the base class (proxy.worker.client_io). It must not know how
targets are chosen or how the table is read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.core.conn_state import (
    BUSY,
    CLOSING,
    HALF_CLOSE,
    HEAD,
    HEAD_BEGIN,
    IDLE,
    KEEP,
    LINGER,
    LOST,
    MADE,
    REFUSE_LATER,
    REFUSING,
    START,
    TUNNEL,
    step,
)
from proxy.core.headers import (
    CHUNK_END,
    CHUNKED,
    LENGTH,
    NO_BODY,
    HeadError,
    chunk,
    simple_response,
)
from proxy.core.request import Request
from proxy.core.request_head import FWD_APPEND, FWD_KEEP, FWD_SET, Front
from proxy.worker.client_io import (
    P_BACKLOG,
    P_BUFFER,
    P_QUEUE,
    P_REFUSED,
    P_UPGRADE,
    P_UPSTREAM,
    ClientIO,
)
from proxy.worker.exchange import Abandoned, ClientExchange

if TYPE_CHECKING:
    from proxy.worker.context import WorkerContext

_HEAD_END: Final = b"\r\n\r\n"
_MAX_BUFFER: Final = 256 * 1024


class ClientConnection(ClientIO):
    """HTTP/1.1 towards one client; at most one exchange in flight, others queued.

    An asyncio protocol by its methods, not by inheritance (see UpstreamConnection)."""

    __slots__ = (
        "backlog",
        "ex",
        "head_raw",
        "in_body",
        "in_head",
        "parser",
        "refusal",
        "req",
    )

    def __init__(
        self,
        ctx: WorkerContext,
        backhaul: bool = False,
        sni_app: str | None = None,
        tls: bool = False,
    ) -> None:
        ClientIO.__init__(self, ctx, backhaul, sni_app, tls)
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # the request being parsed
        self.ex: ClientExchange | None = None  # the exchange of the request in flight
        self.backlog = b""  # read but not yet parsed: past the pipelining bound
        self.in_body = False  # the parser is inside a request body
        self.head_raw = 0
        self.in_head = False
        self.refusal = (0, "")  # phase REFUSING: the bad request's answer, to come

    # asyncio.Protocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self.transport = cast("asyncio.Transport", transport)
        ctx = self.ctx
        peer = t.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        local = t.get_extra_info("sockname")
        port = str(local[1]).encode() if local else b"0"
        if self.backhaul:
            mode = FWD_KEEP
        elif ctx.trusted_forwarder(ip):
            mode = FWD_APPEND
        else:
            mode = FWD_SET
        self.front = Front(mode, ip.encode(), b"https" if self.tls else b"http", port)
        # A response that fits is taken from the instance at full speed, whatever the
        # client's pace (the instance's slot frees as soon as it is done); past this, the
        # client's pace holds the instance back.
        t.set_write_buffer_limits(high=ctx.limits.response_buffer)
        sock = t.get_extra_info("socket")
        # Under TLS the socket carries ciphertext: nothing may be spliced into it (the edge's
        # HTTPS connections say so; a backhaul's mutual TLS shows in its transport).
        tls = self.tls or t.get_extra_info("sslcontext") is not None
        if sock is not None and ctx.pool.splicer is not None and not tls:
            self.sink_fd = sock.fileno()
        ctx.opened(self)
        self.enter(MADE, ctx.loop.time() + ctx.timeouts.client_header)

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        ctx.closed(self)
        up = self.up
        queue = self.queue
        if up is not None:
            self.up = None
            r = queue[0] if queue else None
            if r is not None and r.sent and r.complete and not r.tunnel and not r.responded:
                # The client left while the instance is still thinking: keep counting it
                # (its slot under the hard limit) until it answers, for a short grace.
                # One that is already answering is cut: it stops on its next write.
                queue.popleft()
                deadline = ctx.loop.time() + ctx.timeouts.abandoned
                up.abandon(Abandoned(ctx, r, deadline), deadline)
            else:
                up.abort()
        for r in queue:
            ctx.done(r, 499 if not r.responded else 200)
        queue.clear()
        self.ex = None
        self.out.clear()
        self.transport = None
        self.phase = step(self.phase, LOST)

    def eof_received(self) -> bool:
        if self.phase == TUNNEL and self.up is not None and self.up.transport is not None:
            self.up.write_eof()
            return True
        # A client that closes while waiting is gone (as nginx and Envoy see it): stop the
        # upstream work now rather than hold the instance until a timeout.
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.up is not None:
            self.up.pause_reading(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None:
            self.up.pause_reading(False)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == TUNNEL:
            up = self.up
            if up is not None:
                up.write(data)
                self.deadline = self.ctx.loop.time() + self.ctx.timeouts.tunnel_idle
            return
        if phase > TUNNEL:  # refusing, lingering or closing: nothing more is read
            return
        q = self.queue
        if q and q[-1].tunnel:
            # After an upgrade head nothing is relayed until the instance answers 101:
            # held (reading is paused, so at most one read), then dropped with the
            # connection if the answer is anything else.
            q[-1].early += data
            return
        if self.backlog:
            self.backlog += data
            return
        self.parse(data)

    def parse(self, data: bytes) -> None:
        """Feed the parser at most one request head at a time, so that parsing stops as
        soon as the connection has queued as much as it may (pipelining is bounded)."""
        n = len(data)
        pos = 0
        while pos < n:
            if len(self.queue) > 1 and self.over_pipeline():
                self.backlog = data[pos:]
                self.pause(P_BACKLOG)
                return
            r = self.req
            if self.in_body and r is not None and r.framing == LENGTH:
                end = pos + r.content_length - r.body_size  # exactly the rest of the body
            else:
                e = data.find(_HEAD_END, pos)
                end = n if e < 0 else e + 4
            if end >= n:
                end = n
                piece = data if pos == 0 else data[pos:]
            else:
                piece = data[pos:end]
            if not self.feed(piece):
                q = self.queue
                if end < n and q and q[-1].tunnel and self.phase != TUNNEL:
                    q[-1].early += data[end:]  # held until the instance answers 101
                return
            if self.phase > BUSY:  # refused, answered early or closing: parsing is over
                return
            pos = end

    def feed(self, data: bytes) -> bool:
        """Parse `data`; False when the rest of what was read is not for the parser."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0] :]
            r = self.queue[-1] if self.queue else None
            if r is not None and r.tunnel:
                r.early = rest
                self.pause(P_UPGRADE)  # until the instance answers the upgrade
                return False
            # An upgrade that is not granted: served as an ordinary request, and what
            # follows its head is the next request (a piece holds at most one head).
            self.parser = httptools.HttpRequestParser(self)
            return self.feed(rest) if rest else True
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, HeadError):
                self.refuse(cause.status, cause.reason)
                return False
            raise
        except httptools.HttpParserError as e:
            self.refuse(400, f"malformed request: {e.args[0] if e.args else 'bad syntax'}")
            return False
        if self.in_head:
            # httptools holds an unfinished header line until it ends: bound it.
            nl = data.rfind(b"\n")
            self.head_raw = len(data) - nl - 1 if nl >= 0 else self.head_raw + len(data)
            if self.head_raw > self.ctx.limits.max_header_bytes:
                self.refuse(431, "request head too large")
                return False
        return True

    def over_pipeline(self) -> bool:
        """The requests waiting behind the one in flight hold as much as they may."""
        lim = self.ctx.limits
        q = self.queue
        if len(q) > lim.pipeline_depth:
            return True
        held = 0
        for r in q:
            if not r.sent:
                held += r.size + r.body_size
        return held > lim.pipeline_bytes

    def parse_backlog(self) -> None:
        """Answers went out: parse what was read past the pipelining bound."""
        data = self.backlog
        if not data or self.phase > BUSY or self.over_pipeline():
            return
        self.backlog = b""
        self.parse(data)
        if not self.backlog:
            self.resume(P_BACKLOG)

    # httptools callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        lim = self.ctx.limits
        r = self.req = Request(lim.max_headers, lim.max_header_bytes)
        r.front = self.front
        self.in_head = True
        if not self.queue:
            self.enter(HEAD_BEGIN, self.ctx.loop.time() + self.ctx.timeouts.client_header)

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self.req
        assert r is not None
        if self.in_head:
            r.on_header(name, value)
            return
        # A trailer field (after a chunked body): not forwarded, but bounded like a head.
        r.size += len(name) + len(value) + 4
        if r.size > r.max_bytes:
            raise HeadError(431, "request trailer too large")

    def on_headers_complete(self) -> None:
        r = self.req
        assert r is not None
        self.in_head = False
        self.head_raw = 0
        p = self.parser
        r.decide(
            p.get_method(),
            p.get_http_version(),
            p.should_upgrade(),
            p.should_keep_alive(),
            self.ctx.upgrades,
        )
        if r.framing == NO_BODY:
            r.complete = not r.tunnel
        else:
            self.in_body = True
        self.queue.append(r)
        if len(self.queue) == 1:
            self.start(r)
        else:
            self.pause(P_QUEUE)

    def on_body(self, body: bytes) -> None:
        r = self.req
        assert r is not None
        data = chunk(body) if r.framing == CHUNKED else body
        if not r.body_size:
            r.body_first = self.ctx.loop.time()
        r.body_size += len(body)
        up = self.up
        if up is not None and r.sent and not r.hold and self.queue[0] is r:
            up.write(data)
            if r.replayable:
                r.body.append(data)
                if r.body_size > self.ctx.limits.replay_body_bytes:
                    r.replayable = False
                    r.body.clear()
        else:
            r.body.append(data)
            if r.body_size > _MAX_BUFFER:
                self.pause(P_BUFFER)

    def on_message_complete(self) -> None:
        r = self.req
        assert r is not None
        self.in_body = False
        if r.tunnel:
            return
        r.complete = True
        if r.body_size:
            r.body_last = self.ctx.loop.time()
        if r.framing == CHUNKED:
            if self.up is not None and r.sent and not r.hold and self.queue and self.queue[0] is r:
                self.up.write(CHUNK_END)
                if r.replayable:
                    r.body.append(CHUNK_END)
            else:
                r.body.append(CHUNK_END)

    # the exchange ---------------------------------------------------------------
    def start(self, r: Request) -> None:
        """The request at the head of the queue goes on its way (proxy.worker.exchange)."""
        ctx = self.ctx
        now = ctx.loop.time()
        r.started = now
        self.enter(START, now + ctx.timeouts.request)
        ex = self.ex = ClientExchange(self, r)
        ex.route()

    # ending an exchange -------------------------------------------------------
    def finish(self, r: Request, status: int) -> None:
        self.ctx.done(r, status)
        if self.queue and self.queue[0] is r:
            self.queue.popleft()
            self.ex = None
        t = self.transport
        if t is None:
            return
        if not self.resp_keep:
            self.flush_out()  # before the close or the half-close
            self.queue.clear()
            if not r.complete:
                self.linger()
            else:
                self.close()
            return
        # That exchange's upstream no longer holds us back.
        self.resume(P_UPSTREAM | P_BUFFER)
        if self.backlog:
            self.ctx.loop.call_soon(self.parse_backlog)  # after this answer is on its way
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self.resume(P_QUEUE)
            self.start(nxt)
            return
        if self.phase == REFUSING:
            self._refuse_now(*self.refusal)  # the requests before the bad one are answered
            return
        self.resume(P_QUEUE)
        ctx = self.ctx
        idle = ctx.quiet_period if ctx.draining else ctx.timeouts.client_idle
        self.enter(KEEP, ctx.loop.time() + idle)

    def linger(self) -> None:
        """Half-close after an early final response and discard what the client still sends."""
        t = self.transport
        assert t is not None
        self.backlog = b""
        self.flush_out()
        if t.can_write_eof():
            t.write_eof()
        self.resume(P_QUEUE | P_BUFFER | P_UPSTREAM | P_REFUSED | P_BACKLOG | P_UPGRADE)
        self.enter(HALF_CLOSE, self.ctx.loop.time() + 2.0)

    def refuse(self, status: int, reason: str) -> None:
        """A bad request: answer it, after the requests pipelined before it, and close."""
        if self.transport is None:
            return
        r = self.req
        if r is not None and r.responded:
            self.abort()
            return
        self.ctx.bad_request(status)
        q = self.queue
        if r is not None and len(q) > 1 and q[-1] is r:
            q.pop()  # its body is bad; it waited behind others, so nothing of it was sent
        if q and q[-1] is not r:
            # Requests before the bad one are answered first, in order (as nginx and
            # HAProxy do); nothing more is read from this client.
            self.refusal = (status, reason)
            self.enter(REFUSE_LATER, self.deadline)  # the request in flight keeps its own
            self.pause(P_REFUSED)
            return
        self._refuse_now(status, reason)

    def _refuse_now(self, status: int, reason: str) -> None:
        """Answer a bad request and close; one whose body was bad is cut upstream."""
        t = self.transport
        assert t is not None
        up = self.up
        if up is not None:
            # The head may have gone upstream: that exchange cannot be finished.
            self.up = None
            up.abort()
        for r in self.queue:
            self.ctx.done(r, status)
        self.queue.clear()
        self.ex = None
        self.flush_out()  # earlier answers first
        t.write(simple_response(status, f"edgeproxy: {reason}\n"))
        self.linger()

    def on_deadline(self, now: float) -> None:
        """The sweeper found this connection past its deadline."""
        phase = self.phase
        self.deadline = 0.0
        t = self.transport
        if t is None:
            return
        self.flush_out()
        if phase in (IDLE, LINGER):
            self.close()
        elif phase == HEAD:
            self.ctx.bad_request(408)
            t.write(simple_response(408, "edgeproxy: request head not received in time\n"))
            self.close()
        elif phase in (BUSY, REFUSING):
            r = self.queue[0] if self.queue else None
            ex = self.ex
            if r is not None and not r.responded and ex is not None:
                self.resp_keep = False
                ex.local_response(504, "edgeproxy: request took too long\n")
            else:
                self.abort()
        elif phase == TUNNEL:
            # No byte either way for [timeouts] tunnel_idle: both sides are closed.
            up = self.up
            if up is not None:
                self.up = None
                up.abort()
            self.close()
        elif phase == CLOSING:
            self.abort()  # the client took none of what was left to send in time

    def drain(self, now: float) -> None:
        """The worker is draining: idle connections close after the quiet period."""
        if self.phase == IDLE:
            self.deadline = min(self.deadline, now + self.ctx.quiet_period)
