"""The adaptive receive window applied to one h2 connection (either side).

Owns the BDP PING (its opaque payload, sent through the library) and the growth of
the windows the estimator (proxy.core.h2_window) decides: SETTINGS_INITIAL_WINDOW_SIZE
for every stream (RFC 9113 6.9.2: open streams' windows move by the difference too)
and a WINDOW_UPDATE on the connection. It must not read the socket or write to it:
the connection's owner flushes what the library queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from proxy.core.h2_window import BdpEstimator

if TYPE_CHECKING:
    from h2.connection import H2Connection

    from proxy.config_http2 import Http2Config

_TAG: Final = b"edgebdp"  # the BDP PING's payload is this and one byte of sequence


class WindowTuner:
    """Grows `h2`'s receive windows (stream and connection) with the measured BDP."""

    __slots__ = ("bdp", "conn_window", "h2", "payload", "seq", "stream_window")

    def __init__(self, h2: H2Connection, cfg: Http2Config) -> None:
        self.h2 = h2
        self.stream_window = cfg.initial_window  # as announced in our first SETTINGS
        self.conn_window = cfg.connection_window  # as opened after the preface
        self.bdp = BdpEstimator(cfg.initial_window, cfg.max_window)
        self.payload = b""  # the outstanding PING's, to tell its ack from anyone else's
        self.seq = 0

    def data(self, n: int, now: float) -> None:
        """`n` flow-controlled bytes arrived: maybe a BDP PING goes out (queued)."""
        if self.bdp.data(n, now):
            self.seq = (self.seq + 1) & 0xFF
            self.payload = _TAG + bytes((self.seq,))
            try:
                self.h2.ping(self.payload)
            except ProtocolError:  # the connection is closing
                self.bdp.lost()

    def owns(self, payload: bytes) -> bool:
        """Whether `payload` is the outstanding BDP PING's (an ack of it is not a flood)."""
        return bool(self.payload) and payload == self.payload

    def ack(self, payload: bytes, now: float) -> None:
        """A PING ack came: if it is ours, the windows may grow (frames queued)."""
        if payload != self.payload or not self.bdp.waiting:
            return  # someone else's, or a replay: not a sample
        self.payload = b""
        grown = self.bdp.ack(now)
        if grown:
            self.grow(grown)

    def grow(self, window: int) -> None:
        h = self.h2
        try:
            if window > self.stream_window:
                h.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
                self.stream_window = window
            if window > self.conn_window:
                h.increment_flow_control_window(window - self.conn_window)
                # The library's target for its own WINDOW_UPDATEs: the new size (it
                # would keep the old one when credit was still out, so the peer would
                # not get all of the increase).
                h._inbound_flow_control_window_manager.max_window_size = window
                self.conn_window = window
        except ProtocolError:  # the connection is closing: nothing more to grant
            pass
