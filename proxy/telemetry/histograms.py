"""Histogram families with one fixed label (the worker slot, or the app from config).

Owns the registry of these histograms (loop lag per worker slot, request and response
body durations per app), a worker's counts for them (`Hist.observe`: a bucket search and
two list increments), their snapshot form, the master's sums by label
value and their rendering, with the loop gauges (current lag, shedding) per slot. Label
values are a slot number or a configured app name, never anything a client sent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PER_APP = "app"
PER_WORKER = "worker"
LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BODY_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HistFamily:
    name: str  # without the edgeproxy_ prefix, ending in _seconds
    help: str
    per: str  # PER_APP: one row per configured app (+ the no-app row); PER_WORKER: one row
    bounds: tuple[float, ...]


FAMILIES: tuple[HistFamily, ...] = (
    HistFamily(
        "loop_lag_seconds",
        "How late the worker's event loop ran its lag probe (a timer every"
        " [overload] probe_ms), by worker slot.",
        PER_WORKER,
        LAG_BUCKETS,
    ),
    HistFamily(
        "request_body_seconds",
        "Request body, first to last byte received from the client, by app.",
        PER_APP,
        BODY_BUCKETS,
    ),
    HistFamily(
        "response_body_seconds",
        "Response from the instance, head received to last byte, by app.",
        PER_APP,
        BODY_BUCKETS,
    ),
)
LOOP_LAG, REQUEST_BODY, RESPONSE_BODY = range(len(FAMILIES))
BY_NAME: Mapping[str, HistFamily] = {f.name: f for f in FAMILIES}


def bucket(bounds: tuple[float, ...], x: float) -> int:
    """The index of the first bound >= `x` (bisect_left's answer), len(bounds) past the
    last. A forward scan: compiled, it compares unboxed floats and most observations
    stop at the first bounds, where bisect_left's generic comparisons cost ~10x more."""
    i = 0
    for b in bounds:
        if x <= b:
            return i
        i += 1
    return i


class Hist:
    """One worker's counts of one family: `counts[row * width + bucket]` (per bucket, not
    cumulative; the last is +Inf) and `sums[row]`."""

    __slots__ = ("bounds", "counts", "sums", "width")

    def __init__(self, bounds: tuple[float, ...], rows: int) -> None:
        self.bounds = bounds
        self.width = len(bounds) + 1
        self.counts = [0] * (rows * self.width)
        self.sums = [0.0] * rows

    def observe(self, row: int, seconds: float) -> None:
        self.counts[row * self.width + bucket(self.bounds, seconds)] += 1
        self.sums[row] += seconds


def zeros(app_rows: int) -> list[Hist]:
    """A worker's histograms, in FAMILIES order (`app_rows`: apps + the no-app row)."""
    return [Hist(f.bounds, app_rows if f.per == PER_APP else 1) for f in FAMILIES]


def pack(hists: Sequence[Hist]) -> dict[str, list[list[int] | list[float]]]:
    return {f.name: [h.counts, h.sums] for f, h in zip(FAMILIES, hists, strict=True)}


Rows = dict[str, tuple[tuple[int, ...], float]]  # label value -> (bucket counts, sum)


def decode(raw: Any, apps: Sequence[str], slot: int, no_app: str) -> dict[str, Rows]:
    """A snapshot's histograms by family and label value; unknown or misshapen ones dropped."""
    out: dict[str, Rows] = {}
    if not isinstance(raw, dict):
        return out
    labels = [*apps, no_app]
    for name, value in raw.items():
        fam = BY_NAME.get(name) if isinstance(name, str) else None
        if fam is None or not isinstance(value, list | tuple) or len(value) != 2:
            continue
        counts, sums = value
        keys = labels if fam.per == PER_APP else [str(slot)]
        width = len(fam.bounds) + 1
        if not _ok(counts, sums, len(keys), width):
            continue
        out[name] = {
            k: (tuple(counts[i * width : (i + 1) * width]), float(sums[i]))
            for i, k in enumerate(keys)
        }
    return out


def _ok(counts: Any, sums: Any, rows: int, width: int) -> bool:
    if not isinstance(counts, list | tuple) or not isinstance(sums, list | tuple):
        return False
    if len(counts) != rows * width or len(sums) != rows:
        return False
    if not all(type(v) is int and v >= 0 for v in counts):
        return False
    return all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in sums)


Totals = dict[str, dict[str, list[float]]]  # family -> label value -> [*counts, sum]


def add(into: Totals, hists: Mapping[str, Rows]) -> None:
    for name, rows in hists.items():
        fam_rows = into.setdefault(name, {})
        for key, (counts, total) in rows.items():
            row = fam_rows.setdefault(key, [0] * (len(counts) + 1))
            for i, v in enumerate(counts):
                row[i] += v
            row[-1] += total


def merge(into: Totals, other: Totals) -> None:
    for name, rows in other.items():
        fam_rows = into.setdefault(name, {})
        for key, row in rows.items():
            mine = fam_rows.setdefault(key, [0] * len(row))
            for i, v in enumerate(row):
                mine[i] += v


def fold(t: Totals, keep: set[str], other: str) -> bool:
    """Sum the rows of per-app families whose app is not in `keep` into row `other`;
    whether there was any (the master's cap on per-app series)."""
    folded = False
    for fam in FAMILIES:
        rows = t.get(fam.name)
        if fam.per != PER_APP or not rows:
            continue
        for key in [k for k in rows if k not in keep]:
            row = rows.pop(key)
            into = rows.setdefault(other, [0] * len(row))
            for i, v in enumerate(row):
                into[i] += v
            folded = True
    return folded


def copy(t: Totals) -> Totals:
    return {name: {k: list(row) for k, row in rows.items()} for name, rows in t.items()}


def render(out: list[str], t: Totals, apps: Iterable[str]) -> None:
    """Every family: per-app ones for every app in `apps` (zeros included), per-worker ones
    for every slot seen. The caller orders `apps` (configured first, then retired ones)."""
    app_keys = list(apps)
    for fam in FAMILIES:
        rows = t.get(fam.name, {})
        label = PER_APP if fam.per == PER_APP else PER_WORKER
        keys = app_keys if fam.per == PER_APP else sorted(rows, key=int)
        out.append(f"# HELP edgeproxy_{fam.name} {fam.help}")
        out.append(f"# TYPE edgeproxy_{fam.name} histogram")
        for key in keys:
            row = rows.get(key) or [0] * (len(fam.bounds) + 2)
            lv = f'{label}="{_esc(key)}"'
            cumulative = 0
            for le, n in zip((*(repr(b) for b in fam.bounds), "+Inf"), row, strict=False):
                cumulative += int(n)
                out.append(f'edgeproxy_{fam.name}_bucket{{{lv},le="{le}"}} {cumulative}')
            out.append(f"edgeproxy_{fam.name}_sum{{{lv}}} {float(row[-1])!r}")
            out.append(f"edgeproxy_{fam.name}_count{{{lv}}} {cumulative}")


def render_loop(out: list[str], live: Iterable[tuple[int, float, int]]) -> None:
    """The loop gauges of live workers, (slot, current lag, shedding), by slot: the worst
    of a slot's workers (an old generation draining beside the new one)."""
    lag: dict[int, float] = {}
    shed: dict[int, int] = {}
    for slot, seconds, shedding in live:
        lag[slot] = max(lag.get(slot, 0.0), seconds)
        shed[slot] = max(shed.get(slot, 0), shedding)
    out.append("# HELP edgeproxy_loop_lag_current_seconds The lag probe's last reading.")
    out.append("# TYPE edgeproxy_loop_lag_current_seconds gauge")
    for slot in sorted(lag):
        out.append(f'edgeproxy_loop_lag_current_seconds{{worker="{slot}"}} {lag[slot]!r}')
    out.append(
        "# HELP edgeproxy_shedding 1 while the worker sheds new requests (loop lag above"
        " [overload] shed_lag_ms), else 0."
    )
    out.append("# TYPE edgeproxy_shedding gauge")
    for slot in sorted(shed):
        out.append(f'edgeproxy_shedding{{worker="{slot}"}} {shed[slot]}')


def size_bound(app_rows: int) -> int:
    """Bytes the histograms of a snapshot can take at most (9-byte ints and floats)."""
    total = 16
    for f in FAMILIES:
        rows = app_rows if f.per == PER_APP else 1
        total += len(f.name) + 16 + 9 * rows * (len(f.bounds) + 2)
    return total


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
