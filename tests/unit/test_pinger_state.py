"""Pins the per-peer estimator (RFC 6298 SRTT/RTTVAR, RFC 3550 jitter, loss window) and up/down."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pinger.ping_state import (
    MIN_TIMEOUT,
    RTT_MIN_WINDOW,
    TRANSITIONS,
    Estimator,
    Outcome,
    PeerState,
    next_state,
)

STATES = list(PeerState)
OUTCOMES = list(Outcome)


def test_transition_table_is_total() -> None:
    """Every (state, outcome, threshold reached) triple has an entry in the table."""
    assert set(TRANSITIONS) == set(itertools.product(STATES, OUTCOMES, [False, True]))


@given(st.sampled_from(STATES), st.sampled_from(OUTCOMES), st.booleans())
def test_transitions_follow_the_flap_rule(
    state: PeerState, outcome: Outcome, reached: bool
) -> None:
    """A state changes only on a full streak: UP needs N answers, DOWN needs N misses."""
    new = next_state(state, outcome, reached)
    if new is not state:
        assert reached
        assert new is (PeerState.UP if outcome is Outcome.ANSWER else PeerState.DOWN)
    if reached and state is not PeerState.UNKNOWN:
        assert new is (PeerState.UP if outcome is Outcome.ANSWER else PeerState.DOWN)


@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.lists(st.booleans(), max_size=60),
)
def test_up_down_needs_consecutive_results(up_after: int, down_after: int, seq: list[bool]) -> None:
    """Fed any answer/miss sequence, the state equals what the last full streak decided."""
    e = Estimator(up_after, down_after)
    want = PeerState.UNKNOWN
    run_kind, run = None, 0
    for answered in seq:
        run = run + 1 if run_kind == answered else 1
        run_kind = answered
        if answered:
            e.answered(0.01, 1.0)
            if run >= up_after:
                want = PeerState.UP
        else:
            e.missed()
            if run >= down_after:
                want = PeerState.DOWN
        assert e.state is want


def test_srtt_and_rttvar_follow_rfc6298() -> None:
    """First sample sets SRTT=R, RTTVAR=R/2; later ones use alpha 1/8 and beta 1/4."""
    e = Estimator(1, 1)
    e.answered(0.100, 1.0)
    assert e.srtt == pytest.approx(0.100)
    assert e.rttvar == pytest.approx(0.050)
    e.answered(0.200, 2.0)
    assert e.rttvar == pytest.approx(0.75 * 0.050 + 0.25 * 0.100)
    assert e.srtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.200)


def test_srtt_converges_to_a_steady_rtt() -> None:
    """After 120 equal samples the smoothed RTT is within 1 us of the true one."""
    e = Estimator(1, 1)
    e.answered(0.5, 0.0)
    for i in range(120):
        e.answered(0.050, float(i))
    assert e.srtt is not None and abs(e.srtt - 0.050) <= 1e-6


def test_table_rtt_is_the_least_of_the_last_window_of_samples() -> None:
    """The table's RTT is the minimum of the last RTT_MIN_WINDOW samples: late samples
    (a busy pinger, a queue) do not raise it, an early one lowers it at once, and a path
    that really got slower shows once its fast samples left the window."""
    e = Estimator(1, 1)
    e.answered(0.050, 0.0)
    assert e.snapshot().rtt_us == 50_000
    for i in range(RTT_MIN_WINDOW - 1):  # late samples: the minimum holds
        e.answered(0.050 + 0.004 * (i + 1), 1.0 + i)
    assert e.snapshot().rtt_us == 50_000
    assert e.srtt is not None and e.srtt > 0.052  # the smoothed RTT moved; the table did not
    e.answered(0.049, 10.0)  # an early sample lowers it at once
    assert e.snapshot().rtt_us == 49_000
    for i in range(RTT_MIN_WINDOW):  # the path now takes 80 ms
        assert e.snapshot().rtt_us < 80_000
        e.answered(0.080, 11.0 + i)
    assert e.snapshot().rtt_us == 80_000


@given(st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=40))
def test_table_rtt_is_min_of_the_window_property(rtts: list[float]) -> None:
    """For any samples, the table's RTT is round(min(last RTT_MIN_WINDOW) * 1e6)."""
    e = Estimator(1, 1)
    for i, r in enumerate(rtts):
        e.answered(r, float(i))
    assert e.snapshot().rtt_us == round(min(rtts[-RTT_MIN_WINDOW:]) * 1e6)


def test_jitter_is_the_mean_deviation_of_consecutive_rtts() -> None:
    """Jitter moves 1/16 of the way to |R(i) - R(i-1)| per sample (RFC 3550 A.8)."""
    e = Estimator(1, 1)
    e.answered(0.010, 0.0)
    assert e.jitter == 0.0
    e.answered(0.026, 1.0)
    assert e.jitter == pytest.approx(0.016 / 16)
    for i in range(400):  # alternating 10 / 26 ms: jitter tends to 16 ms
        e.answered(0.010 if i % 2 else 0.026, 2.0 + i)
    assert e.jitter == pytest.approx(0.016, rel=1e-3)


def test_loss_is_counted_over_the_sliding_window() -> None:
    """Loss is the share of lost probes among the last `window` resolved ones."""
    e = Estimator(1, 1, window=10)
    for _ in range(8):
        e.answered(0.01, 1.0)
    e.missed()
    e.missed()
    assert e.loss() == pytest.approx(0.2)
    assert e.snapshot().loss_permille == 200
    for _ in range(10):
        e.answered(0.01, 2.0)
    assert e.loss() == 0.0
    for _ in range(25):
        e.missed()
    assert e.snapshot().loss_permille == 1000


def test_timeout_is_four_srtt_but_at_least_one_second() -> None:
    """An unanswered probe is lost after max(1 s, 4 x SRTT)."""
    e = Estimator(1, 1)
    assert e.timeout() == MIN_TIMEOUT
    e.answered(0.050, 0.0)
    assert e.timeout() == MIN_TIMEOUT
    e2 = Estimator(1, 1)
    e2.answered(0.400, 0.0)
    assert e2.timeout() == pytest.approx(1.6)


def test_unmeasured_peer_has_unknown_rtt() -> None:
    """Before any answer the snapshot says RTT -1 (unknown), down, never heard."""
    s = Estimator(2, 3).snapshot()
    assert (s.rtt_us, s.up, s.last_heard, s.loss_permille) == (-1, False, 0.0, 0)


def test_estimator_rejects_zero_thresholds() -> None:
    """A threshold or window below 1 is a programming error."""
    with pytest.raises(ValueError):
        Estimator(0, 1)
