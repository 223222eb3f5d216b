"""Spans of slow and failed requests (and a sampled share), exported as OTLP/HTTP.

Owns the worker's span buffer and its exporter thread. On the loop, `Tracer.record`
appends one tuple of plain values for a request that WorkerContext.done found slow
(over [tracing] slow_ms), failed (5xx, or 499: the client left), retried or sampled
(decided at its start, with its ids: proxy.core.traceparent); a full buffer drops it
and counts. The exporter thread wakes every interval_ms, builds the
spans and their protobuf (proxy.core.otlp) and POSTs them in batches to the endpoint,
retrying with backoff on a connection error or 429/502/503/504 (the OTLP/HTTP rule),
then drops and counts. The loop never waits on it: they share only a deque.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Final, TextIO
from urllib.parse import urlsplit

from proxy import __version__
from proxy.core.otlp import Event, SpanRecord, Value, export_request
from proxy.worker.faults import ThrottledLine

if TYPE_CHECKING:
    from proxy.config import Config, TracingConfig
    from proxy.core.request import Request

# The trace_spans_total family (proxy.telemetry.families): [exported, buffer_full, export_failed]
EXPORTED, BUFFER_FULL, EXPORT_FAILED = range(3)
REASONS: Final = ("slow", "failed", "retried", "sampled")
_RETRYABLE: Final = frozenset({429, 502, 503, 504})

# What the loop keeps of a traced request (built into a span on the exporter's thread):
# why, start and end (ns), method, app, instance, its node, status, head bytes, request
# body bytes, tries, the three timings (s), backhauled, response body bytes, trace id,
# span id, parent id (hex), retries as (ns, reason, instance given up on).
Raw = tuple[
    int,
    int,
    int,
    bytes,
    str,
    str,
    str,
    int,
    int,
    int,
    int,
    float,
    float,
    float,
    bool,
    int,
    str,
    bytes,
    bytes,
    bytes,
    tuple[tuple[int, str, str], ...],
]


class Tracer:
    """The loop's side: which requests are traced, and the bounded buffer."""

    __slots__ = ("buffer", "cap", "counts", "slow")

    def __init__(self, cfg: TracingConfig, counts: list[int]) -> None:
        self.slow = cfg.slow_ms / 1000.0
        self.cap = cfg.buffer
        self.counts = counts
        self.buffer: deque[Raw] = deque()

    def record(self, r: Request, status: int, now: float, elapsed: float) -> None:
        """Keep what a span of `r` needs (`now`: loop time at its end)."""
        if len(self.buffer) >= self.cap:
            self.counts[BUFFER_FULL] += 1
            return
        if status >= 500 or status == 499:
            why = 1
        elif r.tries > 1:
            why = 2
        elif elapsed > self.slow:
            why = 0
        else:
            why = 3
        end = time.time_ns()
        retries: tuple[tuple[int, str, str], ...] = ()
        if r.retry_log is not None:
            retries = tuple((end - int((now - at) * 1e9), w, i) for at, w, i in r.retry_log)
        t = r.target
        head = r.resp_at - r.started if r.resp_at else -1.0
        body = r.body_last - r.body_first if r.body_last else -1.0
        resp = now - r.resp_at if r.resp_at else -1.0
        self.buffer.append(
            (
                why,
                end - int(elapsed * 1e9),
                end,
                r.method,
                r.app_name,
                t.instance if t is not None else "",
                t.node if t is not None else "",
                status,
                r.size,
                r.body_size,
                r.tries,
                head,
                body,
                resp,
                t is not None and not t.local,
                r.resp_size,
                "2" if r.h2 else "1.0" if r.http10 else "1.1",
                r.trace_id,
                r.span_id,
                r.parent_id,
                retries,
            )
        )


def build(raw: Raw, node: str) -> SpanRecord:
    """The span of one recorded request (on the exporter's thread)."""
    why, start, end, method, app, inst, inst_node, status, head_size, body_size, tries = raw[:11]
    head, body, resp, backhaul, resp_size, version, trace, span_id, parent, retries = raw[11:]
    m = method.decode("latin-1") or "HTTP"
    attrs: list[tuple[str, Value]] = [
        ("http.request.method", m),
        ("http.response.status_code", status),
        ("network.protocol.name", "http"),
        ("network.protocol.version", version),
        ("edgeproxy.app", app),
        ("edgeproxy.node", node),
        ("edgeproxy.traced_because", REASONS[why]),
        ("edgeproxy.tries", tries),
        ("edgeproxy.request.head_bytes", head_size),
        ("http.request.body.size", body_size),
        ("http.response.body.size", resp_size),
    ]
    if retries:
        attrs.append(("edgeproxy.retry_reasons", ",".join(w for _, w, _ in retries)))
    if inst:
        attrs += [
            ("edgeproxy.instance", inst),
            ("edgeproxy.instance.node", inst_node),
            ("edgeproxy.backhaul", backhaul),
        ]
    for key, seconds in (
        ("edgeproxy.time_to_response_head_ms", head),
        ("edgeproxy.request_body_ms", body),
        ("edgeproxy.response_body_ms", resp),
    ):
        if seconds >= 0:
            attrs.append((key, round(seconds * 1000.0, 3)))
    error = ""
    if status >= 500:
        error = f"{status} answered"
    elif status == 499:
        error = "the client left before the answer"
    events = [
        Event(at, "retry", [("edgeproxy.retry.reason", w), ("edgeproxy.instance", inst)])
        for at, w, inst in retries
    ]
    return SpanRecord(
        trace_id=bytes.fromhex(trace.decode()) if trace else os.urandom(16),
        span_id=bytes.fromhex(span_id.decode()) if span_id else os.urandom(8),
        parent_span_id=bytes.fromhex(parent.decode()) if parent else b"",
        name=f"{m} {app}" if app else m,
        start_ns=start,
        end_ns=end,
        attributes=attrs,
        error=error,
        events=events,
    )


class Exporter:
    """The thread that sends the buffer's spans, in batches, off the loop."""

    def __init__(self, config: Config, tracer: Tracer, out: TextIO = sys.stderr) -> None:
        cfg = config.tracing
        self.cfg = cfg
        self.node = config.node.id
        self.tracer = tracer
        self.counts = tracer.counts
        self.resource: list[tuple[str, Value]] = [
            ("service.name", cfg.service_name),
            ("service.instance.id", f"{config.node.id}/{os.getpid()}"),
            ("edgeproxy.node", config.node.id),
            ("edgeproxy.region", config.node.region),
        ]
        u = urlsplit(cfg.endpoint)
        self.https = u.scheme == "https"
        self.host = u.hostname or ""
        self.port = u.port or (443 if self.https else 80)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.headers = {"Content-Type": "application/x-protobuf", **dict(cfg.headers)}
        self.conn: http.client.HTTPConnection | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="trace-export", daemon=True)
        self.complaints = ThrottledLine(out)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Send what is left (one try each), then end the thread."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.cfg.timeout_ms / 1000.0 + 1.0)

    def run(self) -> None:
        interval = self.cfg.interval_ms / 1000.0
        while not self.stopped.wait(interval):
            self.flush()
        self.flush()
        if self.conn is not None:
            self.conn.close()

    def flush(self) -> None:
        buf = self.tracer.buffer
        while buf:
            batch: list[Raw] = []
            while buf and len(batch) < self.cfg.batch:
                batch.append(buf.popleft())
            spans = [build(raw, self.node) for raw in batch]
            body = export_request(self.resource, "edgeproxy", __version__, spans)
            self.send(body, len(batch))

    def send(self, body: bytes, n: int) -> None:
        delay = 0.5
        for attempt in range(self.cfg.retries + 1):
            problem = self.post(body)
            if not problem:
                self.counts[EXPORTED] += n
                return
            retry = problem.startswith("retry:")
            if not retry or attempt == self.cfg.retries or self.stopped.wait(delay):
                break
            delay = min(delay * 2, 8.0)
        self.counts[EXPORT_FAILED] += n
        self.complaints.say(
            f"trace export to {self.cfg.endpoint} failed: {problem}; {n} spans dropped"
        )

    def post(self, body: bytes) -> str:
        """One POST; "" when accepted, else why ("retry: ..." when a retry may help)."""
        timeout = self.cfg.timeout_ms / 1000.0
        try:
            if self.conn is None:
                if self.https:
                    ctx = ssl.create_default_context()
                    self.conn = http.client.HTTPSConnection(
                        self.host, self.port, timeout=timeout, context=ctx
                    )
                else:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self.conn.request("POST", self.path, body, self.headers)
            resp = self.conn.getresponse()
            resp.read(1 << 16)
            status = resp.status
            if resp.will_close:
                self.conn.close()
                self.conn = None
        except (OSError, http.client.HTTPException) as e:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            return f"retry: {type(e).__name__}: {e}"
        if 200 <= status < 300:
            return ""
        if status in _RETRYABLE:
            return f"retry: HTTP {status}"
        return f"HTTP {status}"
