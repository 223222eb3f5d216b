"""The router's rules over the table's ordered view: a pick reads only what it examines.

Owns `closest` and `leastload` over a shm.view.AppView: runs of groups nearest first,
each remote group's counts from its table hint (how many under soft, under hard, at
the lowest load over soft), candidates read one at a time (a local one's load from
the in-flight cells). The rules are proxy.core.router's: the pick is one that
pick_closest / pick_leastload would make over every candidate read now, drawn
uniformly from the ones the table counts alike (tests/unit/test_walk.py). A hint is
only a guide: whatever it names is read and checked, and a hint that proves wrong
sends the pick to its group's members. Load feedback that may put an instance below
the table's load is filed by group (FullMarks.in_group) and read when the table's
word alone would skip it. Apps of a few instances go to the router as they are.
It must not do network I/O.
"""

from __future__ import annotations

from collections.abc import Collection
from random import Random
from typing import Final

from proxy.core.router import (
    PROBE_FROM,
    PROBES_PER_K,
    UNKNOWN_RTT_US,
    FullMarks,
    NoPick,
    leastload_scan,
    pick_closest,
    pick_leastload,
)
from proxy.worker.walk_reads import NOT_YET, WalkReads, table_soft
from shm.candidate import Candidate
from shm.view import AppView, Group, Run

SMALL: Final = 8  # up to this many instances, read them all and let the router choose
PROBES: Final = 8  # random probes into a set before going through all of it


class Walk(WalkReads):
    """One worker's picks over one table reader (and its in-flight cells, if it counts)."""

    # --- closest ---------------------------------------------------------------------------
    def closest(
        self,
        view: AppView,
        rng: Random,
        now: float = 0.0,
        tried: Collection[str] = (),
        marks: FullMarks | None = None,
    ) -> Candidate | NoPick:
        """proxy.core.router.pick_closest over the view: runs nearest first; the first
        run with an instance under soft gives one of those; else the least loaded.

        Runs at RTT 0 (this node's instances, counted here) are read; past them, the
        table's summary of the app says which runs have room, so the walk goes there
        directly (every run otherwise, when the summary is not for this order)."""
        cands = view.all
        if len(cands) <= SMALL:
            for c in cands:
                self.read_all(c)
            return pick_closest(cands, rng, now, tried, marks)
        self._start(rng, now, tried, marks)
        runs = view.runs
        i = 0
        if runs and runs[0].key == 0:
            got = self._soft_in_run(runs[0])
            if got is not None:
                return got
            i = 1
        bits = self.reader.soft_bits(view) if i < len(runs) else -1
        if bits < 0:
            for r in range(i, len(runs)):
                got = self._soft_in_run(runs[r])
                if got is not None:
                    return got
            return self._closest_fallback(view, -1)
        starts = view.starts
        while i < len(runs):
            rest = bits >> starts[i]
            if not rest:
                break
            r = view.run_of[starts[i] + (rest & -rest).bit_length() - 1]
            got = self._filed_soft(view, i, r)
            if got is not None:
                return got
            got = self._soft_in_run(runs[r])
            if got is not None:
                return got
            i = r + 1
        got = self._filed_soft(view, i, len(runs))
        if got is not None:
            return got
        return self._closest_fallback(view, bits)

    def _soft_in_run(self, run: Run) -> Candidate | None:
        """One of the run's instances under soft, or None: those the table counts (and the
        ones without a usable hint, read), uniformly; if none, filed ones it did not count."""
        groups = run.groups
        if len(groups) == 1:
            g = groups[0]
            if g.local:
                return self._soft_in_local(g)
            if self._hint(g):
                got = self._soft_hinted(groups, g.n_soft, [])
                return got if got is not None else self._soft_filed(groups)
        hinted: list[Group] = []
        read: list[Candidate] = []  # of groups without a usable hint: read, under soft
        total = 0
        for g in groups:
            if g.local or not self._hint(g):
                for c in g.members:
                    self.read(c)
                    if self._soft_ok(c):
                        read.append(c)
            else:
                hinted.append(g)
                total += g.n_soft
        got = self._soft_hinted(hinted, total, read)
        return got if got is not None else self._soft_filed(hinted)

    def _soft_hinted(
        self, hinted: list[Group], total: int, read: list[Candidate]
    ) -> Candidate | None:
        """Uniformly one of the hinted entries under soft (checked) and `read`: random
        probes, then every one if they missed."""
        space = total + len(read)
        if space == 0:
            return None
        rand = self.rng.random
        reader = self.reader
        for _ in range(PROBES):
            r = int(rand() * space)
            if r >= total:
                return read[r - total]
            i = 0
            while r >= hinted[i].n_soft:
                r -= hinted[i].n_soft
                i += 1
            c = reader.entry(hinted[i], r)
            if c is not None:
                self.read(c)
                if table_soft(c) and self._soft_ok(c):
                    return c
        best: Candidate | None = None
        m = 0
        for c in read:
            m += 1
            if rand() * m < 1.0:
                best = c
        for g in hinted:
            got: list[Candidate] = []
            stale = False
            for j in range(g.n_soft):
                e = reader.entry(g, j)
                if e is None:
                    stale = True
                    break
                self.read(e)
                if not table_soft(e):
                    stale = True
                    break
                got.append(e)
            if stale:  # the hint was wrong (a write in progress): the members themselves
                got = []
                for c in g.members:
                    self.read(c)
                    got.append(c)
            for c in got:
                if self._soft_ok(c):
                    m += 1
                    if rand() * m < 1.0:
                        best = c
        return best

    def _soft_filed(self, hinted: list[Group]) -> Candidate | None:
        """None the table counts is left: one this worker was told is under soft, if any."""
        if self.marks is None:
            return None
        best: Candidate | None = None
        m = 0
        rand = self.rng.random
        for g in hinted:
            filed = self._filed(g)
            if not filed:
                continue
            for c in self._filed_read(g, filed, UNKNOWN_RTT_US):
                if not table_soft(c) and self._soft_ok(c):
                    m += 1
                    if rand() * m < 1.0:
                        best = c
        return best

    def _filed_soft(self, view: AppView, a: int, b: int) -> Candidate | None:
        """Runs a..b-1, which the summary says have no room by the table: one of the
        nearest this worker was told is under soft after all, if any."""
        marks = self.marks
        if marks is None or a >= b:
            return None
        filed = marks.filed()
        if not filed:
            return None
        best_run = b
        picks: list[Candidate] = []
        for name, ids in filed.items():
            p = view.pos.get(name, -1)
            if p < 0:
                continue
            r = view.run_of[p]
            if r < a or r > best_run or r == b:
                continue
            for c in self._filed_read(view.groups[p], ids, UNKNOWN_RTT_US):
                if not table_soft(c) and self._soft_ok(c):
                    if r < best_run:
                        best_run = r
                        picks = [c]
                    else:
                        picks.append(c)
        return picks[int(self.rng.random() * len(picks))] if picks else None

    def _soft_in_local(self, g: Group) -> Candidate | None:
        """The local group, whose loads are in-flight counts: probes among the ones the
        table last saw under soft (its load as published), then among all, then all of
        them. Any it returns is under soft by its count now; only "none" needs them all."""
        members = g.members
        n = len(members)
        rand = self.rng.random
        reader = self.reader
        if n > PROBES and self._hint(g) and g.n_soft:
            for _ in range(PROBES):
                e = reader.entry(g, int(rand() * g.n_soft))
                if e is not None:
                    self.read(e)
                    if self._soft_ok(e):
                        return e
        if n > PROBES:
            for _ in range(PROBES):
                c = members[int(rand() * n)]
                self.read(c)
                if self._soft_ok(c):
                    return c
        best: Candidate | None = None
        m = 0
        for c in members:
            self.read(c)
            if self._soft_ok(c):
                m += 1
                if rand() * m < 1.0:
                    best = c
        return best

    # --- closest, when none is under soft ---------------------------------------------------
    def _closest_fallback(self, view: AppView, soft_bits: int) -> Candidate | NoPick:
        """None under soft: the least loaded under hard, then the closest, uniformly among
        equals. With the table's summary: the groups at RTT 0, the ones the summary says
        have an instance under soft by the table (not by the rules), filed feedback, and
        the groups at the app's lowest load. Without (or if the summary proves wrong):
        every group's hint (O(groups)), and a hint that named no usable entry is replaced
        by its group's members, the choice made again."""
        if soft_bits >= 0:
            quick = self._fallback_summary(view, soft_bits)
            if quick is not None:
                return quick
        demoted: set[int] = set()
        while True:
            self._best_reset()
            for g in view.groups:
                if not self._weigh(g, demoted, True, True, True):
                    break  # `g` was demoted: again
            else:
                got = self._best_pick(view)
                if not isinstance(got, Group):
                    return got
                demoted.add(got.index)

    def _fallback_summary(self, view: AppView, soft_bits: int) -> Candidate | NoPick | None:
        lows = self.reader.low_bits(view)
        if lows is None:
            return None
        low, bits = lows
        runs = view.runs
        none: set[int] = set()  # no group is demoted here: a wrong hint goes the long way
        self._best_reset()
        r0 = 0
        if runs and runs[0].key == 0:
            r0 = 1
            for g in runs[0].groups:
                if not self._weigh(g, none, True, True, True):
                    return None
        first = len(runs[0].groups) if r0 else 0  # positions past the RTT 0 run
        rest = soft_bits >> first << first
        while rest:  # under soft by the table, not by the rules: tried, marked, raised
            p = (rest & -rest).bit_length() - 1
            rest &= rest - 1
            if not self._weigh(view.groups[p], none, True, False, False):
                return None
        marks = self.marks
        if marks is not None:
            for name in marks.filed():
                p = view.pos.get(name, -1)
                if p >= 0 and view.run_of[p] >= r0:
                    self._weigh(view.groups[p], none, False, True, False)
        if bits and low >= 0:
            p = (bits & -bits).bit_length() - 1
            r = view.run_of[p]
            start = view.starts[r]
            for q in range(start, start + len(runs[r].groups)):
                if bits >> q & 1:
                    g = view.groups[q]
                    if not self._hint(g) or g.n_hard <= g.n_soft or g.min_load != low:
                        return None  # the summary and the group disagree: the long way
                    self._weigh(g, none, False, False, True)
        got = self._best_pick(view)
        return None if isinstance(got, Group) else got

    def _best_reset(self) -> None:
        self._best_load = self._best_key = NOT_YET
        self._ex = []  # read, at the best (load, key) so far
        self._hg = []  # hinted groups whose lowest load is the best so far

    def _consider(self, c: Candidate, key: int) -> None:
        load = self._load(c)
        if load >= c.hard_limit:
            return
        if load < self._best_load or (load == self._best_load and key < self._best_key):
            self._best_load, self._best_key = load, key
            self._ex = [c]
            self._hg = []
        elif load == self._best_load and key == self._best_key:
            self._ex.append(c)

    def _weigh(self, g: Group, demoted: set[int], under: bool, filed: bool, low: bool) -> bool:
        """Count `g` toward the fallback's best: all its members when it has no usable hint
        (or is demoted); else the parts asked for: its entries under soft by the table
        (`under`), its filed instances (`filed`), its hinted lowest load (`low`). False:
        its hint proved wrong, and it is now demoted."""
        key = g.key
        if g.local or g.index in demoted or not self._hint(g):
            for c in g.members:
                self.read(c)
                if not self._out(c):
                    self._consider(c, key)
            return True
        ids = self._filed(g)
        if filed and ids:
            bound = g.min_load if g.n_hard > g.n_soft else UNKNOWN_RTT_US
            for c in self._filed_read(g, ids, min(self._best_load, bound)):
                self._consider(c, key)
        if under and g.n_soft:
            entries = self._under_soft_entries(g, ids)
            if entries is None:
                demoted.add(g.index)
                return False
            for c in entries:
                self._consider(c, key)
        if low and g.n_hard > g.n_soft:
            m = g.min_load
            if m < self._best_load or (m == self._best_load and key < self._best_key):
                self._best_load, self._best_key = m, key
                self._ex = []
                self._hg = [g]
            elif m == self._best_load and key == self._best_key:
                self._hg.append(g)
        return True

    def _best_pick(self, view: AppView) -> Candidate | NoPick | Group:
        if self._best_load == NOT_YET:
            return self._no_pick(view)
        if not self._hg:
            return self._ex[int(self.rng.random() * len(self._ex))]
        return self._lowest(self._hg, self._best_load, self._ex)

    def _under_soft_entries(self, g: Group, filed: set[str]) -> list[Candidate] | None:
        """The fallback's view of `g`'s first n_soft entries (under soft by the table, so
        not under soft by the rules: tried, marked, or raised by what this worker sent):
        those not tried nor marked (the caller weighs their loads); None if the hint
        proves wrong."""
        out: list[Candidate] = []
        reader = self.reader
        for j in range(g.n_soft):
            c = reader.entry(g, j)
            if c is None:
                return None
            self.read(c)
            if not table_soft(c):
                return None
            if not self._out(c) and not self._own_load(c, filed):
                out.append(c)
        return out

    def _lowest_ok(self, c: Candidate, load: int, g: Group) -> bool:
        """A hinted entry at the lowest load: that load by the table and by the rules, not
        tried nor marked, and not one read on its own (filed, its feedback in force)."""
        return (
            c.load == load
            and load < c.hard_limit
            and not self._out(c)
            and self._load(c) == load
            and not self._own_load(c, self._filed(g))
        )

    def _lowest(self, hg: list[Group], load: int, ex: list[Candidate]) -> Candidate | Group:
        """Uniformly one of the instances at `load` in the groups `hg` (the n_min entries
        after their n_soft) and `ex`; or a group whose hint named none of them."""
        rand = self.rng.random
        reader = self.reader
        total = 0
        for g in hg:
            total += g.n_min
        space = total + len(ex)
        for _ in range(PROBES):
            r = int(rand() * space)
            if r >= total:
                return ex[r - total]
            i = 0
            while r >= hg[i].n_min:
                r -= hg[i].n_min
                i += 1
            g = hg[i]
            e = reader.entry(g, g.n_soft + r)
            if e is not None:
                self.read(e)
                if self._lowest_ok(e, load, g):
                    return e
        best: Candidate | None = None
        m = 0
        for c in ex:
            m += 1
            if rand() * m < 1.0:
                best = c
        for g in hg:
            found = 0
            for j in range(g.n_soft, g.n_soft + g.n_min):
                e = reader.entry(g, j)
                if e is None:
                    continue
                self.read(e)
                if self._lowest_ok(e, load, g):
                    found += 1
                    m += 1
                    if rand() * m < 1.0:
                        best = e
            if not found:
                return g
        assert best is not None  # every group in hg had one
        return best

    # --- leastload -------------------------------------------------------------------------
    def leastload(
        self,
        view: AppView,
        rng: Random,
        now: float = 0.0,
        tried: Collection[str] = (),
        marks: FullMarks | None = None,
        k: int = 2,
    ) -> Candidate | NoPick:
        """proxy.core.router.pick_leastload over the view: the same random probes, each
        candidate read when probed; when they miss, a sample drawn through the hints."""
        k = max(k, 1)
        cands = view.all
        n = len(cands)
        if n < PROBE_FROM or n <= k or n <= SMALL:
            for c in cands:
                self.read_all(c)
            return pick_leastload(cands, rng, now, tried, marks, k)
        self._start(rng, now, tried, marks)
        rand = rng.random
        excl = self.excl
        probed: list[int] = []
        best: Candidate | None = None
        best_load = best_rtt = got = 0
        for _ in range(PROBES_PER_K * k + 4):
            i = int(rand() * n)
            if i in probed:
                continue
            probed.append(i)
            c = cands[i]
            if excl is not None and c.id in excl:
                continue
            self.read(c)
            load = self._load(c)
            if load >= c.hard_limit:
                continue
            rtt = view.rank(c)
            if best is None or load < best_load or (load == best_load and rtt < best_rtt):
                best, best_load, best_rtt = c, load, rtt
            got += 1
            if got == k:
                return best
        return self._leastload_hinted(view, k)

    def _hard_ok(self, c: Candidate, g: Group) -> bool:
        """A hinted entry under hard: by the table and by the rules, not tried nor marked,
        and not one read on its own (filed, its feedback in force)."""
        return (
            c.load < c.hard_limit
            and not self._out(c)
            and self._load(c) < c.hard_limit
            and not self._own_load(c, self._filed(g))
        )

    def _leastload_hinted(self, view: AppView, k: int) -> Candidate | NoPick:
        """Most are full or tried: `k` drawn uniformly from the ones under hard (the
        hinted entries, and those read on their own), else all of them to the router."""
        reader = self.reader
        hinted: list[Group] = []
        read: list[Candidate] = []  # read, under hard
        total = 0
        for g in view.groups:
            if g.local or not self._hint(g):
                for c in g.members:
                    self.read(c)
                    if not self._out(c) and self._load(c) < c.hard_limit:
                        read.append(c)
            else:
                hinted.append(g)
                total += g.n_hard
                filed = self._filed(g)
                if filed:
                    read.extend(self._filed_read(g, filed, UNKNOWN_RTT_US))
        space = total + len(read)
        if space == 0:
            return self._no_pick(view)
        rand = self.rng.random
        drawn: list[int] = []
        sample: list[Candidate] = []
        for _ in range(PROBES_PER_K * k + 4):
            r = int(rand() * space)
            if r in drawn:
                continue
            drawn.append(r)
            if r >= total:
                sample.append(read[r - total])
            else:
                i = 0
                while r >= hinted[i].n_hard:
                    r -= hinted[i].n_hard
                    i += 1
                e = reader.entry(hinted[i], r)
                if e is None:
                    continue
                self.read(e)
                if not self._hard_ok(e, hinted[i]):
                    continue
                sample.append(e)
            if len(sample) == k:
                break
        if len(sample) == k:
            best = sample[0]
            best_load = best_rtt = NOT_YET
            for c in sample:  # in random order: the first of equals is a uniform choice
                load = self._load(c)
                rtt = view.rank(c)
                if load < best_load or (load == best_load and rtt < best_rtt):
                    best, best_load, best_rtt = c, load, rtt
            return best
        # Fewer than k found: every one under hard, read, to the router's own scan.
        everyone = list(read)
        for g in hinted:
            stale = False
            got: list[Candidate] = []
            for j in range(g.n_hard):
                e = reader.entry(g, j)
                if e is None:
                    stale = True
                    break
                self.read(e)
                if e.load >= e.hard_limit:
                    stale = True
                    break
                got.append(e)
            if stale:
                got = []
                for c in g.members:
                    self.read(c)
                    got.append(c)
            filed = self._filed(g)
            everyone.extend(c for c in got if not self._own_load(c, filed))
        pick = leastload_scan(everyone, self.rng, self.now, self.excl, self.full, self.loads, k)
        return self._no_pick(view) if isinstance(pick, NoPick) else pick
