"""Rate bounds of the HTTP/2 protections: a budget per kind of client frame.

Owns the leaky bucket that decides when a client's stream resets (rapid reset,
CVE-2023-44487), PINGs or SETTINGS are more than an honest client sends, and the
budgets of the frames that carry no progress (FrameGuard): empty DATA, HEADERS and
CONTINUATION frames and unknown extension frames (CVE-2019-9518), WINDOW_UPDATE,
PRIORITY and PRIORITY_UPDATE (CVE-2019-9513 class) and RST_STREAM on streams already
closed. Like HAProxy's glitch counter and nginx's ratio of payload to frame bytes,
a budget is refilled by real work: request body bytes and streams opened, and the
response bytes a client's WINDOW_UPDATEs answer. Sans-io: the caller classifies each
frame and passes the time; it must not know frames or connections.
"""

from __future__ import annotations

from typing import Final


class Budget:
    """`burst` events at once, then `rate` per second: `spend` says whether one more fits.
    `credit` gives some back for real work (never more than a full budget)."""

    __slots__ = ("burst", "last", "level", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.level = 0.0  # events not yet leaked away
        self.last = 0.0  # the time of the last spend (0.0: none yet)

    def spend(self, now: float) -> bool:
        """Count one event at `now` (seconds, any monotonic origin); False past the budget."""
        if self.last:
            level = self.level - (now - self.last) * self.rate
            level = max(level, 0.0)
        else:
            level = 0.0
        self.last = now
        level += 1.0
        self.level = level
        return level <= self.burst

    def credit(self, n: float) -> None:
        """`n` events' worth of real work was done: as many more fit (up to `burst`)."""
        level = self.level - n
        self.level = level if level > 0.0 else 0.0


# What a client frame is to the guard (the caller classifies it).
PROGRESS: Final = 0  # DATA with payload: request work
STREAM: Final = 1  # a HEADERS frame with a header block (a request, or its trailers)
EMPTY: Final = 2  # DATA without payload nor END_STREAM, HEADERS or CONTINUATION without
#                   a block fragment, an extension frame we do not use
WINDOW: Final = 3  # WINDOW_UPDATE
PRIORITY: Final = 4  # PRIORITY, PRIORITY_UPDATE (RFC 9218)
CLOSED_RESET: Final = 5  # RST_STREAM on a stream that is not open

# Real work's worth, in frames of each budget.
PRIORITY_PER_STREAM: Final = 2.0  # a PRIORITY and a PRIORITY_UPDATE per request
RESETS_PER_STREAM: Final = 1.0  # a client may reset a stream our END_STREAM just closed
EMPTY_PER_WORK: Final = 1.0  # per DATA frame with payload, per header block
WINDOW_PER_BYTES: Final = 1024  # one WINDOW_UPDATE per this many response bytes sent


class FrameGuard:
    """The no-progress budgets of one connection: `frame` says False when a frame of
    its kind is past its budget (a flood: the caller ends the connection)."""

    __slots__ = ("closed_resets", "empty", "priority", "windows")

    def __init__(self, rate: float, burst: int) -> None:
        self.empty = Budget(rate, burst)
        self.windows = Budget(rate, burst)
        self.priority = Budget(rate, burst)
        self.closed_resets = Budget(rate, burst)

    def frame(self, kind: int, now: float) -> bool:
        """A client frame of `kind` at `now`: False past its budget."""
        if kind == PROGRESS:
            self.empty.credit(EMPTY_PER_WORK)
            return True
        if kind == STREAM:
            self.empty.credit(EMPTY_PER_WORK)
            self.priority.credit(PRIORITY_PER_STREAM)
            self.closed_resets.credit(RESETS_PER_STREAM)
            return True
        if kind == EMPTY:
            return self.empty.spend(now)
        if kind == WINDOW:
            return self.windows.spend(now)
        if kind == PRIORITY:
            return self.priority.spend(now)
        if kind == CLOSED_RESET:
            return self.closed_resets.spend(now)
        return True

    def sent(self, nbytes: int) -> None:
        """`nbytes` went to the client: as many WINDOW_UPDATEs may answer them."""
        self.windows.credit(1.0 + nbytes / WINDOW_PER_BYTES)
