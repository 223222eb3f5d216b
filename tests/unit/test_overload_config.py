"""[overload]: the config rules, and the lag probe's shedding decision (proxy.worker.loopwatch)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, OverloadConfig, loads
from proxy.telemetry.metrics import WorkerStats
from proxy.worker.loopwatch import LagProbe


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
