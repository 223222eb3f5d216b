"""One request's exchange: where it goes, how it gets there, and its answer back.

Owns, per request (an object each, as uvicorn's RequestResponseCycle): routing the
request or admitting a peer's, sending it on a pooled or fresh upstream connection,
its body after the head (and after a peer's 100 Continue), what the upstream
connection reports (response head and body framed for the client, interim answers,
tunnels, "full" rejects turned into retries, connections lost before or during an
answer), the proxy's own answers, and the exchange of a client that already left.
It must not parse client bytes nor decide what the connection does next:
proxy.worker.client does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from proxy.core.conn_state import BUSY, REFUSING, TUNNEL, UPGRADE
from proxy.core.headers import BAD_CODING, CHUNK_END, CHUNKED, LENGTH, NO_BODY, chunk
from proxy.core.traceparent import pass_on
from proxy.telemetry.families import SHED_LOOP_LAG
from proxy.worker.client_io import P_BUFFER, P_UPGRADE, P_UPSTREAM, ClientIO
from proxy.worker.routing import MAX_TRIES
from proxy.worker.upstream import (
    BAD_RESPONSE,
    LOST_BEFORE_RESPONSE,
    LOST_UNPROCESSED,
    Exchange,
    UpstreamConnection,
)

if TYPE_CHECKING:
    from proxy.core.request import Request
    from proxy.core.target import Target
    from proxy.worker.context import WorkerContext

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class ClientExchange(Exchange):
    """The exchange of request `r`, at the head of client connection `conn`'s queue."""

    __slots__ = ("conn", "framing", "r")

    def __init__(self, conn: ClientIO, r: Request) -> None:
        self.conn = conn
        self.r = r
        self.framing = NO_BODY  # the response's framing towards the client

    # the way there -------------------------------------------------------------
    def route(self) -> None:
        """Pick a target for the request and send it on its way (or answer it)."""
        conn = self.conn
        ctx = conn.ctx
        r = self.r
        # W3C Trace Context: ids and the sampling decision now, so the instance (or the
        # next node) gets them; a peer on the backhaul is trusted, a client is not.
        trace = ctx.trace
        if trace is not None:
            trace.begin(r, conn.backhaul)
        elif r.traceparent:
            pass_on(r)
        if ctx.shedding:
            self.shed()
            return
        if conn.backhaul:
            self.admit()
            return
        routing = ctx.routing
        app = routing.app_for_host(r.hostname())
        if conn.sni_app is not None and app != conn.sni_app:
            text = f"edgeproxy: host {r.hostname()!r} is not served on this TLS connection\n"
            self.local_response(421, text)
            return
        if app is None:
            self.local_response(404, f"edgeproxy: no app serves host {r.hostname()!r}\n")
            return
        r.app_name = app
        r.app = ctx.app_index.get(app, ctx.no_app)
        target, status, why = routing.pick(app, r, time.time())
        if target is None:
            self.local_response(status, why, b"Retry-After: 1\r\n" if status == 503 else b"")
            return
        r.base_head = r.build(conn.front, r.trace_line)
        self.dispatch(target)

    def shed(self) -> None:
        """The worker's loop is overloaded ([overload] shed_lag_ms): a 503 now rather than
        a place in a queue. A peer's request gets the "full" reject, so its edge retries
        it on another instance (the load report is left out: this node's load is not it)."""
        ctx = self.conn.ctx
        ctx.stats.families["shed_total"][SHED_LOOP_LAG] += 1
        extra = ctx.shed_extra
        if self.conn.backhaul:
            extra = b"X-Edgeproxy-Reject: full\r\n" + extra
        self.local_response(503, "edgeproxy: this node is overloaded, retry later\n", extra)

    def admit(self) -> None:
        """A request a peer node sent for one of our instances: admit it or reject it."""
        conn = self.conn
        ctx = conn.ctx
        r = self.r
        routing = ctx.routing
        iid = r.instance.decode("latin-1")
        target, hard = routing.local_target(iid)
        r.app_name = target.app if target is not None else ""
        r.app = ctx.app_index.get(r.app_name, ctx.no_app)
        if target is None:
            self.local_response(404, f"edgeproxy: no instance {iid!r} on this node\n")
            return
        if not routing.admit(target, r, hard, time.time()):
            load = routing.load_of(target)
            extra = b"X-Edgeproxy-Reject: full\r\nX-Edgeproxy-Load: %d\r\nRetry-After: 1\r\n" % load
            self.local_response(503, f"edgeproxy: instance {iid!r} is full\n", extra)
            return
        r.base_head = r.build(conn.front, r.trace_line)
        self.dispatch(target)

    def dispatch(self, target: Target) -> None:
        """Send the request to `target` on a pooled connection, or connect one."""
        r = self.r
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
        ctx = self.conn.ctx
        if r.h2 and not target.local and ctx.h2_connect is not None:
            self.connect(target)  # a new stream on a peer's HTTP/2 connection
            return
        up = None if r.tunnel else ctx.pool.get(target.key)
        if up is not None:
            self.attach(up)
        else:
            self.connect(target)

    def connect(self, target: Target) -> None:
        """Open a fresh connection to `target`; attach or connect_failed follows."""
        ctx = self.conn.ctx
        task = ctx.loop.create_task(self._connect(ctx, target))
        ctx.tasks.add(task)
        task.add_done_callback(ctx.tasks.discard)

    async def _connect(self, ctx: WorkerContext, target: Target) -> None:
        t0 = ctx.loop.time()
        peer_connect = ctx.peer_connect
        h2_connect = ctx.h2_connect
        try:
            if h2_connect is not None and self.r.h2 and not target.local:
                up = await h2_connect(ctx.pool, target)
            elif peer_connect is not None and not target.local:
                up = await peer_connect(ctx.pool, target)
            else:
                up = await ctx.pool.connect(
                    target.key, target.host, target.port, target.connect_timeout
                )
        except TimeoutError:
            self.connect_failed("connect_timeout")
        except OSError:
            self.connect_failed("connect_refused")
        else:
            ctx.stats.observe_connect(ctx.loop.time() - t0)
            self.attach(up)

    def current(self) -> bool:
        """The client is still there and this exchange's request is the one in flight."""
        conn = self.conn
        q = conn.queue
        return conn.phase in (BUSY, REFUSING) and bool(q) and q[0] is self.r

    def attach(self, up: UpstreamConnection) -> None:
        """An upstream connection is ready for the request: send what we have."""
        if not self.current():
            up.release(True)
            return
        conn = self.conn
        r = self.r
        conn.up = up
        r.sent = True
        r.tries += 1
        ctx = conn.ctx
        up.send(
            self,
            r.head_bytes,
            r.method == b"HEAD",
            ctx.loop.time() + ctx.timeouts.upstream_response,
            conn.wants_trailers,
        )
        if conn.write_paused:
            up.pause_reading(True)
        if r.hold:
            return  # the body waits for the peer's 100 Continue (upstream_continue)
        self.send_body(up)

    def send_body(self, up: UpstreamConnection) -> None:
        """Write what the client sent of the body so far; the rest follows as it comes."""
        conn = self.conn
        r = self.r
        if r.expect_continue and not r.http10 and not r.complete:
            conn.write(_CONTINUE)
            r.expect_continue = False
        if r.body:
            for data in r.body:
                up.write(data)
            if r.tunnel or not r.replayable or r.body_size > conn.ctx.limits.replay_body_bytes:
                r.replayable = False
                r.body.clear()
            conn.resume(P_BUFFER)

    def connect_failed(self, why: str) -> None:
        """The connection to r.target could not be made (nothing was sent)."""
        if not self.current():
            return
        r = self.r
        status = 504 if why == "connect_timeout" else 502
        r.tries += 1
        ctx = self.conn.ctx
        target, st, text = ctx.routing.retry(r, r.app_name, time.time(), unreachable=True)
        if target is not None:
            self.retrying(why)
            self.dispatch(target)
            return
        if st == 503:  # the others are full: "come back later", not a gateway error
            self.local_response(503, text, b"Retry-After: 1\r\n")
            return
        self.local_response(status, f"edgeproxy: upstream {why.replace('_', ' ')}\n")

    def retrying(self, why: str) -> None:
        """The request goes again (counted, and kept for its span: when, why, where)."""
        ctx = self.conn.ctx
        ctx.stats_retry(why)
        r = self.r
        t = r.target
        entry = (ctx.loop.time(), why, t.instance if t is not None else "")
        if r.retry_log is None:
            r.retry_log = [entry]
        else:
            r.retry_log.append(entry)

    def local_response(self, status: int, text: str, extra: bytes = b"") -> None:
        """Answer the request from the proxy itself."""
        conn = self.conn
        t = conn.transport
        if t is None:
            return
        conn.flush_out()  # earlier answers first
        up = conn.up
        if up is not None:
            conn.up = None
            up.abort()
        r = self.r
        ctx = conn.ctx
        keep = conn.resp_keep and r.keep_alive and r.complete and not ctx.draining
        keep = keep and status < 500
        conn.resp_keep = keep
        if status in (502, 504):
            ctx.upstream_error(status)
        head_only = r.method == b"HEAD"
        r.resp_bytes += conn.respond_local(status, text, extra, not keep, head_only)
        r.resp_size = 0 if head_only else len(text.encode())
        r.responded = True
        conn.finish(r, status)

    def abort(self) -> None:
        """Drop the client's connection (its handling of an upstream event failed)."""
        self.conn.abort()

    # the answer: what the upstream connection reports (proxy.worker.upstream.Exchange) ---
    def upstream_head(self, up: UpstreamConnection, status: int, keep_alive: bool) -> None:
        conn = self.conn
        ctx = conn.ctx
        r = self.r
        t = r.target
        if t is not None and not t.local:
            if up.load >= 0:
                ctx.routing.feedback(t.instance, up.load, time.time())
            if up.reject and not r.force:
                r.rejected = True  # swallow this answer; upstream_end retries elsewhere
                return
        keep = conn.resp_keep and r.keep_alive and not ctx.draining and (r.complete or r.tunnel)
        extra = b""
        if conn.backhaul and t is not None and t.slot >= 0:
            # The load once this request is done: it is answered now.
            load = max(0, ctx.routing.load_of(t) - 1)
            extra = b"X-Edgeproxy-Load: %d\r\n" % load
        # The head goes to the client's side as its protocol frames it (held for HTTP/1.1:
        # out with the first body bytes, one write).
        framing, keep, sent = conn.response_head(
            up, status, r.method == b"HEAD", keep, r.http10, extra
        )
        if framing == BAD_CODING:
            self.local_response(
                502, "edgeproxy: the upstream used a transfer coding HTTP/1.0 cannot carry\n"
            )
            return
        r.responded = True
        r.resp_at = ctx.loop.time()
        self.framing = framing
        conn.resp_keep = keep
        r.status = status
        r.resp_bytes += sent

    def upstream_interim(self, head: bytes) -> None:
        self.conn.write(head)

    def upstream_continue(self) -> None:
        r = self.r
        up = self.conn.up
        if r.hold and up is not None:
            r.hold = False
            self.send_body(up)

    def upstream_body(self, data: bytes | memoryview) -> None:
        r = self.r
        if r.rejected:
            return
        r.resp_size += len(data)
        r.resp_bytes += len(data)
        if self.framing == CHUNKED:
            self.conn.out.append(chunk(data))
        else:
            self.conn.out.append(data)

    def upstream_sink(self, held_max: int) -> int:
        """The client's socket if the response body may go straight into it now, else -1:
        the transport has nothing buffered, and the body passes unchanged. What is held
        for the client stays held (upstream_held hands it over, to go first), unless it
        is over `held_max` bytes: then it is written now."""
        conn = self.conn
        out = conn.out
        if out:
            held = 0
            for data in out:
                held += len(data)
            if held > held_max:
                conn.flush_out()
        t = conn.transport
        if (
            t is None
            or self.framing == CHUNKED
            or t.get_write_buffer_size()
            or t.is_closing()
            or self.r.rejected
        ):
            return -1
        return conn.sink_fd

    def upstream_spliced(self, n: int) -> None:
        self.r.resp_bytes += n

    def upstream_held(self) -> list[bytes | memoryview]:
        """Hand over what is held for the client (the caller sends it before the body)."""
        conn = self.conn
        out = conn.out
        if out:
            conn.out = []
        return out

    def upstream_flush(self) -> None:
        self.conn.flush_soon()

    def upstream_end(self, up: UpstreamConnection) -> None:
        conn = self.conn
        r = self.r
        conn.up = None
        if r.rejected:
            # "Full, come back later": nothing reached the app; the body never left.
            up.release(r.framing == NO_BODY)
            self.rejected_retry()
            return
        if self.framing == CHUNKED:
            conn.out.append(CHUNK_END)
        elif self.framing == LENGTH:
            r.resp_size = up.content_length  # a spliced body never passed upstream_body
        conn.flush_soon()
        up.release(r.complete)
        conn.finish(r, r.status)

    def rejected_retry(self) -> None:
        ctx = self.conn.ctx
        r = self.r
        now = time.time()
        ctx.routing.rejected(r, now)
        r.sent = False
        if r.replayable or r.hold:  # the try was counted when it was sent (attach)
            target, status, why = ctx.routing.retry(r, r.app_name, now)
            if target is not None:
                self.retrying("reject")
                self.dispatch(target)
                return
            if status == 503:
                self.local_response(503, why, b"Retry-After: 1\r\n")
                return
        self.local_response(
            503,
            f"edgeproxy: app {r.app_name!r} is at capacity, retry later\n",
            b"Retry-After: 1\r\n",
        )

    def upstream_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        if not self.r.rejected:
            self.conn.response_trailers(fields)

    def upstream_tunnel(self, up: UpstreamConnection, early: bytes) -> None:
        conn = self.conn
        r = self.r
        conn.flush_out()
        if not r.tunnel:  # upstream switched protocols we did not ask for
            conn.abort()
            return
        if early and conn.transport is not None:
            conn.transport.write(early)
        # Only now may the client's bytes after its upgrade head reach the instance.
        ctx = conn.ctx
        conn.enter(UPGRADE, ctx.loop.time() + ctx.timeouts.tunnel_idle)
        held = r.early
        if held:
            r.early = b""
            up.write(held)
        conn.resume(P_UPGRADE)

    def upstream_tunnel_data(self, data: bytes) -> None:
        """Bytes from the instance through an upgraded connection."""
        conn = self.conn
        t = conn.transport
        if t is not None:
            conn.flush_out()
            t.write(data)
            conn.deadline = conn.ctx.loop.time() + conn.ctx.timeouts.tunnel_idle

    def upstream_lost(self, up: UpstreamConnection, why: str) -> None:
        conn = self.conn
        conn.up = None
        if not conn.queue:
            return
        r = self.r
        if conn.phase == TUNNEL:  # the instance ended the upgraded connection
            conn.flush_out()
            conn.close()
            return
        # What is held belongs to answered requests (and to this one's answer when it
        # responded, which is then cut): it goes out first.
        conn.flush_out()
        ctx = conn.ctx
        if r.responded:
            # Part of the response is out: the client must see a cut, not a lie. Counted
            # here, once (the close must not count it again).
            conn.queue.popleft()
            ctx.done(r, 502)
            conn.abort()
            return
        if why == LOST_UNPROCESSED and r.replayable and r.complete and r.target is not None:
            # Nothing of it reached the instance, whatever its method: as a refused connect.
            r.sent = False
            r.tries -= 1  # connect_failed counts the try again
            self.connect_failed("connect_refused")
            return
        if why == LOST_BEFORE_RESPONSE and self.can_replay() and r.target is not None:
            r.sent = False
            if up.reused:
                # A pooled connection the instance may have closed as we wrote: again,
                # on a fresh connection to the same instance. Not a try: the instance
                # never had the request.
                r.tries -= 1
                self.retrying("reset_before_response")
                self.connect(r.target)
                return
            # A fresh connection died before any answer: the instance is in trouble.
            target, _, _ = ctx.routing.retry(r, r.app_name, time.time(), unreachable=True)
            if target is not None:
                self.retrying("reset_before_response")
                self.dispatch(target)
                return
        if why == BAD_RESPONSE:
            self.local_response(502, "edgeproxy: the upstream sent an invalid response\n")
        else:
            self.local_response(502, "edgeproxy: the upstream closed the connection\n")

    def upstream_pause(self, paused: bool) -> None:
        if paused:
            self.conn.pause(P_UPSTREAM)
        else:
            self.conn.resume(P_UPSTREAM)

    def upstream_timed_out(self) -> None:
        """The upstream sent no response head in time."""
        conn = self.conn
        if not conn.queue or self.r.responded:
            conn.abort()
            return
        self.local_response(504, "edgeproxy: the upstream did not answer in time\n")

    def can_replay(self) -> bool:
        r = self.r
        return r.method in _IDEMPOTENT and r.replayable and r.complete and r.tries < MAX_TRIES


class Abandoned(Exchange):
    """The exchange of a client that left: the answer is read and dropped, then counted."""

    __slots__ = ("ctx", "deadline", "r")

    def __init__(self, ctx: WorkerContext, r: Request, deadline: float) -> None:
        self.ctx = ctx
        self.r = r
        self.deadline = deadline  # the answer is read until then, not longer

    def abort(self) -> None:
        """Nothing of the client is left to drop."""

    def upstream_head(self, up: UpstreamConnection, status: int, keep_alive: bool) -> None:
        # An answer that has begun is still bounded by the grace: an endless one (events,
        # a stream) must not hold the instance's slot and the connection forever.
        up.deadline = self.deadline

    def upstream_interim(self, head: bytes) -> None:
        pass

    def upstream_continue(self) -> None:
        pass

    def upstream_body(self, data: bytes | memoryview) -> None:
        pass

    def upstream_tunnel_data(self, data: bytes) -> None:
        pass

    def upstream_flush(self) -> None:
        pass

    def upstream_end(self, up: UpstreamConnection) -> None:
        up.release(True)
        self.ctx.done(self.r, 499)

    def upstream_tunnel(self, up: UpstreamConnection, early: bytes) -> None:
        up.abort()
        self.ctx.done(self.r, 499)

    def upstream_lost(self, up: UpstreamConnection, why: str) -> None:
        self.ctx.done(self.r, 499)

    def upstream_pause(self, paused: bool) -> None:
        pass

    def upstream_timed_out(self) -> None:
        self.ctx.done(self.r, 499)

    def upstream_sink(self, held_max: int) -> int:
        return -1

    def upstream_held(self) -> list[bytes | memoryview]:
        return []

    def upstream_spliced(self, n: int) -> None:
        pass

    def upstream_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        pass
