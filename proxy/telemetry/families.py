"""Labelled counter families: one line each in FAMILIES, carried and rendered generically.

Owns the registry of the counters that are a fixed set of label values (a reason, an
outcome): a worker holds one list of ints per family and bumps `list[index]` on its
path; the snapshot carries them by family name; the master sums and renders every
family it knows, zeros included. A family a master does not know (another version's)
is ignored, never an error. Label values are fixed words, never hosts or paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.core.cert_reasons import REASONS as CERT_REASONS
from proxy.core.clienthello import REASONS as HELLO_REASONS


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # without the edgeproxy_ prefix, ending in _total
    help: str
    label: str
    values: tuple[str, ...]


# TLS at the edge (proxy.worker.tls): what became of each accepted HTTPS connection.
TLS_OUTCOMES = (
    "handshake_ok",  # the handshake completed: an HTTP connection started
    "hello_refused",  # the ClientHello failed our parser: an alert was sent
    "hello_timeout",  # no complete ClientHello within [timeouts] tls_handshake
    "hello_eof",  # the client closed before a complete ClientHello
    "no_certificate",  # no certificate for the name (or no SNI, no default): unrecognized_name
    "no_alpn",  # ALPN offered, none of it served here: no_application_protocol
    "handshake_failed",  # OpenSSL refused the handshake (version, cipher, alert ...)
    "handshake_timeout",  # the handshake did not finish within [timeouts] tls_handshake
)
(
    TLS_OK,
    TLS_HELLO_REFUSED,
    TLS_HELLO_TIMEOUT,
    TLS_HELLO_EOF,
    TLS_NO_CERT,
    TLS_NO_ALPN,
    TLS_HANDSHAKE_FAILED,
    TLS_HANDSHAKE_TIMEOUT,
) = range(len(TLS_OUTCOMES))

# The certificate cache (proxy.worker.certs, its CertCounters fields by these names).
CERT_EVENTS = (
    "hits",  # a handshake's name found in the cache
    "misses",  # looked for and not found (no file, no store key, or only refused ones)
    "fetches",  # resolutions run (directory, then store)
    "loaded",  # certificates checked and cached
    "replaced",  # a cached one replaced by a newer valid one
    "removed",  # dropped: its source no longer has it
    "evicted_lru",
    "evicted_expired",
    "store_errors",  # store reads that failed
    "timeouts",  # resolutions past their time limit
)

# Overload (proxy.worker.loopwatch): requests shed, and callbacks that held the loop.
SHED_REASONS = ("loop_lag",)  # the loop's lag stayed above [overload] shed_lag_ms
(SHED_LOOP_LAG,) = range(len(SHED_REASONS))
BLOCKED_OUTCOMES = ("logged", "rate_limited")  # the stack was logged, or not (one a minute)
BLOCKED_LOGGED, BLOCKED_RATE_LIMITED = range(len(BLOCKED_OUTCOMES))

# Tracing (proxy.worker.tracing): what became of the spans of traced requests.
SPAN_OUTCOMES = ("exported", "buffer_full", "export_failed")

# The access log (proxy.worker.accesslog): what became of each sampled request's line.
ACCESS_OUTCOMES = ("written", "buffer_full", "write_failed")

# HTTP/2 from clients (proxy.worker.h2conn): streams, and what the protections did.
H2_EVENTS = (
    "stream",  # a request stream accepted (then routed like an HTTP/1.1 request)
    "client_reset",  # RST_STREAM from the client
    "rapid_reset",  # resets past [http2] reset_burst/reset_rate: GOAWAY ENHANCE_YOUR_CALM
    "refused_stream",  # past max_concurrent_streams (or shedding): RST_STREAM REFUSED_STREAM
    "malformed",  # pseudo-header fields, names, values: RST_STREAM PROTOCOL_ERROR
    "connection_specific",  # Connection, Transfer-Encoding, TE, ... (RFC 9113 8.2.2)
    "content_length",  # content-length vs DATA (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR
    "hpack_bomb",  # a header list past max_header_list_size: GOAWAY ENHANCE_YOUR_CALM
    "continuation_flood",  # CONTINUATION frames past the bound: GOAWAY ENHANCE_YOUR_CALM
    "ping_flood",  # PINGs past [http2] flood_burst/flood_rate: GOAWAY ENHANCE_YOUR_CALM
    "settings_flood",  # SETTINGS past the same budget: GOAWAY ENHANCE_YOUR_CALM
    "stalled",  # a response stuck at a zero window past stall_timeout: RST_STREAM CANCEL
    "protocol_error",  # any other connection error: GOAWAY with its code
    "empty_frames",  # empty DATA/HEADERS/CONTINUATION, unknown frames past flood_burst/rate
    "window_update_flood",  # WINDOW_UPDATE past the budget (refilled by bytes sent)
    "priority_flood",  # PRIORITY / PRIORITY_UPDATE past the budget (refilled by streams)
    "closed_reset_flood",  # RST_STREAM on closed streams past the budget
    "drain_goaway",  # a draining worker's first GOAWAY (2^31-1) and PING (RFC 9113 6.8)
    "drain_refused",  # a stream opened after the final GOAWAY: RST_STREAM REFUSED_STREAM
)
(
    H2_STREAMS,
    H2_CLIENT_RESET,
    H2_RAPID_RESET,
    H2_REFUSED_STREAM,
    H2_MALFORMED,
    H2_CONNECTION_SPECIFIC,
    H2_CONTENT_LENGTH,
    H2_HPACK_BOMB,
    H2_CONTINUATION_FLOOD,
    H2_PING_FLOOD,
    H2_SETTINGS_FLOOD,
    H2_STALLED,
    H2_PROTOCOL_ERROR,
    H2_EMPTY_FRAMES,
    H2_WINDOW_UPDATE_FLOOD,
    H2_PRIORITY_FLOOD,
    H2_CLOSED_RESET_FLOOD,
    H2_DRAIN_GOAWAY,
    H2_DRAIN_REFUSED,
) = range(len(H2_EVENTS))

FAMILIES: tuple[Family, ...] = (
    Family(
        "tls_connections_total",
        "HTTPS connections accepted, by what became of their handshake.",
        "outcome",
        TLS_OUTCOMES,
    ),
    Family(
        "tls_hellos_refused_total",
        "ClientHellos our parser refused (an alert, then a close), by reason.",
        "reason",
        HELLO_REASONS,
    ),
    Family(
        "tls_certificate_events_total",
        "What the certificate cache did, by event.",
        "event",
        CERT_EVENTS,
    ),
    Family(
        "tls_ticket_errors_total",
        "Session-ticket key trouble: contexts left with per-process tickets (install),"
        " tickets not made or read because the key callback failed (callback).",
        "kind",
        ("install", "callback"),
    ),
    Family(
        "tls_certificates_rejected_total",
        "Certificates found (file or store) and refused by the checks, by reason.",
        "reason",
        CERT_REASONS,
    ),
    Family(
        "shed_total",
        "Requests answered 503 + Retry-After before routing, the worker being overloaded,"
        " by reason.",
        "reason",
        SHED_REASONS,
    ),
    Family(
        "loop_blocked_total",
        "Times one callback held a worker's event loop past [overload] blocked_ms, by"
        " whether its stack was logged.",
        "outcome",
        BLOCKED_OUTCOMES,
    ),
    Family(
        "trace_spans_total",
        "Spans of slow, failed, retried or sampled requests: exported, dropped because"
        " the worker's buffer was full, or dropped after failed export tries.",
        "outcome",
        SPAN_OUTCOMES,
    ),
    Family(
        "access_log_lines_total",
        "Access log lines of sampled requests: written, dropped because the worker's buffer"
        " was full, or dropped because the write failed.",
        "outcome",
        ACCESS_OUTCOMES,
    ),
    Family(
        "http2_events_total", "HTTP/2 client streams and protections, by event.", "event", H2_EVENTS
    ),
)
BY_NAME: Mapping[str, Family] = {f.name: f for f in FAMILIES}


def zeros() -> dict[str, list[int]]:
    """One zeroed counter list per family (a worker's starting point)."""
    return {f.name: [0] * len(f.values) for f in FAMILIES}


def decode(raw: Any) -> dict[str, tuple[int, ...]]:
    """The families of a snapshot this master knows; others (or misshapen ones) dropped."""
    out: dict[str, tuple[int, ...]] = {}
    if not isinstance(raw, dict):
        return out
    for name, counts in raw.items():
        fam = BY_NAME.get(name) if isinstance(name, str) else None
        if fam is None or not isinstance(counts, list | tuple) or len(counts) != len(fam.values):
            continue
        if all(type(v) is int and v >= 0 for v in counts):
            out[name] = tuple(counts)
    return out


def add(into: dict[str, list[int]], values: Mapping[str, Sequence[int]]) -> None:
    for name, counts in values.items():
        row = into.setdefault(name, [0] * len(counts))
        for i, v in enumerate(counts):
            row[i] += v


def render(out: list[str], totals: Mapping[str, Sequence[int]]) -> None:
    """Every family, zeros included, in the Prometheus text format."""
    for fam in FAMILIES:
        counts = totals.get(fam.name) or [0] * len(fam.values)
        out.append(f"# HELP edgeproxy_{fam.name} {fam.help}")
        out.append(f"# TYPE edgeproxy_{fam.name} counter")
        for v, n in zip(fam.values, counts, strict=True):
            out.append(f'edgeproxy_{fam.name}{{{fam.label}="{v}"}} {n}')


def size_bound() -> int:
    """Bytes a snapshot's families can take at most (names, headers, 9-byte ints)."""
    return sum(len(f.name) + 8 + 9 * len(f.values) for f in FAMILIES) + 16
