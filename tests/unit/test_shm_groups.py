"""The writer's per-group order (shm.groups) and RTT order epoch rule (shm.rtt_order), alone."""

from __future__ import annotations

from bisect import bisect_left

from hypothesis import given, settings
from hypothesis import strategies as st

from shm.codec import KEY_FULL, KEY_UNDER_SOFT, RTT_UNKNOWN, class_key, order_key
from shm.groups import Group
from shm.rtt_order import RttOrder

KEYS = st.sampled_from([KEY_UNDER_SOFT, 3, 4, 5, 7, 20, KEY_FULL])
OPS = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "move"]), st.integers(0, 11), KEYS),
    max_size=80,
)


@settings(max_examples=300)
@given(ops=OPS)
def test_group_stays_sorted_and_reports_what_moved(ops: list[tuple[str, int, int]]) -> None:
    """After any adds, removes and re-keys a group's slots are its members sorted by key,
    its positions are right, `move` names every position whose slot changed, and its
    counts are those of the model."""
    g = Group()
    model: dict[int, int] = {}
    for op, slot, key in ops:
        before = list(g.slots)
        if op == "add" and slot not in model:
            g.add(slot, key)
            model[slot] = key
        elif op == "remove" and slot in model:
            g.remove(slot)
            del model[slot]
        elif op == "move" and slot in model:
            touched = g.move(slot, key)
            model[slot] = key
            changed = {p for p, (a, b) in enumerate(zip(before, g.slots, strict=True)) if a != b}
            assert changed <= set(touched)
            assert len(set(touched)) <= 2 * (len(set(model.values())) + 1)
        assert g.keys == sorted(g.keys)
        assert sorted(g.slots) == sorted(model)
        assert [model[s] for s in g.slots] == g.keys
        assert all(g.pos[s] == p for p, s in enumerate(g.slots)) and len(g.pos) == len(model)
        under_soft = sum(1 for k in model.values() if k == KEY_UNDER_SOFT)
        under_hard = sum(1 for k in model.values() if k != KEY_FULL)
        middle = [k for k in model.values() if KEY_UNDER_SOFT < k < KEY_FULL]
        low = min(middle, default=0)
        assert g.counts() == (under_soft, under_hard, low, middle.count(low) if middle else 0)


def test_a_load_step_moves_two_entries_at_most() -> None:
    """A load going up or down by one crosses one class boundary: at most one swap."""
    g = Group()
    for slot, load in enumerate([2, 2, 5, 5, 5, 6, 6, 9]):
        g.add(slot, class_key(load, 4, 9))
    assert len(set(g.move(2, 6))) <= 2  # 5 -> 6
    assert len(set(g.move(6, 5))) <= 2  # 6 -> 5
    assert g.keys == sorted(g.keys)


def test_class_key_follows_the_rules_limits() -> None:
    """Under min(soft, hard) is one class, at or over hard another, loads between in order."""
    assert class_key(3, 5, 9) == KEY_UNDER_SOFT
    assert class_key(5, 5, 9) == 5 and class_key(8, 5, 9) == 8
    assert class_key(9, 5, 9) == KEY_FULL
    assert class_key(6, 10, 6) == KEY_FULL  # soft above hard: hard still rules
    assert class_key(4, 10, 6) == KEY_UNDER_SOFT
    assert KEY_UNDER_SOFT < class_key(-5, -9, 3) < KEY_FULL  # a nonsense load stays in range


def signature(keys: dict[str, int]) -> list[frozenset[str]]:
    """The nodes (with "", a reader's own node at 0, and "?", a node with no row, unknown)
    as ordered classes of equal keys."""
    everything = {**keys, "": 0, "?": RTT_UNKNOWN}
    out: list[frozenset[str]] = []
    for k in sorted(set(everything.values())):
        out.append(frozenset(n for n, v in everything.items() if v == k))
    return out


@settings(max_examples=300)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["n1", "n2", "n3", "n4"]),
            st.sampled_from([-1, 0, 10, 20, 20, 30, 1000]),
            st.booleans(),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_rtt_order_says_when_the_order_or_a_tie_changed(
    ops: list[tuple[str, int, bool, bool]],
) -> None:
    """`set` is true exactly when the nodes' order by key, ties included, is not the same."""
    order = RttOrder()
    model: dict[str, int] = {}
    for node, rtt, up, remove in ops:
        if remove and node in model:
            order.remove(node)
            del model[node]
            continue
        key = order_key(rtt, up)
        before = signature(model)
        moved = order.set(node, key)
        new = node not in model
        model[node] = key
        if not new:
            assert moved == (signature(model) != before)
        assert order.sorted == sorted([0, RTT_UNKNOWN, *model.values()])
        assert order.sorted[bisect_left(order.sorted, 0)] == 0


def test_order_key_ranks_down_and_unmeasured_last() -> None:
    """A down node or one not measured yet ranks after every measured one, all alike."""
    assert order_key(5000, True) == 5000
    assert order_key(5000, False) == order_key(-1, True) == RTT_UNKNOWN
