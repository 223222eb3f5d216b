"""What every connection of a worker shares: its config, routing, pool and stats.

Owns the per-request accounting (status classes, response times, in-flight
release), the set of client connections (their count against max_connections,
the deadline sweep, drain) and the upstream connects in progress. It must not
touch listeners or the process (proxy.worker does), nor know a client
connection beyond what the sweep needs of it (Connection).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import sys
from typing import TYPE_CHECKING, Any, Protocol

from proxy.telemetry.histograms import REQUEST_BODY, RESPONSE_BODY
from proxy.telemetry.metrics import (
    BAD_REQUEST_STATUSES,
    RETRY_REASONS,
    UPSTREAM_ERROR_STATUSES,
    WHERE_BATCH,
    WHERE_SWEEP,
    app_rows,
)
from proxy.worker.accesslog import AccessLog
from proxy.worker.batch import WriteBatch
from proxy.worker.faults import Faults
from proxy.worker.routing import Routing
from proxy.worker.tracing import Tracer
from proxy.worker.upstream import Pool

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Awaitable, Callable

    from proxy.config import Config
    from proxy.core.request import Request
    from proxy.core.target import Target
    from proxy.core.traceparent import TraceContext
    from proxy.telemetry.metrics import WorkerStats
    from proxy.worker.upstream import UpstreamConnection
    from shm.inflight import InflightCells


class Connection(Protocol):
    """A client connection as the worker's bookkeeping sees it (proxy.worker.client)."""

    backhaul: bool  # a peer node's: not counted against max_connections
    deadline: float  # loop time its on_deadline is due, 0.0 for none
    queue: deque[Request]  # its requests in flight or waiting
    transport: asyncio.Transport | None

    def on_deadline(self, now: float) -> None:
        """Its deadline passed."""

    def drain(self, now: float) -> None:
        """The worker drains: close when idle."""

    def abort(self) -> None:
        """Drop it at once."""


class WorkerContext:
    """Everything a connection needs from its worker."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        stats: WorkerStats,
        cells: InflightCells | None,
    ) -> None:
        self.loop = loop
        self.config = config
        self.timeouts = config.timeouts
        self.limits = config.limits
        self.quiet_period = config.workers.quiet_period
        # An app's row in the stats (past [metrics] max_apps, the shared "_other" row).
        self.app_index = app_rows([a.name for a in config.apps], config.metrics.max_apps)
        self.no_app = stats.no_app
        self.routing = Routing(config, cells, random.Random(), stats)
        self.routing.attach()
        self.faults = Faults(stats.internal_errors, loop.time, sys.stderr)
        self.batch = WriteBatch(loop, self.batch_failed)
        self.pool = Pool(
            loop, config.pool.max_idle, config.pool.idle_timeout, loop.time, self.batch
        )
        # Connecting to a peer's backhaul (mutual TLS: proxy.worker.backhaul_tls); None: as
        # to a local instance, plaintext ([backhaul] insecure).
        self.peer_connect: Callable[[Pool, Target], Awaitable[UpstreamConnection]] | None = None
        # A stream on a peer's HTTP/2 connection, for requests that came as HTTP/2
        # (proxy.worker.h2peer); None: this worker takes no HTTP/2, or has no peers.
        self.h2_connect: Callable[[Pool, Target], Awaitable[UpstreamConnection]] | None = None
        self.upgrades = config.trust.upgrade  # protocols an Upgrade may switch to
        self.forwarders = config.trust.forwarded_from
        self.clients: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # upstream connects (proxy.worker.exchange)
        self.draining = False
        self.stats = stats
        # [overload]: while the loop lags (proxy.worker.loopwatch), new requests get a 503.
        self.shedding = False
        self.shed_extra = b"Retry-After: %d\r\n" % config.overload.retry_after
        # [tracing]: requests that become spans (proxy.worker.tracing); None: no tracing.
        self.tracer: Tracer | None = None
        # W3C Trace Context: ids and head sampling at each request's start (with tracer).
        self.trace: TraceContext | None = None
        # [log] access: sampled finished requests get a line (proxy.worker.accesslog).
        self.access_log: AccessLog | None = None
        # [limits] max_connections: client (not peer) connections of this worker. At the
        # cap, `on_accepting(False)` asks the worker to stop accepting; below it again,
        # `on_accepting(True)` to resume (proxy.worker owns the listeners).
        self.max_connections = config.limits.max_connections
        self.client_count = 0
        self.accepting = True
        self.on_accepting: Callable[[bool], None] | None = None

    # connections -------------------------------------------------------------
    def opened(self, c: Connection) -> None:
        """`c` was accepted (its connection_made)."""
        self.clients.add(c)
        self.stats.accepted += 1
        if not c.backhaul:
            self.client_count += 1
            if self.client_count >= self.max_connections and self.accepting:
                self.accepting = False
                if self.on_accepting is not None:
                    self.on_accepting(False)

    def closed(self, c: Connection) -> None:
        """`c` is gone (its connection_lost)."""
        if c not in self.clients:
            return
        self.clients.discard(c)
        if not c.backhaul:
            self.client_count -= 1
            if self.client_count < self.max_connections and not self.accepting:
                self.accepting = True
                if self.on_accepting is not None:
                    self.on_accepting(True)

    def trusted_forwarder(self, ip: str) -> bool:
        """Whether a client at `ip` may pass on forwarding fields ([trust] forwarded_from)."""
        if not self.forwarders:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.forwarders)

    # accounting ------------------------------------------------------------
    def done(self, r: Request, status: int) -> None:
        if r.slot >= 0:
            self.routing.release(r)
        s = self.stats
        app = r.app if r.app >= 0 else self.no_app
        cls = status // 100
        if 1 <= cls <= 5:
            s.requests[app * 5 + cls - 1] += 1
        if r.started:
            now = self.loop.time()
            elapsed = now - r.started
            s.observe_response(elapsed)
            if r.resp_at:
                s.hists[RESPONSE_BODY].observe(app, now - r.resp_at)
            tr = self.tracer
            if tr is not None and (elapsed > tr.slow or status >= 499 or r.tries > 1 or r.sampled):
                tr.record(r, status, now, elapsed)
        if r.body_last:
            s.hists[REQUEST_BODY].observe(app, r.body_last - r.body_first)
        al = self.access_log
        if al is not None:
            al.offer(r, status)

    def bad_request(self, status: int) -> None:
        if status in BAD_REQUEST_STATUSES:
            self.stats.bad_requests[BAD_REQUEST_STATUSES.index(status)] += 1

    def upstream_error(self, status: int) -> None:
        self.stats.upstream_errors[UPSTREAM_ERROR_STATUSES.index(status)] += 1

    def stats_retry(self, why: str) -> None:
        self.stats.retries[RETRY_REASONS.index(why)] += 1

    # housekeeping ----------------------------------------------------------------
    def sweep(self) -> None:
        """Act on every deadline that passed. An exception for one connection is reported
        and closes that connection; the others' deadlines are still handled."""
        now = self.loop.time()
        for c in list(self.clients):
            d = c.deadline
            if d and now >= d:
                try:
                    c.on_deadline(now)
                except Exception as e:
                    self.faults.report(WHERE_SWEEP, e, "a client deadline")
                    _abort(c)
        for up in self.pool.sweep(now):
            ex = up.exchange
            try:
                up.abort()
                if ex is not None:
                    ex.upstream_timed_out()
            except Exception as e:
                self.faults.report(WHERE_SWEEP, e, "an upstream deadline")
                _abort(up)
                if ex is not None:
                    _abort(ex)  # and the client it was for

    def batch_failed(self, exc: Exception) -> None:
        """A held write raised (proxy.worker.batch closes that connection)."""
        self.faults.report(WHERE_BATCH, exc, "a held write")

    def drain(self) -> None:
        self.draining = True
        now = self.loop.time()
        for c in list(self.clients):
            c.drain(now)


def _abort(conn: Any) -> None:
    """Close a connection that raised; one that cannot even be aborted loses its transport."""
    try:
        conn.abort()
    except Exception:
        t = getattr(conn, "transport", None)
        if t is not None:
            t.abort()
