"""The client side of the request path: one asyncio protocol per accepted connection.

Owns parsing client requests (httptools), answering them in order, framing
bodies both ways, backpressure, tunnels and client-side timeouts. It asks the
worker's router for a target and the pool for a connection; it must not know
how targets are chosen or how the table is read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.exchange import (
    D_HEAD,
    D_IDLE,
    D_LINGER,
    D_NONE,
    D_REQUEST,
    P_UPSTREAM,
    Abandoned,
    UpstreamEvents,
)
from proxy.headers import (
    CHUNK_END,
    CHUNKED,
    LENGTH,
    NO_BODY,
    HeadError,
    chunk,
    simple_response,
)
from proxy.request import Request
from proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.context import WorkerContext
    from proxy.routing import Target

# Reasons to stop reading from the client (a bit each).
P_QUEUE: Final = 1  # a pipelined request waits for its turn
P_BUFFER: Final = 4  # body buffered while the upstream connects
P_REFUSED: Final = 8  # a bad request waits for the answers to the ones before it

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_BUFFER: Final = 256 * 1024


class ClientConnection(UpstreamEvents):
    """HTTP/1.1 towards one client; at most one exchange in flight, others queued.

    An asyncio protocol by its methods, not by inheritance (see UpstreamConnection)."""

    __slots__ = (
        "backhaul",
        "ctx",
        "deadline",
        "dkind",
        "head_raw",
        "in_head",
        "ip",
        "out",
        "parser",
        "paused",
        "queue",
        "queued",
        "refused",
        "req",
        "resp_framing",
        "resp_keep",
        "sink_fd",
        "transport",
        "tunnel",
        "up",
        "write_paused",
    )

    def __init__(self, ctx: WorkerContext, backhaul: bool = False) -> None:
        self.ctx = ctx
        self.backhaul = backhaul  # a peer node's connection: requests name their instance
        self.transport: asyncio.Transport | None = None
        self.sink_fd = -1  # the socket's descriptor: a response body may be spliced into it
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.req: Request | None = None  # the request being parsed
        self.up: UpstreamConnection | None = None
        self.ip = b""
        self.deadline = 0.0
        self.dkind = D_NONE
        self.head_raw = 0
        self.in_head = False
        self.out: list[bytes | memoryview] = []  # response bytes held (proxy.batch)
        self.queued = False  # in the worker's WriteBatch
        self.refused: tuple[int, str] | None = None  # a bad request's answer, to come
        self.paused = 0
        self.write_paused = False
        self.resp_framing = NO_BODY
        self.resp_keep = True
        self.tunnel = False

    # asyncio.Protocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        peer = self.transport.get_extra_info("peername")
        self.ip = str(peer[0]).encode() if peer else b"unknown"
        sock = transport.get_extra_info("socket")
        if sock is not None and self.ctx.pool.splicer is not None:
            self.sink_fd = sock.fileno()
        ctx = self.ctx
        ctx.opened(self)
        self.deadline = ctx.loop.time() + ctx.timeouts.client_header
        self.dkind = D_HEAD

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
                up.abandon(Abandoned(ctx, r), ctx.loop.time() + ctx.timeouts.abandoned)
            else:
                up.abort()
        for r in queue:
            ctx.done(r, 499 if not r.responded else 200)
        queue.clear()
        self.out.clear()
        self.transport = None

    def eof_received(self) -> bool:
        if self.tunnel and self.up is not None and self.up.transport is not None:
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
        if self.dkind == D_LINGER or self.refused is not None:
            return
        if self.tunnel:
            up = self.up
            if up is not None:
                up.write(data)
            elif self.queue:
                self.queue[0].body.append(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            r = self.queue[-1] if self.queue else None
            if r is not None:
                rest = data[e.args[0] :]
                if rest:
                    r.body.append(rest)
            self.tunnel = True  # everything after the head belongs to the tunnel
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, HeadError):
                self.refuse(cause.status, cause.reason)
            else:
                raise
        except httptools.HttpParserError as e:
            self.refuse(400, f"malformed request: {e.args[0] if e.args else 'bad syntax'}")
        else:
            if self.in_head:
                # httptools holds an unfinished header line until it ends: bound it.
                nl = data.rfind(b"\n")
                self.head_raw = len(data) - nl - 1 if nl >= 0 else self.head_raw + len(data)
                if self.head_raw > self.ctx.limits.max_header_bytes:
                    self.refuse(431, "request head too large")

    # httptools callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        lim = self.ctx.limits
        self.req = Request(lim.max_headers, lim.max_header_bytes)
        self.in_head = True
        if not self.queue:
            self.deadline = self.ctx.loop.time() + self.ctx.timeouts.client_header
            self.dkind = D_HEAD

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        self.req.on_header(name, value)

    def on_headers_complete(self) -> None:
        r = self.req
        assert r is not None
        self.in_head = False
        self.head_raw = 0
        p = self.parser
        r.method = p.get_method()
        r.keep_alive = p.should_keep_alive()
        r.http10 = p.get_http_version() == "1.0"
        if p.should_upgrade():
            r.tunnel = True
            r.keep_alive = False
        if r.chunked:
            r.framing = CHUNKED
        elif r.content_length > 0:
            r.framing = LENGTH
        else:
            r.framing = NO_BODY
            r.complete = not r.tunnel
        if not r.host and not r.http10:
            raise HeadError(400, "missing Host header")
        if r.tunnel and r.method == b"CONNECT":
            raise HeadError(400, "CONNECT is not supported")
        self.queue.append(r)
        if len(self.queue) == 1:
            self.start(r)
        else:
            self.pause(P_QUEUE)

    def on_body(self, body: bytes) -> None:
        r = self.req
        assert r is not None
        data = chunk(body) if r.framing == CHUNKED else body
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
        if r.tunnel:
            return
        r.complete = True
        if r.framing == CHUNKED:
            if self.up is not None and r.sent and not r.hold and self.queue and self.queue[0] is r:
                self.up.write(CHUNK_END)
                if r.replayable:
                    r.body.append(CHUNK_END)
            else:
                r.body.append(CHUNK_END)

    # flow control -----------------------------------------------------------
    def pause(self, why: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # the exchange ---------------------------------------------------------------
    def start(self, r: Request) -> None:
        """Route the request at the head of the queue and send it on its way."""
        ctx = self.ctx
        now = ctx.loop.time()
        r.started = now
        self.deadline = now + ctx.timeouts.request
        self.dkind = D_REQUEST
        routing = ctx.routing
        if self.backhaul:
            self.start_backhauled(r)
            return
        app = routing.app_for_host(r.hostname())
        if app is None:
            self.local_response(r, 404, f"edgeproxy: no app serves host {r.hostname()!r}\n")
            return
        r.app_name = app
        r.app = ctx.app_index.get(app, ctx.no_app)
        target, status, why = routing.pick(app, r, time.time())
        if target is None:
            self.local_response(r, status, why, b"Retry-After: 1\r\n" if status == 503 else b"")
            return
        r.base_head = r.build(r.method, self.ip, r.framing, r.tunnel)
        self.dispatch(r, target)

    def start_backhauled(self, r: Request) -> None:
        """A request a peer node sent for one of our instances: admit it or reject it."""
        ctx = self.ctx
        routing = ctx.routing
        iid = r.instance.decode("latin-1")
        target, hard = routing.local_target(iid)
        r.app_name = target.app if target is not None else ""
        r.app = ctx.app_index.get(r.app_name, ctx.no_app)
        if target is None:
            self.local_response(r, 404, f"edgeproxy: no instance {iid!r} on this node\n")
            return
        if not routing.admit(target, r, hard, time.time()):
            load = routing.load_of(target)
            extra = b"X-Edgeproxy-Reject: full\r\nX-Edgeproxy-Load: %d\r\nRetry-After: 1\r\n" % load
            self.local_response(r, 503, f"edgeproxy: instance {iid!r} is full\n", extra)
            return
        r.base_head = r.build(r.method, self.ip, r.framing, r.tunnel)
        self.dispatch(r, target)

    def dispatch(self, r: Request, target: Target) -> None:
        """Send `r` to `target` on a pooled connection, or connect one."""
        r.target = target
        r.rejected = False
        extra = target.extra
        if extra and r.framing != NO_BODY and not r.tunnel:
            # Backhaul: no body byte leaves before the instance's node admitted the request.
            extra += b"Expect: 100-continue\r\n"
            r.hold = True
        else:
            r.hold = False
        r.head_bytes = r.base_head[:-2] + extra + b"\r\n" if extra else r.base_head
        ctx = self.ctx
        up = None if r.tunnel else ctx.pool.get(target.key)
        if up is not None:
            self.attach(r, up)
        else:
            ctx.connect(self, r, target)

    def attach(self, r: Request, up: UpstreamConnection) -> None:
        """An upstream connection is ready for request `r`: send what we have."""
        if self.transport is None or not self.queue or self.queue[0] is not r:
            up.release(True)
            return
        self.up = up
        r.sent = True
        r.tries += 1
        ctx = self.ctx
        up.send(
            self,
            r.head_bytes,
            r.method == b"HEAD",
            ctx.loop.time() + ctx.timeouts.upstream_response,
        )
        if self.write_paused:
            up.pause_reading(True)
        if r.hold:
            return  # the body waits for the peer's 100 Continue (upstream_continue)
        self.send_body(r, up)

    def send_body(self, r: Request, up: UpstreamConnection) -> None:
        """Write what the client sent of the body so far; the rest follows as it comes."""
        if r.expect_continue and not r.http10 and not r.complete:
            assert self.transport is not None
            self.flush_out()
            self.transport.write(_CONTINUE)
            r.expect_continue = False
        if r.body:
            for data in r.body:
                up.write(data)
            if r.tunnel or not r.replayable or r.body_size > self.ctx.limits.replay_body_bytes:
                r.replayable = False
                r.body.clear()
            self.resume(P_BUFFER)

    def upstream_continue(self) -> None:
        r = self.queue[0] if self.queue else None
        if r is not None and r.hold and self.up is not None:
            r.hold = False
            self.send_body(r, self.up)

    def connect_failed(self, r: Request, why: str) -> None:
        """The connection to r.target could not be made (nothing was sent)."""
        if self.transport is None or not self.queue or self.queue[0] is not r:
            return
        status = 504 if why == "connect_timeout" else 502
        r.tries += 1
        ctx = self.ctx
        target, st, text = ctx.routing.retry(r, r.app_name, time.time(), unreachable=True)
        if target is not None:
            ctx.stats_retry(why)
            self.dispatch(r, target)
            return
        if st == 503:  # the others are full: "come back later", not a gateway error
            self.local_response(r, 503, text, b"Retry-After: 1\r\n")
            return
        self.local_response(r, status, f"edgeproxy: upstream {why.replace('_', ' ')}\n")

    # ending an exchange -------------------------------------------------------
    def local_response(self, r: Request, status: int, text: str, extra: bytes = b"") -> None:
        """Answer `r` from the proxy itself."""
        if self.transport is None:
            return
        self.flush_out()  # earlier answers first
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        keep = self.resp_keep and r.keep_alive and r.complete and not self.ctx.draining
        keep = keep and status < 500
        self.resp_keep = keep
        if status in (502, 504):
            self.ctx.upstream_error(status)
        self.transport.write(
            simple_response(
                status, text, close=not keep, extra=extra, head_only=r.method == b"HEAD"
            )
        )
        r.responded = True
        self.finish(r, status)

    def finish(self, r: Request, status: int) -> None:
        self.ctx.done(r, status)
        if self.queue and self.queue[0] is r:
            self.queue.popleft()
        t = self.transport
        if t is None:
            return
        if not self.resp_keep:
            self.flush_out()  # before the close or the half-close
            self.queue.clear()
            if not r.complete:
                self.linger()
            else:
                t.close()
            return
        # That exchange's upstream no longer holds us back.
        self.resume(P_UPSTREAM | P_BUFFER)
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self.resume(P_QUEUE)
            self.start(nxt)
            return
        if self.refused is not None:
            self._refuse_now(*self.refused)  # the requests before the bad one are answered
            return
        self.resume(P_QUEUE)
        ctx = self.ctx
        if ctx.draining:
            self.deadline = ctx.loop.time() + ctx.quiet_period
        else:
            self.deadline = ctx.loop.time() + ctx.timeouts.client_idle
        self.dkind = D_IDLE

    def linger(self) -> None:
        """Half-close after an early final response and discard what the client still sends."""
        t = self.transport
        assert t is not None
        self.tunnel = False
        self.flush_out()
        if t.can_write_eof():
            t.write_eof()
        self.resume(P_QUEUE | P_BUFFER | P_UPSTREAM | P_REFUSED)
        self.deadline = self.ctx.loop.time() + 2.0
        self.dkind = D_LINGER

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
            self.refused = (status, reason)
            self.pause(P_REFUSED)
            return
        self._refuse_now(status, reason)

    def _refuse_now(self, status: int, reason: str) -> None:
        """Answer a bad request and close; one whose body was bad is cut upstream."""
        t = self.transport
        assert t is not None
        self.refused = None
        up = self.up
        if up is not None:
            # The head may have gone upstream: that exchange cannot be finished.
            self.up = None
            up.abort()
        for r in self.queue:
            self.ctx.done(r, status)
        self.queue.clear()
        self.flush_out()  # earlier answers first
        t.write(simple_response(status, f"edgeproxy: {reason}\n"))
        self.linger()

    def abort(self) -> None:
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

    def on_deadline(self, now: float) -> None:
        """The sweeper found this connection past its deadline."""
        kind = self.dkind
        self.deadline = 0.0
        t = self.transport
        if t is None:
            return
        self.flush_out()
        if kind in (D_IDLE, D_LINGER):
            t.close()
        elif kind == D_HEAD:
            self.ctx.bad_request(408)
            t.write(simple_response(408, "edgeproxy: request head not received in time\n"))
            t.close()
        elif kind == D_REQUEST:
            r = self.queue[0] if self.queue else None
            if r is not None and not r.responded:
                self.resp_keep = False
                self.local_response(r, 504, "edgeproxy: request took too long\n")
            else:
                self.abort()

    def upstream_timed_out(self) -> None:
        """The upstream sent no response head in time."""
        r = self.queue[0] if self.queue else None
        if r is None or r.responded:
            self.abort()
            return
        self.local_response(r, 504, "edgeproxy: the upstream did not answer in time\n")

    def drain(self, now: float) -> None:
        """The worker is draining: idle connections close after the quiet period."""
        if self.dkind == D_IDLE:
            self.deadline = min(self.deadline, now + self.ctx.quiet_period)
