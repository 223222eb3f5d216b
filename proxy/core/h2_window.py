"""The adaptive HTTP/2 receive window: a bandwidth-delay product (BDP) estimator.

Owns the decisions only: fed the flow-controlled bytes received and the times a BDP
PING went out and its ack came back, it says when to send that PING and how far the
receive windows should grow (never shrinking, never past the configured maximum). It
must not frame, send or read anything, nor read a clock (times are passed in):
proxy.worker.h2window applies its decisions to an h2 connection.

The approach is hyper's (src/proto/h2/ping.rs, the `Bdp` estimator), read and
restated: on DATA with no BDP PING outstanding, send one and count the bytes that
arrive until its ack; the RTT is a moving average (new samples weigh 1/8); the
bandwidth of a sample is bytes / (1.5 x RTT); when a sample is the fastest seen and
carried at least 2/3 of the current window, the peer was held back by the window, so
the window becomes twice that sample. A window that stopped growing is probed less
often (the delay between PINGs is multiplied by 4 after two samples in a row that did
not grow it, up to ~10 s, and halved when one does).
"""

from __future__ import annotations

from typing import Final

FIRST_DELAY: Final = 0.1  # seconds between a BDP ack and the next PING, at first (hyper's)
MAX_DELAY: Final = 10.0  # the delay stops growing once it reaches this
MIN_RTT: Final = 1e-6  # an ack timed at the instant of its PING still yields a finite rate
_GAIN: Final = 0.125  # the weight of a new RTT sample in the moving average


class BdpEstimator:
    """The window one HTTP/2 connection grants: `window` starts at `initial` and only
    grows, up to `maximum`. Bytes count only between a PING and its ack."""

    __slots__ = (
        "bytes",
        "delay",
        "max_bandwidth",
        "maximum",
        "next_at",
        "rtt",
        "sent_at",
        "stable",
        "window",
    )

    def __init__(self, initial: int, maximum: int) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"initial window {initial} must be in 1..maximum ({maximum})")
        self.window = initial  # what the windows should be now (bytes)
        self.maximum = maximum
        self.bytes = 0  # received since the outstanding PING was sent
        self.sent_at = -1.0  # when the outstanding PING left; < 0: none outstanding
        self.next_at = 0.0  # no PING before this time (after an ack)
        self.rtt = 0.0  # the moving average, seconds (0: no sample yet)
        self.max_bandwidth = 0.0  # the fastest sample seen, bytes per second
        self.delay = FIRST_DELAY
        self.stable = 0  # samples in a row that did not grow the window

    @property
    def waiting(self) -> bool:
        """A BDP PING is outstanding."""
        return self.sent_at >= 0.0

    def data(self, n: int, now: float) -> bool:
        """`n` flow-controlled bytes arrived at `now`. True: send a BDP PING now (its
        departure is taken to be `now`)."""
        if self.window >= self.maximum or n <= 0:
            return False  # at the cap there is nothing left to learn
        if self.sent_at >= 0.0:
            self.bytes += n
            return False
        if now < self.next_at:
            return False  # between samples: not counted (the next one starts fresh)
        self.bytes = n
        self.sent_at = now
        return True

    def lost(self) -> None:
        """The PING could not be sent (or its ack will not come): start over."""
        self.sent_at = -1.0
        self.bytes = 0

    def ack(self, now: float) -> int:
        """The outstanding PING's ack came at `now`. Returns the new, larger window, or 0
        when it stays as it is (also when no PING was outstanding)."""
        if self.sent_at < 0.0:
            return 0
        sample = max(now - self.sent_at, MIN_RTT)
        got = self.bytes
        self.sent_at = -1.0
        self.bytes = 0
        grown = self._sample(got, sample)
        self.next_at = now + self.delay
        return grown

    def _sample(self, got: int, sample: float) -> int:
        if self.window >= self.maximum:
            self._stabilise()
            return 0
        self.rtt = sample if self.rtt == 0.0 else self.rtt + (sample - self.rtt) * _GAIN
        bandwidth = got / (self.rtt * 1.5)
        if bandwidth < self.max_bandwidth:
            self._stabilise()
            return 0
        self.max_bandwidth = bandwidth
        if got * 3 < self.window * 2:
            self._stabilise()  # the window did not hold the peer back
            return 0
        wanted = min(got * 2, self.maximum)
        if wanted <= self.window:
            self._stabilise()
            return 0
        self.window = wanted
        self.stable = 0
        self.delay /= 2
        return wanted

    def _stabilise(self) -> None:
        if self.delay < MAX_DELAY:
            self.stable += 1
            if self.stable >= 2:
                self.delay *= 4
                self.stable = 0
