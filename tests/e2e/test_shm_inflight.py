"""In-flight counters: per-worker cells across processes, slot directory, dead workers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm import segment
from shm.errors import LayoutMismatchError, TableFull, WriterBusyError
from shm.inflight import InflightCells, InflightSegment, InflightWriter

ROOT = Path(__file__).resolve().parents[2]
_COUNTER = itertools.count()


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    n = f"/ept-infl-{os.getpid()}-{next(_COUNTER)}"
    yield n
    segment.unlink(n)


WORKER = """
    import sys
    from shm.inflight import InflightCells, InflightSegment
    seg = InflightSegment.attach(sys.argv[1])
    cells = InflightCells(seg, int(sys.argv[2]))
    slot = cells.slot_of("app-1")
    print("ready", flush=True)
    sys.stdin.readline()  # go
    for _ in range(200_000):
        cells.inc(slot)
        cells.inc(slot)
        cells.dec(slot)
    print(cells.mine(slot), flush=True)
"""


@pytest.mark.timeout(60)
def test_two_worker_processes_count_exactly(name: str) -> None:
    """Two processes hammering their own cells of one slot give an exact total."""
    w = InflightWriter.create(name, max_workers=8, max_local_instances=4)
    w.assign_instances(["app-0", "app-1"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", textwrap.dedent(WORKER), name]
    with (
        subprocess.Popen(
            [*cmd, "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        ) as a,
        subprocess.Popen(
            [*cmd, "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        ) as b,
    ):
        for p in (a, b):
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in (a, b):
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        mine = [json.loads(p.communicate(timeout=50)[0]) for p in (a, b)]
    assert mine == [200_000, 200_000]
    assert w.totals() == {"app-0": 0, "app-1": 400_000}
    cells = InflightCells(w.segment, 0)
    assert cells.total(w.slots()["app-1"]) == 400_000
    w.clear_worker(3)
    assert w.totals()["app-1"] == 200_000
    w.close()


def test_assign_keeps_slots_and_reuses_freed_ones_last(name: str) -> None:
    """Ids that stay keep their slot; removed ids free theirs, reused after never-used ones."""
    w = InflightWriter.create(name, max_workers=4, max_local_instances=3)
    first = w.assign_instances(["a", "b"])
    assert first == {"a": 0, "b": 1}
    assert w.assign_instances(["b", "c"]) == {"b": 1, "c": 2}
    assert w.assign_instances(["b", "c", "d"]) == {"b": 1, "c": 2, "d": 0}
    with pytest.raises(TableFull, match="local instances"):
        w.assign_instances(["b", "c", "d", "e"])
    assert w.slots() == {"b": 1, "c": 2, "d": 0}
    reader = InflightSegment.attach(name)
    assert reader.slots() == {"b": 1, "c": 2, "d": 0}
    w.assign_instances(["d"])
    assert reader.slot_of("b") is None and reader.slot_of("d") == 0
    reader.close()
    w.close()


def test_workers_inc_dec_and_total(name: str) -> None:
    """inc/dec touch only the worker's cell; total sums every worker's cell of a slot."""
    w = InflightWriter.create(name, max_workers=64, max_local_instances=8)
    slot = w.assign_instances(["x"])["x"]
    workers = [InflightCells(w.segment, i) for i in range(64)]
    for i, c in enumerate(workers):
        for _ in range(i):
            c.inc(slot)
    assert workers[0].total(slot) == sum(range(64))
    workers[10].dec(slot)
    assert workers[10].mine(slot) == 9 and workers[11].mine(slot) == 11
    assert w.segment.total(slot + 1) == 0
    with pytest.raises(ValueError, match="cell index 64"):
        InflightCells(w.segment, 64)
    w.close()


def test_master_restart_keeps_slots_and_counts(name: str) -> None:
    """A new master takes the segment over: slots and draining counts survive, epoch bumps."""
    w = InflightWriter.create(name, max_workers=4, max_local_instances=4)
    w.assign_instances(["a", "b"])
    InflightCells(w.segment, 1).inc(1)
    with pytest.raises(WriterBusyError):
        InflightWriter.create(name, max_workers=4, max_local_instances=4)
    w.close()
    w2 = InflightWriter.create(name, max_workers=4, max_local_instances=4)
    assert w2.boot_epoch == 2 and w2.slots() == {"a": 0, "b": 1}
    assert w2.totals() == {"a": 0, "b": 1}
    w2.close()
    with pytest.raises(LayoutMismatchError):
        InflightWriter.create(name, max_workers=8, max_local_instances=4)
    with pytest.raises(LayoutMismatchError, match="expected 8 x 4"):
        InflightSegment.attach(name, max_workers=8)


@given(counts=st.dictionaries(st.integers(0, 63), st.integers(1, 1000), max_size=8))
@settings(max_examples=60, deadline=None)
def test_total_is_the_sum_wherever_the_busy_cells_are(counts: dict[int, int]) -> None:
    """total() skips the column's tail when it is all zero: the sum is the same whether the
    busy cells are the first few (live workers) or anywhere up to the last one."""
    n = f"/ept-infl-{os.getpid()}-{next(_COUNTER)}"
    w = InflightWriter.create(n, max_workers=64, max_local_instances=2)
    try:
        slot = w.assign_instances(["x", "y"])["x"]
        other = 1 - slot
        cells = [InflightCells(w.segment, i) for i in range(64)]
        for i, k in counts.items():
            for _ in range(k):
                cells[i].inc(slot)
            cells[i].inc(other)  # the neighbouring slot's column must not leak in
        want = sum(counts.values())
        assert cells[0].total(slot) == want
        assert cells[63].total(slot) == want
        assert w.segment.total(slot) == want
        assert cells[5].total(other) == len(counts)
    finally:
        w.close()
        segment.unlink(n)
