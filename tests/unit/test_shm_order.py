"""The table's groups and RTT order against a model: what a pick trusts to read little."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shm import codec, segment
from shm.layout import Layout
from shm.reader import TableReader
from shm.writer import TableWriter

_COUNTER = itertools.count()
NODES = ["n0", "n1", "n2", "n3"]
APPS = ["a", "b"]
IIDS = [f"i{k}" for k in range(10)]


def unique_name(tag: str) -> str:
    return f"/ept-{tag}-{os.getpid()}-{next(_COUNTER)}"


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    n = unique_name("ord")
    yield n
    segment.unlink(n)


def entries(mm: object, lay: Layout, start: int, n: int) -> list[int]:
    return [codec.ORDER_ENTRY.unpack_from(mm, lay.entry(start + j))[0] for j in range(n)]  # type: ignore[arg-type]


def signature(keys: dict[str, int]) -> list[frozenset[str]]:
    everything = {**keys, "": 0, "?": codec.RTT_UNKNOWN}
    return [
        frozenset(n for n, v in everything.items() if v == k)
        for k in sorted(set(everything.values()))
    ]


class OrderModel(RuleBasedStateMachine):
    """Writer operations; after each, the order array, the group blocks, the order epoch
    and the reader's views say what the model says."""

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name("osm")
        self.lay = Layout(6, 3, len(IIDS))
        self.w = TableWriter.open(self.lay, self.name)
        self.r = TableReader.attach(self.lay, self.name, local_node="n0")
        self.mm = self.w._mm
        self.rows: dict[str, codec.InstanceRow] = {}
        self.load: dict[str, int] = {}
        self.node_keys: dict[str, int] = {}
        self.epoch = self.order()[0]
        self.w.put_app(codec.AppRow("a", ("a.test",), "closest", 5, 9, 2))
        self.w.put_app(codec.AppRow("b", ("b.test",), "leastload", 5, 9, 2))

    def teardown(self) -> None:
        self.r.close()
        self.w.close(unlink=True)

    def order(self) -> tuple[int, int]:
        got = codec.decode_hot(self.mm, codec.ORDER_AT)
        assert got is not None
        return got[1], got[2]

    @rule(nid=st.sampled_from(NODES))
    def put_node(self, nid: str) -> None:
        self.w.put_node(codec.NodeRow(nid, "r", "127.0.0.2:1", 1))
        self.node_keys.setdefault(nid, codec.RTT_UNKNOWN)

    @rule(nid=st.sampled_from(NODES))
    def remove_node(self, nid: str) -> None:
        if nid in self.node_keys:
            self.w.remove_node(nid)
            del self.node_keys[nid]

    @rule(
        nid=st.sampled_from(NODES),
        rtt=st.sampled_from([-1, 0, 100, 100, 250, 9000]),
        up=st.booleans(),
    )
    def set_rtt(self, nid: str, rtt: int, up: bool) -> None:
        if nid not in self.node_keys:
            return
        before = signature(self.node_keys)
        self.w.set_rtt(nid, rtt_us=rtt, jitter_us=0, loss_permille=0, last_heard=1.0, up=up)
        self.node_keys[nid] = codec.order_key(rtt, up)
        epoch = self.order()[0]
        if signature(self.node_keys) != before:
            assert epoch != self.epoch  # readers must sort again
        self.epoch = epoch

    @rule(
        iid=st.sampled_from(IIDS),
        app=st.sampled_from(APPS),
        node=st.sampled_from([*NODES, "ghost"]),
        soft=st.integers(0, 6),
        hard=st.integers(1, 8),
    )
    def put_instance(self, iid: str, app: str, node: str, soft: int, hard: int) -> None:
        row = codec.InstanceRow(app, iid, node, "127.0.0.1:80", soft, hard)
        self.w.put_instance(row)
        self.load.setdefault(iid, 0)
        self.rows[iid] = row

    @rule(iid=st.sampled_from(IIDS))
    def remove_instance(self, iid: str) -> None:
        if iid in self.rows:
            self.w.remove_instance(iid)
            del self.rows[iid], self.load[iid]

    @rule(iid=st.sampled_from(IIDS), load=st.integers(0, 10))
    def set_load(self, iid: str, load: int) -> None:
        if iid in self.rows:
            gen = self.w.generation
            self.w.set_load(iid, load, 1.0, 1)
            assert self.w.generation == gen  # in place: no topology change
            self.load[iid] = load

    @rule(
        moves=st.lists(
            st.tuples(st.sampled_from(IIDS), st.sampled_from(APPS), st.sampled_from(NODES)),
            max_size=4,
        )
    )
    def batch(self, moves: list[tuple[str, str, str]]) -> None:
        with self.w.batch():
            for iid, app, node in moves:
                row = codec.InstanceRow(app, iid, node, "127.0.0.1:80", 3, 6)
                self.w.put_instance(row)
                self.load.setdefault(iid, 0)
                self.rows[iid] = row

    @invariant()
    def layout_matches_model(self) -> None:
        self.r.app_for_host("")  # refresh to the current generation
        tag = self.order()[1]
        groups = sorted({(r.app, r.node) for r in self.rows.values()})
        start = 0
        for index, (app, node) in enumerate(groups):
            members = [i for i, r in self.rows.items() if (r.app, r.node) == (app, node)]
            slots = {self.r.candidate(i).index: i for i in members}  # type: ignore[union-attr]
            got = entries(self.mm, self.lay, start, len(members))
            assert sorted(got) == sorted(slots)
            keys = []
            for s in got:
                r = self.rows[slots[s]]
                keys.append(codec.class_key(self.load[slots[s]], r.soft_limit, r.hard_limit))
            assert keys == sorted(keys)
            block = codec.decode_hot(self.mm, self.lay.group(index))
            assert block is not None
            n_soft = keys.count(codec.KEY_UNDER_SOFT)
            n_hard = len(keys) - keys.count(codec.KEY_FULL)
            middle = keys[n_soft:n_hard]
            low = middle[0] if middle else 0
            assert block[1:] == codec.group_fields(
                tag, n_soft, n_hard, low, middle.count(low) if middle else 0
            )
            start += len(members)

    @invariant()
    def summaries_match_model(self) -> None:
        """Each app's groups in (order key, node) order, their signature, and the bits of
        groups (not at RTT 0) with an instance under soft and at the app's lowest load."""
        groups = sorted({(r.app, r.node) for r in self.rows.values()})
        words = codec.summary_words(self.lay.max_nodes)
        for app in APPS:
            mine = [g for g in groups if g[0] == app]
            key = {g: self.node_keys.get(g[1], codec.RTT_UNKNOWN) for g in mine}
            order = sorted(mine, key=lambda g: (key[g], g[1]))
            at = self.lay.summary(self.w._apps.index[app])
            block = codec.decode_hot(self.mm, at)
            assert block is not None
            assert block[1] == codec.summary_signature([groups.index(g) for g in order])
            soft = at_low = 0
            lows: dict[tuple[str, str], int] = {}
            for p, g in enumerate(order):
                if key[g] == 0:
                    continue
                ks = sorted(
                    codec.class_key(self.load[i], r.soft_limit, r.hard_limit)
                    for i, r in self.rows.items()
                    if (r.app, r.node) == g
                )
                if ks[0] == codec.KEY_UNDER_SOFT:
                    soft |= 1 << p
                middle = [k for k in ks if codec.KEY_UNDER_SOFT < k < codec.KEY_FULL]
                if middle:
                    lows[g] = middle[0]
            low = min(lows.values(), default=-1)
            for p, g in enumerate(order):
                if lows.get(g, -2) == low:
                    at_low |= 1 << p
            assert block[2] == low
            bits = self.mm[at + codec.HOT_SIZE : at + codec.HOT_SIZE + 16 * words]
            assert int.from_bytes(bits[: 8 * words], "little") == soft
            assert int.from_bytes(bits[8 * words :], "little") == at_low

    @invariant()
    def views_follow_the_rtt_order(self) -> None:
        for app in APPS:
            view = self.r.view(app)
            members = {i for i, r in self.rows.items() if r.app == app}
            if not members:
                assert view is None or not view.all
                continue
            assert view is not None
            assert {c.id for c in view.all} == members
            # The walk compares keys only with each other: the runs must be in the model's
            # order now, a run's groups equally close now, and no two runs equally close.
            now = []
            for run in view.runs:
                keys = set()
                for g in run.groups:
                    assert g.key == run.key
                    keys.add(0 if g.node == "n0" else self.node_keys.get(g.node, codec.RTT_UNKNOWN))
                    assert self.r.hint(g)  # the block is this layout's
                assert len(keys) == 1
                now.append(keys.pop())
            assert now == sorted(now) and len(set(now)) == len(now)


TestOrderModel = OrderModel.TestCase
TestOrderModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_torn_group_block_or_other_layout_is_not_used(name: str) -> None:
    """A group block being written, or one of another layout, is no hint at all."""
    lay = Layout(2, 1, 4)
    w = TableWriter.open(lay, name)
    w.put_node(codec.NodeRow("n1", "r", "127.0.0.3:1", 1))
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 5, 9, 2))
    for k in range(3):
        w.put_instance(codec.InstanceRow("a", f"i{k}", "n1", "127.0.0.3:80", 5, 9))
    r = TableReader.attach(lay, name)
    view = r.view("a")
    assert view is not None
    g = view.groups[0]
    assert r.hint(g) and (g.n_soft, g.n_hard) == (3, 3)
    mm = w._mm
    at = lay.group(0)
    seq = int.from_bytes(mm[at : at + 8], "little")
    mm[at : at + 8] = (seq + 1).to_bytes(8, "little")  # odd: a write in progress
    assert not r.hint(g)
    mm[at : at + 8] = seq.to_bytes(8, "little")
    assert r.hint(g)
    tag = codec.decode_hot(mm, codec.ORDER_AT)[2]  # type: ignore[index]
    mm[at : at + codec.HOT_SIZE] = codec.encode_hot(
        seq + 2, *codec.group_fields(tag + 1, 3, 3, 0, 0)
    )
    assert not r.hint(g)  # a block of the next layout: not for this reader's groups
    r.close()
    w.close()


def test_takeover_keeps_the_layout_and_moves_the_epoch(name: str) -> None:
    """A new writer on a dead writer's segment rebuilds the groups from the rows it finds
    (same order array), and moves the epoch so readers sort again."""
    lay = Layout(3, 1, 6)
    w = TableWriter.open(lay, name)
    w.put_node(codec.NodeRow("n1", "r", "127.0.0.3:1", 1))
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 2, 9, 2))
    for k in range(5):
        w.put_instance(codec.InstanceRow("a", f"i{k}", "n1", "127.0.0.3:80", 2, 9))
        w.set_load(f"i{k}", [7, 0, 3, 1, 9][k], 1.0, 1)
    w.set_rtt("n1", rtt_us=500, jitter_us=0, loss_permille=0, last_heard=1.0, up=True)
    before = entries(w._mm, lay, 0, 5)
    epoch = codec.decode_hot(w._mm, codec.ORDER_AT)[1]  # type: ignore[index]
    w.close()
    w2 = TableWriter.open(lay, name)
    got = codec.decode_hot(w2._mm, codec.ORDER_AT)
    assert got is not None and got[1] > epoch
    after = entries(w2._mm, lay, 0, 5)
    slots = w2._instances.index
    loads = {slots[f"i{k}"]: [7, 0, 3, 1, 9][k] for k in range(5)}
    assert [codec.class_key(loads[s], 2, 9) for s in after] == sorted(
        codec.class_key(v, 2, 9) for v in loads.values()
    )
    assert sorted(after) == sorted(before)
    w2.close()


def test_nodes_passing_each_other_rewrite_the_apps_summary(name: str) -> None:
    """Node n2 passes n1: the app with groups on both gets its summary in the new order
    (signature and bits); an app on n1 only keeps its own."""
    lay = Layout(4, 2, 8)
    w = TableWriter.open(lay, name)
    for n in ("n1", "n2"):
        w.put_node(codec.NodeRow(n, "r", "127.0.0.2:1", 1))
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 5, 9, 2))
    w.put_app(codec.AppRow("b", ("b.test",), "closest", 5, 9, 2))
    w.put_instance(codec.InstanceRow("a", "i1", "n1", "127.0.0.2:80", 5, 9))
    w.put_instance(codec.InstanceRow("a", "i2", "n2", "127.0.0.2:80", 5, 9))
    w.put_instance(codec.InstanceRow("b", "i3", "n1", "127.0.0.2:80", 5, 9))
    w.set_load("i1", 7, 1.0, 1)  # n1's group: over soft; n2's: under
    w.set_rtt("n1", rtt_us=100, jitter_us=0, loss_permille=0, last_heard=1.0, up=True)
    w.set_rtt("n2", rtt_us=200, jitter_us=0, loss_permille=0, last_heard=1.0, up=True)
    a, b = (lay.summary(w._apps.index[x]) for x in ("a", "b"))
    # groups in (app, node) order: (a, n1) 0, (a, n2) 1, (b, n1) 2
    assert codec.decode_hot(w._mm, a)[1] == codec.summary_signature([0, 1])  # type: ignore[index]
    assert int.from_bytes(w._mm[a + 48 : a + 56], "little") == 0b10
    before_b = bytes(w._mm[b : b + codec.summary_size(4)])
    w.set_rtt("n2", rtt_us=50, jitter_us=0, loss_permille=0, last_heard=1.0, up=True)
    assert codec.decode_hot(w._mm, a)[1] == codec.summary_signature([1, 0])  # type: ignore[index]
    assert int.from_bytes(w._mm[a + 48 : a + 56], "little") == 0b01
    assert bytes(w._mm[b : b + codec.summary_size(4)]) == before_b
    w.close()
