"""Histograms with a fixed label (proxy.telemetry.histograms): worker counts -> snapshot ->
master sums by label -> Prometheus text; bounded by the configured apps and the slots."""

from __future__ import annotations

import math

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type hints
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.telemetry import histograms
from proxy.telemetry.aggregate import Aggregator
from proxy.telemetry.histograms import (
    BODY_BUCKETS,
    LAG_BUCKETS,
    LOOP_LAG,
    REQUEST_BODY,
    RESPONSE_BODY,
)
from proxy.telemetry.metrics import NO_APP, WorkerStats, block_size_for
from proxy.telemetry.statsblock import StatsBlock

APPS = ("hello", "shop")


def lines(text: str, prefix: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            series, _, value = line.rpartition(" ")
            out[series] = value
    return out


def test_per_app_and_per_slot_series_sum_and_survive_retirement() -> None:
    """Body durations land under their app (the no-app row under _none), loop lag under the
    worker's slot; two workers of one slot sum, and a retired worker's counts stay."""
    agg = Aggregator(APPS)
    a = WorkerStats(APPS, slot=0, generation=1, pid=11)
    a.hists[REQUEST_BODY].observe(1, 0.2)  # shop
    a.hists[RESPONSE_BODY].observe(0, 0.0005)  # hello
    a.hists[RESPONSE_BODY].observe(a.no_app, 400.0)  # beyond the last bound: +Inf only
    a.hists[LOOP_LAG].observe(0, 0.03)
    b = WorkerStats(APPS, slot=1, generation=1, pid=12)
    b.hists[LOOP_LAG].observe(0, 2.0)
    b.loop_lag, b.shedding = 2.0, 1
    agg.update(a.snapshot())
    agg.update(b.snapshot())
    agg.retire(11, a.snapshot())
    c = WorkerStats(APPS, slot=0, generation=2, pid=13)
    c.hists[LOOP_LAG].observe(0, 0.03)
    agg.update(c.snapshot())
    text = agg.render()
    req = lines(text, "edgeproxy_request_body_seconds")
    assert req['edgeproxy_request_body_seconds_count{app="shop"}'] == "1"
    assert req['edgeproxy_request_body_seconds_bucket{app="shop",le="0.1"}'] == "0"
    assert req['edgeproxy_request_body_seconds_bucket{app="shop",le="0.5"}'] == "1"
    assert req['edgeproxy_request_body_seconds_sum{app="shop"}'] == "0.2"
    assert req['edgeproxy_request_body_seconds_count{app="hello"}'] == "0"
    resp = lines(text, "edgeproxy_response_body_seconds")
    assert resp['edgeproxy_response_body_seconds_bucket{app="hello",le="0.001"}'] == "1"
    assert resp[f'edgeproxy_response_body_seconds_bucket{{app="{NO_APP}",le="300.0"}}'] == "0"
    assert resp[f'edgeproxy_response_body_seconds_bucket{{app="{NO_APP}",le="+Inf"}}'] == "1"
    lag = lines(text, "edgeproxy_loop_lag_seconds")
    assert lag['edgeproxy_loop_lag_seconds_count{worker="0"}'] == "2"  # retired + live
    assert lag['edgeproxy_loop_lag_seconds_bucket{worker="0",le="0.05"}'] == "2"
    assert lag['edgeproxy_loop_lag_seconds_bucket{worker="1",le="1.0"}'] == "0"
    assert lag['edgeproxy_loop_lag_seconds_count{worker="1"}'] == "1"
    assert 'edgeproxy_loop_lag_current_seconds{worker="1"} 2.0' in text
    assert 'edgeproxy_shedding{worker="1"} 1' in text
    assert 'edgeproxy_shedding{worker="0"} 0' in text
    per_app = [k for k in req if "_count{" in k]
    assert len(per_app) == len(APPS) + 1  # the label set is the configured apps and _none


@pytest.mark.parametrize(
    "raw",
    [
        "nope",
        {"request_body_seconds": [[0] * 3, [0.0] * 3]},  # wrong width
        {"request_body_seconds": [[0] * (3 * 13), [0.0, -1.0, 0.0]]},  # negative sum
        {"request_body_seconds": [[0] * (3 * 13), [0.0, math.nan, 0.0]]},
        {"request_body_seconds": [[-1] + [0] * (3 * 13 - 1), [0.0] * 3]},
        {"loop_lag_seconds": [[0] * 13 * 2, [0.0, 0.0]]},  # a worker has one row
    ],
)
def test_misshapen_histograms_are_dropped(raw: object) -> None:
    """A histogram of the wrong shape or with bad numbers is dropped, never summed."""
    assert histograms.decode(raw, APPS, 0, NO_APP) == {}


def test_unknown_families_are_ignored() -> None:
    """Another version's histogram family is ignored; the known ones are kept."""
    stats = WorkerStats(APPS, 0, 1, 1)
    raw = msgpack.unpackb(msgpack.packb(histograms.pack(stats.hists)))
    raw["from_the_future_seconds"] = [[1], [1.0]]
    got = histograms.decode(raw, APPS, 0, NO_APP)
    assert set(got) == {f.name for f in histograms.FAMILIES}


@given(st.lists(st.floats(min_value=0.0, max_value=1e4), max_size=50))
def test_observe_counts_every_value_in_its_bucket(values: list[float]) -> None:
    """Every observation lands in exactly one bucket: the first bound >= it (le is
    inclusive), +Inf past the last; the sum is the values' sum."""
    h = histograms.Hist(BODY_BUCKETS, 1)
    for x in values:
        h.observe(0, x)
    assert sum(h.counts) == len(values)
    for i, n in enumerate(h.counts):
        lo = BODY_BUCKETS[i - 1] if i else -1.0
        hi = BODY_BUCKETS[i] if i < len(BODY_BUCKETS) else math.inf
        assert n == sum(1 for x in values if lo < x <= hi)
    assert h.sums[0] == pytest.approx(sum(values))


def test_block_holds_the_histograms_of_many_apps() -> None:
    """block_size_for(n) still holds a snapshot whose every histogram count is huge."""
    apps = [f"{i:03d}" + "a" * 59 for i in range(1024)]
    s = WorkerStats(apps, slot=255, generation=2**40, pid=2**22)
    for h in s.hists:
        h.counts = [2**64 - 1] * len(h.counts)
        h.sums = [1e300] * len(h.sums)
    with StatsBlock.create(block_size_for(len(apps))) as b:
        b.publish(s.snapshot())
    assert len(LAG_BUCKETS) + 1 == len(s.hists[LOOP_LAG].counts)


@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), max_size=20).map(lambda v: tuple(sorted(v))),
    st.floats(-1.0, 2e4, allow_nan=False),
)
def test_bucket_is_bisect_left(bounds: tuple[float, ...], x: float) -> None:
    """The forward scan picks the bucket bisect_left picks, for any sorted bounds and value."""
    from bisect import bisect_left

    assert histograms.bucket(bounds, x) == bisect_left(bounds, x)
