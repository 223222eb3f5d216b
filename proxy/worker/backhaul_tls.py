"""The backhaul's mutual TLS in a worker: the listener's handshake gate, and connecting to peers.

Owns the TLS handshake of every backhaul connection, both ways, before any
HTTP byte is read or written on it: a connection is handed to HTTP only once
the fleet CA vouched for the other end and, towards a peer, once its
certificate names the node this one meant to reach. Owns counting handshakes
and refusals, and logging a refusal at most once per peer per minute. It must
not parse HTTP (proxy.worker.client and upstream do) nor choose peers.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from typing import TYPE_CHECKING, Any, TextIO, cast

from proxy.core.fleetid import node_of_peercert
from proxy.core.tls_refusal import ENDED_CLOSED, ENDED_SSL, ENDED_TIMEOUT, refusal
from proxy.telemetry.metrics import (
    KIND_FULL,
    KIND_RESUMED,
    SIDE_ACCEPT,
    SIDE_CONNECT,
    TLS_KINDS,
    TLS_REFUSALS,
    WHERE_CALLBACK,
    WHERE_LOOP,
)
from proxy.worker import tickets
from proxy.worker.upstream import UpstreamConnection

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.core.target import Target
    from proxy.fleettls import Material, PeerContext
    from proxy.telemetry.metrics import WorkerStats
    from proxy.worker.faults import Faults
    from proxy.worker.upstream import Pool

LOG_PERIOD = 60.0  # seconds: one log line per (side, peer) at most, with the count since
MAX_LOGGED = 1024  # peers remembered for that; the table is cleared when it is full
MAX_HANDSHAKES = 256  # accept-side handshakes in progress per worker; more are refused
MAX_EARLY = 65536  # bytes a peer may send between its handshake's end and the hand-over
ACCEPT_BACKOFF = 0.1  # seconds before accepting again after accept() failed (EMFILE)
TICKET_PERIOD = 3600.0  # seconds per ticket key epoch: a ticket resumes for 1 to 2 of them


class BackhaulRefusedError(ConnectionRefusedError):
    """A peer refused at the handshake: routing treats it as a refused connection (the
    request never left; another instance is tried)."""


class RefusalLog:
    """Counts refusals in the worker's stats; logs the first of each (side, peer) per
    period, with how many more there were since. Peers are addresses (accept side: the
    node is not known yet) or node ids (connect side)."""

    __slots__ = ("clock", "last", "out", "period", "refused", "suppressed")

    def __init__(
        self, refused: list[int], clock: Callable[[], float], out: TextIO, period: float
    ) -> None:
        self.refused = refused  # WorkerStats.backhaul_refused
        self.clock = clock
        self.out = out
        self.period = period
        self.last: dict[tuple[int, str], float] = {}
        self.suppressed: dict[tuple[int, str], int] = {}

    def refuse(self, side: int, reason: str, peer: str, detail: str) -> bool:
        """Count one refusal; True when it was logged."""
        self.refused[side * len(TLS_REFUSALS) + TLS_REFUSALS.index(reason)] += 1
        key = (side, peer)
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.period:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if len(self.last) >= MAX_LOGGED and key not in self.last:
            self.last.clear()
            self.suppressed.clear()
        self.last[key] = now
        more = self.suppressed.pop(key, 0)
        what = "a connection from" if side == SIDE_ACCEPT else "peer node"
        line = f"edgeproxy worker: backhaul TLS: refused {what} {peer}: {reason} ({detail})"
        if more:
            line += f"; {more} more from this peer since the last report"
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # stderr gone: the counter still says it happened
        return True


def _why(e: BaseException) -> tuple[str, str]:
    """(refusal reason, detail for the log) of a failed handshake."""
    if isinstance(e, ssl.SSLError):
        code = getattr(e, "verify_code", None)
        msg = getattr(e, "verify_message", None) or e.reason or str(e)
        return refusal(ENDED_SSL, e.reason, code if isinstance(code, int) else None), str(msg)
    if isinstance(e, TimeoutError | ConnectionAbortedError):
        # uvloop aborts a handshake past ssl_handshake_timeout with ConnectionAbortedError.
        return refusal(ENDED_TIMEOUT), "the handshake did not finish in time"
    return refusal(ENDED_CLOSED), f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _say(out: TextIO, text: str) -> None:
    try:
        out.write(f"edgeproxy worker: {text}\n")
        out.flush()
    except (OSError, ValueError):
        pass


class _Hold(asyncio.Protocol):
    """The protocol of a connection while its handshake runs: it only holds what arrives
    between the end of the handshake and the hand-over (normally nothing)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.early = b""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) > MAX_EARLY and self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class BackhaulTLS:
    """One worker's backhaul TLS: contexts built once (a reload starts a new worker, which
    reads the files again), the handshakes in progress, the counters."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        material: Material | None,
        handshake_timeout: float,
        stats: WorkerStats,
        faults: Faults,
        out: TextIO = sys.stderr,
        period: float = LOG_PERIOD,
    ) -> None:
        self.loop = loop
        if material is not None:  # cryptography is imported only by nodes that use it
            from proxy.fleettls import client_context, server_context
        self.server = server_context(material) if material is not None else None
        # Tickets every worker of every generation of this node decrypts (keys from the
        # node's key and CA: proxy.fleettls.ticket_secret); else each worker's own.
        self.shared_tickets = False
        if self.server is not None and material is not None:
            keys = tickets.TicketKeys(material.ticket_secret, TICKET_PERIOD)
            self.shared_tickets = tickets.install(self.server, keys)
            if not self.shared_tickets:
                _say(out, f"backhaul TLS: session tickets per worker ({tickets.last_failure()})")
        self.client: PeerContext | None = None
        # Connections for HTTP/2 streams: ALPN h2 offered (a context of their own: ALPN
        # is a context's, and the HTTP/1.1 ones must not be offered h2).
        self.client_h2: PeerContext | None = None
        if material is not None:
            self.client = client_context(material)
            self.client_h2 = client_context(material)
            self.client_h2.set_alpn_protocols(["h2", "http/1.1"])
        self.timeout = handshake_timeout
        self.stats = stats
        self.faults = faults
        self.log = RefusalLog(stats.backhaul_refused, loop.time, out, period)
        self.handshaking = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.acceptors: list[tuple[asyncio.Task[None], socket.socket]] = []

    def done(self, side: int, t: asyncio.BaseTransport) -> None:
        obj = t.get_extra_info("ssl_object")
        kind = KIND_RESUMED if obj is not None and obj.session_reused else KIND_FULL
        self.stats.backhaul_handshakes[side * len(TLS_KINDS) + kind] += 1

    # the listener -------------------------------------------------------------------
    def serve(
        self, sock: socket.socket, make: Callable[[], Any], make_h2: Callable[[], Any]
    ) -> None:
        """Accept on the backhaul listener `sock` (non-blocking): each connection's
        handshake runs before `make()` (a ClientConnection, which honours
        X-Edgeproxy-Instance) is called, and only for an authenticated peer; `make_h2()`
        instead when ALPN chose h2 (an HTTP/2 connection of the same trust).

        Accepted by hand and wrapped with connect_accepted_socket rather than by
        create_server(ssl=...): that way the handshake's failure (and why) reaches this
        code; and rather than start_tls on a plain protocol: uvloop may read the peer's
        first bytes before start_tls is in place, and they would be lost to TLS."""
        task = self.loop.create_task(self._accept(sock, make, make_h2))
        self.acceptors.append((task, sock))

    def stop_accepting(self) -> None:
        """Stop accepting (a drain): this process's copy of each listener closes;
        handshakes in progress finish."""
        for task, sock in self.acceptors:
            task.cancel()
            sock.close()
        self.acceptors = []

    def close(self) -> None:
        """The worker stops: handshakes in progress end with it."""
        self.stop_accepting()
        for task in list(self.tasks):
            task.cancel()

    async def _accept(
        self, sock: socket.socket, make: Callable[[], Any], make_h2: Callable[[], Any]
    ) -> None:
        loop = self.loop
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and the like: counted; the loop goes on
                self.faults.report(WHERE_LOOP, e, "accepting on the backhaul listener")
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            peer = str(addr[0]) if isinstance(addr, tuple) and addr else "unknown"
            if self.handshaking >= MAX_HANDSHAKES:
                conn.close()
                detail = f"{MAX_HANDSHAKES} handshakes in progress"
                self.log.refuse(SIDE_ACCEPT, "overload", peer, detail)
                continue
            self.handshaking += 1
            task = loop.create_task(self._handshake(conn, peer, make, make_h2))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handshake(
        self,
        conn: socket.socket,
        peer: str,
        make: Callable[[], Any],
        make_h2: Callable[[], Any],
    ) -> None:
        assert self.server is not None
        hold = _Hold()
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t, _ = await self.loop.connect_accepted_socket(
                lambda: hold, conn, ssl=self.server, ssl_handshake_timeout=self.timeout
            )
        except (OSError, TimeoutError) as e:
            conn.close()
            reason, detail = _why(e)
            self.log.refuse(SIDE_ACCEPT, reason, peer, detail)
            return
        finally:
            self.handshaking -= 1
        tls = t
        node = node_of_peercert(tls.get_extra_info("peercert"))
        if node is None:
            tls.abort()
            detail = "its certificate names no node (spiffe://edgeproxy/node/<id>)"
            self.log.refuse(SIDE_ACCEPT, "not_a_node", peer, detail)
            return
        if hold.lost:
            return
        self.done(SIDE_ACCEPT, tls)
        try:
            obj = tls.get_extra_info("ssl_object")
            h2 = obj is not None and obj.selected_alpn_protocol() == "h2"
            c = make_h2() if h2 else make()
            tls.set_protocol(c)
            c.connection_made(tls)
            early = hold.early
            if early:
                hold.early = b""
                c.data_received(early)
        except Exception as e:
            self.faults.report(WHERE_CALLBACK, e, "handing over a backhaul connection")
            tls.abort()

    # connecting to peers ------------------------------------------------------------
    async def connect(self, pool: Pool, target: Target) -> UpstreamConnection:
        """A verified TLS connection to `target`'s node, as an UpstreamConnection of
        `pool`. Raises TimeoutError, or OSError (BackhaulRefusedError when the handshake or
        the identity check failed: nothing was sent)."""
        t, early = await self.handshake(target, False)
        return self.http11(pool, target, t, early)

    def http11(
        self, pool: Pool, target: Target, t: asyncio.Transport, early: bytes
    ) -> UpstreamConnection:
        """A verified connection as an HTTP/1.1 UpstreamConnection of `pool`."""
        up = UpstreamConnection(pool, target.key)
        t.set_protocol(cast("asyncio.BaseProtocol", up))
        up.connection_made(t)
        if early:
            up.data_received(early)  # bytes before any request: the connection closes
        return up

    async def handshake(self, target: Target, h2: bool) -> tuple[asyncio.Transport, bytes]:
        """A verified TLS connection to `target`'s node (offering ALPN h2 when `h2`), and
        the bytes that came before it was handed over. Raises as connect() does."""
        peer = target.node
        ctx = self.client_h2 if h2 else self.client
        if ctx is None:
            self.log.refuse(
                SIDE_CONNECT,
                "no_credentials",
                peer,
                "this node has no [backhaul] ca, cert and key (insecure = true: labs only)",
            )
            raise BackhaulRefusedError(f"no backhaul certificate to reach {peer!r} with")
        hold = _Hold()
        loop = self.loop
        t: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(target.connect_timeout):
                raw, _ = await loop.create_connection(lambda: hold, target.host, target.port)
                try:
                    t = await loop.start_tls(
                        raw,
                        hold,
                        ctx,
                        server_hostname=peer,  # the session's key (PeerContext), not sent
                        ssl_handshake_timeout=target.connect_timeout,
                    )
                except BaseException:
                    raw.abort()
                    raise
        except (OSError, TimeoutError) as e:
            if hold.transport is None or isinstance(e, ConnectionRefusedError):
                raise  # no TCP connection: not a handshake's business
            reason, detail = _why(e)
            self.log.refuse(SIDE_CONNECT, reason, peer, f"{target.host}:{target.port}: {detail}")
            if isinstance(e, TimeoutError):
                raise
            raise BackhaulRefusedError(f"peer {peer!r}: {reason}") from None
        if t is None:  # the connection went away as the handshake ended
            raise BackhaulRefusedError(f"peer {peer!r} closed the connection after the handshake")
        node = node_of_peercert(t.get_extra_info("peercert"))
        if node != peer:
            t.abort()
            reason = "not_a_node" if node is None else "wrong_node"
            said = "no node name" if node is None else f"node {node!r}'s certificate"
            self.log.refuse(
                SIDE_CONNECT, reason, peer, f"{target.host}:{target.port} presented {said}"
            )
            raise BackhaulRefusedError(f"peer {peer!r}: {reason}")
        if hold.lost:
            raise BackhaulRefusedError(f"peer {peer!r} closed the connection after the handshake")
        ctx.remember(peer, t.get_extra_info("ssl_object"))
        self.done(SIDE_CONNECT, t)
        return t, hold.early
