"""proxy.core.h2_guard: Budget (a burst is taken, then only the refill rate: the bound of
rapid reset and PING/SETTINGS floods; credits for real work) and FrameGuard (the budgets
of frames that carry no progress)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.h2_guard import (
    CLOSED_RESET,
    EMPTY,
    PRIORITY,
    PROGRESS,
    STREAM,
    WINDOW,
    Budget,
    FrameGuard,
)


def test_burst_then_refused_then_refilled() -> None:
    """`burst` events at one instant pass, the next is refused; a second later `rate` more pass."""
    b = Budget(rate=5.0, burst=10)
    assert all(b.spend(100.0) for _ in range(10))
    assert not b.spend(100.0)
    assert sum(b.spend(101.0) for _ in range(10)) >= 4


def test_a_steady_client_under_the_rate_is_never_refused() -> None:
    """One event every 0.25 s against a rate of 5/s: never refused, however long."""
    b = Budget(rate=5.0, burst=3)
    assert all(b.spend(1.0 + i * 0.25) for i in range(10_000))


@given(st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=300))
def test_accepted_never_exceed_burst_plus_rate_times_elapsed(gaps: list[float]) -> None:
    """Over any sequence of events, what passes is at most burst + rate x elapsed (+1)."""
    b = Budget(rate=3.0, burst=7)
    now = 10.0
    ok = 0
    for g in gaps:
        now += g
        ok += b.spend(now)
    assert ok <= 7 + 3.0 * (now - 10.0) + 1


@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=1.0), st.booleans(), st.integers(0, 4096)),
        min_size=1,
        max_size=300,
    )
)
def test_credit_never_lets_more_than_burst_rate_and_work_through(
    steps: list[tuple[float, bool, int]],
) -> None:
    """Spends mixed with credits: what passes is at most burst + rate x elapsed + credits
    (+1), and credits never bank past a full budget."""
    b = Budget(rate=2.0, burst=5)
    now = 10.0
    ok = 0
    credits = 0.0
    for gap, work, n in steps:
        now += gap
        if work:
            b.credit(n / 1000)
            credits += n / 1000
        else:
            ok += b.spend(now)
        assert b.level >= 0.0
    assert ok <= 5 + 2.0 * (now - 10.0) + credits + 1


def test_credit_does_not_bank() -> None:
    """Much work, then a burst of spends at one instant: only `burst` pass."""
    b = Budget(rate=1.0, burst=4)
    b.credit(1000.0)
    assert sum(b.spend(50.0) for _ in range(10)) == 4


@pytest.mark.parametrize("kind", [EMPTY, WINDOW, PRIORITY, CLOSED_RESET])
def test_each_no_progress_kind_has_its_own_budget(kind: int) -> None:
    """`burst` frames of one kind at an instant pass, the next is refused; the other
    kinds are still under their budgets."""
    g = FrameGuard(rate=1.0, burst=20)
    assert all(g.frame(kind, 5.0) for _ in range(20))
    assert not g.frame(kind, 5.0)
    for other in (EMPTY, WINDOW, PRIORITY, CLOSED_RESET):
        if other != kind:
            assert g.frame(other, 5.0)


def test_request_work_refills_empty_frames() -> None:
    """Empty frames interleaved one to one with DATA that carries payload never run out;
    without the DATA the same empty frames do."""
    g = FrameGuard(rate=0.001, burst=10)
    for _ in range(10_000):
        assert g.frame(EMPTY, 1.0)
        assert g.frame(PROGRESS, 1.0)
    g2 = FrameGuard(rate=0.001, burst=10)
    assert not all(g2.frame(EMPTY, 1.0) for _ in range(11))


def test_streams_refill_priority_and_closed_resets() -> None:
    """A browser's PRIORITY frames (two per request) and a reset after each stream's end
    never run out however many requests; a client sending only those does."""
    g = FrameGuard(rate=0.001, burst=10)
    for _ in range(5_000):
        assert g.frame(STREAM, 1.0)
        assert g.frame(PRIORITY, 1.0) and g.frame(PRIORITY, 1.0)
        assert g.frame(CLOSED_RESET, 1.0)
    assert not all(g.frame(PRIORITY, 1.0) for _ in range(11))
    assert not all(g.frame(CLOSED_RESET, 1.0) for _ in range(11))


def test_window_updates_follow_bytes_sent() -> None:
    """WINDOW_UPDATEs answering the response bytes sent (two per 16 KiB DATA frame)
    never run out; with nothing sent, past the burst they do."""
    g = FrameGuard(rate=0.001, burst=10)
    for _ in range(10_000):
        g.sent(16384 + 9)
        assert g.frame(WINDOW, 1.0) and g.frame(WINDOW, 1.0)
    # The last two were not credited yet: the burst less two, then none.
    assert sum(g.frame(WINDOW, 1.0) for _ in range(20)) == 8


@given(
    st.lists(
        st.tuples(st.sampled_from([PROGRESS, STREAM, EMPTY, WINDOW]), st.integers(0, 3)),
        max_size=400,
    )
)
def test_empty_frames_bounded_by_burst_and_work(steps: list[tuple[int, int]]) -> None:
    """Over any mix of frames at one instant, the empty ones that pass are at most the
    burst plus one per DATA frame with payload or header block seen before them."""
    g = FrameGuard(rate=1.0, burst=7)
    work = 0
    passed = 0
    for kind, repeat in steps:
        for _ in range(repeat):
            ok = g.frame(kind, 3.0)
            if kind in (PROGRESS, STREAM):
                work += 1
            elif kind == EMPTY and ok:
                passed += 1
    assert passed <= 7 + work
