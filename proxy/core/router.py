"""Router core: which instance of an app takes a request, on every request in every worker.

Owns the `closest` and `leastload` rules, tie-breaking among equals, and the worker's
edge view of instances (`FullMarks`: "full, come back later" marks, fresh load feedback).
It must not do I/O, read a clock or use the global random: callers pass `now` and a
`random.Random`. It allocates nothing per call on the `closest` path.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from random import Random
from typing import Final

from proxy.config import CLOSEST, LEASTLOAD, STRATEGIES
from shm.candidate import Candidate

UNKNOWN_RTT_US: Final = 1 << 62  # rtt_us < 0 (node not measured yet) ranks after every known RTT
_NOT_YET: Final = UNKNOWN_RTT_US + 1  # "no best yet": above every RTT and every load we rank
PROBE_FROM: Final = 8  # leastload: below this many candidates a scan is as cheap as probing
PROBES_PER_K: Final = 4  # leastload: random probes per wanted sample before a full scan
_NO_TRIED: Final[frozenset[str]] = frozenset()
_NO_MARKS: Final[dict[str, float]] = {}  # read only
_NO_LOADS: Final[dict[str, tuple[int, int]]] = {}  # read only


class NoPick(enum.Enum):
    """Why no instance was chosen (the value is the reason string for logs and metrics)."""

    NO_INSTANCES = "no_instances"  # the app has none, or every one was already tried
    ALL_FULL = "all_full"  # every remaining one is at or over its hard limit (or marked full)


class FullMarks:
    """A worker's edge view: instances marked full after a reject, and fresh load feedback.

    A mark makes the router treat the instance as at its hard limit until `now + hold`.
    Feedback (a backhaul response's in-flight count) replaces the table's load until the
    table's `load_time_us` is newer than the feedback. Times are seconds on the table's clock.
    Feedback given with a `group` name is also filed under it (`in_group`): the ones that
    may make a load lower than the table's, so a pick that skips a group on the table's
    word can still find an instance this view knows to be less loaded.
    """

    __slots__ = ("_full", "_groups", "_loads")

    def __init__(self) -> None:
        self._full: dict[str, float] = {}  # instance id -> full until
        self._loads: dict[str, tuple[int, int]] = {}  # instance id -> (load, at µs)
        self._groups: dict[str, set[str]] = {}  # group name -> ids with feedback

    def mark_full(self, instance_id: str, now: float, hold: float) -> None:
        """Treat the instance as full until `now + hold` (a later mark never shortens one)."""
        until = now + hold
        if until > self._full.get(instance_id, until - 1.0):
            self._full[instance_id] = until

    def feedback(self, instance_id: str, load: int, now: float, group: str = "") -> None:
        """Use `load` for the instance until the table has a newer measurement than `now`."""
        self._loads[instance_id] = (load, int(now * 1_000_000))
        if group:
            ids = self._groups.get(group)
            if ids is None:
                self._groups[group] = {instance_id}
            else:
                ids.add(instance_id)

    def in_group(self, group: str) -> set[str] | None:
        """Ids filed under `group` that may have feedback (a superset; None: none)."""
        return self._groups.get(group) if self._groups else None

    def filed(self) -> dict[str, set[str]]:
        """Every group name with ids filed under it (read only)."""
        return self._groups

    def is_full(self, instance_id: str, now: float) -> bool:
        """Whether the instance is marked full at `now`."""
        return now < self._full.get(instance_id, now)

    def load_of(self, c: Candidate, now: float) -> int:
        """The load the router uses for `c` at `now` (hard limit while marked full)."""
        return effective_load(c, now, self._full, self._loads)

    def prune(self, now: float, max_age: float) -> None:
        """Forget expired marks and feedback older than `max_age` (call off the hot path)."""
        self._full = {i: u for i, u in self._full.items() if now < u}
        oldest = int((now - max_age) * 1_000_000)
        self._loads = loads = {i: v for i, v in self._loads.items() if v[1] >= oldest}
        groups: dict[str, set[str]] = {}
        for name, ids in self._groups.items():
            kept = {i for i in ids if i in loads}
            if kept:
                groups[name] = kept
        self._groups = groups

    def clear(self) -> None:
        """Forget every mark and all feedback."""
        self._full.clear()
        self._loads.clear()
        self._groups.clear()

    def __len__(self) -> int:
        return len(self._full) + len(self._loads)


def effective_load(
    c: Candidate, now: float, full: dict[str, float], loads: dict[str, tuple[int, int]]
) -> int:
    """The load the rules use for `c`: its own, fresher feedback, the hard limit if marked."""
    load = c.load
    if loads:
        fb = loads.get(c.id)
        if fb is not None and fb[1] >= c.load_time_us:
            load = fb[0]
    if full and now < full.get(c.id, now) and load < c.hard_limit:
        load = c.hard_limit
    return load


def _no_pick(cands: Sequence[Candidate], excl: Collection[str] | None) -> NoPick:
    """The reason when nothing was eligible: was any candidate left after exclusions?"""
    if excl is None:
        return NoPick.ALL_FULL if cands else NoPick.NO_INSTANCES
    for c in cands:
        if c.id not in excl:
            return NoPick.ALL_FULL
    return NoPick.NO_INSTANCES


def pick(
    cands: Sequence[Candidate],
    strategy: str,
    rng: Random,
    now: float = 0.0,
    tried: Collection[str] = _NO_TRIED,
    marks: FullMarks | None = None,
    k: int = 2,
) -> Candidate | NoPick:
    """The instance for a request under the app's `strategy`, or why there is none."""
    if strategy == CLOSEST:
        return pick_closest(cands, rng, now, tried, marks)
    if strategy == LEASTLOAD:
        return pick_leastload(cands, rng, now, tried, marks, k)
    raise ValueError(f"unknown routing strategy {strategy!r}; expected one of {STRATEGIES}")


def pick_closest(
    cands: Sequence[Candidate],
    rng: Random,
    now: float = 0.0,
    tried: Collection[str] = _NO_TRIED,
    marks: FullMarks | None = None,
) -> Candidate | NoPick:
    """Lowest RTT under soft limit; else least loaded under hard, then RTT; random among equals.

    One pass, no allocation: the best so far and a count of equals, replaced with
    probability 1/count (reservoir sampling), so equal instances share the load. Once
    one is under soft, a farther candidate is skipped before its load is even read.
    """
    full_get = loads_get = None
    if marks is not None:
        if marks._full:
            full_get = marks._full.get
        if marks._loads:
            loads_get = marks._loads.get
    excl = tried if tried else None
    rand = rng.random
    best: Candidate | None = None  # under soft: lowest RTT
    best_rtt = _NOT_YET  # above every RTT until `best` is set: nothing is skipped before
    n_best = 0
    fb: Candidate | None = None  # fallback under hard: least loaded, then lowest RTT
    fb_load = fb_rtt = _NOT_YET
    n_fb = 0
    for c in cands:
        rtt = 0 if c.local else c.rtt_us
        if rtt < 0:
            rtt = UNKNOWN_RTT_US
        if rtt > best_rtt or (excl is not None and c.id in excl):
            continue
        load = c.load
        if full_get is not None and now < full_get(c.id, now):
            continue  # marked full: as if at its hard limit
        if loads_get is not None:
            seen = loads_get(c.id)
            if seen is not None and seen[1] >= c.load_time_us:
                load = seen[0]
        if load >= c.hard_limit:
            continue
        if load < c.soft_limit:
            if rtt < best_rtt:
                best, best_rtt, n_best = c, rtt, 1
            else:  # rtt == best_rtt: farther ones were skipped above
                n_best += 1
                if rand() * n_best < 1.0:
                    best = c
        elif best is None and load <= fb_load:
            if load < fb_load or rtt < fb_rtt:
                fb, fb_load, fb_rtt, n_fb = c, load, rtt, 1
            elif rtt == fb_rtt:
                n_fb += 1
                if rand() * n_fb < 1.0:
                    fb = c
    if best is not None:
        return best
    if fb is not None:
        return fb
    return _no_pick(cands, excl)


def pick_leastload(
    cands: Sequence[Candidate],
    rng: Random,
    now: float = 0.0,
    tried: Collection[str] = _NO_TRIED,
    marks: FullMarks | None = None,
    k: int = 2,
) -> Candidate | NoPick:
    """Least loaded, then lowest RTT, of a random sample of `k` instances under hard limit.

    Beyond a few candidates the sample is drawn by probing random positions (cost
    independent of their number); when too many probes miss (most instances full or
    tried), a scan samples among the eligible ones instead. A probed sample comes in
    random order, so keeping the first of exact equals is a uniform choice among them.
    `k` < 1 counts as 1.
    """
    full: dict[str, float] = _NO_MARKS
    loads: dict[str, tuple[int, int]] = _NO_LOADS
    if marks is not None:
        full, loads = marks._full, marks._loads
    marked = bool(full or loads)
    excl = tried if tried else None
    k = max(k, 1)
    n = len(cands)
    if n >= PROBE_FROM and n > k:
        rand = rng.random
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
            load = effective_load(c, now, full, loads) if marked else c.load
            if load >= c.hard_limit:
                continue
            rtt = 0 if c.local else c.rtt_us
            if rtt < 0:
                rtt = UNKNOWN_RTT_US
            if best is None or load < best_load or (load == best_load and rtt < best_rtt):
                best, best_load, best_rtt = c, load, rtt
            got += 1
            if got == k:
                return best
    return leastload_scan(cands, rng, now, excl, full, loads, k)


def leastload_scan(
    cands: Sequence[Candidate],
    rng: Random,
    now: float,
    excl: Collection[str] | None,
    full: dict[str, float],
    loads: dict[str, tuple[int, int]],
    k: int,
) -> Candidate | NoPick:
    """`pick_leastload` over every candidate: few of them, or most full or tried.

    Reservoir-samples `k` of the eligible ones, then breaks exact ties by reservoir too
    (the sample's order is not random here).
    """
    rand = rng.random
    marked = bool(full or loads)
    sample: list[Candidate] = []
    m = 0
    for c in cands:
        if excl is not None and c.id in excl:
            continue
        if (effective_load(c, now, full, loads) if marked else c.load) >= c.hard_limit:
            continue
        m += 1
        if m <= k:
            sample.append(c)
        else:
            j = int(rand() * m)
            if j < k:
                sample[j] = c
    if not sample:
        return _no_pick(cands, excl)
    best = sample[0]
    best_load = best_rtt = _NOT_YET
    n_best = 0
    for c in sample:
        load = effective_load(c, now, full, loads) if marked else c.load
        rtt = 0 if c.local else c.rtt_us
        if rtt < 0:
            rtt = UNKNOWN_RTT_US
        if load < best_load or (load == best_load and rtt < best_rtt):
            best, best_load, best_rtt, n_best = c, load, rtt, 1
        elif load == best_load and rtt == best_rtt:
            n_best += 1
            if rand() * n_best < 1.0:
                best = c
    return best
