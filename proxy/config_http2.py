"""The [http2] section of the node configuration: HTTP/2 from clients, its limits and
the thresholds of its protections, as proxy.config reads it.

Owns the record, its defaults and its rules. Like proxy.config, pure: numbers only
(proxy.worker.h2conn applies them).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config_reader import Reader

_DEFAULT_WINDOW = 65535  # RFC 9113 6.9.2: what a client assumes before our SETTINGS
_MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Http2Config:
    """[http2]: served with ALPN h2 on HTTPS listeners, and on plaintext ones with
    `[listen] h2c = true` (prior knowledge)."""

    max_concurrent_streams: int = 100  # advertised; a stream past it is refused (REFUSED_STREAM)
    initial_window: int = 65535  # each stream's receive window (request body held per stream)
    connection_window: int = 1048576  # the connection's receive window (all its streams)
    max_header_list_size: int = 65536  # decoded header bytes per block (HPACK bomb bound)
    reset_burst: int = 200  # client stream resets taken at once (rapid reset, CVE-2023-44487)
    reset_rate: float = 50.0  # ... and per second after that; past it: GOAWAY ENHANCE_YOUR_CALM
    flood_burst: int = 100  # PING or SETTINGS frames taken at once (each, per connection)
    flood_rate: float = 10.0  # ... and per second after that; past it: GOAWAY ENHANCE_YOUR_CALM
    stall_timeout: float = 30.0  # seconds a stream's response may wait on a zero window
    # Receive windows grow with the measured bandwidth-delay product (PING RTT x bytes
    # per RTT, proxy.core.h2_window), from the two above up to max_window (then the most
    # request body one connection holds).
    adaptive_window: bool = True
    max_window: int = 16777216


def http2_section(r: Reader) -> Http2Config:
    r.check_keys(Http2Config.__slots__)
    d = Http2Config()
    cfg = Http2Config(
        max_concurrent_streams=r.positive("max_concurrent_streams", int, d.max_concurrent_streams),
        initial_window=r.positive("initial_window", int, d.initial_window),
        connection_window=r.positive("connection_window", int, d.connection_window),
        max_header_list_size=r.positive("max_header_list_size", int, d.max_header_list_size),
        reset_burst=r.positive("reset_burst", int, d.reset_burst),
        reset_rate=r.positive("reset_rate", float, d.reset_rate),
        flood_burst=r.positive("flood_burst", int, d.flood_burst),
        flood_rate=r.positive("flood_rate", float, d.flood_rate),
        stall_timeout=r.positive("stall_timeout", float, d.stall_timeout),
        adaptive_window=r.get("adaptive_window", bool, d.adaptive_window),
        max_window=r.positive("max_window", int, d.max_window),
    )
    for name in ("initial_window", "connection_window", "max_window"):
        value = getattr(cfg, name)
        if not _DEFAULT_WINDOW <= value <= _MAX_WINDOW:
            # Below 65535 a client may rightly send more than allowed before our SETTINGS.
            raise r.fail(name, f"must be between {_DEFAULT_WINDOW} and {_MAX_WINDOW}")
    if cfg.max_window < max(cfg.initial_window, cfg.connection_window):
        raise r.fail("max_window", "must be >= initial_window and connection_window")
    if cfg.max_header_list_size < 1024:
        raise r.fail("max_header_list_size", "must be >= 1024")
    return cfg
