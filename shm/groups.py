"""The writer's per-group order: an app's instances on one node, sorted by load class.

Owns, in the writer's memory, each group's instance slots in the order the table's
order array shows them (codec.class_key ascending: under soft first, then under hard
by load, then full), the moves that keep them sorted when a load changes (a few swaps
across class boundaries, never a re-sort), and the counts a group block publishes.
Pure bookkeeping: no mmap; the writer copies what it reports into the segment.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from shm.codec import KEY_FULL, KEY_UNDER_SOFT


class Group:
    """One (app, node) group: slots in segment order, with their class keys (sorted)."""

    __slots__ = (
        "app",
        "counted",
        "index",
        "keys",
        "node",
        "pos",
        "published",
        "rank",
        "slots",
        "start",
    )

    def __init__(self, app: str = "", node: str = "") -> None:
        self.app = app
        self.node = node
        self.slots: list[int] = []  # instance slots, in the order of the table's segment
        self.keys: list[int] = []  # class key of each position, ascending
        self.pos: dict[int, int] = {}  # instance slot -> position
        self.index = -1  # group number in the layout last written (-1: not written yet)
        self.start = 0  # its first entry in the order array
        self.rank = -1  # its position in its app's summary order
        self.counted = False  # in its app's summary bits (not at RTT 0)
        self.published = (0, 0, 0, 0)  # the counts its block holds

    def __len__(self) -> int:
        return len(self.slots)

    def key_of(self, slot: int) -> int:
        return self.keys[self.pos[slot]]

    def add(self, slot: int, key: int) -> None:
        """A new member (a topology change: positions after it shift)."""
        p = bisect_right(self.keys, key)
        self.keys.insert(p, key)
        self.slots.insert(p, slot)
        for q in range(p, len(self.slots)):
            self.pos[self.slots[q]] = q

    def remove(self, slot: int) -> None:
        """A member leaves (a topology change)."""
        p = self.pos.pop(slot)
        del self.keys[p]
        del self.slots[p]
        for q in range(p, len(self.slots)):
            self.pos[self.slots[q]] = q

    def move(self, slot: int, new: int) -> list[int]:
        """Give `slot` the class key `new`; the positions whose slot changed (to rewrite).

        The member first goes to the edge of its own class, then hops over each class
        between its old and new key by one swap with that class's far end: the classes
        stay contiguous and sorted, and a load change of one moves at most two entries.
        """
        keys = self.keys
        p = self.pos[slot]
        old = keys[p]
        touched: list[int] = []
        if new > old:
            edge = bisect_right(keys, old) - 1
            while True:
                if edge != p:
                    self._swap(p, edge)
                    touched.append(p)
                    touched.append(edge)
                    p = edge
                if p + 1 >= len(keys) or keys[p + 1] >= new:
                    break
                k = keys[p + 1]
                keys[p] = k  # it now counts as the first of class k (still sorted)
                edge = bisect_right(keys, k) - 1
        elif new < old:
            edge = bisect_left(keys, old)
            while True:
                if edge != p:
                    self._swap(p, edge)
                    touched.append(p)
                    touched.append(edge)
                    p = edge
                if p == 0 or keys[p - 1] <= new:
                    break
                k = keys[p - 1]
                keys[p] = k  # it now counts as the last of class k (still sorted)
                edge = bisect_left(keys, k)
        keys[p] = new
        return touched

    def counts(self) -> tuple[int, int, int, int]:
        """(under soft, under hard, lowest load over soft and under hard, how many have it)."""
        keys = self.keys
        n_soft = bisect_right(keys, KEY_UNDER_SOFT)
        n_hard = bisect_left(keys, KEY_FULL)
        if n_soft == n_hard:
            return n_soft, n_hard, 0, 0
        low = keys[n_soft]
        return n_soft, n_hard, low, bisect_right(keys, low) - n_soft

    def _swap(self, a: int, b: int) -> None:
        slots = self.slots
        slots[a], slots[b] = slots[b], slots[a]
        self.pos[slots[a]] = a
        self.pos[slots[b]] = b
