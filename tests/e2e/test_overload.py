"""A worker whose event loop is slowed on purpose (tests/support/stall_harness.py), over real
sockets: the loop lag shows in its stats, the blocking callback is logged with its stack
(once, the rest counted), new requests are shed with 503 + Retry-After while the lag stays
high, and served again once it is gone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from h2client import H2Client
from harness_worker import harness_worker
from proxyctl import Client, ProxyConfig, Response, Upstream, request_bytes

from proxy.telemetry.aggregate import Aggregator
from proxy.telemetry.families import (
    BLOCKED_LOGGED,
    BLOCKED_RATE_LIMITED,
    H2_REFUSED_STREAM,
    SHED_LOOP_LAG,
)
from proxy.telemetry.histograms import LAG_BUCKETS
from proxy.telemetry.metrics import decode_snapshot

pytestmark = pytest.mark.request_path

REFUSED_STREAM = 0x7  # RFC 9113 7


def get(port: int, path: str = "/") -> Response:
    with Client(port, timeout=10.0) as c:
        c.send(request_bytes(path=path, close=True))
        return c.response()


def poll(port: int, status: int, timeout: float = 15.0) -> Response:
    """GET / on fresh connections until one is answered `status` (or the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = get(port)
        if resp.status == status or time.monotonic() > deadline:
            return resp


@pytest.mark.timeout(60)
def test_slowed_loop_is_measured_logged_and_sheds(tmp_path: Path, upstream: Upstream) -> None:
    """A loop held 400 ms per iteration: lag over 0.1 s recorded, the blocking callback's
    stack logged once (later stalls counted, not logged), new requests get 503 with the
    configured Retry-After and are counted as shed; after the stall they are served again.
    (400 ms is four times blocked_ms: a watchdog whose own wake is late on a loaded machine
    restarts its clock, proxy.worker.loopwatch, and still has each stall to see.)"""
    cfg = ProxyConfig(
        upstream=upstream.address,
        workers=1,
        overload={
            "probe_ms": 10,
            "blocked_ms": 100,
            "shed_lag_ms": 50,
            "shed_after": 2,
            "retry_after": 7,
        },
    )
    with harness_worker("stall_harness.py", cfg, tmp_path) as (port, final):
        assert get(port).status == 200
        assert get(port, "/_stall?ms=400").status == 200
        shed = poll(port, 503)
        assert shed.status == 503, shed
        assert shed.header("Retry-After") == "7", shed
        assert b"overloaded" in shed.body
        assert get(port, "/_stall?ms=0").status == 200
        back = poll(port, 200)
        assert back.status == 200, back
    (data,) = final
    snap = decode_snapshot(data)
    shed_n = snap.families["shed_total"][SHED_LOOP_LAG]
    assert shed_n >= 1
    blocked = snap.families["loop_blocked_total"]
    assert blocked[BLOCKED_LOGGED] == 1, blocked  # one stack a minute
    assert blocked[BLOCKED_RATE_LIMITED] >= 1, blocked
    counts, _ = snap.hists["loop_lag_seconds"]["0"]
    over = sum(counts[LAG_BUCKETS.index(0.1) + 1 :])
    assert over >= 2, counts  # probes that ran more than 0.1 s late
    assert snap.shedding == 0  # recovered
    log = (tmp_path / "worker.stderr").read_text()
    assert log.count("event loop blocked for") == 1, log
    assert "in hold_the_loop" in log, log  # the stack names the blocking callback
    agg = Aggregator(["hello"])
    agg.update(data)
    text = agg.render()
    assert f'edgeproxy_shed_total{{reason="loop_lag"}} {shed_n}' in text
    assert f'edgeproxy_loop_lag_seconds_count{{worker="0"}} {sum(counts)}' in text
    assert 'edgeproxy_shedding{worker="0"} 0' in text


@pytest.mark.timeout(60)
def test_a_shedding_worker_refuses_http2_streams(tmp_path: Path, upstream: Upstream) -> None:
    """While the loop's lag sheds, a new HTTP/2 stream (h2c) is reset with REFUSED_STREAM
    (RFC 9113 8.7: unprocessed, safe to retry elsewhere) and counted as shed; once the lag
    is gone, a stream on the same connection is answered."""
    cfg = ProxyConfig(
        upstream=upstream.address,
        workers=1,
        listen_extra={"h2c": True},
        overload={"probe_ms": 10, "blocked_ms": 0, "shed_lag_ms": 50, "shed_after": 2},
    )
    with (
        harness_worker("stall_harness.py", cfg, tmp_path) as (port, final),
        H2Client(port, None) as c,
    ):
        assert c.request("/").status == 200
        assert get(port, "/_stall?ms=400").status == 200
        deadline = time.monotonic() + 15.0
        refused = None
        while refused is None and time.monotonic() < deadline:
            got = c.request("/")
            if got.reset is not None:
                refused = got
        assert refused is not None and refused.reset == REFUSED_STREAM, refused
        assert get(port, "/_stall?ms=0").status == 200
        deadline = time.monotonic() + 15.0
        while (got := c.request("/")).status != 200 and time.monotonic() < deadline:
            pass
        assert got.status == 200, got
    (data,) = final
    snap = decode_snapshot(data)
    assert snap.families["shed_total"][SHED_LOOP_LAG] >= 1
    assert snap.families["http2_events_total"][H2_REFUSED_STREAM] >= 1
