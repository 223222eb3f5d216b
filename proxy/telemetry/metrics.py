"""Worker counters and their snapshot codec (the master sums and renders them:
proxy.telemetry.aggregate).

Owns the metric names, the fixed label sets (app from config, at most [metrics] max_apps
of them, status class, retry reason, status, worker slot) and the histogram buckets.
`WorkerStats` is bumped on the hot path with plain list increments: it must never format,
allocate per request, or do I/O. Paths, hosts and instance ids must never become labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from proxy.telemetry import families, histograms

SNAPSHOT_VERSION = 4
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
NCLASS = len(STATUS_CLASSES)
NO_APP = "_none"  # label of requests that matched no app; not a valid app name
# Label of the apps past the first [metrics] max_apps of the config, summed: a fixed word
# that, like NO_APP, no app can be named ("other" could be).
OTHER_APPS = "_other"
RETRY_REASONS = ("reject", "connect_refused", "connect_timeout", "reset_before_response")
RETRY_REJECT, RETRY_CONNECT_REFUSED, RETRY_CONNECT_TIMEOUT, RETRY_RESET = range(4)
BAD_REQUEST_STATUSES = (400, 408, 417, 431, 501)
BAD_400, BAD_408, BAD_417, BAD_431, BAD_501 = range(5)
# Why routing answered a request itself (no instance took it). "all_full": every candidate
# left is at its hard limit, or was tried and found full (a remote "full" reject, or a local
# admission another worker won): 503 + Retry-After. "all_failed": every candidate left was
# tried and failed (refused, timed out, reset): 502. "no_instances": the app has none (503).
# "not_found": no such app or forced instance in the routing table (404).
NO_PICK_REASONS = ("all_full", "all_failed", "no_instances", "not_found")
NO_PICK_ALL_FULL, NO_PICK_ALL_FAILED, NO_PICK_NO_INSTANCES, NO_PICK_NOT_FOUND = range(4)
# Admissions refused on a local instance at its hard limit, by whose request it was: this
# node's own ("edge": the router moves on to the next candidate; nothing was sent, so it is
# neither a retry nor an upstream error) or a peer's backhauled one ("peer": answered "full").
ADMISSION_SOURCES = ("edge", "peer")
ADMIT_EDGE, ADMIT_PEER = range(2)
# Where a worker caught an exception of its own code (proxy.worker.faults).
INTERNAL_WHERE = ("callback", "sweep", "batch", "loop")
WHERE_CALLBACK, WHERE_SWEEP, WHERE_BATCH, WHERE_LOOP = range(4)
# The backhaul's mutual TLS (proxy.worker.backhaul_tls), by side: "accept" is this node's
# backhaul listener, "connect" its connections to peers. Handshakes by kind (a resumed one
# skips the certificates and the key exchange); refusals by reason, all at the handshake:
# plaintext (not TLS), protocol (TLS but not 1.3, or nothing in common), no_certificate
# (the client sent none), unknown_ca (not signed by the fleet CA), expired (or not yet
# valid), bad_certificate (any other verify failure or alert), not_a_node (no single
# spiffe://edgeproxy/node/<id> name), wrong_node (a fleet node other than the one this node
# meant to reach), timeout, incomplete (closed mid-handshake), overload (too many handshakes
# at once), no_credentials (this node has no [backhaul] certificate to connect with).
TLS_SIDES = ("accept", "connect")
SIDE_ACCEPT, SIDE_CONNECT = range(2)
TLS_KINDS = ("full", "resumed")
KIND_FULL, KIND_RESUMED = range(2)
TLS_REFUSALS = (
    "plaintext", "protocol", "no_certificate", "unknown_ca", "expired", "bad_certificate",
    "not_a_node", "wrong_node", "timeout", "incomplete", "overload", "no_credentials",
)  # fmt: skip
UPSTREAM_ERROR_STATUSES = (502, 504)
UPSTREAM_502, UPSTREAM_504 = range(2)
WORKER_STATES = ("starting", "serving", "draining")
STARTING, SERVING, DRAINING = range(3)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RESPONSE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def app_labels(apps: Sequence[str], max_apps: int) -> tuple[str, ...]:
    """The app labels a worker counts under: the first `max_apps` apps in config order,
    then OTHER_APPS for all the rest (if any). Stable across restarts of the same config,
    and explainable: an app's place in the file decides, never its traffic."""
    if len(apps) <= max_apps:
        return tuple(apps)
    return (*apps[:max_apps], OTHER_APPS)


def app_rows(apps: Sequence[str], max_apps: int) -> dict[str, int]:
    """Each configured app's row in WorkerStats (apps past the cap share OTHER_APPS's)."""
    return {a: min(i, max_apps) for i, a in enumerate(apps)}


class WorkerStats:
    """One worker's counters; the worker increments the lists directly.

    `requests[app_index * 5 + status // 100 - 1]`, where app_index follows the
    config's app order and `no_app` (== len(apps)) counts requests matching no app.
    Histogram lists hold per-bucket (not cumulative) counts, the last one is +Inf.
    """

    __slots__ = (
        "accept_paused_seconds",
        "accept_pauses",
        "accepted",
        "admissions_refused",
        "apps",
        "backhaul_handshakes",
        "backhaul_refused",
        "bad_requests",
        "connect_buckets",
        "connect_sum",
        "families",
        "generation",
        "hists",
        "inflight",
        "internal_errors",
        "loop_lag",
        "no_app",
        "no_pick",
        "open_connections",
        "pid",
        "requests",
        "response_buckets",
        "response_sum",
        "retries",
        "shedding",
        "slot",
        "state",
        "upstream_errors",
        "upstream_idle",
    )

    def __init__(self, apps: Sequence[str], slot: int, generation: int, pid: int) -> None:
        self.apps = tuple(apps)
        self.no_app = len(self.apps)
        self.slot = slot
        self.generation = generation
        self.pid = pid
        self.state = STARTING
        self.requests = [0] * ((self.no_app + 1) * NCLASS)
        self.connect_buckets = [0] * (len(CONNECT_BUCKETS) + 1)
        self.connect_sum = 0.0
        self.response_buckets = [0] * (len(RESPONSE_BUCKETS) + 1)
        self.response_sum = 0.0
        self.retries = [0] * len(RETRY_REASONS)
        self.bad_requests = [0] * len(BAD_REQUEST_STATUSES)
        self.upstream_errors = [0] * len(UPSTREAM_ERROR_STATUSES)
        self.no_pick = [0] * len(NO_PICK_REASONS)
        self.admissions_refused = [0] * len(ADMISSION_SOURCES)
        self.internal_errors = [0] * len(INTERNAL_WHERE)
        self.accepted = 0
        self.accept_pauses = 0  # times accepting paused at [limits] max_connections
        self.accept_paused_seconds = 0.0  # time spent paused (the worker adds the current pause)
        self.open_connections = 0
        self.inflight = 0
        self.upstream_idle = 0
        self.families = families.zeros()  # proxy.telemetry.families
        # [side * len(TLS_KINDS) + kind] and [side * len(TLS_REFUSALS) + reason]
        self.backhaul_handshakes = [0] * (len(TLS_SIDES) * len(TLS_KINDS))
        self.backhaul_refused = [0] * (len(TLS_SIDES) * len(TLS_REFUSALS))
        self.hists = histograms.zeros(self.no_app + 1)  # proxy.telemetry.histograms
        self.loop_lag = 0.0  # seconds, the lag probe's last reading (proxy.worker.loopwatch)
        self.shedding = 0  # 1 while the worker sheds new requests

    def family(self, name: str) -> list[int]:
        """The counter list of family `name`, to keep and bump by index."""
        return self.families[name]

    def observe_connect(self, seconds: float) -> None:
        """One upstream connect took `seconds`."""
        self.connect_buckets[histograms.bucket(CONNECT_BUCKETS, seconds)] += 1
        self.connect_sum += seconds

    def observe_response(self, seconds: float) -> None:
        """One request took `seconds` from its head received to its response's end."""
        self.response_buckets[histograms.bucket(RESPONSE_BUCKETS, seconds)] += 1
        self.response_sum += seconds

    def snapshot(self) -> bytes:
        """msgpack of every counter and gauge (about once a second, never per request)."""
        data: bytes = msgpack.packb(
            (
                SNAPSHOT_VERSION,
                self.pid,
                self.slot,
                self.generation,
                self.state,
                self.apps,
                self.requests,
                CONNECT_BUCKETS,
                self.connect_buckets,
                self.connect_sum,
                RESPONSE_BUCKETS,
                self.response_buckets,
                self.response_sum,
                self.retries,
                self.bad_requests,
                self.upstream_errors,
                self.accepted,
                self.open_connections,
                self.inflight,
                self.upstream_idle,
                self.no_pick,
                self.admissions_refused,
                self.internal_errors,
                self.accept_pauses,
                self.accept_paused_seconds,
                self.backhaul_handshakes,
                self.backhaul_refused,
                self.families,
                histograms.pack(self.hists),
                self.loop_lag,
                self.shedding,
            )
        )
        return data


class SnapshotError(ValueError):
    """Snapshot bytes that this master cannot use (other version, bad shape)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A decoded WorkerStats snapshot, as the master sees it."""

    pid: int
    slot: int
    generation: int
    state: int
    apps: tuple[str, ...]
    requests: tuple[int, ...]
    connect_buckets: tuple[int, ...]
    connect_sum: float
    response_buckets: tuple[int, ...]
    response_sum: float
    retries: tuple[int, ...]
    bad_requests: tuple[int, ...]
    upstream_errors: tuple[int, ...]
    accepted: int
    open_connections: int
    inflight: int
    upstream_idle: int
    no_pick: tuple[int, ...]
    admissions_refused: tuple[int, ...]
    internal_errors: tuple[int, ...]
    accept_pauses: int
    accept_paused_seconds: float
    backhaul_handshakes: tuple[int, ...]
    backhaul_refused: tuple[int, ...]
    families: dict[str, tuple[int, ...]]
    hists: dict[str, histograms.Rows]
    loop_lag: float
    shedding: int

    @property
    def state_name(self) -> str:
        return WORKER_STATES[self.state]


def _ints(value: Any, n: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) != n:
        raise SnapshotError(f"{what}: expected {n} integers")
    if not all(type(v) is int and v >= 0 for v in value):
        raise SnapshotError(f"{what}: expected non-negative integers")
    return tuple(value)


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise SnapshotError(f"{what}: expected a non-negative number")
    return float(value)


def decode_snapshot(data: bytes) -> Snapshot:
    """Validate and decode `WorkerStats.snapshot()` bytes; SnapshotError if unusable."""
    try:
        raw = msgpack.unpackb(data, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise SnapshotError(f"not a snapshot: {e}") from None
    if not isinstance(raw, list) or len(raw) != 31 or raw[0] != SNAPSHOT_VERSION:
        raise SnapshotError(f"not a version {SNAPSHOT_VERSION} snapshot")
    (_, pid, slot, gen, state, apps, requests, cb, cbuckets, csum, rb, rbuckets, rsum,
     retries, bad, upstream, accepted, open_c, inflight, idle, no_pick, refused, internal,
     pauses, paused_s, handshakes, tls_refused, fams, hists, lag, shedding) = raw  # fmt: skip
    pid, slot, gen, state = _ints([pid, slot, gen, state], 4, "pid/slot/generation/state")
    if state >= len(WORKER_STATES):
        raise SnapshotError(f"unknown worker state {state}")
    if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
        raise SnapshotError("apps: expected a list of names")
    if tuple(cb) != CONNECT_BUCKETS or tuple(rb) != RESPONSE_BUCKETS:
        raise SnapshotError("histogram buckets differ from this master's")
    gauges = _ints([accepted, open_c, inflight, idle], 4, "gauges")
    return Snapshot(
        pid=pid,
        slot=slot,
        generation=gen,
        state=state,
        apps=tuple(apps),
        requests=_ints(requests, (len(apps) + 1) * NCLASS, "requests"),
        connect_buckets=_ints(cbuckets, len(CONNECT_BUCKETS) + 1, "connect buckets"),
        connect_sum=_number(csum, "connect sum"),
        response_buckets=_ints(rbuckets, len(RESPONSE_BUCKETS) + 1, "response buckets"),
        response_sum=_number(rsum, "response sum"),
        retries=_ints(retries, len(RETRY_REASONS), "retries"),
        bad_requests=_ints(bad, len(BAD_REQUEST_STATUSES), "bad requests"),
        upstream_errors=_ints(upstream, len(UPSTREAM_ERROR_STATUSES), "upstream errors"),
        accepted=gauges[0],
        open_connections=gauges[1],
        inflight=gauges[2],
        upstream_idle=gauges[3],
        no_pick=_ints(no_pick, len(NO_PICK_REASONS), "no pick"),
        admissions_refused=_ints(refused, len(ADMISSION_SOURCES), "admissions refused"),
        internal_errors=_ints(internal, len(INTERNAL_WHERE), "internal errors"),
        accept_pauses=_ints([pauses], 1, "accept pauses")[0],
        accept_paused_seconds=_number(paused_s, "accept paused seconds"),
        backhaul_handshakes=_ints(handshakes, len(TLS_SIDES) * len(TLS_KINDS), "handshakes"),
        backhaul_refused=_ints(tls_refused, len(TLS_SIDES) * len(TLS_REFUSALS), "tls refused"),
        families=families.decode(fams),
        hists=histograms.decode(hists, apps, slot, NO_APP),
        loop_lag=_number(lag, "loop lag"),
        shedding=_ints([shedding], 1, "shedding")[0],
    )


def block_size_for(n_apps: int, page: int = 4096) -> int:
    """Stats block size that always fits a snapshot of a worker serving `n_apps` apps."""
    lists = len(RETRY_REASONS) + len(BAD_REQUEST_STATUSES) + len(UPSTREAM_ERROR_STATUSES)
    lists += len(NO_PICK_REASONS) + len(ADMISSION_SOURCES) + len(INTERNAL_WHERE)
    lists += len(TLS_SIDES) * (len(TLS_KINDS) + len(TLS_REFUSALS))
    ints = (n_apps + 1) * NCLASS + len(CONNECT_BUCKETS) + len(RESPONSE_BUCKETS) + lists + 32
    names = n_apps * 66  # msgpack str header + a name of at most 63 characters
    worst = ints * 9 + names + families.size_bound() + histograms.size_bound(n_apps + 1) + 1024
    return max(64 * 1024, -(-(worst + 64) // page) * page)
