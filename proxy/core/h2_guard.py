"""Rate bounds of the HTTP/2 protections: a budget per kind of client frame.

Owns the leaky bucket that decides when a client's stream resets (rapid reset,
CVE-2023-44487), PINGs or SETTINGS are more than an honest client sends. Sans-io:
the caller passes the time; it must not know frames or connections.
"""

from __future__ import annotations


class Budget:
    """`burst` events at once, then `rate` per second: `spend` says whether one more fits."""

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
