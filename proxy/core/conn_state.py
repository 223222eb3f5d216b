"""The life of a client connection as data: its phases, the events that move it, and
every allowed move in one table (as h11's _state.py keeps its rules).

The connection (proxy.worker.client, proxy.worker.client_io) asks `step` for its
next phase at each event and its guards read the phase. A (phase, event) pair the
table does not hold is a bug in the connection: refused with ConnStateError, never
a silent drift into a state nobody designed. Sans-io: no clock, no I/O. Phases and
events are int constants, so that compiled (mypyc) a guard is an integer compare.
"""

from __future__ import annotations

from typing import Final

# Phases. Each live one has its own deadline (what the sweeper does once it passes).
NEW: Final = 0  # constructed, no transport yet
IDLE: Final = 1  # keep-alive, nothing queued: the deadline closes quietly
HEAD: Final = 2  # a request head is awaited or being read, nothing queued: 408
BUSY: Final = 3  # requests queued, the first one's exchange in flight: 504, or cut
TUNNEL: Final = 4  # upgraded (101): bytes relayed both ways: idle deadline closes both
REFUSING: Final = 5  # a bad request waits for the answers to those before it; nothing read
LINGER: Final = 6  # half-closed after an early answer, what arrives is dropped: close
CLOSING: Final = 7  # close or abort asked; a close not done by the deadline is cut
CLOSED: Final = 8  # the transport is gone (connection_lost)
PHASE_NAMES: Final = (
    "NEW",
    "IDLE",
    "HEAD",
    "BUSY",
    "TUNNEL",
    "REFUSING",
    "LINGER",
    "CLOSING",
    "CLOSED",
)

# Events.
MADE: Final = 0  # connection_made
HEAD_BEGIN: Final = 1  # a request head begins while nothing is queued
START: Final = 2  # the request at the head of the queue starts its exchange
KEEP: Final = 3  # the last queued request is answered and the connection stays open
REFUSE_LATER: Final = 4  # a bad request must wait for the answers to earlier ones
UPGRADE: Final = 5  # the instance switched protocols (101 relayed)
HALF_CLOSE: Final = 6  # answered early or refused: half-close, drop what follows
CLOSE: Final = 7  # close or abort asked (again: nothing more happens)
LOST: Final = 8  # connection_lost
EVENT_NAMES: Final = (
    "MADE",
    "HEAD_BEGIN",
    "START",
    "KEEP",
    "REFUSE_LATER",
    "UPGRADE",
    "HALF_CLOSE",
    "CLOSE",
    "LOST",
)

# Every allowed move; whatever is not here is refused. Invariants (tests/unit/
# test_conn_state.py checks them): CLOSED is reached from every live phase by LOST
# and left by nothing; only START enters BUSY, only UPGRADE enters TUNNEL; once a
# connection lingers, closes or is refusing it never reads a request again (no
# HEAD_BEGIN, START only for requests queued before the bad one); NEW only by MADE.
TRANSITIONS: Final[dict[tuple[int, int], int]] = {
    (NEW, MADE): HEAD,
    (IDLE, HEAD_BEGIN): HEAD,
    (IDLE, START): BUSY,  # a head begun behind a pipelined request completes once idle
    (IDLE, HALF_CLOSE): LINGER,  # bytes that are no request
    (IDLE, CLOSE): CLOSING,
    (IDLE, LOST): CLOSED,
    (HEAD, HEAD_BEGIN): HEAD,
    (HEAD, START): BUSY,
    (HEAD, HALF_CLOSE): LINGER,
    (HEAD, CLOSE): CLOSING,
    (HEAD, LOST): CLOSED,
    (BUSY, START): BUSY,  # the next pipelined request
    (BUSY, KEEP): IDLE,
    (BUSY, REFUSE_LATER): REFUSING,
    (BUSY, UPGRADE): TUNNEL,
    (BUSY, HALF_CLOSE): LINGER,
    (BUSY, CLOSE): CLOSING,
    (BUSY, LOST): CLOSED,
    (TUNNEL, CLOSE): CLOSING,
    (TUNNEL, LOST): CLOSED,
    (REFUSING, START): REFUSING,  # a request queued before the bad one
    (REFUSING, HALF_CLOSE): LINGER,  # they are answered: the refusal goes out
    (REFUSING, CLOSE): CLOSING,
    (REFUSING, LOST): CLOSED,
    (LINGER, CLOSE): CLOSING,
    (LINGER, LOST): CLOSED,
    (CLOSING, CLOSE): CLOSING,
    (CLOSING, LOST): CLOSED,
    (CLOSED, CLOSE): CLOSED,
}

N_PHASES: Final = len(PHASE_NAMES)
N_EVENTS: Final = len(EVENT_NAMES)
# The table flattened for the request path: next phase at [phase * N_EVENTS + event], -1
# for a refused pair.
_NEXT: Final[tuple[int, ...]] = tuple(
    TRANSITIONS.get((p, e), -1) for p in range(N_PHASES) for e in range(N_EVENTS)
)


class ConnStateError(Exception):
    """The connection tried a move its table does not allow (a bug in the connection)."""

    def __init__(self, phase: int, event: int) -> None:
        super().__init__(
            f"client connection: {_name(EVENT_NAMES, event)} in phase "
            f"{_name(PHASE_NAMES, phase)} is not allowed"
        )
        self.phase = phase
        self.event = event


def step(phase: int, event: int) -> int:
    """The phase after `event` in `phase`; ConnStateError if the table does not allow it."""
    if 0 <= phase < N_PHASES and 0 <= event < N_EVENTS:
        nxt = _NEXT[phase * N_EVENTS + event]
        if nxt >= 0:
            return nxt
    raise ConnStateError(phase, event)


def _name(names: tuple[str, ...], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)
