"""One client request and the state of its exchange (a record, no behaviour).

Owns the per-request fields that the client connection, routing and the
upstream side share. It must not do I/O or hold references to transports.
"""

from __future__ import annotations

from proxy.core.request_head import Front, RequestHead
from proxy.core.target import Target


class Request(RequestHead):
    """One parsed request and the state of its exchange."""

    __slots__ = (
        "app",
        "app_name",
        "base_head",
        "body",
        "body_first",
        "body_last",
        "body_size",
        "complete",
        "early",
        "front",
        "full",
        "h2",
        "head_bytes",
        "hold",
        "parent_id",
        "rejected",
        "replayable",
        "resp_at",
        "resp_bytes",
        "resp_size",
        "responded",
        "retry_log",
        "sampled",
        "sent",
        "slot",
        "span_id",
        "started",
        "status",
        "target",
        "trace_id",
        "trace_line",
        "tried",
        "tries",
    )

    def __init__(self, max_count: int, max_bytes: int) -> None:
        RequestHead.__init__(self, max_count, max_bytes)
        self.body: list[bytes] = []  # framed bytes not yet written upstream
        self.body_size = 0
        self.body_first = 0.0  # loop time of the body's first byte from the client
        self.body_last = 0.0  # loop time of its last byte (0.0: not there yet)
        self.resp_at = 0.0  # loop time the response head came from the instance
        self.resp_bytes = 0  # response bytes (head and body) relayed to the client
        self.front: Front | None = None  # the client connection's address and scheme
        self.complete = False
        self.h2 = False  # a stream of an HTTP/2 connection (proxy.worker.h2conn)
        self.early = b""  # client bytes after an upgrade head, held until the 101
        self.head_bytes = b""
        self.sent = False  # head written to an upstream
        self.hold = False  # body held until the upstream says 100 Continue (backhaul)
        self.rejected = False  # the target answered "full, come back later"
        self.responded = False  # a response head went to the client
        self.replayable = True
        self.started = 0.0
        self.status = 0
        self.tries = 0
        self.app = -1
        self.app_name = ""
        self.base_head = b""
        self.slot = -1  # in-flight counter slot held on a local instance
        self.tried: set[str] | None = None
        self.full = 0  # of the tried instances, those found full (routing: 503, not 502)
        self.target: Target | None = None
        self.resp_size = 0  # response body bytes towards the client
        # Every retry: (loop time, reason, the instance given up on); None: no retry.
        self.retry_log: list[tuple[float, str, str]] | None = None
        # W3C Trace Context (proxy.core.traceparent): ids as lowercase hex, the head
        # sampling decision, the lines the instance gets (b"": none).
        self.trace_id = b""
        self.span_id = b""
        self.parent_id = b""
        self.sampled = False
        self.trace_line = b""
