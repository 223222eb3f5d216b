"""Watching a worker's event loop: its scheduling lag, callbacks that block it, shedding.

Owns the lag probe (a timer every [overload] probe_ms that records how late it ran: a
histogram, the current value, never a per-request cost), the shedding decision (lag above
shed_lag_ms for shed_after probes in a row starts it, as many in a row below stops it; the
request path reads one flag) and the watchdog thread that, when the probe is late by more
than blocked_ms, samples the loop thread's stack with sys._current_frames and logs it, at
most once per period. A wake of the watchdog that comes late itself means the whole
process was off the CPU, which is not blamed on the loop. The watchdog only reads the
probe's heartbeat and writes its own counters; it never touches the loop.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, TextIO

from proxy.telemetry.families import BLOCKED_LOGGED, BLOCKED_RATE_LIMITED
from proxy.telemetry.histograms import LOOP_LAG

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from proxy.config import OverloadConfig
    from proxy.telemetry.metrics import WorkerStats

LOG_PERIOD = 60.0  # seconds between two logged stacks of a blocked loop
_STACK_FRAMES = 40  # innermost frames logged


class LagProbe:
    """The in-loop half: runs every `probe` seconds and measures how late it ran.

    `on_shed(bool)` is called when shedding starts or stops."""

    __slots__ = (
        "above",
        "below",
        "due",
        "handle",
        "hist",
        "interval",
        "loop",
        "on_shed",
        "shed_after",
        "shed_lag",
        "shedding",
        "stats",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cfg: OverloadConfig,
        stats: WorkerStats,
        on_shed: Callable[[bool], None],
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.hist = stats.hists[LOOP_LAG]
        self.interval = cfg.probe_ms / 1000.0
        self.shed_lag = cfg.shed_lag_ms / 1000.0  # 0: never shed
        self.shed_after = cfg.shed_after
        self.on_shed = on_shed
        self.above = 0  # probes in a row above shed_lag
        self.below = 0  # probes in a row at or below it
        self.shedding = False
        self.due = 0.0  # time.monotonic() the next run is due (the watchdog reads it)
        self.handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.due = time.monotonic() + self.interval
        self.handle = self.loop.call_later(self.interval, self.run)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.due = 0.0

    def run(self) -> None:
        now = time.monotonic()
        lag = now - self.due
        lag = max(lag, 0.0)  # the loop's clock rounds timers to the millisecond
        self.hist.observe(0, lag)
        self.stats.loop_lag = lag
        self.due = now + self.interval
        self.handle = self.loop.call_later(self.interval, self.run)
        if self.shed_lag > 0.0:
            self.decide(lag)

    def decide(self, lag: float) -> None:
        """Shedding needs shed_after readings in a row on the same side to change."""
        if lag > self.shed_lag:
            self.above += 1
            self.below = 0
            if not self.shedding and self.above >= self.shed_after:
                self.shedding = True
                self.stats.shedding = 1
                self.on_shed(True)
        else:
            self.below += 1
            self.above = 0
            if self.shedding and self.below >= self.shed_after:
                self.shedding = False
                self.stats.shedding = 0
                self.on_shed(False)


class Watchdog:
    """The thread half: wakes a few times per `blocked` seconds and, when the probe is
    overdue by more than that, logs the loop thread's stack (once per stall, at most one
    stack per `period`; the rest are counted)."""

    def __init__(
        self,
        probe: LagProbe,
        blocked: float,
        counts: list[int],
        out: TextIO,
        period: float = LOG_PERIOD,
    ) -> None:
        self.probe = probe
        self.blocked = blocked
        self.counts = counts  # the loop_blocked_total family: [logged, rate_limited]
        self.out = out
        self.period = period
        self.loop_thread = threading.get_ident()  # made on the loop's thread
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="loop-watchdog", daemon=True)
        self.last_logged = -period
        self.suppressed = 0
        self.step = min(max(blocked / 2.0, 0.01), 0.5)  # 4 wakes a second at the default
        self.last_wake = 0.0  # time.monotonic() of this thread's last wake
        self.back = 0.0  # when this process last came back from being off the CPU
        self.reported = 0.0  # the `due` of the stall already reported

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=1.0)

    def watch(self) -> None:
        self.last_wake = time.monotonic()
        while not self.stopped.wait(self.step):
            late = self.seen(time.monotonic(), self.probe.due)
            if late > 0.0:
                self.report(late)

    def seen(self, now: float, due: float) -> float:
        """One wake of this thread at `now`, the probe next due at `due`: how late the
        probe is when that means a blocked loop to report, else 0.0.

        A wake that comes late itself means this whole process was off the CPU (a starved
        or stopped host), not that a callback held the loop: the loop gets `blocked` from
        that moment to run its probe before it counts as blocked. Each stall once."""
        woke_late = now - self.last_wake > self.step + self.blocked / 2.0
        self.last_wake = now
        if woke_late:
            self.back = now
        if due in (0.0, self.reported):
            return 0.0
        if now - max(due, self.back) <= self.blocked:
            return 0.0
        self.reported = due
        return now - due

    def report(self, late: float) -> None:
        now = time.monotonic()
        if now - self.last_logged < self.period:
            self.counts[BLOCKED_RATE_LIMITED] += 1
            self.suppressed += 1
            return
        self.counts[BLOCKED_LOGGED] += 1
        frame = sys._current_frames().get(self.loop_thread)
        stack = traceback.format_stack(frame, limit=_STACK_FRAMES) if frame is not None else []
        del frame
        self.last_logged = now
        head = (
            f"edgeproxy worker: event loop blocked for {late * 1000:.0f} ms so far "
            f"(> [overload] blocked_ms = {self.blocked * 1000:.0f})"
        )
        if self.suppressed:
            head += f" ({self.suppressed} more since the last report)"
            self.suppressed = 0
        text = head + "; the loop thread is in:\n" + "".join(stack)
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # stderr gone: the counter still says it happened
