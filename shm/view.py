"""A reader's ordered view of one app: its groups in RTT order, for picks that read little.

Owns the shapes a pick walks (Group: an app's instances on one node with where its
table hint lives; Run: groups equally close; AppView: an app's runs, nearest first,
and all its candidates) and how they are built from the reader's cached rows and a
snapshot of the nodes' order keys. Plain values: no segment reads, no routing rules.
"""

from __future__ import annotations

from shm.candidate import Candidate
from shm.codec import RTT_UNKNOWN, summary_signature


class Group:
    """An app's instances on one node; `n_*`/`min_load` are the last hint read for it."""

    __slots__ = (
        "block_at",
        "index",
        "key",
        "local",
        "members",
        "min_load",
        "n_hard",
        "n_min",
        "n_soft",
        "name",
        "node",
        "order_at",
        "seen",
    )

    def __init__(
        self,
        name: str,
        node: str,
        index: int,
        members: list[Candidate],
        block_at: int,
        order_at: int,
    ) -> None:
        self.name = name  # "app\\0node": what load feedback is filed under
        self.node = node
        self.index = index  # its number in the table's group layout
        self.members = members
        self.block_at = block_at  # its hint block
        self.order_at = order_at  # its first order entry
        self.local = False  # on the reader's own node (loads come from in-flight counts)
        self.key = RTT_UNKNOWN  # its order key when the view was built
        self.n_soft = 0  # under soft, by the table's loads (the first entries)
        self.n_hard = 0  # under hard (the first entries)
        self.min_load = 0  # the lowest load over soft and under hard
        self.n_min = 0  # entries with that load, after the first n_soft
        self.seen = 0  # the pick that last read the hint (a pick reads a block once)


class Run:
    """Groups with the same order key: every member is as close as every other."""

    __slots__ = ("groups", "key", "local", "size")

    def __init__(self, key: int, groups: list[Group]) -> None:
        self.key = key
        self.groups = groups
        self.local = False  # holds the local group
        self.size = 0  # members in all its groups
        for g in groups:
            self.size += len(g.members)
            if g.local:
                self.local = True


class AppView:
    """An app as a pick walks it: runs nearest first, and every candidate (for sampling)."""

    __slots__ = (
        "all",
        "app",
        "first",
        "groups",
        "pos",
        "ranks",
        "run_of",
        "runs",
        "sig",
        "starts",
        "summary_at",
    )

    def __init__(
        self, app: str, runs: list[Run], groups: list[Group], all: list[Candidate]
    ) -> None:
        self.app = app
        self.runs = runs
        self.groups = groups  # the runs' groups, nearest first: a group's position
        self.all = all
        self.pos = {g.name: p for p, g in enumerate(groups)}  # group name -> position
        self.starts: list[int] = []  # a run's first position
        self.run_of: list[int] = []  # position -> its run
        for r, run in enumerate(runs):
            self.starts.append(len(self.run_of))
            self.run_of.extend([r] * len(run.groups))
        # The table's summary of this app is usable when the writer ordered its groups
        # the same way: same signature (see codec, app summaries). Set by the reader.
        self.sig = summary_signature([g.index for g in groups])
        self.summary_at = -1
        # An app's groups have consecutive numbers: ranks[c.group - first] is the order key
        # of c's group, which ranks c by RTT as its node's RTT now would (same order, same
        # ties) until the epoch moves.
        self.first = min((g.index for g in groups), default=0)
        self.ranks = [0] * len(groups)
        for g in groups:
            self.ranks[g.index - self.first] = g.key

    def rank(self, c: Candidate) -> int:
        """`c`'s RTT rank: 0 on this node, its node's order key otherwise."""
        return self.ranks[c.group - self.first]

    def __len__(self) -> int:
        return len(self.all)


def group_name(app: str, node: str) -> str:
    """The name a group's load feedback is filed under."""
    return app + "\0" + node


def build(
    app: str, groups: list[Group], all: list[Candidate], keys: dict[str, int], local_node: str
) -> AppView:
    """The view of `app` with its groups ordered by `keys` (node -> order key; absent:
    unknown), the local node's group first at key 0, equal keys forming one run."""
    for g in groups:
        if local_node and g.node == local_node:
            g.local = True
            g.key = 0
        else:
            g.local = False
            g.key = keys.get(g.node, RTT_UNKNOWN)
    ordered = sorted(groups, key=_by_key)
    runs: list[Run] = []
    i = 0
    while i < len(ordered):
        j = i + 1
        while j < len(ordered) and ordered[j].key == ordered[i].key:
            j += 1
        runs.append(Run(ordered[i].key, ordered[i:j]))
        i = j
    return AppView(app, runs, ordered, all)


def _by_key(g: Group) -> tuple[int, str]:
    return g.key, g.node
