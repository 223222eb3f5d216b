"""The OTLP encoder (proxy.core.otlp) against the official protobuf definitions, and the
[tracing] config rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.config import ConfigError, loads
from proxy.core.otlp import Event, SpanRecord, export_request

values = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
attrs = st.lists(st.tuples(st.text(min_size=1, max_size=20), values), max_size=8)
spans = st.builds(
    SpanRecord,
    trace_id=st.binary(min_size=16, max_size=16),
    span_id=st.binary(min_size=8, max_size=8),
    parent_span_id=st.one_of(st.just(b""), st.binary(min_size=8, max_size=8)),
    name=st.text(max_size=60),
    start_ns=st.integers(min_value=0, max_value=2**64 - 1),
    end_ns=st.integers(min_value=0, max_value=2**64 - 1),
    attributes=attrs,
    error=st.text(max_size=30),
    events=st.lists(
        st.builds(
            Event,
            time_ns=st.integers(min_value=0, max_value=2**64 - 1),
            name=st.text(max_size=20),
            attributes=attrs,
        ),
        max_size=3,
    ),
)


def decoded_value(v: object) -> object:
    which = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, which)


@given(resource=attrs, records=st.lists(spans, max_size=5))
def test_official_decoder_reads_back_every_field(
    resource: list[tuple[str, object]], records: list[SpanRecord]
) -> None:
    """What the encoder writes, opentelemetry-proto decodes to the same ids, names, times,
    attributes (each value type), events and error status, in order."""
    body = export_request(resource, "edgeproxy", "1.2.3", records)  # type: ignore[arg-type]
    msg = ExportTraceServiceRequest.FromString(body)
    (rs,) = msg.resource_spans
    assert [(kv.key, decoded_value(kv.value)) for kv in rs.resource.attributes] == resource
    (ss,) = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("edgeproxy", "1.2.3")
    assert len(ss.spans) == len(records)
    for got, want in zip(ss.spans, records, strict=True):
        assert got.trace_id == want.trace_id and got.span_id == want.span_id
        assert got.parent_span_id == want.parent_span_id
        assert got.name == want.name and got.kind == 2  # SPAN_KIND_SERVER
        assert got.start_time_unix_nano == want.start_ns
        assert got.end_time_unix_nano == want.end_ns
        pairs = [(kv.key, decoded_value(kv.value)) for kv in got.attributes]
        assert len(pairs) == len(want.attributes)
        for (gk, gv), (wk, wv) in zip(pairs, want.attributes, strict=True):
            assert gk == wk
            assert type(gv) is type(wv) and (gv == wv or (isinstance(wv, float) and math.isnan(wv)))
        assert [
            (e.time_unix_nano, e.name, [(kv.key, decoded_value(kv.value)) for kv in e.attributes])
            for e in got.events
        ] == [(e.time_ns, e.name, list(e.attributes)) for e in want.events]
        if want.error:
            assert got.status.code == 2 and got.status.message == want.error
        else:
            assert got.status.code == 0


def test_tracing_is_off_without_an_endpoint() -> None:
    """No [tracing] endpoint: nothing is traced; with one, the headers are kept in order."""
    assert not loads("").tracing.enabled
    c = loads('[tracing]\nendpoint = "https://api.example.test/v1/traces"\nheaders = {a = "1"}\n')
    assert c.tracing.enabled and c.tracing.headers == (("a", "1"),)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('endpoint = "ftp://x/"\n', r"tracing\.endpoint: 'ftp://x/' is not an http\(s\) URL"),
        ('endpoint = "http:///v1"\n', r"tracing\.endpoint: .* is not an http\(s\) URL"),
        ('headers = {"bad name" = "x"}\n', r"tracing\.headers\.bad name: is not a header field"),
        ('headers = {a = "x\\r\\nInjected: 1"}\n', r"tracing\.headers\.a: must be a string"),
        ("headers = {a = 1}\n", r"tracing\.headers\.a: must be a string"),
        ("sample_rate = 1.5\n", r"tracing\.sample_rate: must be between 0 and 1"),
        ("slow_ms = nan\n", r"tracing\.slow_ms: must be a finite number"),
        ("slow_ms = 0\n", r"tracing\.slow_ms: must be > 0"),
        ("buffer = 0\n", r"tracing\.buffer: must be > 0"),
        ("retries = 11\n", r"tracing\.retries: must be between 0 and 10"),
        ("sampling = 1\n", r"tracing\.sampling: unknown key"),
    ],
)
def test_bad_tracing_values_are_refused(body: str, message: str) -> None:
    """Each bad [tracing] value is refused with the key named (no CR/LF into headers)."""
    with pytest.raises(ConfigError, match=message):
        loads("[tracing]\n" + body)
