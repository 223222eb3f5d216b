"""Micro-benchmarks of the shared-memory hot paths (run explicitly, never by `pytest`).

pytest bench/bench_shm.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shm import codec
from shm.inflight import InflightCells, InflightWriter
from shm.layout import Layout
from shm.reader import TableReader
from shm.writer import TableWriter

_COUNTER = itertools.count()
SIZES = [10, 10_000, 100_000]


class Table:
    def __init__(self, w: TableWriter, r: TableReader) -> None:
        self.w = w
        self.r = r


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}-instances" for n in SIZES])
def table(request: pytest.FixtureRequest) -> Iterator[Table]:
    """A table holding N instances: app 'small' has 3, app 'big' 1,000, 'rest' the others."""
    total: int = request.param
    cfg = Layout(64, 8, total)
    name = f"/ept-bench-{os.getpid()}-{next(_COUNTER)}"
    w = TableWriter.open(cfg, name)
    with w.batch():
        for n in range(16):
            w.put_node(codec.NodeRow(f"n{n}", "r", f"127.0.0.{n + 2}:4280", 1))
        for app in ("small", "big", "rest"):
            w.put_app(codec.AppRow(app, (f"{app}.test",), "closest", 20, 25, 2))
        for k in range(total):
            app = "small" if k < 3 else "big" if k < 1003 else "rest"
            w.put_instance(codec.InstanceRow(app, f"i{k}", f"n{k % 16}", "10.0.0.1:80", 20, 25))
    for n in range(16):
        w.set_rtt(f"n{n}", rtt_us=1000 + n, jitter_us=10, loss_permille=0, last_heard=1.0, up=True)
    r = TableReader.attach(cfg, name)
    yield Table(w, r)
    r.close()
    w.close(unlink=True)


def test_candidates_3_instances(benchmark, table: Table) -> None:  # type: ignore[no-untyped-def]
    """Reading a 3-instance app's candidates (the per-request cost)."""
    got = benchmark(table.r.candidates, "small")
    assert len(got) == 3


def test_candidates_1000_instances(benchmark, table: Table) -> None:  # type: ignore[no-untyped-def]
    """Reading a 1,000-instance app's candidates."""
    if len(table.w.instances()) < 1003:
        pytest.skip("table smaller than 1,000 instances")
    got = benchmark(table.r.candidates, "big")
    assert len(got) == 1000


def test_host_lookup(benchmark, table: Table) -> None:  # type: ignore[no-untyped-def]
    """Host -> app lookup (cached by generation)."""
    assert benchmark(table.r.app_for_host, "small.test") == "small"


def test_set_load(benchmark, table: Table) -> None:  # type: ignore[no-untyped-def]
    """The writer updating one instance's load in place."""
    benchmark(table.w.set_load, "i1", 7, 1.0, 1)


@pytest.fixture(scope="module")
def inflight() -> Iterator[InflightWriter]:
    """An in-flight segment of 64 workers x 256 local instances."""
    name = f"/ept-bench-infl-{os.getpid()}"
    w = InflightWriter.create(name, max_workers=64, max_local_instances=256)
    w.assign_instances([f"i{k}" for k in range(256)])
    yield w
    w.close(unlink=True)


def test_inflight_inc_dec(benchmark, inflight: InflightWriter) -> None:  # type: ignore[no-untyped-def]
    """A worker's inc+dec of its own cell (once per proxied request)."""
    cells = InflightCells(inflight.segment, 5)

    def inc_dec() -> None:
        cells.inc(7)
        cells.dec(7)

    benchmark(inc_dec)
    assert cells.mine(7) == 0


def test_inflight_total(benchmark, inflight: InflightWriter) -> None:  # type: ignore[no-untyped-def]
    """Summing one local instance's cells over 64 workers (the hard-limit check)."""
    cells = InflightCells(inflight.segment, 5)
    assert benchmark(cells.total, 7) == 0
