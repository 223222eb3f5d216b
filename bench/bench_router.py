"""Micro-benchmarks of the router core: one pick for 3, 50 and 1,000 candidates.

Run: `/tmp/venv/bin/pytest bench/bench_router.py --benchmark-only -p no:cacheprovider`.
Candidates are remote with spread RTTs and loads mostly under soft (the common case);
`marked` variants add a FullMarks view with a few marks and load feedback.
"""

from __future__ import annotations

import random

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from proxy.config import CLOSEST, LEASTLOAD
from proxy.core.router import FullMarks, pick
from shm.candidate import Candidate

SIZES = (3, 50, 1000)


def fleet(n: int, seed: int = 7) -> list[Candidate]:
    r = random.Random(seed)
    return [
        Candidate(
            f"inst-{i}",
            f"node-{i % 40}",
            i == 0,
            r.randint(0, 24),
            20,
            25,
            r.randint(500, 250_000),
            f"127.0.0.1:{9000 + i}",
            i,
            1_000_000,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("strategy", [CLOSEST, LEASTLOAD])
def test_pick(benchmark: BenchmarkFixture, strategy: str, n: int) -> None:
    cands = fleet(n)
    rng = random.Random(1)
    got = benchmark(pick, cands, strategy, rng, 2.0)
    assert isinstance(got, Candidate)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("strategy", [CLOSEST, LEASTLOAD])
def test_pick_marked_tried(benchmark: BenchmarkFixture, strategy: str, n: int) -> None:
    cands = fleet(n)
    rng = random.Random(1)
    marks = FullMarks()
    marks.mark_full(cands[0].id, 1.0, 5.0)
    marks.feedback(cands[-1].id, 3, 1.5)
    tried = frozenset({cands[1 % n].id})
    got = benchmark(pick, cands, strategy, rng, 2.0, tried, marks)
    assert isinstance(got, Candidate)


@pytest.mark.parametrize("n", SIZES)
def test_pick_closest_all_over_soft(benchmark: BenchmarkFixture, n: int) -> None:
    cands = fleet(n)
    for c in cands:
        c.load = max(c.load, c.soft_limit)  # the fallback path: least loaded under hard
    rng = random.Random(1)
    got = benchmark(pick, cands, CLOSEST, rng, 2.0)
    assert isinstance(got, Candidate)


def test_pick_three_equal_local(benchmark: BenchmarkFixture) -> None:
    cands = [Candidate(f"i{i}", "n", True, 0, 20, 25, 0) for i in range(3)]
    rng = random.Random(1)
    got = benchmark(pick, cands, CLOSEST, rng, 2.0)
    assert isinstance(got, Candidate)
