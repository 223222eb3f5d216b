"""W3C Trace Context through real proxies: a request that crossed two nodes is one trace,
the instance gets exactly one traceparent (the last hop's span), head sampling is decided
at the start and followed across the backhaul, and a retried span carries its retries and
bytes both ways. Spans are decoded with the official definitions (tests/support/otlp_receiver)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backhaul_nodes import BackhaulNode
from otlp_receiver import Receiver, attrs
from ports import free_port
from proxyctl import Proxy, Upstream, request_bytes, stop_proxies

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(90)]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CLIENT_TP = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def trace_fields(echo: dict[str, Any]) -> list[tuple[str, str]]:
    """The trace context fields the instance received (its echo of the head)."""
    return [
        (n.lower(), v) for n, v in echo["headers"] if n.lower() in ("traceparent", "tracestate")
    ]


def tracing(receiver: Receiver, **kw: Any) -> dict[str, Any]:
    return {"endpoint": receiver.endpoint, "slow_ms": 60000, "interval_ms": 100, **kw}


def test_a_backhauled_request_is_one_trace_across_two_nodes(
    tmp_path: Path, upstream: Upstream, receiver: Receiver
) -> None:
    """A client's traceparent enters edge n2 (sample_rate 1), crosses the backhaul to n3
    (sample_rate 0): both spans have the client's trace id, n2's parent is the client's
    span, n3's parent is n2's span (n3 followed the peer's sampled flag), and the
    instance got exactly one traceparent, carrying n3's span id, and the tracestate."""
    started: list[Proxy] = []
    try:
        n3_cfg = BackhaulNode(
            "n3",
            "127.0.0.3",
            {"insecure": True},
            instances=[{"id": "hello-n3", "address": upstream.address}],
            extra={"tracing": tracing(receiver, sample_rate=0.0)},
        )
        started.append(Proxy(n3_cfg, tmp_path))  # type: ignore[arg-type]
        n2_cfg = BackhaulNode(
            "n2",
            "127.0.0.2",
            {"insecure": True},
            instances=[{"id": "hello-n3", "address": "127.0.0.3:9", "node": "n3"}],
            peers=[{"id": "n3", "backhaul": n3_cfg.backhaul_address, "ping": "127.0.0.3:9"}],
            listen_backhaul=False,
            extra={"tracing": tracing(receiver, sample_rate=1.0)},
        )
        n2 = Proxy(n2_cfg, tmp_path)  # type: ignore[arg-type]
        started.append(n2)
        raw = request_bytes(
            headers=[("traceparent", CLIENT_TP), ("tracestate", "congo=t61rcWkgMzE")],
            close=True,
        )
        resp = n2.request(raw)
        assert resp.status == 200, resp
        got = receiver.wait_spans(2)
    finally:
        stop_proxies(started)
    assert len(got) == 2, got
    spans = {attrs(s.attributes)["edgeproxy.node"]: s for _, s in got}
    edge, far = spans["n2"], spans["n3"]
    assert edge.trace_id.hex() == TRACE and far.trace_id.hex() == TRACE
    assert edge.parent_span_id.hex() == PARENT
    assert far.parent_span_id == edge.span_id and far.span_id != edge.span_id
    assert attrs(edge.attributes)["edgeproxy.backhaul"] is True
    assert attrs(far.attributes)["edgeproxy.traced_because"] == "sampled"
    fields = trace_fields(json.loads(resp.body))
    assert fields == [
        ("traceparent", f"00-{TRACE}-{far.span_id.hex()}-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
    ]


@pytest.mark.parametrize(
    ("sent", "continued"),
    [
        ([CLIENT_TP], True),
        ([CLIENT_TP, CLIENT_TP], False),  # two traceparent fields: invalid
        ([CLIENT_TP.upper()], False),
        ([], False),
    ],
)
def test_the_instance_gets_one_traceparent_of_ours(
    proxy_factory: Callable[..., Proxy],
    receiver: Receiver,
    sent: list[str],
    continued: bool,
) -> None:
    """Whatever traceparent fields a client sends, the instance gets one: our span's id as
    parent-id, the client's trace id only when its field was valid and alone; a client's
    sampled flag is not followed (sample_rate 0: flag 00, no span)."""
    p = proxy_factory(workers=1, tracing=tracing(receiver, sample_rate=0.0))
    hs = [("traceparent", v) for v in sent] + [("tracestate", "congo=t61rcWkgMzE")]
    resp = p.request(request_bytes(headers=hs, close=True))
    assert resp.status == 200
    fields = trace_fields(resp.json())
    assert len(fields) == (2 if continued else 1), fields
    name, value = fields[0]
    version, trace, span, flags = value.split("-")
    assert name == "traceparent" and version == "00" and flags == "00"
    assert (trace == TRACE) is continued
    assert span not in (PARENT, "0" * 16) and len(span) == 16
    assert p.get("/status/500").status == 500  # a span that must come, after the first
    got = receiver.wait_spans(1)
    assert [attrs(s.attributes)["http.response.status_code"] for _, s in got] == [500]


def test_sample_rate_one_traces_every_request_with_the_sampled_flag(
    proxy_factory: Callable[..., Proxy], receiver: Receiver
) -> None:
    """sample_rate 1: every request is sampled at its start (flag 01 to the instance) and
    becomes a span whose ids are the ones the instance got."""
    p = proxy_factory(workers=1, tracing=tracing(receiver, sample_rate=1.0))
    sent = []
    for _ in range(3):
        resp = p.get("/")
        assert resp.status == 200
        ((_, value),) = trace_fields(resp.json())
        assert value.endswith("-01")
        sent.append(value)
    got = receiver.wait_spans(3)
    assert len(got) == 3
    spans = sorted(f"00-{s.trace_id.hex()}-{s.span_id.hex()}-01" for _, s in got)
    assert spans == sorted(sent)
    assert all(attrs(s.attributes)["edgeproxy.traced_because"] == "sampled" for _, s in got)
    assert all(not s.parent_span_id for _, s in got)


def test_a_retried_span_carries_its_retries_and_bytes_both_ways(
    proxy_factory: Callable[..., Proxy], receiver: Receiver
) -> None:
    """A POST preferred onto an instance that refuses connections is retried on the other:
    its span says retried, lists the reason, has one retry event naming the instance given
    up on, and the request and response body sizes."""
    dead = f"127.0.0.1:{free_port()}"
    p = proxy_factory(
        workers=1,
        tracing=tracing(receiver),
        extra_instances=[{"app": "hello", "id": "hello-dead", "address": dead}],
    )
    body = b"x" * 1000
    raw = request_bytes(
        "POST",
        "/",
        headers=[("X-Edgeproxy-Prefer-Instance", "hello-dead")],
        body=body,
        close=True,
    )
    resp = p.request(raw)
    assert resp.status == 200
    assert resp.json()["body_len"] == 1000
    ((_, span),) = receiver.wait_spans(1)
    a = attrs(span.attributes)
    assert a["edgeproxy.traced_because"] == "retried" and a["edgeproxy.tries"] == 2
    assert a["edgeproxy.retry_reasons"] == "connect_refused"
    assert a["edgeproxy.instance"] == "hello-1"
    assert a["http.request.body.size"] == 1000
    assert a["http.response.body.size"] == len(resp.body)
    (event,) = span.events
    assert event.name == "retry"
    e = attrs(event.attributes)
    assert e == {"edgeproxy.retry.reason": "connect_refused", "edgeproxy.instance": "hello-dead"}
    assert span.start_time_unix_nano <= event.time_unix_nano <= span.end_time_unix_nano
