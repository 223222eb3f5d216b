"""The reads a pick over the table's ordered view makes, and the router's rules in pieces.

Owns reading a candidate (a remote one's load from the table, a local one's from the
in-flight cells), the state of the pick in progress (exclusions, full marks, feedback)
and the tests every pick applies: out, under soft, under hard, filed feedback.
proxy.worker.walk composes them into `closest` and `leastload`. It must not do network I/O.
"""

from __future__ import annotations

from collections.abc import Collection
from random import Random
from typing import Final

from proxy.core.router import UNKNOWN_RTT_US, FullMarks, NoPick, effective_load
from shm.candidate import Candidate
from shm.inflight import InflightCells
from shm.reader import TableReader
from shm.view import AppView, Group

NOT_YET: Final = UNKNOWN_RTT_US + 1
NO_MARKS: Final[dict[str, float]] = {}  # read only
NO_LOADS: Final[dict[str, tuple[int, int]]] = {}  # read only
NO_IDS: Final[set[str]] = set()  # read only


def table_soft(c: Candidate) -> bool:
    """Under soft by the table's load last read (what a group's hint counted)."""
    return c.load < c.soft_limit and c.load < c.hard_limit


class WalkReads:
    """What a pick reads and the rules' pieces over it (proxy.worker.walk builds the picks)."""

    def __init__(self, reader: TableReader, cells: InflightCells | None) -> None:
        self.reader = reader
        self.cells = cells
        # the pick in progress
        self.rng = Random(0)
        self.now = 0.0
        self.excl: Collection[str] | None = None
        self.marks: FullMarks | None = None
        self.full: dict[str, float] = NO_MARKS
        self.loads: dict[str, tuple[int, int]] = NO_LOADS
        self.marked = False
        self._best_load = self._best_key = NOT_YET  # the closest fallback's best so far
        self._ex: list[Candidate] = []
        self._hg: list[Group] = []

    # --- reading and the rules' pieces ----------------------------------------------------
    def read(self, c: Candidate) -> None:
        """`c`'s load now: a local one's in-flight count (or its published load when the
        worker has no cell for it), a remote one's from the table. Not its RTT: the view's
        order and ties stand for the RTTs until the epoch moves (view.rank)."""
        if c.local:
            cells = self.cells
            if cells is not None and c.cell >= 0:
                c.load = cells.total(c.cell)
            else:
                self.reader.load_of(c)
        else:
            self.reader.fresh_load(c)

    def read_all(self, c: Candidate) -> None:
        """`c`'s load and RTT now, for the router's own rules (-1 if its node is down)."""
        if c.local:
            self.read(c)
        else:
            self.reader.fresh(c)
            if not c.node_up:
                c.rtt_us = -1  # a node the pinger sees down ranks after every measured one

    def _start(
        self, rng: Random, now: float, tried: Collection[str], marks: FullMarks | None
    ) -> None:
        self.rng = rng
        self.now = now
        self.reader.picks += 1  # a group's hint is read once per pick (Group.seen)
        self.excl = tried if tried else None
        self.marks = marks
        if marks is not None:
            self.full = marks._full
            self.loads = marks._loads
        else:
            self.full = NO_MARKS
            self.loads = NO_LOADS
        self.marked = bool(self.full or self.loads)

    def _hint(self, g: Group) -> bool:
        """`g`'s hint (reader.hint), read once per pick."""
        reader = self.reader
        if g.seen == reader.picks:
            return True
        if reader.hint(g):
            g.seen = reader.picks
            return True
        return False

    def _load(self, c: Candidate) -> int:
        """The load the rules use (feedback, marks)."""
        if self.marked:
            return effective_load(c, self.now, self.full, self.loads)
        return c.load

    def _out(self, c: Candidate) -> bool:
        """Tried already, or marked full."""
        excl = self.excl
        if excl is not None and c.id in excl:
            return True
        full = self.full
        return bool(full) and self.now < full.get(c.id, self.now)

    def _soft_ok(self, c: Candidate) -> bool:
        """Under soft by the rules, and not tried."""
        if self._out(c):
            return False
        load = self._load(c)
        return load < c.soft_limit and load < c.hard_limit

    def _filed(self, g: Group) -> set[str]:
        marks = self.marks
        ids = marks.in_group(g.name) if marks is not None else None
        return ids if ids is not None else NO_IDS

    def _own_load(self, c: Candidate, filed: set[str]) -> bool:
        """`c` is filed and its feedback is in force: its load is this worker's own word,
        so it is read on its own, never counted through the group's hint."""
        if c.id not in filed:
            return False
        fb = self.loads.get(c.id)
        return fb is not None and fb[1] >= c.load_time_us

    def _filed_read(self, g: Group, filed: set[str], bound: int) -> list[Candidate]:
        """`g`'s filed instances whose own load is in force, not over `bound`, under hard,
        not tried nor marked (read now)."""
        out: list[Candidate] = []
        loads = self.loads
        reader = self.reader
        for iid in filed:
            fb = loads.get(iid)
            if fb is None or fb[0] > bound:
                continue
            c = reader.candidate(iid)
            if c is None or c.group != g.index:
                continue
            self.read(c)
            if fb[1] >= c.load_time_us and not self._out(c) and self._load(c) < c.hard_limit:
                out.append(c)
        return out

    def _no_pick(self, view: AppView) -> NoPick:
        excl = self.excl
        if excl is None:
            return NoPick.ALL_FULL if view.all else NoPick.NO_INSTANCES
        mine = 0
        for iid in excl:
            c = self.reader.candidate(iid)
            if c is not None and c.app == view.app:
                mine += 1
        return NoPick.ALL_FULL if mine < len(view.all) else NoPick.NO_INSTANCES
