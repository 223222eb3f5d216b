"""Router core: the closest and leastload rules, tie-breaking, exclusions and FullMarks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import CLOSEST, LEASTLOAD
from proxy.core.router import (
    FullMarks,
    NoPick,
    pick,
    pick_closest,
    pick_leastload,
)
from shm.candidate import Candidate


def cand(
    id: str,
    load: int = 0,
    soft: int = 10,
    hard: int = 20,
    rtt: int = 1000,
    local: bool = False,
    load_time_us: int = 0,
) -> Candidate:
    return Candidate(id, "n-" + id, local, load, soft, hard, rtt, "127.0.0.1:9000", 0, load_time_us)


def ids(got: object) -> str:
    assert isinstance(got, Candidate), got
    return got.id


def rng() -> random.Random:
    return random.Random(1234)


# --- closest -------------------------------------------------------------------------------
def test_closest_prefers_under_soft_over_closer_at_soft() -> None:
    """An instance under its soft limit wins over a closer one at or over its soft limit."""
    cs = [cand("near", load=10, rtt=100), cand("far", load=9, rtt=90_000)]
    assert ids(pick_closest(cs, rng())) == "far"


def test_closest_picks_lowest_rtt_under_soft() -> None:
    """Among instances under soft, the lowest RTT wins regardless of load."""
    cs = [cand("a", load=1, rtt=5000), cand("b", load=8, rtt=300), cand("c", load=0, rtt=900)]
    assert ids(pick_closest(cs, rng())) == "b"


def test_local_counts_as_zero_rtt() -> None:
    """A local instance has RTT 0 whatever its rtt field says, so it beats any remote one."""
    cs = [cand("remote", rtt=1), cand("local", rtt=99_999, local=True)]
    assert ids(pick_closest(cs, rng())) == "local"


def test_unknown_rtt_ranks_last() -> None:
    """A negative RTT (node not measured yet) ranks after every known RTT."""
    cs = [cand("unknown", rtt=-1), cand("far", rtt=300_000)]
    assert ids(pick_closest(cs, rng())) == "far"


def test_closest_falls_back_to_least_loaded_under_hard() -> None:
    """With none under soft, the least loaded under hard wins even if farther."""
    cs = [cand("near", load=18, rtt=10), cand("mid", load=12, rtt=5000), cand("x", load=20, rtt=1)]
    assert ids(pick_closest(cs, rng())) == "mid"


def test_closest_fallback_ties_broken_by_rtt() -> None:
    """Between equally loaded instances over soft, the lower RTT wins."""
    cs = [cand("far", load=15, rtt=8000), cand("near", load=15, rtt=200)]
    assert ids(pick_closest(cs, rng())) == "near"


def test_closest_never_picks_at_hard() -> None:
    """An instance at its hard limit loses to one under it, however close it is."""
    cs = [cand("full", load=20, rtt=0, local=True), cand("ok", load=19, rtt=90_000)]
    assert ids(pick_closest(cs, rng())) == "ok"


def test_soft_above_hard_still_respects_hard() -> None:
    """A misconfigured soft limit above hard never lets an instance at hard be chosen."""
    cs = [cand("bad", load=5, soft=10, hard=5, rtt=1), cand("ok", load=7, soft=3, hard=9)]
    assert ids(pick_closest(cs, rng())) == "ok"


def test_all_full_and_no_instances() -> None:
    """No pick says all_full when every remaining one is at hard, no_instances when none remain."""
    full = [cand("a", load=20), cand("b", load=25)]
    for strategy in (CLOSEST, LEASTLOAD):
        assert pick(full, strategy, rng()) is NoPick.ALL_FULL
        assert pick([], strategy, rng()) is NoPick.NO_INSTANCES
        assert pick(full, strategy, rng(), tried={"a", "b"}) is NoPick.NO_INSTANCES
        assert pick(full, strategy, rng(), tried={"a"}) is NoPick.ALL_FULL
    assert NoPick.ALL_FULL.value == "all_full"
    assert NoPick.NO_INSTANCES.value == "no_instances"


def test_tried_instances_are_excluded() -> None:
    """An instance already tried for this request is never chosen again."""
    cs = [cand("best", local=True), cand("next", rtt=500), cand("last", rtt=900)]
    assert ids(pick_closest(cs, rng(), tried={"best"})) == "next"
    assert ids(pick_closest(cs, rng(), tried=["best", "next"])) == "last"
    for seed in range(50):
        got = pick_leastload(cs, random.Random(seed), tried=frozenset({"best"}))
        assert ids(got) != "best"


def test_equal_instances_share_load_closest() -> None:
    """Three identical local instances each get at least 25 % of 3,000 closest picks."""
    cs = [cand(f"i{i}", local=True) for i in range(3)]
    r = rng()
    counts = Counter(ids(pick_closest(cs, r)) for _ in range(3000))
    assert set(counts) == {"i0", "i1", "i2"}
    assert min(counts.values()) >= 750, counts


def test_fallback_equals_share_load() -> None:
    """Equally loaded, equally close instances over soft are chosen at random among them."""
    cs = [cand(f"i{i}", load=15, rtt=100) for i in range(3)] + [cand("busy", load=16, rtt=1)]
    r = rng()
    counts = Counter(ids(pick_closest(cs, r)) for _ in range(3000))
    assert set(counts) == {"i0", "i1", "i2"}
    assert min(counts.values()) >= 750, counts


# --- leastload -----------------------------------------------------------------------------
def test_leastload_whole_sample_picks_least_loaded() -> None:
    """With k at least the number of instances, the least loaded one always wins."""
    cs = [cand("a", load=5, rtt=1), cand("b", load=2, rtt=90_000), cand("c", load=3, rtt=2)]
    for seed in range(50):
        assert ids(pick_leastload(cs, random.Random(seed), k=3)) == "b"
        assert ids(pick_leastload(cs, random.Random(seed), k=5)) == "b"


def test_leastload_ties_broken_by_rtt() -> None:
    """Among equally loaded instances in the sample, the closest wins."""
    cs = [cand("far", load=4, rtt=9000), cand("near", load=4, rtt=100), cand("local", load=4)]
    cs[2].local = True
    for seed in range(50):
        assert ids(pick_leastload(cs, random.Random(seed), k=3)) == "local"


def test_leastload_sample_of_two() -> None:
    """With k=2 the most loaded of three is never chosen, the least loaded is most often."""
    cs = [cand("lo", load=1), cand("mid", load=2), cand("hi", load=3)]
    r = rng()
    counts = Counter(ids(pick_leastload(cs, r, k=2)) for _ in range(3000))
    assert "hi" not in counts
    # lo wins whenever sampled (2 of 3 pairs), mid only in the pair {mid, hi}
    assert 1800 < counts["lo"] < 2200, counts


def test_leastload_k1_is_uniform_random() -> None:
    """With k=1 (and k < 1, which counts as 1) the pick is uniform among eligible instances."""
    cs = [cand(f"i{i}", load=i) for i in range(4)]
    r = rng()
    for k in (1, 0):
        counts = Counter(ids(pick_leastload(cs, r, k=k)) for _ in range(4000))
        assert min(counts.values()) > 800, counts


def test_leastload_exact_equals_share_load() -> None:
    """Identical instances in leastload are each chosen about equally often."""
    for n in (2, 3, 10):
        cs = [cand(f"i{i}", load=3) for i in range(n)]
        r = rng()
        counts = Counter(ids(pick_leastload(cs, r)) for _ in range(1000 * n))
        assert len(counts) == n
        assert min(counts.values()) > 800, counts


def test_leastload_finds_the_only_instance_under_hard() -> None:
    """When almost all instances are full, the sample still finds the one under hard."""
    cs = [cand(f"full{i}", load=20) for i in range(500)] + [cand("free", load=19)]
    for seed in range(20):
        assert ids(pick_leastload(cs, random.Random(seed))) == "free"


def test_pick_dispatch_and_unknown_strategy() -> None:
    """`pick` follows the strategy name and refuses an unknown one with a clear error."""
    cs = [cand("near", load=9, rtt=10), cand("idle", load=0, rtt=5000)]
    assert ids(pick(cs, CLOSEST, rng())) == "near"
    assert ids(pick(cs, LEASTLOAD, rng(), k=2)) == "idle"
    with pytest.raises(ValueError, match="unknown routing strategy 'random'"):
        pick(cs, "random", rng())


def test_candidate_has_slots() -> None:
    """Candidate keeps its fields in slots (no per-object dict) and carries address and index."""
    c = Candidate("i", "n", True, 1, 2, 3, 4, "10.0.0.1:80", 7)
    assert not hasattr(c, "__dict__")
    assert (c.address, c.index, c.load_time_us) == ("10.0.0.1:80", 7, 0)
    assert "Candidate('i'" in repr(c)


# --- FullMarks -----------------------------------------------------------------------------
def test_full_mark_holds_until_expiry() -> None:
    """A marked instance is treated as at hard until now + hold, then chosen again."""
    marks = FullMarks()
    cs = [cand("local", local=True), cand("remote", rtt=50_000)]
    marks.mark_full("local", now=100.0, hold=2.0)
    assert marks.is_full("local", 101.9)
    assert marks.load_of(cs[0], 101.9) == 20
    for strategy in (CLOSEST, LEASTLOAD):
        assert ids(pick(cs, strategy, rng(), 101.9, marks=marks)) == "remote"
        assert ids(pick(cs, strategy, rng(), 102.0, marks=marks, k=2)) == "local"
    assert not marks.is_full("local", 102.0)


def test_full_marks_on_all_mean_all_full() -> None:
    """With every instance marked full the router answers all_full."""
    marks = FullMarks()
    cs = [cand("a"), cand("b")]
    marks.mark_full("a", 0.0, 1.0)
    marks.mark_full("b", 0.0, 1.0)
    assert pick_closest(cs, rng(), 0.5, marks=marks) is NoPick.ALL_FULL
    assert pick_leastload(cs, rng(), 0.5, marks=marks) is NoPick.ALL_FULL


def test_full_mark_never_shortened_and_pruned() -> None:
    """A later shorter mark keeps the longer hold; prune drops expired marks and old feedback."""
    marks = FullMarks()
    marks.mark_full("a", 0.0, 5.0)
    marks.mark_full("a", 1.0, 1.0)
    assert marks.is_full("a", 4.9)
    marks.mark_full("a", 4.0, 3.0)
    assert marks.is_full("a", 6.9)
    marks.feedback("a", 3, 1.0)
    marks.feedback("b", 3, 6.0)
    assert len(marks) == 3
    marks.prune(7.0, max_age=2.0)
    assert len(marks) == 1  # only b's feedback (age 1 s) is left
    assert not marks.is_full("a", 7.0)


def test_load_override_until_table_is_newer() -> None:
    """Fresh load feedback replaces the table's load until the table's load time is newer."""
    marks = FullMarks()
    busy = cand("busy", load=1, rtt=100, load_time_us=1_000_000)
    idle = cand("idle", load=3, rtt=100, load_time_us=1_000_000)
    marks.feedback("busy", 9, now=2.0)  # a response said busy has 9 in flight now
    assert marks.load_of(busy, 2.0) == 9
    assert ids(pick_leastload([busy, idle], rng(), 2.0, marks=marks, k=2)) == "idle"
    busy.load_time_us = 2_000_000  # same time: the feedback still stands
    assert marks.load_of(busy, 2.5) == 9
    busy.load_time_us = 2_500_000  # the table has a newer measurement
    assert marks.load_of(busy, 2.5) == 1
    assert ids(pick_leastload([busy, idle], rng(), 2.5, marks=marks, k=2)) == "busy"


def test_load_override_can_push_over_soft_and_hard() -> None:
    """Feedback at the hard limit makes closest avoid the instance like a table load would."""
    marks = FullMarks()
    cs = [cand("local", local=True), cand("remote", rtt=40_000)]
    marks.feedback("local", 20, now=1.0)
    assert ids(pick_closest(cs, rng(), 1.0, marks=marks)) == "remote"
    marks.feedback("local", 12, now=1.5)  # over soft: the remote under soft wins
    assert ids(pick_closest(cs, rng(), 1.5, marks=marks)) == "remote"
    marks.feedback("local", 2, now=2.0)
    assert ids(pick_closest(cs, rng(), 2.0, marks=marks)) == "local"


# --- properties ----------------------------------------------------------------------------
candidate_rows = st.lists(
    st.tuples(
        st.integers(0, 6),  # load
        st.integers(0, 6),  # soft
        st.integers(0, 6),  # hard
        st.sampled_from([-1, 0, 100, 100, 5000]),  # rtt
        st.booleans(),  # local
    ),
    max_size=12,
)


def build(rows: list[tuple[int, int, int, int, bool]]) -> list[Candidate]:
    return [
        cand(f"i{i}", load, soft, hard, rtt, local)
        for i, (load, soft, hard, rtt, local) in enumerate(rows)
    ]


def eff_rtt(c: Candidate) -> int:
    return 0 if c.local else (c.rtt_us if c.rtt_us >= 0 else 1 << 62)


@settings(max_examples=400)
@given(
    rows=candidate_rows,
    tried_mask=st.integers(0, 4095),
    marked_mask=st.integers(0, 4095),
    strategy=st.sampled_from([CLOSEST, LEASTLOAD]),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_property_never_full_never_tried(
    rows: list[tuple[int, int, int, int, bool]],
    tried_mask: int,
    marked_mask: int,
    strategy: str,
    k: int,
    seed: int,
) -> None:
    """No pick is tried, at hard or marked full while another is under hard; reasons are right."""
    cs = build(rows)
    tried = {c.id for i, c in enumerate(cs) if tried_mask >> i & 1}
    marks = FullMarks()
    for i, c in enumerate(cs):
        if marked_mask >> i & 1:
            marks.mark_full(c.id, 10.0, 1.0)
    remaining = [c for c in cs if c.id not in tried]
    eligible = [c for c in remaining if c.load < c.hard_limit and not marks.is_full(c.id, 10.5)]
    got = pick(cs, strategy, random.Random(seed), 10.5, tried, marks, k)
    if not remaining:
        assert got is NoPick.NO_INSTANCES
    elif not eligible:
        assert got is NoPick.ALL_FULL
    else:
        assert isinstance(got, Candidate)
        assert got in eligible


@settings(max_examples=400)
@given(rows=candidate_rows, tried_mask=st.integers(0, 4095), seed=st.integers(0, 2**32))
def test_property_closest_under_soft_has_min_rtt(
    rows: list[tuple[int, int, int, int, bool]], tried_mask: int, seed: int
) -> None:
    """When some instance is under soft, closest picks one under soft with the minimum RTT."""
    cs = build(rows)
    tried = {c.id for i, c in enumerate(cs) if tried_mask >> i & 1}
    under = [c for c in cs if c.id not in tried and c.load < min(c.soft_limit, c.hard_limit)]
    got = pick_closest(cs, random.Random(seed), tried=tried)
    if under:
        assert isinstance(got, Candidate)
        assert got in under
        assert eff_rtt(got) == min(eff_rtt(c) for c in under)
    elif isinstance(got, Candidate):  # fallback: least loaded under hard, then RTT
        rest = [c for c in cs if c.id not in tried and c.load < c.hard_limit]
        best = min((c.load, eff_rtt(c)) for c in rest)
        assert (got.load, eff_rtt(got)) == best


@settings(max_examples=300)
@given(
    rows=candidate_rows,
    tried_mask=st.integers(0, 4095),
    k=st.integers(1, 14),
    seed=st.integers(0, 2**32),
)
def test_property_leastload_picks_least_loaded_of_its_sample(
    rows: list[tuple[int, int, int, int, bool]], tried_mask: int, k: int, seed: int
) -> None:
    """Leastload's pick is the least loaded, then closest, of some k eligible instances."""
    cs = build(rows)
    tried = {c.id for i, c in enumerate(cs) if tried_mask >> i & 1}
    eligible = [c for c in cs if c.id not in tried and c.load < c.hard_limit]
    got = pick_leastload(cs, random.Random(seed), tried=tried, k=k)
    if not eligible:
        assert isinstance(got, NoPick)
        return
    assert isinstance(got, Candidate)
    ranked = sorted((c.load, eff_rtt(c)) for c in eligible)
    # the pick beats or ties every eligible instance outside the best k-1 others
    assert (got.load, eff_rtt(got)) <= ranked[max(0, len(ranked) - k)]
    if k >= len(eligible):
        assert (got.load, eff_rtt(got)) == ranked[0]


def simulate_leastload(seed: int, n: int = 50, steps: int = 600, warmup: int = 200) -> float:
    """Mean over steady-state steps of max/mean in-flight for `n` equal instances."""
    r = random.Random(seed)
    cs = [Candidate(f"i{i}", "n", True, 0, 10**6, 10**6, 0, "", i) for i in range(n)]
    ends: dict[int, list[int]] = {}
    ratios = []
    for t in range(steps):
        for i in ends.pop(t, ()):
            cs[i].load -= 1
        for _ in range(n):  # n arrivals a step, each held 1..19 steps: ~10 in flight each
            c = pick_leastload(cs, r, k=2)
            assert isinstance(c, Candidate)
            c.load += 1
            ends.setdefault(t + r.randint(1, 19), []).append(c.index)
        if t >= warmup:
            loads = [c.load for c in cs]
            ratios.append(max(loads) * n / sum(loads))
    return sum(ratios) / len(ratios)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_property_leastload_spreads_simulated_load(seed: int) -> None:
    """Leastload (k=2) over 50 equal instances keeps steady-state max/mean in-flight <= 1.3."""
    assert simulate_leastload(seed) <= 1.3
