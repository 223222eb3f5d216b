"""HTTP/2 from clients: one asyncio protocol per connection, its streams through the
same request path as HTTP/1.1.

Owns the h2 library's connection (frames, HPACK, flow-control bookkeeping), our
SETTINGS, each client frame's event (a request becomes a stream, proxy.worker.h2stream,
started once the whole read is handled, so a stream reset in the same read never
reaches an instance), the connection's protections (rapid reset, PING and SETTINGS
floods as budgets, proxy.core.h2_guard, and the frames that carry no progress counted
by proxy.worker.h2frames; HPACK bombs and CONTINUATION floods bounded by the library;
streams past max_concurrent_streams refused; malformed requests reset,
proxy.core.h2_head), the two-step GOAWAY when the worker drains (proxy.core.h2_drain
decides), the writes to the socket and the connection's deadlines. It must not route
or relay a request (the exchange does) nor frame a response (the stream does).
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
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream as LibStream
from hyperframe.frame import GoAwayFrame

from proxy.core import h2_drain
from proxy.core.h2_drain import Drain
from proxy.core.h2_guard import Budget, FrameGuard
from proxy.core.h2_head import CONNECTION_SPECIFIC, CONTENT_LENGTH, StreamError, fill_request
from proxy.core.headers import HeadError
from proxy.core.request import Request
from proxy.core.request_head import FWD_APPEND, FWD_KEEP, FWD_SET, Front
from proxy.telemetry.families import (
    H2_CLIENT_RESET,
    H2_CONNECTION_SPECIFIC,
    H2_CONTENT_LENGTH,
    H2_CONTINUATION_FLOOD,
    H2_DRAIN_GOAWAY,
    H2_DRAIN_REFUSED,
    H2_HPACK_BOMB,
    H2_MALFORMED,
    H2_PING_FLOOD,
    H2_PROTOCOL_ERROR,
    H2_RAPID_RESET,
    H2_REFUSED_STREAM,
    H2_SETTINGS_FLOOD,
    H2_STALLED,
    H2_STREAMS,
    SHED_LOOP_LAG,
)
from proxy.worker.h2frames import FloodError, GuardedConnection
from proxy.worker.h2stream import H2Stream
from proxy.worker.h2window import WindowTuner

if TYPE_CHECKING:
    from h2.connection import AllowedStreamIDs

    from proxy.worker.context import WorkerContext

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4
_CHECK: Final = 0.5  # seconds between looks at the streams' deadlines while any is open
# The library's own hard bound on open streams (a connection error past it, since the
# header block is then not decoded); ours, max_concurrent_streams, is a stream error.
_HARD_STREAMS: Final = 2
_KIND: Final = {
    "malformed": H2_MALFORMED,
    CONNECTION_SPECIFIC: H2_CONNECTION_SPECIFIC,
    CONTENT_LENGTH: H2_CONTENT_LENGTH,
}
_ACK_WAIT: Final = 1.0  # seconds a draining connection waits for its PING's ACK
_END_MARGIN: Final = 0.5  # seconds before drain_timeout a draining connection ends


class _Stream(LibStream):
    """The library's stream without its content-length check, which fails the whole
    connection; RFC 9113 8.1.1 makes a mismatch a stream error (h2stream checks it)."""

    def _initialize_content_length(self, headers: Any) -> None:
        pass

    def _track_content_length(self, length: int, end_stream: bool) -> None:
        pass


class _Connection(GuardedConnection):
    def _begin_new_stream(self, stream_id: int, allowed_ids: AllowedStreamIDs) -> LibStream:
        s = super()._begin_new_stream(stream_id, allowed_ids)
        s.__class__ = _Stream
        return s


def _config() -> H2Configuration:
    # Inbound fields are checked by proxy.core.h2_head (a malformed request is a stream
    # error there; the library would fail the connection). Outbound ones are ours.
    return H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


class H2Front:
    """One client's HTTP/2 connection (over TLS with ALPN h2, or h2c prior knowledge)."""

    def __init__(
        self, ctx: WorkerContext, sni_app: str | None, tls: bool, backhaul: bool = False
    ) -> None:
        self.ctx = ctx
        self.cfg = cfg = ctx.config.http2
        self.sni_app = sni_app
        self.tls = tls
        # A peer node's (the backhaul listener's, ALPN h2): its streams name their
        # instance and keep the forwarding fields its edge set, as over HTTP/1.1.
        self.backhaul = backhaul
        self.transport: asyncio.Transport | None = None
        self.front = Front(FWD_SET, b"unknown", b"https" if tls else b"http", b"0")
        self.guard = FrameGuard(cfg.flood_rate, cfg.flood_burst)
        self.h2: H2Connection = _Connection(_config(), self.guard, ctx.loop.time)
        self.streams: dict[int, H2Stream] = {}
        self.queue: deque[Request] = deque()  # requests in flight (the worker's gauge)
        self.starting: list[H2Stream] = []  # made in this read, started after it
        self.dirty: list[H2Stream] = []  # with response bytes held for this iteration
        self.queued = False  # in the worker's WriteBatch
        self.write_paused = False
        self.deadline = 0.0
        self.closed = False
        self.stats = ctx.stats.family("http2_events_total")
        self.resets = Budget(cfg.reset_rate, cfg.reset_burst)
        self.pings = Budget(cfg.flood_rate, cfg.flood_burst)
        self.settings = Budget(cfg.flood_rate, cfg.flood_burst)
        self.drainer: Drain | None = None  # the two-step GOAWAY, once the worker drains
        # The receive windows grow with the measured BDP (client uploads).
        self.tuner = WindowTuner(self.h2, cfg) if cfg.adaptive_window else None

    # asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self.transport = cast("asyncio.Transport", transport)
        ctx = self.ctx
        peer = t.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        local = t.get_extra_info("sockname")
        port = str(local[1]).encode() if local else b"0"
        if self.backhaul:
            mode = FWD_KEEP
        elif ctx.trusted_forwarder(ip):
            mode = FWD_APPEND
        else:
            mode = FWD_SET
        self.front = Front(mode, ip.encode(), b"https" if self.tls else b"http", port)
        t.set_write_buffer_limits(high=ctx.limits.response_buffer)
        cfg = self.cfg
        h = self.h2
        values = {
            SettingCodes.MAX_CONCURRENT_STREAMS: cfg.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: cfg.initial_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
            SettingCodes.ENABLE_PUSH: 0,
        }
        h.local_settings = Settings(client=False, initial_values=values)
        h.initiate_connection()  # our SETTINGS, as the values above
        # What the library enforces by itself: a wider stream bound (ours is a stream
        # error, see RequestReceived) and the decoded header list (HPACK bomb).
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = cfg.max_concurrent_streams * _HARD_STREAMS
        h.local_settings = Settings(client=False, initial_values=values)
        h.decoder.max_header_list_size = cfg.max_header_list_size
        if cfg.connection_window > 65535:
            h.increment_flow_control_window(cfg.connection_window - 65535)
        t.write(h.data_to_send())
        ctx.opened(self)
        now = ctx.loop.time()
        self.deadline = now + ctx.timeouts.client_header
        if ctx.draining:  # the TLS handshake ended after the worker began to drain
            self.drain(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.closed(self)
        for s in list(self.streams.values()):
            s.gone()
        self.streams.clear()
        self.transport = None

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading it too (its PINGs and
        SETTINGS must not grow our output while it does not take it), and the streams'
        upstreams."""
        self.write_paused = True
        t = self.transport
        if t is not None:
            t.pause_reading()
        for s in self.streams.values():
            s.connection_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()
        for s in self.streams.values():
            s.connection_paused(False)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except DenialOfServiceError:
            # A header list past max_header_list_size once decoded (HPACK bomb).
            self.count(H2_HPACK_BOMB)
            self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            return
        except FloodError as e:
            self.count(e.event)  # the library has queued GOAWAY ENHANCE_YOUR_CALM
            self.goaway(e.error_code)
            return
        except ProtocolError as e:
            # The library has queued its GOAWAY with the error's code already. A header
            # block past its 64 CONTINUATION frames (at most 64 x 16 KiB held) is a
            # flood (CVE-2024-27316 class): counted apart, ended the same way.
            flood = "continuation frames" in str(e).lower()
            self.count(H2_CONTINUATION_FLOOD if flood else H2_PROTOCOL_ERROR)
            self.goaway(e.error_code)
            return
        now = self.ctx.loop.time()
        for ev in events:
            if self.closed:  # a stream error past the reset budget ended it
                return
            kind = type(ev)
            if kind is DataReceived:
                d = cast("DataReceived", ev)
                if self.tuner is not None:
                    self.tuner.data(d.flow_controlled_length or 0, now)
                s = self.streams.get(d.stream_id or 0)
                if s is None:
                    self.ack(d.stream_id or 0, d.flow_controlled_length or 0)
                else:
                    s.on_data(d.data or b"", d.flow_controlled_length or 0)
            elif kind is RequestReceived:
                self.request(cast("RequestReceived", ev))
            elif kind is StreamEnded:
                s = self.streams.get(cast("StreamEnded", ev).stream_id or 0)
                if s is not None:
                    s.on_end()
            elif kind is WindowUpdated:
                self.window(cast("WindowUpdated", ev).stream_id or 0)
            elif kind is StreamReset:
                if not self.client_reset(cast("StreamReset", ev)):
                    return
            elif kind is PingReceived:
                if not self.pings.spend(now):
                    self.count(H2_PING_FLOOD)
                    self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
                    return
            elif kind is PingAckReceived:
                data = cast("PingAckReceived", ev).ping_data or b""
                dr = self.drainer
                if dr is not None and data == h2_drain.PING_DATA:
                    self.drain_act(
                        dr.ping_ack(data, self.h2.highest_inbound_stream_id, len(self.streams))
                    )
                    if self.closed:
                        return
                elif self.tuner is not None and self.tuner.owns(data):  # the BDP PING's
                    self.tuner.ack(data, now)
                elif not self.pings.spend(now):  # ACKs of PINGs we never sent
                    self.count(H2_PING_FLOOD)
                    self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
                    return
            elif kind is RemoteSettingsChanged:
                if not self.settings.spend(now):
                    self.count(H2_SETTINGS_FLOOD)
                    self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
                    return
                self.window(0)  # a new initial window may open the streams' windows
            elif kind is ConnectionTerminated:
                self.goaway(ErrorCodes.NO_ERROR)
                return
            # TrailersReceived: not forwarded (as over HTTP/1.1); its END_STREAM follows.
        starting = self.starting
        if starting:
            self.starting = []
            for s in starting:
                if not s.ended:  # not reset in the same read: no work for a reset stream
                    s.start()
        self.flush_soon()

    # events --------------------------------------------------------------------------
    def request(self, ev: RequestReceived) -> None:
        sid = ev.stream_id or 0
        h = self.h2
        ctx = self.ctx
        d = self.drainer
        late = d is not None and not d.admits(sid)  # after the final GOAWAY (RFC 9113 6.8)
        # A peer's stream while shedding goes on to the exchange: it answers the "full"
        # reject there, as over HTTP/1.1, and the edge retries elsewhere.
        shed = ctx.shedding and not self.backhaul
        if len(self.streams) >= self.cfg.max_concurrent_streams or late or shed:
            # RFC 9113 5.1.2 / 8.7: nothing of it was processed, the client may retry it
            # (elsewhere). Shedding ([overload] shed_lag_ms) refuses a stream as HTTP/1.1
            # gets its 503, before routing, and counts it the same.
            if shed:
                ctx.stats.families["shed_total"][SHED_LOOP_LAG] += 1
            self.count(H2_DRAIN_REFUSED if late else H2_REFUSED_STREAM)
            h.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        lim = self.ctx.limits
        r = Request(lim.max_headers, lim.max_header_bytes)
        r.h2 = True
        end = ev.stream_ended is not None
        refusal: HeadError | None = None
        trailers = False
        try:
            trailers = fill_request(r, cast("list[tuple[bytes, bytes]]", ev.headers or []), end)
        except StreamError as e:
            self.count(_KIND.get(e.kind, H2_MALFORMED))
            h.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)  # RFC 9113 8.1.1
            self.provoked_reset()
            return
        except HeadError as e:
            refusal = e
        r.complete = end
        self.count(H2_STREAMS)
        s = H2Stream(self, sid, r)
        s.wants_trailers = trailers
        self.streams[sid] = s
        self.queue.append(r)
        self.deadline = min(self.deadline, self.ctx.loop.time() + _CHECK)
        if refusal is not None:
            s.refuse(refusal.status, refusal.reason)
        else:
            self.starting.append(s)

    def client_reset(self, ev: StreamReset) -> bool:
        """The client reset a stream: its work stops now. False past the reset budget
        (CVE-2023-44487): the connection is closed with ENHANCE_YOUR_CALM."""
        self.count(H2_CLIENT_RESET)
        s = self.streams.get(ev.stream_id or 0)
        if s is not None:
            s.gone()
        if not self.resets.spend(self.ctx.loop.time()):
            self.count(H2_RAPID_RESET)
            self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            return False
        return True

    def window(self, sid: int) -> None:
        """Flow-control credit came: streams waiting on it send what they hold."""
        if sid:
            s = self.streams.get(sid)
            if s is not None and s.pending:
                s.push()
            return
        for s in list(self.streams.values()):
            if s.pending:
                s.push()

    def malformed(self, s: H2Stream, kind: str) -> None:
        """A request found malformed after it started (content-length vs DATA)."""
        self.count(_KIND.get(kind, H2_MALFORMED))
        s.reset(ErrorCodes.PROTOCOL_ERROR)
        self.provoked_reset()

    def provoked_reset(self) -> None:
        """A client that makes us reset its streams (CVE-2025-8671, "MadeYouReset": work
        started, then a malformed frame) spends the rapid reset budget as if it reset
        them itself: past it, GOAWAY ENHANCE_YOUR_CALM."""
        if not self.resets.spend(self.ctx.loop.time()):
            self.count(H2_RAPID_RESET)
            self.goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def count(self, event: int) -> None:
        self.stats[event] += 1

    def count_stall(self) -> None:
        self.stats[H2_STALLED] += 1

    # streams' bookkeeping ----------------------------------------------------------------
    def ack(self, sid: int, n: int) -> None:
        """`n` request bytes of stream `sid` are written upstream (or dropped): the client
        may send as many again."""
        if n and not self.closed:
            self.h2.acknowledge_received_data(n, sid)
            self.flush_soon()

    def request_done(self, r: Request) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(r)

    def stream_closed(self, s: H2Stream) -> None:
        if self.streams.get(s.sid) is s:
            del self.streams[s.sid]
        if not self.streams and not self.closed:
            d = self.drainer
            if d is not None:
                self.drain_act(d.stream_done(0))
            else:
                ctx = self.ctx
                self.deadline = ctx.loop.time() + ctx.timeouts.client_idle

    # output --------------------------------------------------------------------------
    def flush_soon(self) -> None:
        if not self.queued and not self.closed:
            self.queued = True
            self.ctx.batch.add_client(self)

    def flush_out(self) -> None:
        """The streams' held bytes become frames; what the library has goes out in one write."""
        self.queued = False
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for s in dirty:
                if s.queued:
                    s.queued = False
                    s.take_out()
                    s.push()
        data = self.h2.data_to_send()
        t = self.transport
        if data and t is not None and not t.is_closing():
            t.write(data)
            self.guard.sent(len(data))  # as many WINDOW_UPDATEs may answer it

    def goaway(self, code: int) -> None:
        """A connection error (or the end): GOAWAY with `code` (unless the library sent
        its own for the error it raised), every stream dropped, closed."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(code)
        self.end(self.h2.data_to_send())

    def end(self, data: bytes) -> None:
        """`data` is the last the client gets; every stream dropped, closed."""
        self.closed = True
        for s in list(self.streams.values()):
            s.gone()
        self.streams.clear()
        t = self.transport
        if t is not None:
            if data:
                t.write(data)
            t.close()

    def abort(self) -> None:
        self.closed = True
        for s in list(self.streams.values()):
            s.gone()
        t = self.transport
        if t is not None:
            t.abort()

    # the worker's sweep ------------------------------------------------------------------
    def on_deadline(self, now: float) -> None:
        d = self.drainer
        if d is not None:
            self.drain_act(d.tick(now, self.h2.highest_inbound_stream_id, len(self.streams)))
            if self.closed:
                return
        streams = self.streams
        if not streams:
            if d is None:
                self.goaway(ErrorCodes.NO_ERROR)  # idle (or no request since the preface)
            else:
                self.deadline = d.next_check()  # idle, waiting for the PING's ACK
            return
        for s in list(streams.values()):
            if (s.deadline and now >= s.deadline) or (s.stall_at and now >= s.stall_at):
                s.on_deadline(now)
        if self.streams:
            self.deadline = now + _CHECK
            if d is not None and d.next_check():
                self.deadline = min(self.deadline, d.next_check())
        self.flush_soon()

    # the worker's drain (proxy.core.h2_drain) -----------------------------------------------
    def drain(self, now: float) -> None:
        """The worker drains: the two-step GOAWAY (RFC 9113 6.8), then the end once the
        streams are done or at drain_timeout."""
        if self.drainer is not None or self.closed:
            return
        # The end comes a moment before the worker's own (which aborts what is left), so
        # that the last GOAWAY is written before the loop stops.
        timeout = self.ctx.config.workers.drain_timeout
        d = self.drainer = Drain(_ACK_WAIT, timeout - min(_END_MARGIN, timeout / 4))
        self.drain_act(d.start(now))
        self.deadline = min(self.deadline, d.next_check()) if self.deadline else d.next_check()

    def drain_act(self, act: int) -> None:
        """Do what the drain decided: GOAWAYs and PING out (after what is queued), close."""
        d = self.drainer
        if not act or d is None or self.closed:
            return
        h = self.h2
        out = h.data_to_send()
        # GOAWAY frames of our own, not the library's close_connection: that would end
        # its state machine, and the streams it covers must still be served.
        if act & h2_drain.ANNOUNCE:
            self.count(H2_DRAIN_GOAWAY)
            out += GoAwayFrame(0, last_stream_id=h2_drain.MAX_STREAM_ID).serialize()
            h.ping(h2_drain.PING_DATA)
            out += h.data_to_send()
        if act & h2_drain.FINAL:
            out += GoAwayFrame(0, last_stream_id=d.last_stream_id).serialize()
        if act & h2_drain.CLOSE:
            self.end(out)
            return
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.write(out)
