"""The edge TLS shell: HTTPS listeners, the ClientHello read before OpenSSL, the handshake.

Owns accepting on this worker's HTTPS sockets, the wait for a complete ClientHello,
the alert and close of a hello our parser refuses (proxy.core.clienthello), the choice
of certificate by SNI (proxy.worker.certs) and the handshake, all bounded by
`[timeouts] tls_handshake` and `[tls] max_handshakes`. Once the handshake is done the
connection is an ordinary client connection (proxy.worker.client) that knows the app
its SNI named. It must not parse HTTP or choose instances.

Why the hello is read with MSG_PEEK: Python's ssl (and uvloop's TLS transport) cannot
be handed bytes already read from the socket, so the hello stays in the kernel's
buffer until our parser accepts it, and OpenSSL then reads it from the socket as if
nothing had happened. While a hello is incomplete, SO_RCVLOWAT is set to the byte count
the parser needs, so the socket is not reported readable (and re-peeked) for every
segment of a slow or hostile client. A hello is at most MAX_HELLO bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
from typing import TYPE_CHECKING, Any

from proxy.core.cert_reasons import REASONS as CERT_REASONS
from proxy.core.clienthello import (
    ALERT_NO_APPLICATION_PROTOCOL,
    ALERT_UNRECOGNIZED_NAME,
    MAX_HELLO,
    REASONS,
    Hello,
    HelloError,
    alert_record,
    parse_client_hello,
)
from proxy.telemetry.families import (
    CERT_EVENTS,
    TLS_HANDSHAKE_FAILED,
    TLS_HANDSHAKE_TIMEOUT,
    TLS_HELLO_EOF,
    TLS_HELLO_REFUSED,
    TLS_HELLO_TIMEOUT,
    TLS_NO_ALPN,
    TLS_NO_CERT,
    TLS_OK,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

    from proxy.config import Config
    from proxy.telemetry.metrics import WorkerStats
    from proxy.worker.certs import CertCache

# What this edge speaks, and so all it may advertise; OpenSSL picks in this order, so a
# client that offers h2 gets HTTP/2 (proxy.worker.h2select).
ALPN = (b"h2", b"http/1.1")
ACCEPT_BATCH = 64  # connections accepted per readable listener, before yielding
LINGER = 1.0  # seconds a refused client may go on sending before it is closed anyway
ACCEPT_RETRY = 0.1  # seconds accepting rests after the process ran out of descriptors


class TlsEdge:
    """This worker's HTTPS listeners and the connections still in their handshake."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        certs: CertCache,
        stats: WorkerStats,
        factory: Callable[[str | None], Callable[[], Any]],
        app_for_host: Callable[[str], str | None],
    ) -> None:
        self.loop = loop
        self.certs = certs
        self.timeout = config.timeouts.tls_handshake
        self.default_host = config.tls.default_host
        self.alpn = ALPN
        self.max_pending = config.tls.max_handshakes
        self.factory = factory  # sni_app -> protocol factory of the connection
        self.app_for_host = app_for_host
        self.outcomes = stats.family("tls_connections_total")
        self.refusals = stats.family("tls_hellos_refused_total")
        self.cert_events = stats.family("tls_certificate_events_total")
        self.cert_rejected = stats.family("tls_certificates_rejected_total")
        self.socks: list[socket.socket] = []
        self.polling = False
        self.allowed = True  # the worker's say (max_connections, drain)
        self.pending: set[_Handshake] = set()
        self.rest: asyncio.TimerHandle | None = None

    # listeners -----------------------------------------------------------------
    def add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socks.append(sock)

    def accepting(self, allowed: bool) -> None:
        """The worker allows accepting (or not: at max_connections, draining)."""
        self.allowed = allowed
        self._poll()

    def close(self) -> None:
        """Stop accepting for good (a drain): handshakes in progress go on to their end."""
        self.allowed = False
        self._poll()
        for sock in self.socks:
            sock.close()
        self.socks = []
        if self.rest is not None:
            self.rest.cancel()
            self.rest = None

    async def start(self) -> None:
        """Certificates first (the directory's first scan), then accepting."""
        await self.certs.start()
        self.accepting(True)

    async def stop(self) -> None:
        """Drop the handshakes in progress (the worker stops now) and the certificates."""
        for h in list(self.pending):
            h.finish(-1)
        await self.certs.close()

    def publish(self) -> None:
        """Copy the certificate cache's counters into the stats (about once a second)."""
        c = self.certs.counters
        events = self.cert_events
        for i, name in enumerate(CERT_EVENTS):
            events[i] = getattr(c, name)
        rejected = self.cert_rejected
        for i, reason in enumerate(CERT_REASONS):
            rejected[i] = c.rejected.get(reason, 0)

    def _poll(self) -> None:
        want = (
            self.allowed
            and self.rest is None
            and len(self.pending) < self.max_pending
            and bool(self.socks)
        )
        if want == self.polling:
            return
        self.polling = want
        for sock in self.socks:
            if want:
                self.loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                self.loop.remove_reader(sock.fileno())

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.pending) >= self.max_pending:
                break  # paused, not refused: the listen queue holds the rest
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # EMFILE/ENFILE/ENOBUFS: rest a moment instead of spinning on the queue.
                print(f"edgeproxy worker: accept on a TLS listener: {e}", file=sys.stderr)
                self.rest = self.loop.call_later(ACCEPT_RETRY, self._rested)
                break
            sock.setblocking(False)
            # No TCP_NODELAY here: the transport sets it (uvloop and asyncio both do),
            # and the one write before that, a refusal's alert, is the first segment
            # on the connection, which Nagle never holds back.
            h = _Handshake(self, sock, self.loop.time() + self.timeout)
            self.pending.add(h)
            h.start()
        self._poll()

    def _rested(self) -> None:
        self.rest = None
        self._poll()

    def finished(self, h: _Handshake, outcome: int) -> None:
        self.pending.discard(h)
        if outcome >= 0:
            self.outcomes[outcome] += 1
        self._poll()

    # the name ------------------------------------------------------------------
    def sni_app(self, hello: Hello) -> str | None:
        """The app the SNI names ("" when none); None without SNI (no Host check)."""
        if hello.sni is None:
            return None
        return self.app_for_host(hello.sni) or ""


class _Handshake:
    """One accepted HTTPS connection, from accept to a finished handshake (or a close)."""

    __slots__ = ("edge", "fd", "hello", "outcome", "seen", "sock", "task", "timer", "waiting")

    def __init__(self, edge: TlsEdge, sock: socket.socket, deadline: float) -> None:
        self.edge = edge
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.hello: Hello | None = None
        self.waiting = False  # reading the hello (a reader is registered)
        self.seen = 0  # bytes of hello peeked so far
        self.outcome = -1  # what to count once a refused connection is closed
        self.task: asyncio.Task[None] | None = None
        self.timer = edge.loop.call_at(deadline, self.expired)

    def start(self) -> None:
        """Peek at once: a client sends its hello right after the TCP handshake, so it is
        often in the buffer already at accept, and then no reader is registered (and
        removed) for it at all. Otherwise wait until the socket is readable."""
        if self.peek():
            self.waiting = True
            self.edge.loop.add_reader(self.fd, self.peek)

    def peek(self) -> bool:
        """Read the hello so far; True while it is incomplete (wait for more)."""
        sock = self.sock
        if sock is None:
            return False
        try:
            data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self.finish(TLS_HELLO_EOF)
            return False
        if not data:
            self.finish(TLS_HELLO_EOF)
            return False
        try:
            res = parse_client_hello(data)
        except HelloError as e:
            self.edge.refusals[REASONS.index(e.reason)] += 1
            self.refuse(e.alert, TLS_HELLO_REFUSED)
            return False
        if isinstance(res, int):
            if len(data) <= self.seen:
                # Readable with nothing new: below SO_RCVLOWAT only the peer's FIN (or an
                # error) wakes us. The hello will never complete.
                self.finish(TLS_HELLO_EOF)
                return False
            self.seen = len(data)
            # Not readable again before the parser can go further (and no more than a
            # hello can be: the parser refuses past MAX_HELLO).
            _lowat(sock, min(res, MAX_HELLO))
            return True
        self.stop_reading()
        if self.seen:  # SO_RCVLOWAT was raised (only ever after a partial hello)
            _lowat(sock, 1)
        self.hello = res
        self.choose(res)
        return False

    def stop_reading(self) -> None:
        if self.waiting:
            self.waiting = False
            self.edge.loop.remove_reader(self.fd)

    def choose(self, hello: Hello) -> None:
        edge = self.edge
        if hello.alpn is not None and not any(p in edge.alpn for p in hello.alpn):
            # RFC 7301 3.2: offered protocols, none of them ours. OpenSSL (through
            # Python) would go on without ALPN and the client would speak what it offered.
            self.refuse(ALERT_NO_APPLICATION_PROTOCOL, TLS_NO_ALPN)
            return
        name = hello.sni or edge.default_host
        if name is None:
            self.refuse(ALERT_UNRECOGNIZED_NAME, TLS_NO_CERT)
            return
        ctx = edge.certs.lookup(name)
        if ctx is not None:
            self.handshake(ctx)
            return
        self.task = edge.loop.create_task(self.fetch(name))

    async def fetch(self, name: str) -> None:
        # Shielded: other handshakes may share this fetch; a timeout here cancels only us.
        ctx = await asyncio.shield(self.edge.certs.get(name))
        if self.sock is None:
            return  # timed out meanwhile
        if ctx is None:
            self.refuse(ALERT_UNRECOGNIZED_NAME, TLS_NO_CERT)
            return
        self.task = None
        self.handshake(ctx)

    def handshake(self, ctx: ssl.SSLContext) -> None:
        edge = self.edge
        sock = self.sock
        assert sock is not None and self.hello is not None
        remaining = max(0.001, self.timer.when() - edge.loop.time())
        factory = edge.factory(edge.sni_app(self.hello))
        self.task = edge.loop.create_task(self.run_handshake(sock, ctx, factory, remaining))

    async def run_handshake(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        factory: Callable[[], Any],
        timeout: float,
    ) -> None:
        self.sock = None  # the transport owns it from here
        self.timer.cancel()
        try:
            await self.edge.loop.connect_accepted_socket(
                factory, sock, ssl=ctx, ssl_handshake_timeout=timeout
            )
        except TimeoutError:
            self.done(TLS_HANDSHAKE_TIMEOUT, sock)
        except (OSError, EOFError):  # ssl.SSLError is an OSError
            self.done(TLS_HANDSHAKE_FAILED, sock)
        except asyncio.CancelledError:
            self.done(-1, sock)
            raise
        else:
            self.done(TLS_OK, None)

    def done(self, outcome: int, sock: socket.socket | None) -> None:
        if sock is not None and sock.fileno() >= 0:
            sock.close()
        self.task = None
        self.edge.finished(self, outcome)

    def expired(self) -> None:
        """[timeouts] tls_handshake passed before a hello (or a certificate) was had."""
        self.finish(TLS_HELLO_TIMEOUT)

    def refuse(self, description: int, outcome: int) -> None:
        """A fatal alert, then a lingering close: our FIN goes out and what the client
        still sends is read and dropped until it closes (at most LINGER seconds). Closing
        with its bytes unread would send a reset, which can overtake the alert (and a
        client still writing its hello would fail on EPIPE instead of reading it)."""
        sock = self.sock
        if sock is None:
            return
        self.stop_reading()
        with contextlib.suppress(OSError):
            sock.send(alert_record(description))
            sock.shutdown(socket.SHUT_WR)
        if self.seen:
            _lowat(sock, 1)
        self.outcome = outcome
        self.timer.cancel()
        self.timer = self.edge.loop.call_later(LINGER, self.lingered)
        self.waiting = True
        self.edge.loop.add_reader(self.fd, self.discard)

    def discard(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.finish(self.outcome)

    def lingered(self) -> None:
        self.finish(self.outcome)

    def finish(self, outcome: int) -> None:
        """Close before the handshake started (or drop it at shutdown: outcome -1)."""
        self.stop_reading()
        self.timer.cancel()
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            if self.sock is None:
                return  # the handshake task closes its socket and reports
        sock, self.sock = self.sock, None
        if sock is not None:
            _close_now(sock)
        self.edge.finished(self, outcome)


def _lowat(sock: socket.socket, n: int) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)


def _close_now(sock: socket.socket) -> None:
    """Close cleanly: the peeked hello is read off first (unread bytes would turn the
    close into a reset, which can overtake the alert just sent), then a FIN."""
    try:
        for _ in range(4):
            if not sock.recv(MAX_HELLO):
                break
    except OSError:
        pass
    sock.close()
