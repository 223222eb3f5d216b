"""Per-peer measurement core: RTT estimator, jitter, loss window, up/down state (sans-io).

Owns the numbers the table shows for a peer and the up/down transition table. The
table's RTT is the least of the last RTT_MIN_WINDOW samples (a windowed minimum, as
Linux keeps min_rtt for BBR and RACK): a sample can only be late, never early (a busy
pinger reads an answer late, a queue holds it), so the minimum is the path's own delay
and the smoothed RTT (RFC 6298) sets the probe timeout.
Times are passed in (seconds, any monotonic origin); it must not read clocks,
touch sockets or know about the table.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final

ALPHA: Final = 1 / 8  # RFC 6298 SRTT gain
BETA: Final = 1 / 4  # RFC 6298 RTTVAR gain
JITTER_GAIN: Final = 1 / 16  # RFC 3550 A.8 interarrival jitter gain
LOSS_WINDOW: Final = 100  # probes the loss share is computed over
MIN_TIMEOUT: Final = 1.0  # seconds before an unanswered probe counts as lost
TIMEOUT_SRTTS: Final = 4
RTT_MIN_WINDOW: Final = 8  # answered probes the table's RTT is the least of


class PeerState(enum.Enum):
    UNKNOWN = "unknown"  # never decided: no streak long enough yet
    UP = "up"
    DOWN = "down"


class Outcome(enum.Enum):
    ANSWER = "answer"
    MISS = "miss"


# (state, outcome, streak reached its threshold) -> next state.
# Invariant: every (state, outcome, reached) triple is present; UP only leaves on a full
# miss streak (down_after) and DOWN only on a full answer streak (up_after): a flap needs
# N in a row. A missing key would be a bug and raises KeyError.
TRANSITIONS: Final[dict[tuple[PeerState, Outcome, bool], PeerState]] = {
    (PeerState.UNKNOWN, Outcome.ANSWER, False): PeerState.UNKNOWN,
    (PeerState.UNKNOWN, Outcome.ANSWER, True): PeerState.UP,
    (PeerState.UNKNOWN, Outcome.MISS, False): PeerState.UNKNOWN,
    (PeerState.UNKNOWN, Outcome.MISS, True): PeerState.DOWN,
    (PeerState.UP, Outcome.ANSWER, False): PeerState.UP,
    (PeerState.UP, Outcome.ANSWER, True): PeerState.UP,
    (PeerState.UP, Outcome.MISS, False): PeerState.UP,
    (PeerState.UP, Outcome.MISS, True): PeerState.DOWN,
    (PeerState.DOWN, Outcome.ANSWER, False): PeerState.DOWN,
    (PeerState.DOWN, Outcome.ANSWER, True): PeerState.UP,
    (PeerState.DOWN, Outcome.MISS, False): PeerState.DOWN,
    (PeerState.DOWN, Outcome.MISS, True): PeerState.DOWN,
}


def next_state(state: PeerState, outcome: Outcome, reached: bool) -> PeerState:
    """The state after one probe outcome; KeyError for a pair outside the table."""
    return TRANSITIONS[(state, outcome, reached)]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the table shows for a peer (microseconds, per mille)."""

    rtt_us: int  # -1 until the first answer
    jitter_us: int
    loss_permille: int
    up: bool
    last_heard: float  # caller's clock, seconds; 0.0 if never heard


class Estimator:
    """RTT/jitter/loss/up-down of one peer, fed probe outcomes in the order they resolve."""

    __slots__ = (
        "_answers",
        "_misses",
        "_recent",
        "_window",
        "down_after",
        "jitter",
        "last_heard",
        "last_rtt",
        "lost_in_window",
        "rttvar",
        "srtt",
        "state",
        "up_after",
        "window_size",
    )

    def __init__(self, up_after: int, down_after: int, window: int = LOSS_WINDOW) -> None:
        if up_after < 1 or down_after < 1 or window < 1:
            raise ValueError("up_after, down_after and window must be >= 1")
        self.up_after = up_after
        self.down_after = down_after
        self.window_size = window
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.jitter = 0.0
        self.last_rtt: float | None = None
        self._recent: deque[float] = deque(maxlen=RTT_MIN_WINDOW)
        self.last_heard = 0.0
        self.state = PeerState.UNKNOWN
        self._window: deque[bool] = deque()  # True = lost
        self.lost_in_window = 0
        self._answers = 0
        self._misses = 0

    def timeout(self) -> float:
        """Seconds after which an unanswered probe counts as lost."""
        if self.srtt is None:
            return MIN_TIMEOUT
        return max(MIN_TIMEOUT, TIMEOUT_SRTTS * self.srtt)

    def answered(self, rtt: float, now: float) -> None:
        """A probe was answered after `rtt` seconds (received at `now`)."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:  # RFC 6298 2.2
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:  # RFC 6298 2.3: RTTVAR first, with the old SRTT
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        if self.last_rtt is not None:  # RFC 3550 A.8 on consecutive RTTs
            self.jitter += (abs(rtt - self.last_rtt) - self.jitter) * JITTER_GAIN
        self.last_rtt = rtt
        self._recent.append(rtt)
        self.last_heard = max(self.last_heard, now)
        self._record(False)
        self._answers += 1
        self._misses = 0
        self._step(Outcome.ANSWER, self._answers >= self.up_after)

    def missed(self) -> None:
        """A probe went unanswered past its timeout."""
        self._record(True)
        self._misses += 1
        self._answers = 0
        self._step(Outcome.MISS, self._misses >= self.down_after)

    def loss(self) -> float:
        """Share of the last `window` resolved probes that were lost (0.0 before any)."""
        n = len(self._window)
        return self.lost_in_window / n if n else 0.0

    def min_rtt(self) -> float | None:
        """The least of the last RTT_MIN_WINDOW answered probes' RTTs (None before any)."""
        return min(self._recent) if self._recent else None

    def snapshot(self) -> Snapshot:
        low = self.min_rtt()
        return Snapshot(
            rtt_us=-1 if low is None else round(low * 1e6),
            jitter_us=round(self.jitter * 1e6),
            loss_permille=round(self.lost_in_window * 1000 / len(self._window))
            if self._window
            else 0,
            up=self.state is PeerState.UP,
            last_heard=self.last_heard,
        )

    def _record(self, lost: bool) -> None:
        w = self._window
        w.append(lost)
        self.lost_in_window += lost
        if len(w) > self.window_size:
            self.lost_in_window -= w.popleft()

    def _step(self, outcome: Outcome, reached: bool) -> None:
        self.state = next_state(self.state, outcome, reached)
