"""HTTP/2 to peer nodes: this worker's multiplexed backhaul connections, for requests
that came as HTTP/2.

Owns, per peer, a few HTTP/2 connections to its backhaul listener (opened on demand:
mutual TLS with ALPN h2, or prior knowledge when `[backhaul] insecure`; reused; at most
MAX_CONNS, each with at most the streams the peer allows and MAX_STREAMS; closed when
idle), their frames, their receive windows (adaptive: proxy.worker.h2window) and a
GOAWAY or a death with streams open (each stream's exchange hears a lost connection).
A stream is a StreamLink (proxy.worker.h2link) under an UpstreamConnection. It must not
route, retry or check a peer's identity (the exchange and backhaul_tls do).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from proxy.worker.h2link import StreamLink
from proxy.worker.h2window import WindowTuner
from proxy.worker.upstream import UpstreamConnection

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.config_http2 import Http2Config
    from proxy.core.target import Target
    from proxy.worker.upstream import Pool

    Handshake = Callable[[Target, bool], Awaitable[tuple[asyncio.Transport, bytes]]]
    Http11 = Callable[[Pool, Target, asyncio.Transport, bytes], UpstreamConnection]


class PeerH2Connection(H2Connection):
    """h2's client connection, kept receiving after a GOAWAY. The library moves to CLOSED
    on any GOAWAY and then refuses every frame (ProtocolError), and it drops what it had
    queued: that would fail the streams a draining peer still serves. RFC 9113 6.8 lets
    them finish up to the GOAWAY's last stream id, and a peer's drain sends a first GOAWAY
    naming 2^31-1 and a PING before the final one. No new stream is opened on it
    (PeerConn.draining); the streams past the last id are lost unprocessed."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        ev = ConnectionTerminated()
        ev.error_code = _error_code(frame.error_code)
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


def _error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code  # an unknown code is kept as its number (RFC 9113 7)


MAX_CONNS: Final = 4  # HTTP/2 connections per peer per worker
MAX_STREAMS: Final = 100  # streams per connection (fewer if the peer says so)
H1_ONLY_FOR: Final = 60.0  # seconds a peer that did not choose h2 is reached as HTTP/1.1


class PeerConn:
    """One HTTP/2 connection to a peer's backhaul listener (client side)."""

    def __init__(self, peers: H2Peers, key: str, tls: bool) -> None:
        self.peers = peers
        self.loop = peers.loop
        self.key = key
        self.scheme = b"https" if tls else b"http"
        cfg = peers.cfg
        self.h2 = PeerH2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.links: dict[int, StreamLink] = {}
        self.starting: set[StreamLink] = set()  # opened, their HEADERS not sent yet
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.draining = False  # GOAWAY came: no new stream here
        self.write_paused = False
        self.idle: asyncio.TimerHandle | None = None
        self.tuner = WindowTuner(self.h2, cfg) if cfg.adaptive_window else None

    # asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast("asyncio.Transport", transport)
        cfg = self.peers.cfg
        h = self.h2
        values = {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: cfg.initial_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
        }
        h.local_settings = Settings(client=True, initial_values=values)
        h.initiate_connection()  # the preface, then our SETTINGS as the values above
        if cfg.connection_window > 65535:
            h.increment_flow_control_window(cfg.connection_window - 65535)
        t.write(h.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.peers.forget(self)
        self.cancel_idle()
        for link in list(self.links.values()):
            link.lost()
        for link in list(self.starting):
            link.lost(True)  # nothing of it left
        self.links.clear()
        self.starting.clear()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for link in list(self.links.values()):
            link.push()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.close()
            return
        now = self.loop.time()
        links = self.links
        for ev in events:
            kind = type(ev)
            if kind is DataReceived:
                d = cast("DataReceived", ev)
                n = d.flow_controlled_length or 0
                if self.tuner is not None:
                    self.tuner.data(n, now)
                link = links.get(d.stream_id or 0)
                if link is None:
                    self.ack(d.stream_id or 0, n)
                else:
                    link.on_data(d.data or b"", n, d.stream_ended is not None)
            elif kind is ResponseReceived or kind is InformationalResponseReceived:
                r = cast("ResponseReceived", ev)
                link = links.get(r.stream_id or 0)
                if link is not None:
                    ended = kind is ResponseReceived and r.stream_ended is not None
                    link.on_response(cast("list[tuple[bytes, bytes]]", r.headers or []), ended)
            elif kind is StreamEnded:  # after DATA or a head that carried it: done already
                link = links.get(cast("StreamEnded", ev).stream_id or 0)
                if link is not None:
                    link.on_end()
            elif kind is TrailersReceived:
                tr = cast("TrailersReceived", ev)
                link = links.get(tr.stream_id or 0)
                if link is not None:
                    link.on_trailers(cast("list[tuple[bytes, bytes]]", tr.headers or []))
            elif kind is StreamReset:
                rs = cast("StreamReset", ev)
                refused = rs.error_code == ErrorCodes.REFUSED_STREAM
                if refused and not self.draining:
                    # A peer that refuses streams (draining, at its limit): new ones go
                    # on a new connection (to its next generation, say); this one ends
                    # with its last stream.
                    self.draining = True
                    self.peers.forget(self)
                link = links.get(rs.stream_id or 0)
                if link is not None:
                    link.lost(refused)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                sid = cast("WindowUpdated", ev).stream_id if kind is WindowUpdated else 0
                targets = [links[sid]] if sid and sid in links else list(links.values())
                for link in targets:
                    if link.pending or link.fin:
                        link.push()
            elif kind is PingAckReceived:
                if self.tuner is not None:
                    self.tuner.ack(cast("PingAckReceived", ev).ping_data or b"", now)
            elif kind is ConnectionTerminated:
                self.goaway(cast("ConnectionTerminated", ev).last_stream_id)
        self.flush()

    # streams -------------------------------------------------------------------------
    def room(self) -> bool:
        """A new stream may open here now."""
        if self.closed or self.draining or self.transport is None:
            return False
        allowed = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        return len(self.links) + len(self.starting) < allowed

    def open_stream(self, pool: Pool) -> UpstreamConnection:
        """A new stream, as a fresh UpstreamConnection of `pool` (never pooled)."""
        self.cancel_idle()
        up = UpstreamConnection(pool, self.key)
        link = StreamLink(self, 0, up)
        self.starting.add(link)
        up.connection_made(cast("asyncio.BaseTransport", link))
        return up

    def send_headers(self, link: StreamLink, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        """The stream's id is taken now, as its HEADERS go (ids must rise in the order
        streams open: RFC 9113 5.1.1), not when the exchange got it."""
        self.starting.discard(link)
        if self.closed or self.draining:
            link.lost(True)
            return
        sid = link.sid = self.h2.get_next_available_stream_id()
        self.links[sid] = link
        try:
            self.h2.send_headers(sid, fields, end_stream=end)
        except ProtocolError:
            link.lost()
            return
        self.flush()

    def send_data(self, sid: int, pending: deque[bytes], fin: bool) -> tuple[int, bool]:
        """Send from `pending` what the windows allow, END_STREAM with the last of it when
        `fin` (alone when nothing is pending); (bytes sent, END_STREAM sent)."""
        if self.write_paused or self.closed:
            return 0, False
        h = self.h2
        sent = 0
        ended = False
        try:
            if fin and not pending:
                h.end_stream(sid)
                ended = True
            while pending:
                window = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
                if window <= 0:
                    break
                data = pending[0]
                if len(data) > window:
                    pending[0] = data[window:]
                    data = data[:window]
                else:
                    pending.popleft()
                sent += len(data)
                ended = fin and not pending
                h.send_data(sid, data, end_stream=ended)
        except ProtocolError:
            link = self.links.get(sid)
            if link is not None:
                link.lost()
        self.flush()
        return sent, ended

    def ack(self, sid: int, n: int) -> None:
        if n and sid and not self.closed:
            with contextlib.suppress(ProtocolError):
                self.h2.acknowledge_received_data(n, sid)
            self.flush()

    def reset(self, sid: int, code: int) -> None:
        if sid and not self.closed:
            with contextlib.suppress(ProtocolError):
                self.h2.reset_stream(sid, code)
            self.flush()

    def forget(self, link: StreamLink) -> None:
        self.starting.discard(link)
        if self.links.get(link.sid) is link:
            del self.links[link.sid]
        if not self.links and not self.starting and not self.closed:
            if self.draining:
                self.close()
            else:
                self.idle = self.loop.call_later(self.peers.idle_timeout, self.idle_close)

    def goaway(self, last: int | None) -> None:
        """The peer goes away: streams past `last` were not processed (they are lost
        before any response: the exchange retries them as its rules allow)."""
        self.draining = True
        self.peers.forget(self)
        for link in list(self.starting):
            link.lost(True)  # nothing of it was sent
        for sid, link in list(self.links.items()):
            if last is not None and sid > last:
                link.lost(True)
        if not self.links:
            self.close()

    # the connection --------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        t = self.transport
        if data and t is not None and not t.is_closing():
            t.write(data)

    def cancel_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def idle_close(self) -> None:
        self.idle = None
        if not self.links and not self.starting:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.peers.forget(self)
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection()
        self.flush()
        t = self.transport
        if t is not None:
            t.close()


class H2Peers:
    """This worker's HTTP/2 connections to peers, by target key (one node's backhaul)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cfg: Http2Config,
        idle_timeout: float,
        handshake: Handshake | None,
        http11: Http11 | None,
    ) -> None:
        self.loop = loop
        self.cfg = cfg
        self.idle_timeout = idle_timeout
        self.handshake = handshake  # mutual TLS (None: [backhaul] insecure, plaintext)
        self.http11 = http11
        self.conns: dict[str, list[PeerConn]] = {}
        self.opening: dict[str, asyncio.Future[PeerConn | None]] = {}
        self.h1_until: dict[str, float] = {}  # peers that did not choose h2, until when

    async def stream(self, pool: Pool, target: Target) -> UpstreamConnection:
        """A new stream to `target`'s node (or, when that peer does not speak HTTP/2 or
        its connections are full, an HTTP/1.1 connection). Raises as a connect does."""
        key = target.key
        until = self.h1_until.get(key)
        if until is not None and self.loop.time() < until:
            return await self.connect_http11(pool, target)
        conn = self.pick(key)
        if conn is None:
            fut = self.opening.get(key)
            if fut is not None:
                conn = await asyncio.shield(fut)  # one opening per peer: share it
            elif len(self.conns.get(key, ())) >= MAX_CONNS:
                return await self.connect_http11(pool, target)  # all full: as before
            else:
                conn = await self.open_shared(pool, target)
            if conn is None:  # the peer chose HTTP/1.1
                return await self.connect_http11(pool, target)
            if not conn.room():
                conn = self.pick(key)
                if conn is None:
                    return await self.connect_http11(pool, target)
        return conn.open_stream(pool)

    async def open_shared(self, pool: Pool, target: Target) -> PeerConn | None:
        """open(), its outcome shared with the requests that come meanwhile."""
        key = target.key
        fut: asyncio.Future[PeerConn | None] = self.loop.create_future()
        self.opening[key] = fut
        try:
            conn = await self.open(pool, target)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved here: only the waiters (if any) raise it
            raise
        finally:
            if self.opening.get(key) is fut:
                del self.opening[key]
        fut.set_result(conn)
        return conn

    def pick(self, key: str) -> PeerConn | None:
        for c in self.conns.get(key, ()):
            if c.room():
                return c
        return None

    async def open(self, pool: Pool, target: Target) -> PeerConn | None:
        """A new connection to `target`'s node; None when the peer chose HTTP/1.1."""
        key = target.key
        if self.handshake is None:
            conn = PeerConn(self, key, False)
            async with asyncio.timeout(target.connect_timeout):
                proto: Any = conn
                await self.loop.create_connection(lambda: proto, target.host, target.port)
        else:
            t, early = await self.handshake(target, True)
            obj = t.get_extra_info("ssl_object")
            if obj is None or obj.selected_alpn_protocol() != "h2":
                self.h1_until[key] = self.loop.time() + H1_ONLY_FOR
                t.close()
                return None
            conn = PeerConn(self, key, True)
            t.set_protocol(cast("asyncio.BaseProtocol", conn))
            conn.connection_made(t)
            if early:
                conn.data_received(early)
        if conn.closed:
            raise ConnectionResetError(f"peer {target.node!r} closed the HTTP/2 connection")
        self.conns.setdefault(key, []).append(conn)
        return conn

    async def connect_http11(self, pool: Pool, target: Target) -> UpstreamConnection:
        if self.handshake is not None and self.http11 is not None:
            t, early = await self.handshake(target, False)
            return self.http11(pool, target, t, early)
        return await pool.connect(target.key, target.host, target.port, target.connect_timeout)

    def forget(self, conn: PeerConn) -> None:
        conns = self.conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.conns[conn.key]

    def close_all(self) -> None:
        for conns in list(self.conns.values()):
            for c in list(conns):
                c.close()
