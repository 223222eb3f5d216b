"""A client connection's transport, as the connection and its exchanges share it.

Owns what goes out to the client (response bytes held to the end of the loop's
iteration, proxy.worker.batch, and written together), reading paused and resumed
by reason, the requests in order, the upstream connection of the one in flight,
its phase (proxy.core.conn_state) with that phase's deadline, closing and
aborting. It must not parse requests (proxy.worker.client) nor route and relay
them (proxy.worker.exchange).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from proxy.core.conn_state import CLOSE, NEW, step
from proxy.core.headers import BAD_CODING, simple_response
from proxy.core.request_head import FWD_SET, Front

if TYPE_CHECKING:
    from proxy.core.request import Request
    from proxy.worker.context import WorkerContext
    from proxy.worker.upstream import UpstreamConnection

# Reasons to stop reading from the client (a bit each).
P_QUEUE: Final = 1  # a pipelined request waits for its turn
P_UPSTREAM: Final = 2  # the upstream's write buffer is full
P_BUFFER: Final = 4  # body buffered while the upstream connects
P_REFUSED: Final = 8  # a bad request waits for the answers to the ones before it
P_UPGRADE: Final = 16  # an upgrade request waits for the instance's answer (101 or not)
P_BACKLOG: Final = 32  # parsing stopped at the pipelining bound; what was read waits

HOLD_MAX: Final = 65536  # response bytes held for one client until the iteration ends


# An HTTP/2 stream (proxy.worker.h2stream, not compiled) is a client side too.
@mypyc_attr(allow_interpreted_subclasses=True)
class ClientIO:
    """The transport side of one client connection (the base of ClientConnection).

    An exchange (proxy.worker.exchange) writes through it and tells it, by `finish`,
    that the request at the head of the queue is answered; what happens next (the
    next request, a close, keep-alive) is the connection's to decide."""

    __slots__ = (
        "backhaul",
        "ctx",
        "deadline",
        "front",
        "out",
        "paused",
        "phase",
        "queue",
        "queued",
        "resp_keep",
        "sink_fd",
        "sni_app",
        "tls",
        "transport",
        "up",
        "wants_trailers",
        "write_paused",
    )

    def __init__(
        self, ctx: WorkerContext, backhaul: bool, sni_app: str | None = None, tls: bool = False
    ) -> None:
        self.ctx = ctx
        self.backhaul = backhaul  # a peer node's connection: requests name their instance
        self.tls = tls  # over TLS: X-Forwarded-Proto https, and never a splice into the socket
        # The app the TLS SNI named ("" if none): every request must name the same one
        # (RFC 9110 15.5.20, 421). None: not TLS, or no SNI.
        self.sni_app = sni_app
        self.transport: asyncio.Transport | None = None
        self.sink_fd = -1  # the socket's descriptor: a response body may be spliced into it
        self.front = Front(FWD_SET, b"unknown", b"http", b"0")  # who sends the requests
        self.queue: deque[Request] = deque()  # parsed, answered in order; [0] is in flight
        self.up: UpstreamConnection | None = None  # the upstream of the request in flight
        self.out: list[bytes | memoryview] = []  # response bytes held (proxy.worker.batch)
        self.queued = False  # in the worker's WriteBatch
        self.paused = 0  # P_* bits: why reading from the client is paused
        self.write_paused = False  # the client's transport asked us to stop writing
        self.resp_keep = True  # the connection stays open after the current answer
        self.phase = NEW  # proxy.core.conn_state: every move goes through step()
        self.deadline = 0.0  # loop time the phase's deadline passes (0.0: none)
        self.wants_trailers = False  # the client takes response trailers (an HTTP/2 stream)

    def enter(self, event: int, deadline: float) -> None:
        """Move by `event` (proxy.core.conn_state.TRANSITIONS) with the new phase's deadline."""
        self.phase = step(self.phase, event)
        self.deadline = deadline

    def finish(self, r: Request, status: int) -> None:
        """`r`, at the head of the queue, is answered: go on with the connection."""
        raise NotImplementedError

    # output ------------------------------------------------------------------
    def response_head(
        self,
        up: UpstreamConnection,
        status: int,
        head_only: bool,
        keep: bool,
        http10: bool,
        extra: bytes,
    ) -> tuple[int, bool, int]:
        """The instance's response head, made for this client and held: (the body's
        framing towards it, whether the connection stays open, the head's bytes);
        BAD_CODING if it cannot be sent."""
        head, framing, keep = up.build(status, head_only, keep, http10, extra)
        if framing == BAD_CODING:
            return framing, keep, 0
        self.out.append(head)  # goes out with the first body bytes: one write
        return framing, keep, len(head)

    def response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """An instance's trailer fields: not asked for over HTTP/1.1 (not sent on)."""

    def respond_local(
        self, status: int, text: str, extra: bytes, close: bool, head_only: bool
    ) -> int:
        """One of the proxy's own answers, written now (after what is held); its bytes."""
        if self.transport is None:
            return 0
        answer = simple_response(status, text, close=close, extra=extra, head_only=head_only)
        self.transport.write(answer)
        return len(answer)

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

    def flush_soon(self) -> None:
        """What is held is complete for now: written when the loop's iteration ends, with
        the other connections' output (proxy.worker.batch). Once HOLD_MAX bytes are held
        they are written at once, so that a slow client's backpressure still stops the
        upstream reads of a long body."""
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

    def write(self, data: bytes) -> None:
        """Write `data` now, after what is held."""
        self.flush_out()
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Close once what is written is sent (the phase's deadline still bounds that)."""
        self.phase = step(self.phase, CLOSE)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection and its upstream at once (what is held is lost)."""
        self.phase = step(self.phase, CLOSE)
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

    # reading -------------------------------------------------------------------
    def pause(self, why: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
