"""The writer's slot bookkeeping of one row table (nodes, apps or instances).

Owns which slots are used (id -> slot, the rows as last written), the free slots
below the high-water mark, and re-reading what a dead writer left: which slots hold a
valid row to keep and which are free. It never writes the segment; the writer does.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Generic, TypeVar

from shm.errors import TableFull

R = TypeVar("R")


class Slots(Generic[R]):
    """Slot bookkeeping of one row table (writer memory only)."""

    def __init__(self, kind: str, capacity: int) -> None:
        self.kind = kind
        self.capacity = capacity
        self.index: dict[str, int] = {}
        self.rows: dict[str, R] = {}
        self.free: list[int] = []  # min-heap of freed slots below hwm
        self.hwm = 0  # slots [0, hwm) have been written at least once

    def take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        if self.hwm >= self.capacity:
            raise TableFull(self.kind, self.capacity)
        self.hwm += 1
        return self.hwm - 1

    def give_back(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def adopt(
        self,
        hwm: int,
        read: Callable[[int], tuple[int, R | None] | None],
        key: Callable[[R], str],
    ) -> tuple[list[int], list[int]]:
        """Index the rows a dead writer left in slots [0, hwm): `read(slot)` decodes one
        (None: torn). A free, torn or duplicate slot goes to the free list. Returns the
        torn slots (to be rewritten as free rows) and the kept ones."""
        self.hwm = min(hwm, self.capacity)
        torn: list[int] = []
        kept: list[int] = []
        for slot in range(self.hwm):
            got = read(slot)
            row = got[1] if got else None
            if row is None or key(row) in self.index:
                if got is None:
                    torn.append(slot)
                heapq.heappush(self.free, slot)
                continue
            self.index[key(row)] = slot
            self.rows[key(row)] = row
            kept.append(slot)
        return torn, kept
