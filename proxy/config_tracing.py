"""The [tracing] section of the node configuration: which requests become spans and
where they are exported (OTLP/HTTP protobuf), as proxy.config reads it.

Owns the record, its defaults and its rules. Like proxy.config, pure: it checks the
endpoint's form, never connects (proxy.worker.tracing exports).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.config_reader import Reader

_FIELD_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 5.6.2 token
_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")  # visible ASCII, spaces and tabs: no CR/LF


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """[tracing]: spans of slow and failed requests (and a sampled share), OTLP/HTTP."""

    endpoint: str = ""  # http(s)://host:port/v1/traces; empty: no tracing at all
    headers: tuple[tuple[str, str], ...] = field(default=())  # sent with every export
    slow_ms: float = 1000.0  # a request slower than this becomes a span
    sample_rate: float = 0.0  # share of all other requests that become spans too
    service_name: str = "edgeproxy"
    buffer: int = 4096  # spans held per worker for export; past it they are dropped, counted
    batch: int = 512  # spans per export request at most
    interval_ms: float = 1000.0  # how often the exporter sends what it has
    timeout_ms: float = 5000.0  # one export request's time limit
    retries: int = 3  # further tries of a failed export, with backoff; then dropped, counted

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


def tracing_section(r: Reader) -> TracingConfig:
    r.check_keys(TracingConfig.__slots__)
    d = TracingConfig()
    endpoint = r.get("endpoint", str, "")
    if endpoint:
        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise r.fail("endpoint", f"{endpoint!r} is not an http(s) URL")
    headers = []
    for k, v in r.get("headers", dict, {}).items():
        if not _FIELD_RE.match(k):
            raise r.fail(f"headers.{k}", "is not a header field name")
        if not isinstance(v, str) or not _VALUE_RE.match(v):
            raise r.fail(f"headers.{k}", "must be a string of visible characters")
        headers.append((k, v))
    for k in ("slow_ms", "sample_rate", "interval_ms", "timeout_ms"):
        if k in r.data and not math.isfinite(r.get(k, float)):
            raise r.fail(k, "must be a finite number")
    rate = r.get("sample_rate", float, d.sample_rate)
    if not 0.0 <= rate <= 1.0:
        raise r.fail("sample_rate", "must be between 0 and 1")
    retries = r.get("retries", int, d.retries)
    if not 0 <= retries <= 10:
        raise r.fail("retries", "must be between 0 and 10")
    return TracingConfig(
        endpoint=endpoint,
        headers=tuple(headers),
        slow_ms=r.positive("slow_ms", float, d.slow_ms),
        sample_rate=rate,
        service_name=r.text("service_name", d.service_name),
        buffer=r.positive("buffer", int, d.buffer),
        batch=r.positive("batch", int, d.batch),
        interval_ms=r.positive("interval_ms", float, d.interval_ms),
        timeout_ms=r.positive("timeout_ms", float, d.timeout_ms),
        retries=retries,
    )
