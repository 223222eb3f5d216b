"""The client connection's phases (proxy.core.conn_state): the table on its own (every
allowed pair, every other pair refused, its invariants, random event sequences), then a
real proxy.worker.client connection over recording transports walked through it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch import RESPONSE, Recorder, World, _request

from proxy.core.conn_state import (
    BUSY,
    CLOSE,
    CLOSED,
    CLOSING,
    EVENT_NAMES,
    HALF_CLOSE,
    HEAD,
    HEAD_BEGIN,
    IDLE,
    KEEP,
    LINGER,
    LOST,
    MADE,
    N_EVENTS,
    N_PHASES,
    NEW,
    PHASE_NAMES,
    REFUSE_LATER,
    REFUSING,
    START,
    TRANSITIONS,
    TUNNEL,
    UPGRADE,
    ConnStateError,
    step,
)
from proxy.worker.client import ClientConnection

# The table written out again, by phase, as a reader would check it against the design:
# a change to proxy.core.conn_state's table must be made here too, on purpose.
EXPECTED = {
    NEW: {MADE: HEAD},
    IDLE: {HEAD_BEGIN: HEAD, START: BUSY, HALF_CLOSE: LINGER, CLOSE: CLOSING, LOST: CLOSED},
    HEAD: {HEAD_BEGIN: HEAD, START: BUSY, HALF_CLOSE: LINGER, CLOSE: CLOSING, LOST: CLOSED},
    BUSY: {
        START: BUSY,
        KEEP: IDLE,
        REFUSE_LATER: REFUSING,
        UPGRADE: TUNNEL,
        HALF_CLOSE: LINGER,
        CLOSE: CLOSING,
        LOST: CLOSED,
    },
    TUNNEL: {CLOSE: CLOSING, LOST: CLOSED},
    REFUSING: {START: REFUSING, HALF_CLOSE: LINGER, CLOSE: CLOSING, LOST: CLOSED},
    LINGER: {CLOSE: CLOSING, LOST: CLOSED},
    CLOSING: {CLOSE: CLOSING, LOST: CLOSED},
    CLOSED: {CLOSE: CLOSED},
}
ALLOWED = [(p, e, n) for p, row in EXPECTED.items() for e, n in row.items()]
FORBIDDEN = [
    (p, e) for p in range(N_PHASES) for e in range(N_EVENTS) if e not in EXPECTED.get(p, {})
]
READING = (IDLE, HEAD, BUSY, TUNNEL, REFUSING)  # phases in which client bytes are used
ENDED = (LINGER, CLOSING, CLOSED)


def _reachable(start: int) -> set[int]:
    seen = {start}
    todo = [start]
    while todo:
        p = todo.pop()
        for (q, _), n in TRANSITIONS.items():
            if q == p and n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_table_is_the_designed_one() -> None:
    """The module's table holds exactly the pairs written out above, to the same phases."""
    assert {(p, e): n for p, e, n in ALLOWED} == TRANSITIONS
    assert len(PHASE_NAMES) == N_PHASES and len(EVENT_NAMES) == N_EVENTS


@pytest.mark.parametrize(("phase", "event", "nxt"), ALLOWED)
def test_every_allowed_pair_steps_to_its_phase(phase: int, event: int, nxt: int) -> None:
    """Each allowed (phase, event) moves to the phase the table gives."""
    assert step(phase, event) == nxt


@pytest.mark.parametrize(("phase", "event"), FORBIDDEN)
def test_every_other_pair_is_refused(phase: int, event: int) -> None:
    """Each pair not in the table raises ConnStateError naming the phase and the event."""
    with pytest.raises(ConnStateError) as e:
        step(phase, event)
    assert (e.value.phase, e.value.event) == (phase, event)
    assert PHASE_NAMES[phase] in str(e.value) and EVENT_NAMES[event] in str(e.value)


@pytest.mark.parametrize(
    ("phase", "event"), [(-1, MADE), (N_PHASES, CLOSE), (IDLE, -1), (IDLE, N_EVENTS)]
)
def test_numbers_outside_the_table_are_refused(phase: int, event: int) -> None:
    """A phase or event number that is none of the constants is refused, not indexed."""
    with pytest.raises(ConnStateError):
        step(phase, event)


def test_invariants() -> None:
    """CLOSED is reached from every live phase by LOST and left by nothing; only START
    enters BUSY and only UPGRADE enters TUNNEL; only MADE leaves NEW; every phase is
    reachable from NEW and reaches CLOSED; once ended, a connection never reads again."""
    for p in range(N_PHASES):
        if p not in (NEW, CLOSED):
            assert step(p, LOST) == CLOSED
        assert CLOSED in _reachable(p)
    assert {n for (p, _), n in TRANSITIONS.items() if p == CLOSED} == {CLOSED}
    for (p, e), n in TRANSITIONS.items():
        if n == BUSY and p != BUSY:
            assert e == START
        if n == TUNNEL:
            assert e == UPGRADE
        if p == NEW:
            assert e == MADE
    assert _reachable(NEW) == set(range(N_PHASES))
    for p in ENDED:
        assert not _reachable(p) & set(READING), PHASE_NAMES[p]
    # Refusing: no new request head, and the only way on is the refusal or the end.
    assert _reachable(REFUSING) == {REFUSING, LINGER, CLOSING, CLOSED}


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.integers(0, N_EVENTS - 1), max_size=40))
def test_any_event_sequence_stays_in_the_table(events: list[int]) -> None:
    """Fed any events from NEW, a refused event leaves the phase as it was, an allowed one
    moves as the table says; an ended connection never reads again, a closed one stays
    closed."""
    phase = NEW
    for e in events:
        try:
            nxt = step(phase, e)
        except ConnStateError:
            assert (phase, e) not in TRANSITIONS
            continue
        assert TRANSITIONS[(phase, e)] == nxt
        if phase in ENDED:
            assert nxt in ENDED
        if phase == CLOSED:
            assert nxt == CLOSED
        phase = nxt


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(range(N_PHASES)), st.sampled_from(range(N_EVENTS)))
def test_step_refuses_exactly_the_pairs_outside_the_table(phase: int, event: int) -> None:
    """step returns a phase for a pair in the table and raises for any other (as h2's
    state machine tests sample every pair)."""
    if (phase, event) in TRANSITIONS:
        assert step(phase, event) == TRANSITIONS[(phase, event)]
    else:
        with pytest.raises(ConnStateError):
            step(phase, event)


# A real connection (proxy.worker.client over proxy.worker.client_io) -----------------


class Aborts(Recorder):
    """A recording transport that tells a close from an abort."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.closing = True


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.loop.close()


def _client(world: World) -> tuple[ClientConnection, Aborts]:
    c = ClientConnection(world.ctx, False)
    assert c.phase == NEW
    t = Aborts()
    c.connection_made(t)  # type: ignore[arg-type]
    return c, t


def _answer(world: World, c: ClientConnection) -> None:
    world.end_iteration()
    up = next(u for u, ut in world.ups if ut.writes and getattr(u.exchange, "conn", None) is c)
    up.data_received(RESPONSE)
    world.end_iteration()


def test_a_keep_alive_exchange_walks_head_busy_idle(world: World) -> None:
    """Accepted: HEAD; a request head: BUSY; its answer on a kept connection: IDLE; the
    next head: HEAD again; connection_lost: CLOSED."""
    c, t = _client(world)
    assert c.phase == HEAD
    c.data_received(_request("/one"))
    assert c.phase == BUSY
    _answer(world, c)
    assert c.phase == IDLE and t.writes[-1].endswith(b"ok")
    c.data_received(b"GET /two HTTP/1.1\r\n")
    assert c.phase == HEAD
    c.connection_lost(None)
    assert c.phase == CLOSED


def test_a_bad_request_after_a_good_one_refuses_then_lingers(world: World) -> None:
    """A bad request pipelined behind a good one: REFUSING (nothing more is read) until
    the good one is answered, then its 400 goes out and the connection LINGERs."""
    c, t = _client(world)
    c.data_received(_request("/good") + b"BAD\x00 / HTTP/1.1\r\n\r\n")
    assert c.phase == REFUSING
    c.data_received(_request("/ignored"))  # not parsed: nothing is read while refusing
    assert len(c.queue) == 1
    _answer(world, c)
    assert c.phase == LINGER
    assert t.writes[0].startswith(b"HTTP/1.1 200 ") and t.writes[1].startswith(b"HTTP/1.1 400 ")
    assert not any(w.startswith(b"GET /ignored") for _, ut in world.ups for w in ut.writes)


def test_a_close_not_done_by_its_deadline_is_cut(world: World) -> None:
    """An answer that ends the connection (Connection: close): CLOSING; if the close is
    still pending at the deadline (the client reads nothing), the connection is aborted."""
    c, t = _client(world)
    c.data_received(b"GET /bye HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    _answer(world, c)
    assert c.phase == CLOSING and t.closing and not t.aborted
    c.deadline = world.loop.time() - 1.0
    world.ctx.sweep()
    assert t.aborted


def test_a_head_deadline_answers_408_and_closes(world: World) -> None:
    """A connection that sends no head by the deadline: 408, then CLOSING."""
    c, t = _client(world)
    c.deadline = world.loop.time() - 1.0
    world.ctx.sweep()
    assert t.writes and t.writes[0].startswith(b"HTTP/1.1 408 ")
    assert c.phase == CLOSING and t.closing and not t.aborted
