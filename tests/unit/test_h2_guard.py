"""proxy.core.h2_guard.Budget: a burst is taken, then only the refill rate (the bound of
rapid reset and PING/SETTINGS floods)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.h2_guard import Budget


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
