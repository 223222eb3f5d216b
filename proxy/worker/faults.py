"""Exceptions a worker's own code raised: counted, and logged with a rate limit.

Owns the `internal_errors` counters (by where the exception was caught) and the
rule that one site (where, exception type, innermost frame) logs its traceback at
most once per period, with the count of repeats suppressed since. The same
rule for a worker thread's own failures (ThrottledLine: the trace exporter, the access
log). It must not decide what happens to the connection involved: the caller closes it.
"""

from __future__ import annotations

import time
import traceback
from typing import TYPE_CHECKING, TextIO

from proxy.telemetry.metrics import INTERNAL_WHERE

if TYPE_CHECKING:
    from collections.abc import Callable

LOG_PERIOD = 60.0  # seconds between two tracebacks of the same site
_MAX_SITES = 1024  # sites remembered: the code has far fewer raise points than this


class Faults:
    """One worker's internal-error reporter (`clock` in seconds, `out` a text stream)."""

    __slots__ = ("clock", "counts", "last", "out", "period", "suppressed")

    def __init__(
        self,
        counts: list[int],
        clock: Callable[[], float],
        out: TextIO,
        period: float = LOG_PERIOD,
    ) -> None:
        self.counts = counts  # WorkerStats.internal_errors
        self.clock = clock
        self.out = out
        self.period = period
        self.last: dict[tuple[int, str, str, int], float] = {}  # site -> last logged at
        self.suppressed: dict[tuple[int, str, str, int], int] = {}

    def report(self, where: int, exc: BaseException | None, message: str = "") -> bool:
        """Count one error caught at `where`; True when it was logged (not rate-limited)."""
        self.counts[where] += 1
        site = _site(where, exc)
        now = self.clock()
        last = self.last.get(site)
        if last is not None and now - last < self.period:
            self.suppressed[site] = self.suppressed.get(site, 0) + 1
            return False
        if len(self.last) >= _MAX_SITES and site not in self.last:
            self.last.clear()
            self.suppressed.clear()
        self.last[site] = now
        more = self.suppressed.pop(site, 0)
        head = f"edgeproxy worker: internal error in {INTERNAL_WHERE[where]}"
        if message:
            head += f": {message}"
        if more:
            head += f" ({more} more at this site since the last report)"
        text = "".join(traceback.format_exception(exc)) if exc is not None else ""
        try:
            self.out.write(head + "\n" + text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # stderr gone: the counter still says it happened
        return True


def _site(where: int, exc: BaseException | None) -> tuple[int, str, str, int]:
    """(where, exception type, file, line) of the innermost frame of the traceback."""
    if exc is None:
        return where, "", "", 0
    tb = exc.__traceback__
    filename, line = "", 0
    while tb is not None:
        filename, line = tb.tb_frame.f_code.co_filename, tb.tb_lineno
        tb = tb.tb_next
    return where, type(exc).__name__, filename, line


class ThrottledLine:
    """A thread's failure lines to `out`: at most one per period, the ones in between
    counted and said with the next."""

    __slots__ = ("last", "out", "period", "skipped")

    def __init__(self, out: TextIO, period: float = LOG_PERIOD) -> None:
        self.out = out
        self.period = period
        self.last = -period
        self.skipped = 0

    def say(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last < self.period:
            self.skipped += 1
            return
        self.last = now
        if self.skipped:
            text += f" ({self.skipped} more failures since the last report)"
            self.skipped = 0
        try:
            self.out.write(f"edgeproxy worker: {text}\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # stderr gone: the counters still say it happened
