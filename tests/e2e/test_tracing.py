"""Spans of slow and failed requests, exported as OTLP/HTTP protobuf by a real proxy to a
receiver that decodes them with the official definitions (tests/support/otlp_receiver.py)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator

import pytest
from h2client import H2Client
from otlp_receiver import Receiver, attrs
from proxyctl import Proxy

pytestmark = pytest.mark.request_path

SPAN_KIND_SERVER = 2
STATUS_CODE_ERROR = 2


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)  # the first export is answered 503: the exporter retries
    yield r
    r.close()


@pytest.mark.timeout(60)
def test_slow_and_failed_requests_become_spans(
    proxy_factory: Callable[..., Proxy], receiver: Receiver
) -> None:
    """A 503 from the instance and a request slower than slow_ms arrive as spans with the
    app, instance, node, status, tries and timings, under the configured headers; fast
    successful requests are not traced; the first export, refused with 503, is retried."""
    p = proxy_factory(
        workers=1,
        tracing={
            "endpoint": receiver.endpoint,
            "headers": {"x-honeycomb-team": "k3y"},
            "slow_ms": 1000,
            "interval_ms": 100,
        },
    )
    for _ in range(3):
        assert p.get("/").status == 200
    assert p.get("/status/503").status == 503
    assert p.get("/?delay=1.2").status == 200
    got = receiver.wait_spans(2)
    assert len(got) == 2, got
    assert not receiver.bad, receiver.bad
    assert receiver.answered >= 3  # the refused one, then the two batches (or one)
    by_status = {attrs(s.attributes)["http.response.status_code"]: (res, s) for res, s in got}
    res, failed = by_status[503]
    a = attrs(failed.attributes)
    assert a["edgeproxy.traced_because"] == "failed"
    assert a["edgeproxy.app"] == "hello" and a["edgeproxy.instance"] == "hello-1"
    assert a["edgeproxy.node"] == f"t{p.cfg.uid}" and a["edgeproxy.tries"] == 1
    assert a["http.request.method"] == "GET" and a["edgeproxy.backhaul"] is False
    assert "edgeproxy.time_to_response_head_ms" in a
    assert failed.status.code == STATUS_CODE_ERROR
    assert failed.kind == SPAN_KIND_SERVER and failed.name == "GET hello"
    assert len(failed.trace_id) == 16 and any(failed.trace_id)
    assert len(failed.span_id) == 8 and any(failed.span_id)
    assert failed.end_time_unix_nano >= failed.start_time_unix_nano  # the loop clock: 1 ms ticks
    assert attrs(res.attributes)["service.name"] == "edgeproxy"
    _, slow = by_status[200]
    b = attrs(slow.attributes)
    assert b["edgeproxy.traced_because"] == "slow"
    assert slow.end_time_unix_nano - slow.start_time_unix_nano >= 1_000_000_000
    assert slow.status.code != STATUS_CODE_ERROR
    for headers, _ in receiver.requests:
        assert headers["x-honeycomb-team"] == "k3y"
    assert p.wait_metric('edgeproxy_trace_spans_total{outcome="exported"}', 2) == 2
    assert p.metric('edgeproxy_trace_spans_total{outcome="export_failed"}') == 0


@pytest.mark.timeout(60)
def test_full_buffer_drops_and_counts_and_the_rest_leaves_at_stop(
    proxy_factory: Callable[..., Proxy], receiver: Receiver
) -> None:
    """With a buffer of 2 and no export before stopping, 4 failed requests keep 2 spans and
    count 2 dropped (the loop never waits for the exporter); a graceful stop sends the 2."""
    receiver.fail_first = 0
    p = proxy_factory(
        workers=1,
        tracing={"endpoint": receiver.endpoint, "buffer": 2, "interval_ms": 600000},
    )
    for _ in range(4):
        assert p.get("/status/500").status == 500
    assert p.wait_metric('edgeproxy_trace_spans_total{outcome="buffer_full"}', 2) == 2
    assert p.metric('edgeproxy_trace_spans_total{outcome="exported"}') == 0
    assert receiver.spans() == []
    p.stop(signal.SIGTERM)
    got = receiver.wait_spans(2)
    assert len(got) == 2
    assert {attrs(s.attributes)["http.response.status_code"] for _, s in got} == {500}


@pytest.mark.timeout(60)
def test_an_http2_stream_span_says_http2_and_carries_the_trace(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """A sampled request on an HTTP/2 connection (h2c) becomes a span whose protocol
    version is 2, and the instance receives exactly one traceparent, naming that span's
    trace and id; an HTTP/1.1 request beside it says 1.1."""
    receiver = Receiver()
    try:
        p = proxy_factory(
            workers=1,
            listen_extra={"h2c": True},
            tracing={"endpoint": receiver.endpoint, "sample_rate": 1.0, "interval_ms": 100},
        )
        with H2Client(p.port, None) as c:
            got = c.request("/echo")
        assert got.status == 200
        assert p.get("/").status == 200
        spans = [s for _, s in receiver.wait_spans(2)]
    finally:
        receiver.close()
    versions = sorted(attrs(s.attributes)["network.protocol.version"] for s in spans)
    assert versions == ["1.1", "2"], versions
    (h2span,) = [s for s in spans if attrs(s.attributes)["network.protocol.version"] == "2"]
    seen = json.loads(got.body)["headers"]
    sent = [v for k, v in seen if k.lower() == "traceparent"]
    assert sent == [f"00-{h2span.trace_id.hex()}-{h2span.span_id.hex()}-01"], (sent, seen)
