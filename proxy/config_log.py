"""The [log] section of the node configuration: the optional access log and the form of
the workers' error lines, as proxy.config reads it.

Owns the record, its defaults and its rules. Like proxy.config, pure: it checks the
path's form, never opens it (proxy.worker.accesslog writes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from proxy.config_reader import Reader

STDERR = "stderr"
FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: a sampled JSON-lines access log, and text or JSON error lines."""

    access: str = ""  # "" (no access log), "stderr", or an absolute file path
    sample_rate: float = 1.0  # share of finished requests that get a line
    buffer: int = 8192  # lines held per worker for the writer; past it dropped, counted
    flush_ms: float = 200.0  # how often each worker's writer thread writes what it holds
    format: str = "text"  # the workers' error and warning lines: "text" or "json"

    @property
    def enabled(self) -> bool:
        return bool(self.access)


def log_section(r: Reader) -> LogConfig:
    r.check_keys(LogConfig.__slots__)
    d = LogConfig()
    access = r.get("access", str, "")
    if access and access != STDERR and not os.path.isabs(access):
        raise r.fail("access", f'{access!r} is neither "stderr" nor an absolute path')
    if "\x00" in access or access.endswith("/"):
        raise r.fail("access", f"{access!r} is not a file path")
    for k in ("sample_rate", "flush_ms"):
        if k in r.data and not math.isfinite(r.get(k, float)):
            raise r.fail(k, "must be a finite number")
    rate = r.get("sample_rate", float, d.sample_rate)
    if not 0.0 <= rate <= 1.0:
        raise r.fail("sample_rate", "must be between 0 and 1")
    flush = r.positive("flush_ms", float, d.flush_ms)
    if flush > 10_000:
        raise r.fail("flush_ms", "must be at most 10000")
    fmt = r.get("format", str, d.format)
    if fmt not in FORMATS:
        raise r.fail("format", f"must be one of {', '.join(FORMATS)}")
    buffer = r.positive("buffer", int, d.buffer)
    if buffer > 1_000_000:
        raise r.fail("buffer", "must be at most 1000000")
    return LogConfig(access=access, sample_rate=rate, buffer=buffer, flush_ms=flush, format=fmt)
