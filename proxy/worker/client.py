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
from proxy.worker.exchange import (
    D_HEAD,
    D_IDLE,
    D_LINGER,
    D_NONE,
    D_REQUEST,
    D_TUNNEL,
    P_UPGRADE,
    P_UPSTREAM,
    Abandoned,
    UpstreamEvents,
)
from proxy.worker.upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.core.target import Target
    from proxy.worker.context import WorkerContext

# Reasons to stop reading from the client (a bit each).
P_QUEUE: Final = 1  # a pipelined request waits for its turn
P_BUFFER: Final = 4  # body buffered while the upstream connects
P_REFUSED: Final = 8  # a bad request waits for the answers to the ones before it
P_BACKLOG: Final = 32  # parsing stopped at the pipelining bound; what was read waits

_HEAD_END: Final = b"\r\n\r\n"

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_BUFFER: Final = 256 * 1024


class ClientConnection(UpstreamEvents):
    """HTTP/1.1 towards one client; at most one exchange in flight, others queued.

    An asyncio protocol by its methods, not by inheritance (see UpstreamConnection)."""

    __slots__ = (
        "backhaul",
        "backlog",
        "ctx",
        "deadline",
        "dkind",
        "front",
        "head_raw",
        "in_body",
        "in_head",
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
        self.front = Front(FWD_SET, b"unknown", b"http", b"0")
        self.backlog = b""  # read but not yet parsed: past the pipelining bound
        self.in_body = False  # the parser is inside a request body
        self.deadline = 0.0
        self.dkind = D_NONE
        self.head_raw = 0
        self.in_head = False
        self.out: list[bytes | memoryview] = []  # response bytes held (proxy.worker.batch)
        self.queued = False  # in the worker's WriteBatch
        self.refused: tuple[int, str] | None = None  # a bad request's answer, to come
        self.paused = 0
        self.write_paused = False
        self.resp_framing = NO_BODY
        self.resp_keep = True
        self.tunnel = False

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
        self.front = Front(mode, ip.encode(), b"http", port)
        # A response that fits is taken from the instance at full speed, whatever the
        # client's pace (the instance's slot frees as soon as it is done); past this, the
        # client's pace holds the instance back.
        t.set_write_buffer_limits(high=ctx.limits.response_buffer)
        sock = t.get_extra_info("socket")
        # Under TLS the socket carries ciphertext: nothing may be spliced into it.
        if sock is not None and ctx.pool.splicer is not None and not t.get_extra_info("sslcontext"):
            self.sink_fd = sock.fileno()
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
                deadline = ctx.loop.time() + ctx.timeouts.abandoned
                up.abandon(Abandoned(ctx, r, deadline), deadline)
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
                self.deadline = self.ctx.loop.time() + self.ctx.timeouts.tunnel_idle
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
                if end < n and q and q[-1].tunnel and not self.tunnel:
                    q[-1].early += data[end:]  # held until the instance answers 101
                return
            if self.refused is not None or self.dkind == D_LINGER or self.transport is None:
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
        if not data or self.transport is None or self.over_pipeline():
            return
        self.backlog = b""
        self.parse(data)
        if not self.backlog:
            self.resume(P_BACKLOG)

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
        r.base_head = r.build(self.front)
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
        r.base_head = r.build(self.front)
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
        if self.backlog:
            self.ctx.loop.call_soon(self.parse_backlog)  # after this answer is on its way
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
        self.backlog = b""
        self.flush_out()
        if t.can_write_eof():
            t.write_eof()
        self.resume(P_QUEUE | P_BUFFER | P_UPSTREAM | P_REFUSED | P_BACKLOG | P_UPGRADE)
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
        elif kind == D_TUNNEL:
            # No byte either way for [timeouts] tunnel_idle: both sides are closed.
            up = self.up
            if up is not None:
                self.up = None
                up.abort()
            t.close()

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
