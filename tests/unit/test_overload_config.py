"""[overload]: the config rules, the lag probe's shedding decision and the watchdog's
blocked-loop decision (proxy.worker.loopwatch)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, OverloadConfig, loads
from proxy.telemetry.metrics import WorkerStats
from proxy.worker.loopwatch import LagProbe, Watchdog


def test_defaults_watch_but_never_shed() -> None:
    """Without [overload], the loop is probed and blocked callbacks logged, but nothing is
    shed (shed_lag_ms = 0)."""
    c = loads("")
    assert c.overload == OverloadConfig()
    assert c.overload.shed_lag_ms == 0.0 and c.overload.blocked_ms > 0


def test_keys_are_read() -> None:
    """Every key reaches the record; integers are taken for milliseconds."""
    c = loads(
        "[overload]\nprobe_ms = 20\nblocked_ms = 0\nshed_lag_ms = 75.5\nshed_after = 4\n"
        "retry_after = 9\n"
    )
    assert c.overload == OverloadConfig(20.0, 0.0, 75.5, 4, 9)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("probe_ms = 0\n", r"overload\.probe_ms: must be > 0"),
        ("probe_ms = 5000\n", r"overload\.probe_ms: must be between 1 and 1000"),
        ("blocked_ms = -1\n", r"overload\.blocked_ms: must be >= 0"),
        ("shed_lag_ms = -5\n", r"overload\.shed_lag_ms: must be >= 0"),
        ("shed_lag_ms = nan\n", r"overload\.shed_lag_ms: must be a finite number"),
        ("blocked_ms = inf\n", r"overload\.blocked_ms: must be a finite number"),
        ("shed_after = 0\n", r"overload\.shed_after: must be > 0"),
        ("retry_after = 0\n", r"overload\.retry_after: must be > 0"),
        ("retry_after = 99999\n", r"overload\.retry_after: must be at most 3600"),
        ("shed = 1\n", r"overload\.shed: unknown key"),
    ],
)
def test_bad_values_are_refused(body: str, message: str) -> None:
    """Each bad [overload] value is refused with the key named."""
    with pytest.raises(ConfigError, match=message):
        loads("[overload]\n" + body)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()  # only a handle for the probe; never run here
    yield lp
    lp.close()


def probe(loop: asyncio.AbstractEventLoop, after: int, events: list[bool]) -> LagProbe:
    cfg = OverloadConfig(shed_lag_ms=50.0, shed_after=after)
    return LagProbe(loop, cfg, WorkerStats(["a"], 0, 1, 1), events.append)


@given(
    after=st.integers(min_value=1, max_value=5),
    lags=st.lists(st.sampled_from([0.0, 0.05, 0.051, 0.3]), max_size=60),
)
def test_shedding_follows_runs_of_readings(
    loop: asyncio.AbstractEventLoop, after: int, lags: list[float]
) -> None:
    """Shedding changes only after `shed_after` readings in a row on the other side of
    shed_lag_ms (a reading equal to it is not above): a run of that many above means
    shedding, below means not; every change is reported once, and the gauge agrees."""
    events: list[bool] = []
    p = probe(loop, after, events)
    for i, lag in enumerate(lags):
        before = p.shedding
        p.decide(lag)
        tail = lags[max(0, i + 1 - after) : i + 1]
        if len(tail) == after and all(x > 0.05 for x in tail):
            assert p.shedding
        elif len(tail) == after and all(x <= 0.05 for x in tail):
            assert not p.shedding
        else:
            assert p.shedding == before
        assert p.stats.shedding == int(p.shedding)
    changes = sum(1 for a, b in zip([False, *events], events, strict=False) if a != b)
    assert changes == len(events)  # alternating: never the same change twice


def watchdog(loop: asyncio.AbstractEventLoop, start: float) -> Watchdog:
    """blocked_ms 100: the thread wakes every 50 ms (never started here; fed by hand)."""
    w = Watchdog(probe(loop, 1, []), 0.1, [0, 0], io.StringIO())
    w.last_wake = start
    return w


def test_a_loop_held_past_blocked_ms_is_reported_once(loop: asyncio.AbstractEventLoop) -> None:
    """Wakes on time every 50 ms while the probe stays due at t=10.0: nothing up to 100 ms
    late, then one report with the lateness, and none again for the same stall."""
    w = watchdog(loop, 10.0)
    got = [w.seen(10.0 + 0.05 * i, 10.0) for i in range(1, 7)]
    assert got[:2] == [0.0, 0.0]
    assert got[2] == pytest.approx(0.15)
    assert got[3:] == [0.0, 0.0, 0.0]
    assert w.seen(10.4, 10.39) == 0.0  # the probe ran again: a new due, on time


def test_a_process_off_the_cpu_is_not_a_blocked_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The whole process stopped for 300 ms (a starved or SIGSTOPped host): the watchdog's
    own wake comes late too, so the probe's lateness is not blamed on a callback; the loop
    gets blocked_ms from then on to run its probe."""
    w = watchdog(loop, 10.0)
    assert w.seen(10.05, 10.04) == 0.0
    assert w.seen(10.35, 10.06) == 0.0  # back after 300 ms: the probe is 290 ms late
    assert w.seen(10.36, 10.37) == 0.0  # and it ran at once
    assert w.counts == [0, 0]


def test_a_loop_still_held_after_the_process_is_back_is_reported(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """After a late wake the loop's lateness counts from the moment the process was back:
    still stuck more than blocked_ms after that, it is reported, with its whole lateness."""
    w = watchdog(loop, 10.0)
    assert w.seen(10.35, 10.06) == 0.0
    assert w.seen(10.40, 10.06) == 0.0
    assert w.seen(10.45, 10.06) == 0.0  # 100 ms since back: not more than blocked_ms
    assert w.seen(10.50, 10.06) == pytest.approx(0.44)
