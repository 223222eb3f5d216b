"""The [overload] section of the node configuration: how a worker watches its event loop
and when it sheds new requests instead of queueing them, as proxy.config reads it.

Owns the record, its defaults and its rules. Like proxy.config, pure: the worker's loop
watch (proxy.worker.loopwatch) does the measuring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.config_reader import Reader


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """[overload]: loop-lag probing, blocked-callback reports and shedding, in milliseconds."""

    probe_ms: float = 50.0  # period of the loop-lag probe (a timer: never per request)
    blocked_ms: float = 500.0  # a callback holding the loop this long is logged with its stack
    shed_lag_ms: float = 0.0  # lag that, sustained, sheds new requests with 503 (0: never)
    shed_after: int = 3  # probes in a row above shed_lag_ms to start shedding (below: to stop)
    retry_after: int = 1  # seconds, the Retry-After of a shed request's 503


def overload_section(r: Reader) -> OverloadConfig:
    r.check_keys(OverloadConfig.__slots__)
    d = OverloadConfig()
    for k in ("probe_ms", "blocked_ms", "shed_lag_ms"):
        if k in r.data and not math.isfinite(r.get(k, float)):
            raise r.fail(k, "must be a finite number")
    probe = r.positive("probe_ms", float, d.probe_ms)
    if not 1.0 <= probe <= 1000.0:
        raise r.fail("probe_ms", "must be between 1 and 1000")
    blocked = r.get("blocked_ms", float, d.blocked_ms)
    if blocked < 0:
        raise r.fail("blocked_ms", "must be >= 0 (0: no blocked-callback reports)")
    shed = r.get("shed_lag_ms", float, d.shed_lag_ms)
    if shed < 0:
        raise r.fail("shed_lag_ms", "must be >= 0 (0: never shed)")
    retry_after = r.positive("retry_after", int, d.retry_after)
    if retry_after > 3600:
        raise r.fail("retry_after", "must be at most 3600 seconds")
    return OverloadConfig(
        probe_ms=probe,
        blocked_ms=blocked,
        shed_lag_ms=shed,
        shed_after=r.positive("shed_after", int, d.shed_after),
        retry_after=retry_after,
    )
