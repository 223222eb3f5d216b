"""OTLP trace export requests, encoded: span records in, protobuf bytes out.

Owns the wire form of `ExportTraceServiceRequest` (opentelemetry-proto's trace v1 and
collector v1 messages) for the fields this proxy sends: one resource, one scope, spans
with ids, name, kind SERVER, times, attributes (string, int, double, bool values),
events (a time, a name, attributes), an error status. Protobuf's encoding is small
(varints, length-delimited fields, fixed64), so it is written here rather than pulling
a protobuf runtime into every worker; the tests decode what it makes with the official
definitions. Sans-io: no clock, no random.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

Value = str | int | float | bool
Attrs = Sequence[tuple[str, Value]]

SPAN_KIND_SERVER: Final = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR: Final = 2  # opentelemetry.proto.trace.v1.Status.StatusCode
_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")


@dataclass(frozen=True, slots=True)
class Event:
    """A moment in a span (a retry): when, what, and its attributes."""

    time_ns: int  # Unix epoch nanoseconds
    name: str
    attributes: Attrs


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, as the exporter hands it to the encoder."""

    trace_id: bytes  # 16 bytes, not all zero
    span_id: bytes  # 8 bytes, not all zero
    parent_span_id: bytes  # 8 bytes, or b"" for a root span
    name: str
    start_ns: int  # Unix epoch nanoseconds
    end_ns: int
    attributes: Attrs
    error: str = ""  # non-empty: the span's status is ERROR with this message
    events: Sequence[Event] = ()


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # int64 as protobuf writes it: two's complement, ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode("utf-8", "replace"))


def _any_value(v: Value) -> bytes:
    """AnyValue: string_value 1, bool_value 2, int_value 3, double_value 4."""
    if isinstance(v, bool):
        return _tag(2, 0) + _varint(int(v))
    if isinstance(v, int):
        return _tag(3, 0) + _varint(v)
    if isinstance(v, float):
        return _tag(4, 1) + _DOUBLE.pack(v)
    return _str(1, v)


def _key_value(key: str, v: Value) -> bytes:
    """KeyValue: key 1, value 2."""
    return _str(1, key) + _bytes(2, _any_value(v))


def _attributes(field: int, attrs: Iterable[tuple[str, Value]]) -> bytes:
    return b"".join(_bytes(field, _key_value(k, v)) for k, v in attrs)


def span(s: SpanRecord) -> bytes:
    """Span: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, start 7, end 8
    (fixed64), attributes 9, events 11 (Event: time_unix_nano 1 fixed64, name 2,
    attributes 3), status 15 (message 2, code 3)."""
    out = _bytes(1, s.trace_id) + _bytes(2, s.span_id)
    if s.parent_span_id:
        out += _bytes(4, s.parent_span_id)
    out += _str(5, s.name) + _tag(6, 0) + _varint(SPAN_KIND_SERVER)
    out += _tag(7, 1) + _FIXED64.pack(s.start_ns) + _tag(8, 1) + _FIXED64.pack(s.end_ns)
    out += _attributes(9, s.attributes)
    for e in s.events:
        ev = _tag(1, 1) + _FIXED64.pack(e.time_ns) + _str(2, e.name) + _attributes(3, e.attributes)
        out += _bytes(11, ev)
    if s.error:
        out += _bytes(15, _str(2, s.error) + _tag(3, 0) + _varint(STATUS_ERROR))
    return out


def export_request(resource: Attrs, scope: str, version: str, spans: Iterable[SpanRecord]) -> bytes:
    """ExportTraceServiceRequest { resource_spans 1: ResourceSpans { resource 1: Resource
    { attributes 1 }, scope_spans 2: ScopeSpans { scope 1: { name 1, version 2 },
    spans 2 } } }."""
    scope_msg = _str(1, scope) + _str(2, version)
    scope_spans = _bytes(1, scope_msg) + b"".join(_bytes(2, span(s)) for s in spans)
    resource_spans = _bytes(1, _attributes(1, resource)) + _bytes(2, scope_spans)
    return _bytes(1, resource_spans)
