"""The upstream half of an exchange, as the client connection sees it.

Owns what an upstream connection reports (response head and body framing
towards the client, interim answers, tunnels, "full" rejects turned into
retries, connections lost before or during an answer) and the exchange of a
client that already left. It must not parse client bytes: proxy.worker.client does.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from proxy.core.headers import BAD_CODING, CHUNK_END, CHUNKED, NO_BODY, chunk
from proxy.core.request import Request
from proxy.worker.routing import MAX_TRIES
from proxy.worker.upstream import BAD_RESPONSE, LOST_BEFORE_RESPONSE, Exchange, UpstreamConnection

if TYPE_CHECKING:
    from proxy.core.target import Target
    from proxy.worker.client import ClientConnection
    from proxy.worker.context import WorkerContext

# Deadline kinds of a client connection.
D_NONE: Final = 0
D_IDLE: Final = 1  # keep-alive, between requests: close quietly
D_HEAD: Final = 2  # reading a request head: 408
D_REQUEST: Final = 3  # a whole request: 504 (or cut)
D_LINGER: Final = 4  # half-closed after an early response: close
D_TUNNEL: Final = 5  # an upgraded connection with no byte either way: close both sides

HOLD_MAX: Final = 65536  # response bytes held for one client until the iteration ends
P_UPSTREAM: Final = 2  # stop reading the client: the upstream's write buffer is full
P_UPGRADE: Final = 16  # an upgrade request waits for the instance's answer (101 or not)
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class UpstreamEvents(Exchange):
    """ClientConnection's base: its handlers of proxy.worker.upstream.Exchange events.

    Declares the connection's attributes it uses and the methods it calls, which
    ClientConnection defines."""

    ctx: WorkerContext
    transport: asyncio.Transport | None
    queue: deque[Request]
    up: UpstreamConnection | None
    out: list[bytes | memoryview]
    resp_framing: int
    resp_keep: bool
    sink_fd: int
    queued: bool
    tunnel: bool
    backhaul: bool
    deadline: float
    dkind: int

    def local_response(self, r: Request, status: int, text: str, extra: bytes = b"") -> None:
        raise NotImplementedError

    def finish(self, r: Request, status: int) -> None:
        raise NotImplementedError

    def dispatch(self, r: Request, target: Target) -> None:
        raise NotImplementedError

    def send_body(self, r: Request, up: UpstreamConnection) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def pause(self, why: int) -> None:
        raise NotImplementedError

    def resume(self, why: int) -> None:
        raise NotImplementedError

    def upstream_head(self, up: UpstreamConnection, status: int, keep_alive: bool) -> None:
        r = self.queue[0]
        t = r.target
        if t is not None and not t.local:
            if up.load >= 0:
                self.ctx.routing.feedback(t.instance, up.load, time.time())
            if up.reject and not r.force:
                r.rejected = True  # swallow this answer; upstream_end retries elsewhere
                return
        keep = (
            self.resp_keep and r.keep_alive and not self.ctx.draining and (r.complete or r.tunnel)
        )
        extra = b""
        if self.backhaul and t is not None and t.slot >= 0:
            # The load once this request is done: it is answered now.
            load = max(0, self.ctx.routing.load_of(t) - 1)
            extra = b"X-Edgeproxy-Load: %d\r\n" % load
        head, framing, keep = up.build(status, r.method == b"HEAD", keep, r.http10, extra)
        if framing == BAD_CODING:
            self.local_response(
                r, 502, "edgeproxy: the upstream used a transfer coding HTTP/1.0 cannot carry\n"
            )
            return
        r.responded = True
        self.resp_framing = framing
        self.resp_keep = keep
        r.status = status
        self.out.append(head)  # goes out with the first body bytes: one write

    def upstream_interim(self, head: bytes) -> None:
        self.flush_out()
        if self.transport is not None:
            self.transport.write(head)

    def upstream_body(self, data: bytes | memoryview) -> None:
        if self.queue and self.queue[0].rejected:
            return
        if self.resp_framing == CHUNKED:
            self.out.append(chunk(data))
        else:
            self.out.append(data)

    def upstream_sink(self, held_max: int) -> int:
        """The client's socket if the response body may go straight into it now, else -1:
        the transport has nothing buffered, and the body passes unchanged. What is held
        for the client stays held (upstream_held hands it over, to go first), unless it
        is over `held_max` bytes: then it is written now."""
        out = self.out
        if out:
            held = 0
            for data in out:
                held += len(data)
            if held > held_max:
                self.flush_out()
        t = self.transport
        if (
            t is None
            or self.resp_framing == CHUNKED
            or t.get_write_buffer_size()
            or t.is_closing()
            or self.queue[0].rejected
        ):
            return -1
        return self.sink_fd

    def upstream_held(self) -> list[bytes | memoryview]:
        """Hand over what is held for the client (the caller sends it before the body)."""
        out = self.out
        if out:
            self.out = []
        return out

    def upstream_flush(self) -> None:
        """What one upstream read produced is complete: written when the loop's
        iteration ends, with the other connections' output (proxy.worker.batch). Once
        HOLD_MAX bytes are held they are written at once, so that a slow client's
        backpressure still stops the upstream reads of a long body."""
        out = self.out
        if not out:
            return
        held = 0
        for data in out:
            held += len(data)
        if held >= HOLD_MAX:
            self.flush_out()
        elif not self.queued:
            self.queued = True
            self.ctx.batch.add_client(self)

    def flush_out(self) -> None:
        """Write what is held for the client now, in one call."""
        self.queued = False
        out = self.out
        if not out:
            return
        t = self.transport
        if t is not None:
            if len(out) == 1:
                t.write(out[0])
            elif len(out) == 2 and len(out[1]) < 16384:
                t.write(b"".join(out))
            else:
                t.writelines(out)
        out.clear()

    def upstream_end(self, up: UpstreamConnection) -> None:
        r = self.queue[0]
        self.up = None
        if r.rejected:
            # "Full, come back later": nothing reached the app; the body never left.
            up.release(r.framing == NO_BODY)
            self.rejected_retry(r)
            return
        if self.resp_framing == CHUNKED:
            self.out.append(CHUNK_END)
        self.upstream_flush()
        up.release(r.complete)
        self.finish(r, r.status)

    def rejected_retry(self, r: Request) -> None:
        ctx = self.ctx
        now = time.time()
        ctx.routing.rejected(r, now)
        r.sent = False
        if r.replayable or r.hold:  # the try was counted when it was sent (attach)
            target, status, why = ctx.routing.retry(r, r.app_name, now)
            if target is not None:
                ctx.stats_retry("reject")
                self.dispatch(r, target)
                return
            if status == 503:
                self.local_response(r, 503, why, b"Retry-After: 1\r\n")
                return
        self.local_response(
            r,
            503,
            f"edgeproxy: app {r.app_name!r} is at capacity, retry later\n",
            b"Retry-After: 1\r\n",
        )

    def upstream_tunnel(self, up: UpstreamConnection, early: bytes) -> None:
        r = self.queue[0]
        self.flush_out()
        if not r.tunnel:  # upstream switched protocols we did not ask for
            self.abort()
            return
        if early and self.transport is not None:
            self.transport.write(early)
        # Only now may the client's bytes after its upgrade head reach the instance.
        self.tunnel = True
        held = r.early
        if held:
            r.early = b""
            up.write(held)
        ctx = self.ctx
        self.deadline = ctx.loop.time() + ctx.timeouts.tunnel_idle
        self.dkind = D_TUNNEL
        self.resume(P_UPGRADE)

    def upstream_tunnel_data(self, data: bytes) -> None:
        """Bytes from the instance through an upgraded connection."""
        t = self.transport
        if t is not None:
            self.flush_out()
            t.write(data)
            self.deadline = self.ctx.loop.time() + self.ctx.timeouts.tunnel_idle

    def upstream_lost(self, up: UpstreamConnection, why: str) -> None:
        self.up = None
        if not self.queue:
            return
        r = self.queue[0]
        if self.tunnel and r.tunnel and r.responded:
            self.flush_out()
            if self.transport is not None:
                self.transport.close()
            return
        # What is held belongs to answered requests (and to this one's answer when it
        # responded, which is then cut): it goes out first.
        self.flush_out()
        if r.responded:
            # Part of the response is out: the client must see a cut, not a lie. Counted
            # here, once (the close must not count it again).
            self.queue.popleft()
            self.ctx.done(r, 502)
            self.abort()
            return
        if why == LOST_BEFORE_RESPONSE and self.can_replay(r) and r.target is not None:
            ctx = self.ctx
            r.sent = False
            if up.reused:
                # A pooled connection the instance may have closed as we wrote: again,
                # on a fresh connection to the same instance. Not a try: the instance
                # never had the request.
                r.tries -= 1
                ctx.stats_retry("reset_before_response")
                ctx.connect(cast("ClientConnection", self), r, r.target)
                return
            # A fresh connection died before any answer: the instance is in trouble.
            target, _, _ = ctx.routing.retry(r, r.app_name, time.time(), unreachable=True)
            if target is not None:
                ctx.stats_retry("reset_before_response")
                self.dispatch(r, target)
                return
        if why == BAD_RESPONSE:
            self.local_response(r, 502, "edgeproxy: the upstream sent an invalid response\n")
        else:
            self.local_response(r, 502, "edgeproxy: the upstream closed the connection\n")

    def upstream_pause(self, paused: bool) -> None:
        if paused:
            self.pause(P_UPSTREAM)
        else:
            self.resume(P_UPSTREAM)

    def can_replay(self, r: Request) -> bool:
        return r.method in _IDEMPOTENT and r.replayable and r.complete and r.tries < MAX_TRIES


class Abandoned(Exchange):
    """The exchange of a client that left: the answer is read and dropped, then counted."""

    __slots__ = ("ctx", "deadline", "r")

    def __init__(self, ctx: WorkerContext, r: Request, deadline: float) -> None:
        self.ctx = ctx
        self.r = r
        self.deadline = deadline  # the answer is read until then, not longer

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
