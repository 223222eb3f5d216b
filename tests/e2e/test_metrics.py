"""Worker stats -> snapshot -> shared block -> master aggregation -> Prometheus text."""

from __future__ import annotations

import mmap
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type hints
import pytest

from proxy.telemetry.aggregate import Aggregator
from proxy.telemetry.metrics import (
    ADMIT_EDGE,
    BAD_417,
    BAD_431,
    BAD_501,
    BAD_REQUEST_STATUSES,
    CONNECT_BUCKETS,
    DRAINING,
    NO_APP,
    NO_PICK_ALL_FULL,
    NO_PICK_REASONS,
    RESPONSE_BUCKETS,
    RETRY_REASONS,
    RETRY_REJECT,
    SERVING,
    UPSTREAM_504,
    WHERE_BATCH,
    SnapshotError,
    WorkerStats,
    block_size_for,
    decode_snapshot,
)
from proxy.telemetry.statsblock import (
    DEFAULT_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    PAYLOAD_OFFSET,
    StatsBlock,
    StatsBlockError,
)

ROOT = Path(__file__).resolve().parents[2]
APPS = ("hello", "shop")
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
ALLOWED_LABELS = {"app", "class", "reason", "status", "le", "worker", "generation", "state",
                  "version", "source", "where", "outcome", "event", "kind", "side",
                  "peer"}  # fmt: skip


def parse_exposition(text: str) -> Series:
    """A strict parser of the text format: families typed before use, no duplicates."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helped: set[str] = set()
    out: Series = {}
    hist_buckets: dict[tuple[str, frozenset[tuple[str, str]]], list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helped, f"second HELP for {name}"
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in types and name in helped, line
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, raw_labels, raw_value = m.groups()
        labels: list[tuple[str, str]] = []
        pos = 0
        while raw_labels and pos < len(raw_labels):
            lm = _LABEL.match(raw_labels, pos)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), lm.group(2)))
            pos = lm.end()
        assert {k for k, _ in labels} <= ALLOWED_LABELS, line
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        assert family in types, f"{name} used before its TYPE"
        assert name.startswith("edgeproxy_"), name
        if types[family] == "counter":
            assert name.endswith("_total"), name
        value = float(raw_value)
        key = (name, frozenset(labels))
        assert key not in out, f"duplicate series {line!r}"
        out[key] = value
        if name.endswith("_bucket"):
            le = dict(labels).pop("le")
            rest = frozenset((k, v) for k, v in labels if k != "le")
            hist_buckets.setdefault((family, rest), []).append((float(le), value))
    for (family, rest), buckets in hist_buckets.items():
        assert [b for b, _ in buckets] == sorted(b for b, _ in buckets), family
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{family} buckets not cumulative"
        assert buckets[-1][0] == float("inf")
        assert out[(family + "_count", rest)] == counts[-1]
    return out


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def busy_worker(pid: int = 101, slot: int = 0, generation: int = 1) -> WorkerStats:
    s = WorkerStats(APPS, slot=slot, generation=generation, pid=pid)
    s.state = SERVING
    for status in (200, 200, 204, 404, 503):
        s.requests[0 * 5 + status // 100 - 1] += 1  # app "hello"
    s.requests[s.no_app * 5 + 404 // 100 - 1] += 1
    s.retries[RETRY_REJECT] += 2
    s.bad_requests[BAD_431] += 1
    s.bad_requests[BAD_417] += 2
    s.bad_requests[BAD_501] += 4
    s.upstream_errors[UPSTREAM_504] += 1
    s.no_pick[NO_PICK_ALL_FULL] += 5
    s.admissions_refused[ADMIT_EDGE] += 6
    s.internal_errors[WHERE_BATCH] += 7
    s.accepted += 3
    s.accept_pauses += 2
    s.accept_paused_seconds += 1.5
    s.observe_connect(0.001)
    s.observe_connect(0.2)
    for seconds in (0.001, 0.0011, 0.3, 100.0):
        s.observe_response(seconds)
    s.open_connections, s.inflight, s.upstream_idle = 3, 1, 4
    return s


def test_full_path_renders_exact_values() -> None:
    """Counters bumped in a worker come out of /metrics text with the same values."""
    stats = busy_worker()
    with StatsBlock.create() as master_side:
        worker_side = StatsBlock.attach(os.dup(master_side.fd))
        worker_side.publish(stats.snapshot())
        worker_side.close()
        data = master_side.read()
    assert data is not None
    agg = Aggregator(APPS)
    agg.update(data)
    series = parse_exposition(agg.render())
    assert value(series, "edgeproxy_requests_total", app="hello", **{"class": "2xx"}) == 3
    assert value(series, "edgeproxy_requests_total", app="hello", **{"class": "5xx"}) == 1
    assert value(series, "edgeproxy_requests_total", app="shop", **{"class": "2xx"}) == 0
    assert value(series, "edgeproxy_requests_total", app=NO_APP, **{"class": "4xx"}) == 1
    assert value(series, "edgeproxy_retries_total", reason="reject") == 2
    assert value(series, "edgeproxy_retries_total", reason="connect_timeout") == 0
    assert value(series, "edgeproxy_bad_requests_total", status="431") == 1
    assert value(series, "edgeproxy_bad_requests_total", status="417") == 2
    assert value(series, "edgeproxy_bad_requests_total", status="501") == 4
    assert value(series, "edgeproxy_bad_requests_total", status="400") == 0
    assert value(series, "edgeproxy_no_pick_total", reason="all_full") == 5
    assert value(series, "edgeproxy_no_pick_total", reason="all_failed") == 0
    assert value(series, "edgeproxy_admissions_refused_total", source="edge") == 6
    assert value(series, "edgeproxy_admissions_refused_total", source="peer") == 0
    assert value(series, "edgeproxy_internal_errors_total", where="batch") == 7
    assert value(series, "edgeproxy_internal_errors_total", where="sweep") == 0
    assert value(series, "edgeproxy_accept_pauses_total") == 2
    assert value(series, "edgeproxy_accept_paused_seconds_total") == 1.5
    assert value(series, "edgeproxy_upstream_errors_total", status="504") == 1
    assert value(series, "edgeproxy_connections_accepted_total") == 3
    assert value(series, "edgeproxy_response_seconds_bucket", le="0.001") == 1  # le is inclusive
    assert value(series, "edgeproxy_response_seconds_bucket", le="0.0025") == 2
    assert value(series, "edgeproxy_response_seconds_bucket", le="60.0") == 3
    assert value(series, "edgeproxy_response_seconds_bucket", le="+Inf") == 4
    assert value(series, "edgeproxy_response_seconds_sum") == pytest.approx(100.3021)
    assert value(series, "edgeproxy_upstream_connect_seconds_count") == 2
    assert value(series, "edgeproxy_open_connections", worker="0") == 3
    assert value(series, "edgeproxy_inflight_requests", worker="0") == 1
    assert value(series, "edgeproxy_upstream_idle_connections", worker="0") == 4
    assert value(series, "edgeproxy_workers", generation="1", state="serving") == 1
    assert value(series, "edgeproxy_build_info", version="0.1.0") == 1


def test_workers_sum_and_gauges_by_slot() -> None:
    """Counters sum over workers; gauges sum per slot across generations."""
    agg = Aggregator(APPS)
    old = busy_worker(pid=1, slot=0, generation=1)
    old.state = DRAINING
    agg.update(old.snapshot())
    agg.update(busy_worker(pid=2, slot=0, generation=2).snapshot())
    agg.update(busy_worker(pid=3, slot=1, generation=2).snapshot())
    series = parse_exposition(agg.render())
    assert value(series, "edgeproxy_requests_total", app="hello", **{"class": "2xx"}) == 9
    assert value(series, "edgeproxy_open_connections", worker="0") == 6
    assert value(series, "edgeproxy_open_connections", worker="1") == 3
    assert value(series, "edgeproxy_workers", generation="1", state="draining") == 1
    assert value(series, "edgeproxy_workers", generation="2", state="serving") == 2


def test_retire_keeps_counters_monotonic() -> None:
    """A worker's exit and its replacement never make a counter go down."""
    agg = Aggregator(APPS)
    first = busy_worker(pid=10)
    agg.update(first.snapshot())
    seen = parse_exposition(agg.render())
    first.requests[1] += 5  # served more before exiting; the final snapshot has them
    agg.retire(10, first.snapshot())
    after_exit = parse_exposition(agg.render())
    replacement = WorkerStats(APPS, slot=0, generation=1, pid=11)
    agg.update(replacement.snapshot())
    after_restart = parse_exposition(agg.render())
    key = ("edgeproxy_requests_total", frozenset({("app", "hello"), ("class", "2xx")}))
    assert (seen[key], after_exit[key], after_restart[key]) == (3, 8, 8)
    for name_labels, v in seen.items():
        if name_labels[0].endswith(("_total", "_bucket", "_count", "_sum")):
            assert after_restart[name_labels] >= v, name_labels
    assert ("edgeproxy_open_connections", frozenset({("worker", "0")})) in after_restart
    assert value(after_restart, "edgeproxy_open_connections", worker="0") == 0


def test_retire_without_final_uses_last_seen() -> None:
    """A worker that died without a readable final snapshot keeps its last counts."""
    agg = Aggregator(APPS)
    agg.update(busy_worker(pid=20).snapshot())
    agg.retire(20, None)
    agg.retire(20, b"garbage")  # a second retire of the same pid adds nothing
    series = parse_exposition(agg.render())
    assert value(series, "edgeproxy_requests_total", app="hello", **{"class": "2xx"}) == 3
    assert not any(name == "edgeproxy_workers" for name, _ in series)


def test_apps_removed_by_reload_keep_their_totals() -> None:
    """An app dropped from the config still renders its retired counts; new apps show zero."""
    agg = Aggregator(APPS)
    agg.update(busy_worker(pid=30).snapshot())
    agg.retire(30)
    agg.set_apps(["shop", "new"])
    agg.update(WorkerStats(("shop", "new"), slot=0, generation=2, pid=31).snapshot())
    series = parse_exposition(agg.render())
    assert value(series, "edgeproxy_requests_total", app="hello", **{"class": "2xx"}) == 3
    assert value(series, "edgeproxy_requests_total", app="new", **{"class": "2xx"}) == 0


def test_decode_rejects_foreign_bytes() -> None:
    """Snapshot bytes of another version, shape or bucket layout are refused."""
    good = msgpack.unpackb(busy_worker().snapshot())
    for bad in (
        b"",
        b"\xc1",
        msgpack.packb([1, *good[1:]]),  # the previous version
        msgpack.packb(good[:-1]),
        msgpack.packb([*good[:6], good[6][:-1], *good[7:]]),
        msgpack.packb([*good[:7], [1.0, *CONNECT_BUCKETS[1:]], *good[8:]]),
        msgpack.packb([*good[:13], [-1, 0, 0, 0], *good[14:]]),
        msgpack.packb([*good[:14], [0, 0, 0], *good[15:]]),  # a version-1 bad-request list
        msgpack.packb([*good[:20], [0], *good[21:]]),
        msgpack.packb([*good[:24], -1.0]),
    ):
        with pytest.raises(SnapshotError):
            decode_snapshot(bad)
    snap = decode_snapshot(msgpack.packb(good))
    assert snap.apps == APPS and len(snap.response_buckets) == len(RESPONSE_BUCKETS) + 1
    assert len(snap.retries) == len(RETRY_REASONS)
    assert len(snap.bad_requests) == len(BAD_REQUEST_STATUSES)
    assert len(snap.no_pick) == len(NO_PICK_REASONS)


def test_label_values_are_escaped() -> None:
    """A label value with quotes or backslashes stays one parseable series."""
    agg = Aggregator(version='1.0"\\x\n')
    text = agg.render()
    assert 'edgeproxy_build_info{version="1.0\\"\\\\x\\n"} 1' in text
    parse_exposition(text)


def test_block_layout_is_pinned() -> None:
    """The block header (magic, layout version, size, payload offset) does not drift."""
    assert (MAGIC, LAYOUT_VERSION, PAYLOAD_OFFSET, DEFAULT_SIZE) == (b"EPSTATS\x00", 1, 64, 65536)
    with StatsBlock.create() as b:
        with mmap.mmap(b.fd, 64, mmap.MAP_SHARED, mmap.PROT_READ) as raw:
            assert raw[:16] == MAGIC + struct.pack("<II", 1, DEFAULT_SIZE)
        assert b.read() is None  # nothing published yet
        b.publish(b"abc")
        b.publish(b"")
        assert b.read() == b"" and b.sequence() == 4


def test_attach_refuses_a_foreign_segment() -> None:
    """A worker refuses a segment with the wrong magic or layout version."""
    with StatsBlock.create() as b:
        with mmap.mmap(b.fd, 64) as raw:
            raw[8:12] = struct.pack("<I", 99)
        with pytest.raises(StatsBlockError, match="layout version 99"):
            StatsBlock.attach(os.dup(b.fd))
    fd = os.memfd_create("not-stats")
    os.ftruncate(fd, DEFAULT_SIZE)
    with pytest.raises(StatsBlockError, match="bad magic"):
        StatsBlock.attach(fd)  # owns and closes fd on failure


def test_corrupt_payload_is_never_returned() -> None:
    """A payload changed behind the seqlock fails its crc32 and reads as None."""
    with StatsBlock.create() as b:
        b.publish(b"hello world")
        with mmap.mmap(b.fd, b.size) as raw:
            raw[PAYLOAD_OFFSET] = ord("j")
        assert b.read() is None


def test_publish_too_large_is_refused() -> None:
    """A snapshot larger than the block raises instead of truncating."""
    with StatsBlock.create() as b:
        with pytest.raises(ValueError, match="exceeds"):
            b.publish(b"x" * (b.capacity + 1))
        b.publish(b"x" * b.capacity)
        assert b.read() == b"x" * b.capacity


def test_block_size_fits_the_largest_snapshot() -> None:
    """block_size_for(n) holds a snapshot of n long-named apps with huge counters."""
    apps = [f"{i:03d}" + "a" * 59 for i in range(1024)]
    s = WorkerStats(apps, slot=255, generation=2**40, pid=2**22)
    s.requests = [2**64 - 1] * len(s.requests)
    s.response_buckets = [2**64 - 1] * len(s.response_buckets)
    with StatsBlock.create(block_size_for(len(apps))) as b:
        b.publish(s.snapshot())
    assert block_size_for(2) == DEFAULT_SIZE


WRITER = textwrap.dedent(
    """
    import sys
    from proxy.telemetry.metrics import WorkerStats
    from proxy.telemetry.statsblock import StatsBlock
    block = StatsBlock.attach(int(sys.argv[1]))
    k = 0
    while True:
        k += 1
        s = WorkerStats([f"app{i}" for i in range(k % 300)], slot=0, generation=k, pid=1)
        s.requests = [k] * len(s.requests)
        block.publish(s.snapshot())
        if k == 1:
            print("READY", flush=True)
    """
)


@pytest.mark.timeout(30)
def test_torn_read_impossible() -> None:
    """A reader racing a writer process that publishes varying sizes only sees whole snapshots."""
    with StatsBlock.create() as block:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(block.fd)],
            cwd=ROOT,
            pass_fds=[block.fd],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"READY\n"
            reads = misses = 0
            generations: set[int] = set()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                data = block.read()
                if data is None:
                    misses += 1
                    continue
                snap = decode_snapshot(data)  # raises on any torn payload
                k = snap.generation
                assert len(snap.apps) == k % 300
                assert set(snap.requests) == {k}
                generations.add(k)
                reads += 1
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
    assert reads > 100 and len(generations) > 50, (reads, misses, len(generations))
