"""The writer's per-app summary: an app's groups in the order readers walk them, as bits.

Owns, in the writer's memory, each app's groups sorted as a reader on this node sorts
them (node order key, then node id: codec.order_key, this node at 0), the order's
signature, and two bitmaps over those positions: groups with an instance under soft,
and groups whose lowest load over soft is the app's lowest. Groups at RTT 0 (this
node, whose loads a reader counts itself, and any peer as close) are left out of both:
a reader reads those on its own. A reader that computes the same signature finds the
nearest group with room, or the least loaded ones, with a few bit operations instead
of reading every group's block. Pure bookkeeping: the writer copies what changes into
the segment (codec: summary block and words).
"""

from __future__ import annotations

from shm.codec import RTT_UNKNOWN, summary_signature
from shm.groups import Group


class Summary:
    """One app's groups in walk order, with the bits a reader uses to skip most of them."""

    __slots__ = ("at_low_bits", "groups", "low", "lows", "sig", "soft", "words")

    def __init__(self, groups: list[Group], keys: dict[str, int], words: int) -> None:
        def order(g: Group) -> tuple[int, str]:
            return keys.get(g.node, RTT_UNKNOWN), g.node

        self.groups = sorted(groups, key=order)
        self.words = words
        fits = len(self.groups) <= words * 64
        # 0: this app's order does not fit the bitmaps; readers walk every group
        self.sig = summary_signature([g.index for g in self.groups]) if fits else 0
        self.soft = 0  # bit p: group at position p has an instance under soft
        self.lows: dict[int, int] = {}  # lowest load over soft -> groups that have it
        self.low = -1  # the app's lowest load over soft (-1: none)
        for p, g in enumerate(self.groups):
            g.rank = p
            g.counted = fits and keys.get(g.node, RTT_UNKNOWN) != 0
            if not g.counted:
                continue
            n_soft, n_hard, low, _ = g.published
            if n_soft:
                self.soft |= 1 << p
            if n_hard > n_soft:
                self.lows[low] = self.lows.get(low, 0) + 1
        self.low = min(self.lows) if self.lows else -1
        self.at_low_bits = 0  # bit p: group at position p is at the app's lowest load

    def at_low(self) -> int:
        """Bits of the groups whose lowest load over soft is the app's lowest."""
        if not self.sig or self.low < 0:
            return 0
        bits = 0
        for p, g in enumerate(self.groups):
            n_soft, n_hard, low, _ = g.published
            if g.counted and n_hard > n_soft and low == self.low:
                bits |= 1 << p
        return bits

    def update(
        self, g: Group, old: tuple[int, int, int, int], new: tuple[int, int, int, int]
    ) -> tuple[bool, bool]:
        """`g`'s counts went from `old` to `new`: (its soft bit changed, the low changed)."""
        if not g.counted:
            return False, False
        soft_changed = bool(old[0]) != bool(new[0])
        if soft_changed:
            self.soft ^= 1 << g.rank
        lows = self.lows
        if old[1] > old[0]:
            n = lows[old[2]] - 1
            if n:
                lows[old[2]] = n
            else:
                del lows[old[2]]
        if new[1] > new[0]:
            lows[new[2]] = lows.get(new[2], 0) + 1
        low = min(lows) if lows else -1
        low_changed = low != self.low
        self.low = low
        return soft_changed, low_changed


def word(bits: int, w: int) -> int:
    """64-bit word `w` of a bitmap."""
    return (bits >> (64 * w)) & 0xFFFFFFFFFFFFFFFF
