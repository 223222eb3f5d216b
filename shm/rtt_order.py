"""The writer's view of the nodes' order by RTT: says when readers must sort again.

Owns every node's order key (codec.order_key) and the rule for the table's order
epoch: it moves when a node's new key passes or meets another node's, or leaves a
tie, so between two moves the nodes' order and their ties stay as a reader sorted
them, whatever the RTTs do in between. Pure bookkeeping: no mmap.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

from shm.codec import RTT_UNKNOWN


class RttOrder:
    """Node id -> order key, and the sorted keys (with 0 and RTT_UNKNOWN always in)."""

    __slots__ = ("keys", "sorted")

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}
        # 0 stands for the reader's own node (its instances rank at RTT 0), RTT_UNKNOWN
        # for an instance's node that has no row (it ranks as unknown): a node reaching or
        # leaving either changes a tie with them, whatever rows there are.
        self.sorted: list[int] = [0, RTT_UNKNOWN]

    def set(self, node: str, key: int) -> bool:
        """Record `node`'s key; True when the order or a tie may have changed."""
        old = self.keys.get(node)
        if old == key:
            return False
        self.keys[node] = key
        if old is None:
            insort(self.sorted, key)
            return True
        s = self.sorted
        del s[bisect_left(s, old)]
        lo, hi = (old, key) if old < key else (key, old)
        passed = bisect_right(s, hi) - bisect_left(s, lo)  # other nodes in [lo, hi]
        insort(s, key)
        return passed > 0

    def remove(self, node: str) -> None:
        key = self.keys.pop(node, None)
        if key is not None:
            del self.sorted[bisect_left(self.sorted, key)]
