"""The client frames the h2 library's events do not show, counted: the no-progress
budgets of proxy.core.h2_guard applied to each frame before the library handles it.

Owns the classification of a client frame (an empty DATA frame, an empty header block:
HEADERS and its CONTINUATION frames, which the library joins, 64 at most; an extension
frame, WINDOW_UPDATE, PRIORITY and PRIORITY_UPDATE, a RST_STREAM on a stream
that is not open; request work that refills the budgets) and the connection error a
flood becomes (GOAWAY ENHANCE_YOUR_CALM, which the library sends as for any protocol
error). It must not handle events or streams: proxy.worker.h2conn does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, cast

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    HeadersFrame,
    PriorityFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from proxy.core import h2_guard
from proxy.telemetry.families import (
    H2_CLOSED_RESET_FLOOD,
    H2_EMPTY_FRAMES,
    H2_PRIORITY_FLOOD,
    H2_WINDOW_UPDATE_FLOOD,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from h2.config import H2Configuration
    from h2.events import Event
    from hyperframe.frame import Frame

    from proxy.core.h2_guard import FrameGuard

FLOOD_EVENTS: Final = {
    h2_guard.EMPTY: H2_EMPTY_FRAMES,
    h2_guard.WINDOW: H2_WINDOW_UPDATE_FLOOD,
    h2_guard.PRIORITY: H2_PRIORITY_FLOOD,
    h2_guard.CLOSED_RESET: H2_CLOSED_RESET_FLOOD,
}
PRIORITY_UPDATE: Final = 0x10  # RFC 9218 7.1


class FloodError(ProtocolError):
    """Frames of one kind past their budget: the library answers GOAWAY
    ENHANCE_YOUR_CALM; `event` is the http2_events_total label to count."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM

    def __init__(self, event: int) -> None:
        super().__init__("flood")
        self.event = event


class GuardedConnection(H2Connection):
    """The library's connection with each received frame counted first."""

    def __init__(
        self, config: H2Configuration, guard: FrameGuard, clock: Callable[[], float]
    ) -> None:
        super().__init__(config)
        self.guard = guard
        self.clock = clock

    def _receive_frame(self, frame: Frame) -> list[Event]:
        cls = frame.__class__
        if cls is DataFrame:
            if cast("DataFrame", frame).data:  # request work: the common case, kept short
                empty = self.guard.empty
                if empty.level:
                    empty.credit(h2_guard.EMPTY_PER_WORK)
                return _RECEIVE(self, frame)
            kind = -1 if "END_STREAM" in frame.flags else h2_guard.EMPTY  # padding alone too
        elif cls is HeadersFrame:
            # With its CONTINUATION frames: the library joins them (64 at most) first.
            kind = h2_guard.STREAM if cast("HeadersFrame", frame).data else h2_guard.EMPTY
        elif cls is WindowUpdateFrame:
            kind = h2_guard.WINDOW
        elif cls is PriorityFrame:
            kind = h2_guard.PRIORITY
        elif cls is RstStreamFrame:
            s = self.streams.get(frame.stream_id)
            # Closed, or idle (the library ignores both); an open one: the rapid reset
            # budget counts it (proxy.worker.h2conn).
            kind = h2_guard.CLOSED_RESET if s is None or s.closed else -1
        elif cls is ExtensionFrame:
            ext = cast("ExtensionFrame", frame).type
            kind = h2_guard.PRIORITY if ext == PRIORITY_UPDATE else h2_guard.EMPTY
        else:
            kind = -1
        if kind >= 0 and not self.guard.frame(kind, self.clock()):
            raise FloodError(FLOOD_EVENTS[kind])
        return _RECEIVE(self, frame)


_RECEIVE: Final = H2Connection._receive_frame  # the library's own (no super() lookup per frame)
