"""The master's side of the worker counters: sums and Prometheus text.

Owns the latest snapshot of each live worker, the totals of retired ones (so counters
stay monotonic over restarts and reloads), which apps get their own series (at most
[metrics] max_apps: the config's first ones, the rest summed under OTHER_APPS) and the
text exposition format 0.0.4. It must never run in a worker, nor read a block itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy import __version__
from proxy.telemetry import families, histograms
from proxy.telemetry.metrics import (
    ADMISSION_SOURCES,
    BAD_REQUEST_STATUSES,
    CONNECT_BUCKETS,
    INTERNAL_WHERE,
    NCLASS,
    NO_APP,
    NO_PICK_REASONS,
    OTHER_APPS,
    RESPONSE_BUCKETS,
    RETRY_REASONS,
    STATUS_CLASSES,
    TLS_KINDS,
    TLS_REFUSALS,
    TLS_SIDES,
    UPSTREAM_ERROR_STATUSES,
    WORKER_STATES,
    Snapshot,
    SnapshotError,
    decode_snapshot,
)

DEFAULT_MAX_APPS = 100  # as proxy.config_metrics; the master always passes the config's


class _Totals:
    """Counters summed over many snapshots, keyed by label values rather than index."""

    __slots__ = (
        "accept_paused_seconds",
        "accept_pauses",
        "accepted",
        "admissions",
        "bad",
        "connect",
        "connect_sum",
        "families",
        "handshakes",
        "hists",
        "internal",
        "no_pick",
        "requests",
        "response",
        "response_sum",
        "retries",
        "tls_refused",
        "upstream",
    )  # fmt: skip

    def __init__(self, apps: Iterable[str] = ()) -> None:
        self.requests: dict[str, list[int]] = {a: [0] * NCLASS for a in apps}
        self.requests.setdefault(NO_APP, [0] * NCLASS)
        self.connect = [0] * (len(CONNECT_BUCKETS) + 1)
        self.connect_sum = 0.0
        self.response = [0] * (len(RESPONSE_BUCKETS) + 1)
        self.response_sum = 0.0
        self.retries = [0] * len(RETRY_REASONS)
        self.bad = [0] * len(BAD_REQUEST_STATUSES)
        self.upstream = [0] * len(UPSTREAM_ERROR_STATUSES)
        self.no_pick = [0] * len(NO_PICK_REASONS)
        self.admissions = [0] * len(ADMISSION_SOURCES)
        self.internal = [0] * len(INTERNAL_WHERE)
        self.handshakes = [0] * (len(TLS_SIDES) * len(TLS_KINDS))
        self.tls_refused = [0] * (len(TLS_SIDES) * len(TLS_REFUSALS))
        self.accepted = 0
        self.accept_pauses = 0
        self.accept_paused_seconds = 0.0
        self.families: dict[str, list[int]] = {}
        self.hists: histograms.Totals = {}

    def copy(self) -> _Totals:
        t = _Totals()
        t.requests = {k: list(v) for k, v in self.requests.items()}
        t.add_lists(self)
        return t

    def add_lists(self, other: _Totals) -> None:
        _add(self.connect, other.connect)
        _add(self.response, other.response)
        _add(self.retries, other.retries)
        _add(self.bad, other.bad)
        _add(self.upstream, other.upstream)
        _add(self.no_pick, other.no_pick)
        _add(self.admissions, other.admissions)
        _add(self.internal, other.internal)
        _add(self.handshakes, other.handshakes)
        _add(self.tls_refused, other.tls_refused)
        families.add(self.families, other.families)
        histograms.merge(self.hists, other.hists)
        self.connect_sum += other.connect_sum
        self.response_sum += other.response_sum
        self.accepted += other.accepted
        self.accept_pauses += other.accept_pauses
        self.accept_paused_seconds += other.accept_paused_seconds

    def add(self, s: Snapshot) -> None:
        for i, name in enumerate((*s.apps, NO_APP)):
            row = self.requests.setdefault(name, [0] * NCLASS)
            _add(row, s.requests[i * NCLASS : (i + 1) * NCLASS])
        _add(self.connect, s.connect_buckets)
        _add(self.response, s.response_buckets)
        _add(self.retries, s.retries)
        _add(self.bad, s.bad_requests)
        _add(self.upstream, s.upstream_errors)
        _add(self.no_pick, s.no_pick)
        _add(self.admissions, s.admissions_refused)
        _add(self.internal, s.internal_errors)
        _add(self.handshakes, s.backhaul_handshakes)
        _add(self.tls_refused, s.backhaul_refused)
        families.add(self.families, s.families)
        histograms.add(self.hists, s.hists)
        self.connect_sum += s.connect_sum
        self.response_sum += s.response_sum
        self.accepted += s.accepted
        self.accept_pauses += s.accept_pauses
        self.accept_paused_seconds += s.accept_paused_seconds


def _add(into: list[int], values: Sequence[int]) -> None:
    for i, v in enumerate(values):
        into[i] += v


def _fold(t: _Totals, keep: set[str]) -> bool:
    """Sum every app row not in `keep` into OTHER_APPS (requests and per-app histograms);
    whether there was any."""
    other = [0] * NCLASS
    folded = False
    for app in [a for a in t.requests if a not in keep]:
        _add(other, t.requests.pop(app))
        folded = True
    if folded:
        _add(t.requests.setdefault(OTHER_APPS, [0] * NCLASS), other)
    return histograms.fold(t.hists, keep, OTHER_APPS) or folded


class Aggregator:
    """Master side: latest snapshot per live worker + totals of retired workers.

    `update()` each time a block yields a snapshot; `retire(pid, final)` when a
    worker exits (its final snapshot, else the last one seen, moves into the
    retired totals), so every counter stays monotonic across restarts and reloads.
    """

    def __init__(
        self,
        apps: Iterable[str] = (),
        version: str = __version__,
        max_apps: int = DEFAULT_MAX_APPS,
    ) -> None:
        self._version = version
        self._max_apps = max_apps
        self._apps: list[str] = []  # the running config's apps, then apps reloads removed
        self._capped = False  # the running config has more apps than max_apps
        self._live: dict[int, Snapshot] = {}
        self._retired = _Totals()
        self.set_apps(apps)

    def set_apps(self, apps: Iterable[str], max_apps: int | None = None) -> None:
        """Config (re)load: the first max_apps apps of the config render, even at zero;
        apps a reload removed keep their series while there is room under max_apps."""
        if max_apps is not None:
            self._max_apps = max_apps
        now = list(apps)
        self._capped = len(now) > self._max_apps
        self._apps = [*now, *(a for a in self._apps if a not in now)]

    def named(self) -> list[str]:
        """The apps that get their own series: at most max_apps, config order first."""
        return self._apps[: self._max_apps]

    def update(self, data: bytes) -> Snapshot:
        """Record a live worker's latest snapshot bytes; SnapshotError if unusable."""
        snap = decode_snapshot(data)
        self._live[snap.pid] = snap
        return snap

    def retire(self, pid: int, final: bytes | None = None) -> None:
        """Worker `pid` has exited: fold its final (or last seen) counters into totals."""
        snap = self._live.pop(pid, None)
        if final is not None:
            try:
                last = decode_snapshot(final)
            except SnapshotError:
                last = None
            if last is not None and last.pid == pid:
                snap = last
        if snap is not None:
            self._retired.add(snap)

    def live(self) -> list[Snapshot]:
        """Latest snapshot of every live worker, by slot then generation."""
        return sorted(self._live.values(), key=lambda s: (s.slot, s.generation, s.pid))

    def totals(self) -> _Totals:
        t = self._retired.copy()
        for s in self._live.values():
            t.add(s)
        return t

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        t = self.totals()
        out: list[str] = []
        _family(out, "build_info", "gauge", "Build of the running master.")
        out.append(f'edgeproxy_build_info{{version="{_esc(self._version)}"}} 1')
        _family(out, "workers", "gauge", "Live workers by generation and state.")
        states: dict[tuple[int, int], int] = {}
        for s in self._live.values():
            states[s.generation, s.state] = states.get((s.generation, s.state), 0) + 1
        for (gen, st), n in sorted(states.items()):
            out.append(f'edgeproxy_workers{{generation="{gen}",state="{WORKER_STATES[st]}"}} {n}')

        _family(out, "requests_total", "counter", "Responses sent, by app and status class.")
        apps = self.named()
        if _fold(t, {*apps, NO_APP}) or self._capped:
            apps.append(OTHER_APPS)
        for app in (*apps, NO_APP):
            row = t.requests.get(app) or [0] * NCLASS
            for cls, n in zip(STATUS_CLASSES, row, strict=True):
                out.append(f'edgeproxy_requests_total{{app="{_esc(app)}",class="{cls}"}} {n}')
        _family(out, "connections_accepted_total", "counter", "Client connections accepted.")
        out.append(f"edgeproxy_connections_accepted_total {t.accepted}")
        _family(out, "accept_pauses_total", "counter",
                "Times accepting paused at [limits] max_connections.")  # fmt: skip
        out.append(f"edgeproxy_accept_pauses_total {t.accept_pauses}")
        _family(out, "accept_paused_seconds_total", "counter",
                "Time accepting was paused at [limits] max_connections.")  # fmt: skip
        out.append(f"edgeproxy_accept_paused_seconds_total {t.accept_paused_seconds!r}")
        for name, help_, label, values, counts in (
            ("retries_total", "Upstream attempts retried, by reason.",
             "reason", RETRY_REASONS, t.retries),
            ("bad_requests_total", "Malformed client requests, by status sent.",
             "status", BAD_REQUEST_STATUSES, t.bad),
            ("upstream_errors_total", "Upstream failures, by status sent.",
             "status", UPSTREAM_ERROR_STATUSES, t.upstream),
            ("no_pick_total", "Requests routing answered itself (no instance took them).",
             "reason", NO_PICK_REASONS, t.no_pick),
            ("admissions_refused_total",
             "Local instance admissions refused at the hard limit, by whose request.",
             "source", ADMISSION_SOURCES, t.admissions),
            ("internal_errors_total", "Exceptions caught in a worker's own code, by where.",
             "where", INTERNAL_WHERE, t.internal),
        ):  # fmt: skip
            _labelled(out, name, help_=help_, label=label, values=values, counts=counts)
        _two_labels(out, "backhaul_tls_handshakes_total",
                    help_="Backhaul TLS handshakes completed, by side and kind.",
                    labels=("side", "kind"), rows=TLS_SIDES, cols=TLS_KINDS,
                    counts=t.handshakes)  # fmt: skip
        _two_labels(out, "backhaul_tls_refused_total",
                    help_="Backhaul connections refused at the TLS handshake, by side and reason.",
                    labels=("side", "reason"), rows=TLS_SIDES, cols=TLS_REFUSALS,
                    counts=t.tls_refused)  # fmt: skip
        families.render(out, t.families)
        _histogram(out, "upstream_connect_seconds", help_="Upstream connect time.",
                   bounds=CONNECT_BUCKETS, buckets=t.connect, total=t.connect_sum)  # fmt: skip
        _histogram(out, "response_seconds", help_="Request head received to response end.",
                   bounds=RESPONSE_BUCKETS, buckets=t.response, total=t.response_sum)  # fmt: skip
        histograms.render(out, t.hists, (*apps, NO_APP))
        histograms.render_loop(out, ((s.slot, s.loop_lag, s.shedding) for s in self._live.values()))

        slots: dict[int, list[int]] = {}
        for s in self._live.values():
            g = slots.setdefault(s.slot, [0, 0, 0])
            g[0] += s.open_connections
            g[1] += s.inflight
            g[2] += s.upstream_idle
        for i, (name, help_) in enumerate(
            (
                ("open_connections", "Open client connections, by worker slot."),
                ("inflight_requests", "Requests in flight, by worker slot."),
                ("upstream_idle_connections", "Idle pooled upstream connections, by slot."),
            )
        ):
            _family(out, name, "gauge", help_)
            for slot in sorted(slots):
                out.append(f'edgeproxy_{name}{{worker="{slot}"}} {slots[slot][i]}')
        out.append("")
        return "\n".join(out)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP edgeproxy_{name} {help_}")
    out.append(f"# TYPE edgeproxy_{name} {kind}")


def _labelled(
    out: list[str],
    name: str,
    *,
    help_: str,
    label: str,
    values: Sequence[object],
    counts: Sequence[int],
) -> None:
    _family(out, name, "counter", help_)
    for v, n in zip(values, counts, strict=True):
        out.append(f'edgeproxy_{name}{{{label}="{v}"}} {n}')


def _two_labels(
    out: list[str],
    name: str,
    *,
    help_: str,
    labels: tuple[str, str],
    rows: Sequence[str],
    cols: Sequence[str],
    counts: Sequence[int],
) -> None:
    """A counter family over two fixed label sets; `counts[row * len(cols) + col]`."""
    _family(out, name, "counter", help_)
    a, b = labels
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            out.append(f'edgeproxy_{name}{{{a}="{r}",{b}="{c}"}} {counts[i * len(cols) + j]}')


def _histogram(
    out: list[str],
    name: str,
    *,
    help_: str,
    bounds: Sequence[float],
    buckets: Sequence[int],
    total: float,
) -> None:
    _family(out, name, "histogram", help_)
    cumulative = 0
    for le, n in zip((*(repr(b) for b in bounds), "+Inf"), buckets, strict=True):
        cumulative += n
        out.append(f'edgeproxy_{name}_bucket{{le="{le}"}} {cumulative}')
    out.append(f"edgeproxy_{name}_sum {total!r}")
    out.append(f"edgeproxy_{name}_count {cumulative}")
