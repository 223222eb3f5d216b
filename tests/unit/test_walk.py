"""proxy.worker.walk over real tables: it picks what the router's full scan would pick.

A random table (nodes up, down, unmeasured, with equal RTTs; instances with their own
limits and loads, some on a node with no row), random tries, marks and load feedback:
the walk's pick is in the set the rules allow (proxy.core.router: closest, leastload),
where the router's own pick over every candidate read now also is. Then what makes the
walk cheap: it reads no instance it does not examine, chooses uniformly among equals,
and a hint that proves wrong costs time, never the answer.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.router import (
    UNKNOWN_RTT_US,
    FullMarks,
    NoPick,
    pick_closest,
    pick_leastload,
)
from proxy.worker.walk import SMALL, Walk
from shm import codec
from shm.candidate import Candidate
from shm.layout import Layout
from shm.reader import TableReader
from shm.view import group_name
from shm.writer import TableWriter

_COUNTER = itertools.count()
NOW = 10.5
NODES = ("n0", "n1", "n2", "n3", "n4")  # n0 is the reader's own node


@dataclass
class Table:
    w: TableWriter
    r: TableReader
    walk: Walk
    layout: Layout

    def close(self) -> None:
        self.r.close()
        self.w.close(unlink=True)


def make_table(
    nodes: list[tuple[str, int, bool]],
    insts: list[tuple[str, int, int, int, float]],
    capacity: int = 64,
) -> Table:
    """A real table: nodes (id, rtt, up), instances i<k> (node, soft, hard, load, load time)."""
    lay = Layout(8, 2, max(capacity, len(insts) + 1))
    name = f"/ept-walk-{os.getpid()}-{next(_COUNTER)}"
    w = TableWriter.open(lay, name)
    with w.batch():
        for nid, _, _ in nodes:
            w.put_node(codec.NodeRow(nid, "r", "127.0.0.2:1", 1))
        w.put_app(codec.AppRow("a", ("a.test",), "closest", 5, 9, 2))
        for k, (node, soft, hard, _, _) in enumerate(insts):
            w.put_instance(codec.InstanceRow("a", f"i{k}", node, "127.0.0.2:80", soft, hard))
    for nid, rtt, up in nodes:
        w.set_rtt(nid, rtt_us=rtt, jitter_us=0, loss_permille=0, last_heard=1.0, up=up)
    for k, (_, _, _, load, t) in enumerate(insts):
        w.set_load(f"i{k}", load, t, 1)
    r = TableReader.attach(lay, name, local_node="n0")
    return Table(w, r, Walk(r, None), lay)


def everyone(t: Table) -> list[Candidate]:
    """Every candidate read now, as a worker without a table view reads them."""
    cands = list(t.r.candidates("a"))
    for c in cands:
        if not c.local and not c.node_up:
            c.rtt_us = -1
    return cands


def rank_rtt(c: Candidate) -> int:
    return 0 if c.local else (c.rtt_us if c.rtt_us >= 0 else UNKNOWN_RTT_US)


def closest_set(cands: list[Candidate], tried: set[str], marks: FullMarks) -> set[str] | NoPick:
    """What the closest rule allows: ids of the equally right choices, or why none."""
    left = [c for c in cands if c.id not in tried]
    ok = [c for c in left if marks.load_of(c, NOW) < c.hard_limit]
    if not ok:
        return NoPick.ALL_FULL if left else NoPick.NO_INSTANCES
    under = [c for c in ok if marks.load_of(c, NOW) < c.soft_limit]
    if under:
        best = min(rank_rtt(c) for c in under)
        return {c.id for c in under if rank_rtt(c) == best}
    low = min((marks.load_of(c, NOW), rank_rtt(c)) for c in ok)
    return {c.id for c in ok if (marks.load_of(c, NOW), rank_rtt(c)) == low}


def leastload_ok(
    got: Candidate | NoPick, cands: list[Candidate], tried: set[str], marks: FullMarks, k: int
) -> bool:
    """The leastload rule: the least loaded, then closest, of some k eligible ones."""
    left = [c for c in cands if c.id not in tried]
    ok = [c for c in left if marks.load_of(c, NOW) < c.hard_limit]
    if not ok:
        return got is (NoPick.ALL_FULL if left else NoPick.NO_INSTANCES)
    if not isinstance(got, Candidate) or got.id not in {c.id for c in ok}:
        return False
    ranked = sorted((marks.load_of(c, NOW), rank_rtt(c)) for c in ok)
    mine = (marks.load_of(got, NOW), rank_rtt(got))
    if k >= len(ok):
        return mine == ranked[0]
    return mine <= ranked[len(ranked) - k]


node_rows = st.lists(
    st.tuples(st.sampled_from([-1, 0, 100, 100, 5000, 5000]), st.booleans()),
    min_size=5,
    max_size=5,
)
instance_rows = st.lists(
    st.tuples(
        st.sampled_from([*NODES, "n1", "n2", "ghost"]),
        st.integers(0, 6),  # soft
        st.integers(0, 7),  # hard
        st.integers(0, 7),  # load
        st.sampled_from([9.0, 10.0, 11.0]),  # when the table's load was measured
    ),
    min_size=1,
    max_size=40,
)
edges = st.lists(
    st.tuples(
        st.integers(0, 39), st.sampled_from(["tried", "full", "fb", "sent"]), st.integers(0, 7)
    ),
    max_size=8,
)
pressures = st.sampled_from([0, 0, 2, 4, 5, 6, 7])
moves = st.lists(
    st.tuples(
        st.sampled_from(NODES), st.sampled_from([-1, 0, 50, 100, 101, 4999, 5000]), st.booleans()
    ),
    max_size=4,
)


def move_rtts(t: Table, rtts: list[tuple[str, int, bool]]) -> None:
    """New RTTs after the view was sorted (the pinger's next measurements)."""
    t.r.view("a")
    for nid, rtt, up in rtts:
        t.w.set_rtt(nid, rtt_us=rtt, jitter_us=0, loss_permille=0, last_heard=2.0, up=up)


def setup(
    nodes: list[tuple[int, bool]],
    insts: list[tuple[str, int, int, int, float]],
    edge: list[tuple[int, str, int]],
    pressure: int,
) -> tuple[Table, set[str], FullMarks]:
    """The table, tries and marks of an example; `pressure` raises every load (toward
    every instance over soft, or full: the walk's fallbacks)."""
    insts = [(n, soft, hard, min(load + pressure, 8), t) for n, soft, hard, load, t in insts]
    t = make_table([(NODES[i], rtt, up) for i, (rtt, up) in enumerate(nodes)], insts)
    tried: set[str] = set()
    marks = FullMarks()
    for k, what, load in edge:
        if k >= len(insts):
            continue
        iid = f"i{k}"
        if what == "tried":
            tried.add(iid)
        elif what == "full":
            marks.mark_full(iid, 10.0, 1.0)
        elif what == "sent":  # what a worker counts after sending: above the table's load
            marks.feedback(iid, insts[k][3] + 1 + load, 10.0)
        else:  # a backhaul response's count, at 10.0: newer than some table loads
            marks.feedback(iid, load, 10.0, group_name("a", insts[k][0]))
    return t, tried, marks


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=node_rows,
    insts=instance_rows,
    edge=edges,
    pressure=pressures,
    rtts=moves,
    seed=st.integers(0, 2**32),
)
def test_property_closest_picks_what_the_full_scan_allows(
    nodes: list[tuple[int, bool]],
    insts: list[tuple[str, int, int, int, float]],
    edge: list[tuple[int, str, int]],
    pressure: int,
    rtts: list[tuple[str, int, bool]],
    seed: int,
) -> None:
    """Over random tables the walk's closest pick is one the rule allows (the full scan's
    own pick is in the same set), and a no-pick gives the same reason; RTTs that moved
    since the view was sorted change nothing to that."""
    t, tried, marks = setup(nodes, insts, edge, pressure)
    try:
        move_rtts(t, rtts)
        allowed = closest_set(everyone(t), tried, marks)
        ref = pick_closest(everyone(t), random.Random(seed), NOW, tried, marks)
        view = t.r.view("a")
        assert view is not None
        got = t.walk.closest(view, random.Random(seed), NOW, tried, marks)
        if isinstance(allowed, NoPick):
            assert got is allowed and ref is allowed
        else:
            assert isinstance(ref, Candidate) and ref.id in allowed
            assert isinstance(got, Candidate) and got.id in allowed, (got, allowed)
    finally:
        t.close()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=node_rows,
    insts=instance_rows,
    edge=edges,
    pressure=pressures,
    rtts=moves,
    k=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_property_leastload_picks_what_the_full_scan_allows(
    nodes: list[tuple[int, bool]],
    insts: list[tuple[str, int, int, int, float]],
    edge: list[tuple[int, str, int]],
    pressure: int,
    rtts: list[tuple[str, int, bool]],
    k: int,
    seed: int,
) -> None:
    """Over random tables the walk's leastload pick is the least loaded, then closest, of
    some k eligible instances, as the full scan's is; a no-pick gives the same reason;
    RTTs that moved since the view was sorted change nothing to that."""
    t, tried, marks = setup(nodes, insts, edge, pressure)
    try:
        move_rtts(t, rtts)
        ref = pick_leastload(everyone(t), random.Random(seed), NOW, tried, marks, k)
        assert leastload_ok(ref, everyone(t), tried, marks, k)
        view = t.r.view("a")
        assert view is not None
        got = t.walk.leastload(view, random.Random(seed), NOW, tried, marks, k)
        assert leastload_ok(got, everyone(t), tried, marks, k), got
    finally:
        t.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    loads=st.lists(st.integers(0, 7), min_size=SMALL + 1, max_size=40),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**32),
)
def test_property_leastload_probes_like_the_router(loads: list[int], k: int, seed: int) -> None:
    """When its probes find k (most instances under hard), the walk picks exactly the
    candidate the router picks with the same random draws: it reads them as it probes."""
    insts = [(NODES[1 + i % 4], 5, 9, load, 9.0) for i, load in enumerate(loads)]
    t = make_table([(n, 100 * i, True) for i, n in enumerate(NODES)], insts)
    try:
        view = t.r.view("a")
        assert view is not None
        ref = pick_leastload(everyone(t), random.Random(seed), NOW, (), None, k)
        got = t.walk.leastload(view, random.Random(seed), NOW, (), None, k)
        if sum(1 for x in loads if x < 9) > len(loads) // 2:
            assert isinstance(got, Candidate) and isinstance(ref, Candidate)
            assert got.id == ref.id
    finally:
        t.close()


# --- what makes it cheap ----------------------------------------------------------------
@pytest.fixture
def big() -> Iterator[Table]:
    """300 instances on four remote nodes (RTT 1, 2, 3, 4 ms), 75 each, all under soft."""
    nodes = [("n0", 0, True)] + [(f"n{i}", 1000 * i, True) for i in range(1, 5)]
    insts = [(f"n{1 + i % 4}", 5, 9, 0, 9.0) for i in range(300)]
    t = make_table(nodes, insts, capacity=400)
    yield t
    t.close()


def tear(t: Table, iid: str) -> None:
    """Leave `iid`'s load block as a writer that died mid-write would (odd seq)."""
    c = t.r.candidate(iid)
    assert c is not None
    at = c.load_at
    seq = int.from_bytes(t.w._mm[at : at + 8], "little")
    t.w._mm[at : at + 8] = (seq | 1).to_bytes(8, "little")


def test_closest_reads_no_instance_beyond_the_group_it_picks_from(big: Table) -> None:
    """Every instance farther than the nearest node's is unreadable (torn): picks from the
    nearest node never touch them (a read would count retries)."""
    view = big.r.view("a")
    assert view is not None
    for c in view.all:
        if c.node != "n1":
            tear(big, c.id)
    rng = random.Random(3)
    for _ in range(200):
        got = big.walk.closest(view, rng, NOW)
        assert isinstance(got, Candidate) and got.node == "n1"
    assert big.r.retries == 0


def test_closest_skips_a_saturated_node_on_the_summary(big: Table) -> None:
    """The nearest node's instances are all over soft: the table's summary says so, and
    the pick goes to the next node without reading any of them, nor their group's block
    (all torn)."""
    for c in list(big.r.candidates("a")):
        if c.node == "n1":
            big.w.set_load(c.id, 7, 9.0, 1)
    view = big.r.view("a")
    assert view is not None
    for c in view.all:
        if c.node not in ("n2",):
            tear(big, c.id)
    n1 = next(g for g in view.groups if g.node == "n1")
    seq = int.from_bytes(big.w._mm[n1.block_at : n1.block_at + 8], "little")
    big.w._mm[n1.block_at : n1.block_at + 8] = (seq | 1).to_bytes(8, "little")
    got = big.walk.closest(view, random.Random(1), NOW)
    assert isinstance(got, Candidate) and got.node == "n2"
    assert big.r.retries == 0


def test_leastload_reads_only_what_it_probes(big: Table) -> None:
    """Leastload over 300 reads the candidates it probes, not the other ones: with every
    other instance torn, a pick reads at most the probe budget."""
    view = big.r.view("a")
    assert view is not None
    rng = random.Random(5)
    big.r.retries = 0
    got = big.walk.leastload(view, rng, NOW, (), None, 2)
    assert isinstance(got, Candidate)
    for c in view.all:
        tear(big, c.id)
    before = big.r.retries
    big.walk.leastload(view, rng, NOW, (), None, 2)
    read = (big.r.retries - before) // 16  # every read of a torn block retries 16 times
    assert 2 <= read <= 4 * 2 + 4


def test_closest_chooses_uniformly_among_the_equals(big: Table) -> None:
    """Equally close instances under soft share the load: 10 of node n1's 75 are under soft
    (the rest over): 3,000 picks give each of the 10 at least half its share."""
    under = [c.id for c in big.r.candidates("a") if c.node == "n1"][:10]
    for c in list(big.r.candidates("a")):
        if c.node == "n1" and c.id not in under:
            big.w.set_load(c.id, 6, 9.0, 1)
    view = big.r.view("a")
    assert view is not None
    rng = random.Random(7)
    counts = Counter()
    for _ in range(3000):
        got = big.walk.closest(view, rng, NOW)
        assert isinstance(got, Candidate)
        counts[got.id] += 1
    assert set(counts) == set(under)
    assert min(counts.values()) >= 150, counts


def test_equal_rtts_make_one_run_chosen_uniformly() -> None:
    """Two nodes at the same RTT are equally close: their instances under soft share picks."""
    nodes = [("n0", 0, True), ("n1", 700, True), ("n2", 700, True), ("n3", 100, True)]
    insts = [("n1", 5, 9, 0, 9.0)] * 10 + [("n2", 5, 9, 0, 9.0)] * 30 + [("n3", 5, 9, 6, 9.0)] * 5
    t = make_table(nodes, insts)
    try:
        view = t.r.view("a")
        assert view is not None
        rng = random.Random(11)
        nodes_hit = Counter()
        for _ in range(2000):
            got = t.walk.closest(view, rng, NOW)
            assert isinstance(got, Candidate)
            nodes_hit[got.node] += 1
        assert set(nodes_hit) == {"n1", "n2"}
        assert 350 <= nodes_hit["n1"] <= 650, nodes_hit  # 10 of 40: 500 expected
    finally:
        t.close()


def test_fallback_ties_share_and_the_least_loaded_wins() -> None:
    """All over soft: the least loaded under hard wins however far; equals share."""
    nodes = [("n0", 0, True), ("n1", 100, True), ("n2", 9000, True)]
    insts = [("n1", 2, 9, 7, 9.0)] * 20 + [("n2", 2, 9, 4, 9.0)] * 6 + [("n2", 2, 9, 5, 9.0)] * 6
    t = make_table(nodes, insts)
    try:
        view = t.r.view("a")
        assert view is not None
        rng = random.Random(2)
        counts = Counter()
        for _ in range(1200):
            got = t.walk.closest(view, rng, NOW)
            assert isinstance(got, Candidate) and got.load == 4
            counts[got.id] += 1
        assert len(counts) == 6 and min(counts.values()) >= 100, counts
    finally:
        t.close()


def test_a_wrong_order_array_costs_time_not_the_answer(big: Table) -> None:
    """Order entries that name instances of another node (as mid-write) are caught: the
    pick reads the group's members and is still right."""
    view = big.r.view("a")
    assert view is not None
    n1 = next(g for g in view.groups if g.node == "n1")
    n2 = next(g for g in view.groups if g.node == "n2")
    for c in n1.members[5:]:
        big.w.set_load(c.id, 7, 9.0, 1)  # 5 under soft on n1
    mm = big.w._mm
    other = n2.members[0].index
    for j in range(len(n1.members)):
        codec.ORDER_ENTRY.pack_into(mm, n1.order_at + 4 * j, other)
    rng = random.Random(4)
    for _ in range(50):
        got = big.walk.closest(view, rng, NOW)
        assert isinstance(got, Candidate) and got in n1.members[:5]
    for _ in range(50):
        got = big.walk.leastload(view, rng, NOW, (), None, 2)
        assert isinstance(got, Candidate) and got.load < 9


def test_feedback_below_the_table_is_seen_in_a_group_the_hint_skips(big: Table) -> None:
    """The table says node n1 is saturated; this worker heard from n1 that one instance is
    idle now: that one is the closest under soft, and is picked."""
    for c in list(big.r.candidates("a")):
        if c.node == "n1":
            big.w.set_load(c.id, 7, 9.0, 1)
    view = big.r.view("a")
    assert view is not None
    idle = next(c for c in view.all if c.node == "n1")
    marks = FullMarks()
    marks.feedback(idle.id, 0, 10.0, group_name("a", "n1"))
    for seed in range(20):
        got = big.walk.closest(view, random.Random(seed), NOW, (), marks)
        assert got is idle


def test_saturated_app_picks_only_what_is_left() -> None:
    """38 of 40 instances full: whichever way the walk samples (through the groups' hints),
    a tried or marked instance is never the answer, and the one left always is."""
    nodes = [("n0", 0, True), ("n1", 100, True), ("n2", 200, True)]
    insts = [(f"n{1 + i % 2}", 2, 9, 9, 9.0) for i in range(38)]
    insts += [("n1", 2, 9, 3, 9.0), ("n2", 2, 9, 8, 9.0)]
    t = make_table(nodes, insts)
    try:
        view = t.r.view("a")
        assert view is not None
        marks = FullMarks()
        marks.mark_full("i39", 10.0, 1.0)
        for seed in range(40):
            for k in (1, 2, 3):
                got = t.walk.leastload(view, random.Random(seed), NOW, {"i38"}, None, k)
                assert isinstance(got, Candidate) and got.id == "i39"
                got = t.walk.leastload(view, random.Random(seed), NOW, (), marks, k)
                assert isinstance(got, Candidate) and got.id == "i38"
            assert t.walk.closest(view, random.Random(seed), NOW, {"i38"}, marks) is NoPick.ALL_FULL
            got = t.walk.closest(view, random.Random(seed), NOW, {"i39"})
            assert isinstance(got, Candidate) and got.id == "i38"
        every = {f"i{k}" for k in range(40)}
        assert t.walk.leastload(view, random.Random(1), NOW, every) is NoPick.NO_INSTANCES
    finally:
        t.close()


def test_fallback_sees_an_instance_raised_by_what_this_worker_sent() -> None:
    """The table counts one instance under soft, but this worker has sent it enough to put
    it over soft (not over hard): with every other one busier, it is still the least loaded."""
    nodes = [("n0", 0, True), ("n1", 100, True), ("n2", 9000, True)]
    insts = [("n1", 5, 9, 8, 9.0)] * 12 + [("n2", 5, 9, 7, 9.0)] * 12 + [("n2", 5, 9, 1, 9.0)]
    t = make_table(nodes, insts)
    try:
        view = t.r.view("a")
        assert view is not None
        marks = FullMarks()
        marks.feedback("i24", 6, 10.0)  # sent 5 since the table's 1: over soft, under hard
        for seed in range(30):
            got = t.walk.closest(view, random.Random(seed), NOW, (), marks)
            assert isinstance(got, Candidate) and got.id == "i24"
    finally:
        t.close()


@pytest.fixture
def busy() -> Iterator[Table]:
    """300 instances over soft on n1..n4 (1 to 4 ms): n1 at 8, n2 at 7, n3 at 7 but one
    at 5, n4 at 8 but one at 5 (soft 2, hard 9). This node (n0, RTT 0) runs none."""
    nodes = [("n0", 0, True)] + [(f"n{i}", 1000 * i, True) for i in range(1, 5)]
    loads = {1: 8, 2: 7, 3: 7, 4: 8}
    insts = [(f"n{1 + i % 4}", 2, 9, loads[1 + i % 4], 9.0) for i in range(300)]
    insts[2] = ("n3", 2, 9, 5, 9.0)  # i2 is on n3
    insts[3] = ("n4", 2, 9, 5, 9.0)  # i3 is on n4
    t = make_table(nodes, insts, capacity=400)
    yield t
    t.close()


def test_fallback_goes_to_the_nearest_least_loaded_reading_nothing_else(busy: Table) -> None:
    """All over soft: the table's summary names the groups at the app's lowest load; the
    nearest of them gives the pick, and no other instance nor group block is read (all
    the others are torn)."""
    view = busy.r.view("a")
    assert view is not None
    for c in view.all:
        if c.id != "i2":
            tear(busy, c.id)
    for g in view.groups:
        if g.node != "n3":
            seq = int.from_bytes(busy.w._mm[g.block_at : g.block_at + 8], "little")
            busy.w._mm[g.block_at : g.block_at + 8] = (seq | 1).to_bytes(8, "little")
    for seed in range(20):
        got = busy.walk.closest(view, random.Random(seed), NOW)
        assert isinstance(got, Candidate) and got.id == "i2"
    assert busy.r.retries == 0


def test_fallback_sees_feedback_below_the_lowest_the_table_knows(busy: Table) -> None:
    """All over soft, and this worker heard that a far instance (n4, table load 8) is at 3
    now (still over soft): it is the least loaded, wherever it is."""
    view = busy.r.view("a")
    assert view is not None
    far = next(c for c in view.all if c.node == "n4" and c.id != "i3")
    marks = FullMarks()
    marks.feedback(far.id, 3, 10.0, group_name("a", "n4"))
    for seed in range(20):
        assert busy.walk.closest(view, random.Random(seed), NOW, (), marks) is far
