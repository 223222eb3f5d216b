"""proxy.worker.faults: internal errors are always counted, their tracebacks logged at most once
per site per period (clock injected)."""

from __future__ import annotations

import io

from proxy.telemetry.metrics import INTERNAL_WHERE, WHERE_BATCH, WHERE_SWEEP
from proxy.worker.faults import Faults


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _raise_here(n: int) -> Exception:
    try:
        if n:
            raise KeyError(n)
        raise ValueError("other site")
    except Exception as e:
        return e


def test_same_site_logs_once_per_period_and_counts_every_time() -> None:
    """Repeats of one site within the period are counted, not logged; the next log after
    the period says how many were suppressed; another site logs at once."""
    counts = [0] * len(INTERNAL_WHERE)
    out = io.StringIO()
    clock = Clock()
    f = Faults(counts, clock, out, period=60.0)
    assert f.report(WHERE_BATCH, _raise_here(1), "a held write")
    assert not f.report(WHERE_BATCH, _raise_here(2))
    assert not f.report(WHERE_BATCH, _raise_here(3))
    assert f.report(WHERE_BATCH, _raise_here(0))  # ValueError: another site
    assert f.report(WHERE_SWEEP, _raise_here(4))  # same code, other place in the worker
    clock.now += 60.0
    assert f.report(WHERE_BATCH, _raise_here(5))
    text = out.getvalue()
    assert counts[WHERE_BATCH] == 5 and counts[WHERE_SWEEP] == 1
    assert text.count("Traceback (most recent call last)") == 4, text
    assert text.count("\nKeyError: ") == 3 and "\nValueError: other site" in text
    assert "internal error in batch: a held write\n" in text
    assert "(2 more at this site since the last report)" in text
