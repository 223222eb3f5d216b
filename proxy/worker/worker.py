"""A worker process: uvloop, the inherited listeners, the request path, drain.

Owns one event loop: the listening sockets handed over by the master, the
client connections, the upstream pool, the deadline sweeper and the stats it
publishes. It must not bind a listener or fork: the master does that.
Run as `python -m proxy.worker` with a JSON bootstrap on stdin.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson

from proxy.config import ConfigError, loads
from proxy.core.traceparent import TraceContext
from proxy.telemetry.metrics import (
    DRAINING,
    SERVING,
    WHERE_CALLBACK,
    WHERE_LOOP,
    WorkerStats,
    app_labels,
)
from proxy.telemetry.statsblock import StatsBlock
from proxy.worker.accesslog import AccessLog, Writer
from proxy.worker.backhaul_tls import BackhaulTLS
from proxy.worker.client import ClientConnection
from proxy.worker.context import WorkerContext
from proxy.worker.loopwatch import LagProbe, Watchdog
from proxy.worker.tls import ALPN, TlsEdge
from proxy.worker.tracing import Exporter, Tracer
from shm.errors import ShmError
from shm.inflight import InflightCells, InflightSegment

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.fleettls import Material
    from proxy.worker.tickets import TicketKeys

TICK = 0.1  # deadline sweep period, seconds
PUBLISH = 1.0  # stats publish period, seconds
FEEDBACK_MAX_AGE = 2.0  # seconds a backhaul load report outranks the table


class Worker:
    """The process shell around a WorkerContext."""

    def __init__(self, boot: dict[str, Any]) -> None:
        self.boot = boot
        self.config = loads(boot["config_text"], boot["config_path"])
        self.slot: int = boot["slot"]
        if self.config.log.format == "json":
            from proxy.worker.errlines import install

            install(self.config.node.id, self.slot)  # before anything keeps sys.stderr
        self.generation: int = boot["generation"]
        self.master_pid: int = boot["master_pid"]
        self.loop = asyncio.new_event_loop()
        app_names = [a.name for a in self.config.apps]
        labels = app_labels(app_names, self.config.metrics.max_apps)
        self.stats = WorkerStats(labels, self.slot, self.generation, os.getpid())
        self.block = (
            StatsBlock.attach(boot["stats_fd"]) if boot.get("stats_fd") is not None else None
        )
        self.cells = self.attach_cells(boot)
        self.ctx = WorkerContext(self.loop, self.config, self.stats, self.cells)
        self.tls: TlsEdge | None = None  # the edge's HTTPS listeners, if any
        self.tickets: TicketKeys | None = None
        self.tickets_warned = False
        # The backhaul's credentials, read now: a reload (a new worker) reads them again.
        bh = self.config.backhaul
        self.backhaul_tls = BackhaulTLS(
            self.loop,
            _backhaul_material(self.config),
            bh.handshake_timeout,
            self.stats,
            self.ctx.faults,
            out=sys.stderr,  # the JSON error stream when [log] format = "json"
        )
        if not bh.insecure:
            self.ctx.peer_connect = self.backhaul_tls.connect
        self.h2_peers: Any = None
        listen = self.config.listen
        if listen.https or listen.h2c:
            # Requests that come as HTTP/2 cross to peers as HTTP/2 (the h2 library is
            # imported by these listeners anyway; a node without them never touches it).
            from proxy.worker.h2peer import H2Peers

            bt = self.backhaul_tls
            tls = not bh.insecure
            self.h2_peers = H2Peers(
                self.loop,
                self.config.http2,
                self.config.pool.idle_timeout,
                bt.handshake if tls else None,
                bt.http11 if tls else None,
            )
            self.ctx.h2_connect = self.h2_peers.stream
        self.servers: list[asyncio.Server] = []
        # Client listeners, kept open for the process's life: pausing at max_connections
        # closes only the dup'ed fd an asyncio Server polls, so the socket and its accept
        # queue stay (closing a SO_REUSEPORT socket would drop the connections queued on it).
        self.client_socks: list[socket.socket] = []
        self.client_servers: list[asyncio.Server] = []
        self.paused_at = -1.0  # loop time accepting paused, -1 while accepting
        self.resuming: asyncio.Task[None] | None = None
        self.stop_event = asyncio.Event()
        self.fast = False
        self.drain_deadline = 0.0
        self.probe = LagProbe(self.loop, self.config.overload, self.stats, self.on_shed)
        self.watchdog: Watchdog | None = None
        self.exporter: Exporter | None = None
        if self.config.tracing.enabled:
            spans = self.stats.family("trace_spans_total")
            tracer = Tracer(self.config.tracing, spans)
            self.ctx.tracer = tracer
            rate = self.config.tracing.sample_rate
            self.ctx.trace = TraceContext(os.urandom, rate, random.Random().random)
            self.exporter = Exporter(self.config, tracer, out=sys.stderr)
        self.access_writer: Writer | None = None
        if self.config.log.enabled:
            lines = self.stats.family("access_log_lines_total")
            al = AccessLog(self.config.log, lines, random.Random().random, self.loop.time)
            self.ctx.access_log = al
            self.access_writer = Writer(self.config.log, self.config.node.id, al, out=sys.stderr)

    @staticmethod
    def attach_cells(boot: dict[str, Any]) -> InflightCells | None:
        """This worker's in-flight cells (None: limits are not enforced across workers)."""
        try:
            seg = InflightSegment.attach(boot["inflight"])
        except (KeyError, ShmError, OSError) as e:
            print(f"edgeproxy worker: no in-flight counters: {e}", file=sys.stderr)
            return None
        return InflightCells(seg, boot["cell"])

    def factory(self, backhaul: bool, sni_app: str | None = None, tls: bool = False) -> Any:
        """The protocol factory of a listener (a backhaul one: peers name the instance; a
        TLS one: requests must name the app the SNI named, "" when it named none)."""
        ctx = self.ctx
        # HTTP/2 (the h2 library: some 40 ms of imports) only where a listener may speak it,
        # so that a plaintext-only worker starts (and a reload serves) as fast as before.
        if tls and not backhaul:
            from proxy.worker.h2select import AlpnChoice

            return lambda: AlpnChoice(ctx, sni_app)  # HTTP/2 when ALPN chose h2
        if not backhaul and self.config.listen.h2c:
            from proxy.worker.h2select import PrefaceSniff

            return lambda: PrefaceSniff(ctx)  # HTTP/2 with prior knowledge, or HTTP/1.1
        return lambda: ClientConnection(ctx, backhaul, sni_app, tls)

    def backhaul_h2(self) -> Any:
        """The protocol factory of a backhaul connection whose peer chose h2 (ALPN): the
        same trust as HTTP/1.1 there (X-Edgeproxy-* honoured). The h2 library is imported
        now, at start, on a node with a backhaul listener: not on its first connection."""
        from proxy.worker.h2conn import H2Front

        ctx = self.ctx
        return lambda: H2Front(ctx, None, False, True)

    def backhaul_plain(self) -> Any:
        """The protocol factory of a plaintext backhaul listener ([backhaul] insecure):
        HTTP/2 with prior knowledge (the RFC 9113 preface), or HTTP/1.1."""
        from proxy.worker.h2select import PrefaceSniff

        ctx = self.ctx
        return lambda: PrefaceSniff(ctx, True)

    async def serve(self) -> None:
        loop = self.loop
        loop.set_exception_handler(self.on_loop_exception)
        for lst in self.boot["listeners"]:
            sock = socket.socket(fileno=lst["fd"])
            sock.setblocking(False)
            if lst["kind"] == "backhaul" and self.backhaul_tls.server is not None:
                # Mutual TLS first; then HTTP/1.1, or HTTP/2 when ALPN chose h2.
                self.backhaul_tls.serve(sock, self.factory(True), self.backhaul_h2())
            elif lst["kind"] == "backhaul":  # [backhaul] insecure: plaintext
                srv = await loop.create_server(
                    self.backhaul_plain(), sock=sock, backlog=4096, start_serving=True
                )
                self.servers.append(srv)
            elif lst["kind"] == "https":
                self.tls_edge().add(sock)
            else:
                self.client_socks.append(sock)
        await self.listen_clients()
        if self.tls is not None:
            await self.tls.start()
        self.ctx.on_accepting = self.on_accepting
        loop.add_signal_handler(signal.SIGTERM, self.on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGQUIT, self.on_signal, signal.SIGQUIT)
        loop.add_signal_handler(signal.SIGINT, self.on_signal, signal.SIGINT)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.stats.state = SERVING
        self.publish()
        os.write(self.boot["notify_fd"], b"READY %d\n" % os.getpid())
        os.close(self.boot["notify_fd"])
        loop.call_later(TICK, self.tick)
        loop.call_later(PUBLISH, self.publish_tick)
        self.probe.start()
        if self.exporter is not None:
            self.exporter.start()
        if self.access_writer is not None:
            self.access_writer.start()
        blocked = self.config.overload.blocked_ms / 1000.0
        if blocked > 0:
            counts = self.stats.family("loop_blocked_total")
            self.watchdog = Watchdog(self.probe, blocked, counts, sys.stderr)
            self.watchdog.start()
        await self.stop_event.wait()
        if self.watchdog is not None:
            self.watchdog.stop()
        self.probe.stop()
        self.close_listeners()
        if self.tls is not None:
            await self.tls.stop()
        self.backhaul_tls.close()
        if self.h2_peers is not None:
            self.h2_peers.close_all()
        self.ctx.pool.close_all()
        for c in list(self.ctx.clients):
            if c.transport is not None:
                c.transport.abort()
        if self.exporter is not None:
            self.exporter.stop()  # what is buffered goes out (one try each), bounded
        if self.access_writer is not None:
            self.access_writer.stop()  # what is buffered is written
        self.publish()

    def tls_edge(self) -> TlsEdge:
        """The HTTPS side of this worker, made with its first HTTPS listener."""
        if self.tls is None:
            from proxy.worker.certs import CertCache  # cryptography: HTTPS nodes only
            from proxy.worker.h2select import AlpnChoice  # the h2 library, at startup

            del AlpnChoice  # imported now, not on the loop at the first connection

            ctx, config = self.ctx, self.config
            tls = config.tls
            certs = CertCache(
                tls.certs_dir,
                config.cluster.store if tls.store else None,
                config.cluster.endpoints,
                config.cluster.prefix,
                cache_size=tls.cache_size,
                miss_ttl=tls.miss_ttl,
                alpn=tuple(p.decode() for p in ALPN),
                configure=self.install_tickets,
            )
            self.tls = TlsEdge(
                self.loop,
                config,
                certs,
                self.stats,
                lambda sni_app: self.factory(False, sni_app, True),
                ctx.routing.app_for_host,
            )
        return self.tls

    def install_tickets(self, ctx: ssl.SSLContext) -> None:
        """Session tickets any worker of any generation can read (proxy.worker.tickets);
        where that cannot be done, resumption stays per process (logged once)."""
        from proxy.worker.tickets import TicketKeys, install, last_failure

        if self.tickets is None:
            secret = bytes.fromhex(self.boot["ticket_secret"])
            self.tickets = TicketKeys(secret, self.config.tls.ticket_rotate)
        if install(ctx, self.tickets):
            return
        self.stats.family("tls_ticket_errors_total")[0] += 1
        if not self.tickets_warned:
            self.tickets_warned = True
            print(
                f"edgeproxy worker: TLS session tickets stay per process: {last_failure()}",
                file=sys.stderr,
            )

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGTERM and not self.ctx.draining:
            self.start_drain()
        else:
            self.fast = True
            self.stop_event.set()

    def close_listeners(self) -> None:
        """Stop accepting for good: closes this process's copies of the fds only."""
        for srv in self.servers:
            srv.close()
        self.servers = []
        if self.tls is not None:
            self.tls.close()
        self.backhaul_tls.stop_accepting()
        self.stop_clients()
        for sock in self.client_socks:
            sock.close()
        self.client_socks = []

    # [limits] max_connections --------------------------------------------------------
    async def listen_clients(self) -> None:
        """Accept on every client listener, each through a dup of its fd."""
        for sock in self.client_socks:
            srv = await self.loop.create_server(
                self.factory(False), sock=sock.dup(), backlog=4096, start_serving=True
            )
            if not self.ctx.accepting or self.ctx.draining:
                srv.close()  # paused (or draining) again while this one was being set up
                continue
            self.client_servers.append(srv)

    def stop_clients(self) -> None:
        """Stop polling the client listeners (their dup'ed fds close; the queues stay)."""
        for srv in self.client_servers:
            srv.close()
        self.client_servers = []

    def on_accepting(self, accepting: bool) -> None:
        """The context's connection count crossed max_connections."""
        s = self.stats
        if self.tls is not None:
            self.tls.accepting(accepting and not self.ctx.draining)
        if not accepting:
            self.stop_clients()
            if self.paused_at < 0:
                self.paused_at = self.loop.time()
                s.accept_pauses += 1
            return
        if self.paused_at >= 0:
            s.accept_paused_seconds += self.loop.time() - self.paused_at
            self.paused_at = -1.0
        if self.ctx.draining or not self.client_socks:
            return
        if self.resuming is None or self.resuming.done():
            self.resuming = self.loop.create_task(self.listen_clients())

    def on_shed(self, shedding: bool) -> None:
        """The lag probe started or stopped shedding (proxy.worker.loopwatch)."""
        self.ctx.shedding = shedding

    # errors --------------------------------------------------------------------------
    def on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception reached the event loop: a protocol callback (the loop closes that
        transport) or another callback. Counted, and logged at most once per site/period."""
        exc = context.get("exception")
        where = WHERE_CALLBACK if "protocol" in context else WHERE_LOOP
        self.ctx.faults.report(
            where,
            exc if isinstance(exc, BaseException) else None,
            str(context.get("message", "")),
        )
        if where == WHERE_CALLBACK:
            t = context.get("transport")
            if isinstance(t, asyncio.BaseTransport) and not t.is_closing():
                t.close()

    def start_drain(self) -> None:
        self.close_listeners()
        self.ctx.drain()
        self.stats.state = DRAINING
        self.drain_deadline = self.loop.time() + self.config.workers.drain_timeout
        self.publish()

    def tick(self) -> None:
        ctx = self.ctx
        try:
            ctx.sweep()
        except Exception as e:  # the sweep reports per connection; this is a last resort
            ctx.faults.report(WHERE_LOOP, e, "the deadline sweep")
        if ctx.routing.reader is None:
            ctx.routing.attach()
        if os.getppid() != self.master_pid and not ctx.draining:
            self.start_drain()  # the master is gone: finish what we have, then leave
        idle = not ctx.clients and (self.tls is None or not self.tls.pending)
        if ctx.draining and (idle or self.loop.time() >= self.drain_deadline):
            self.stop_event.set()
            return
        self.loop.call_later(TICK, self.tick)

    def publish_tick(self) -> None:
        self.publish()
        # Load feedback older than this is no better than the table: forget it.
        self.ctx.routing.prune(time.time(), FEEDBACK_MAX_AGE)
        self.loop.call_later(PUBLISH, self.publish_tick)

    def publish(self) -> None:
        s = self.stats
        s.open_connections = len(self.ctx.clients)
        s.inflight = sum(len(c.queue) for c in self.ctx.clients)
        s.upstream_idle = self.ctx.pool.idle_count
        if self.paused_at >= 0:  # the pause so far counts: fold it in now
            now = self.loop.time()
            s.accept_paused_seconds += now - self.paused_at
            self.paused_at = now
        if self.tls is not None:
            self.tls.publish()
        if self.tickets is not None:
            s.family("tls_ticket_errors_total")[1] = self.tickets.callback_errors
        if self.block is not None:
            self.block.publish(s.snapshot())

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self.serve())
        finally:
            self.loop.close()


def _backhaul_material(config: Config) -> Material | None:
    """The [backhaul] credentials, checked (cryptography is imported only when there are)."""
    if not config.backhaul.tls:
        return None
    from proxy.fleettls import load

    return load(config)


def main() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        pass
    boot = orjson.loads(sys.stdin.buffer.read())
    try:
        worker = Worker(boot)
    except ConfigError as e:  # a [backhaul] file changed since the master checked it
        print(f"edgeproxy worker: {e}", file=sys.stderr)
        sys.exit(2)
    asyncio.set_event_loop(worker.loop)
    worker.run()


if __name__ == "__main__":
    main()
