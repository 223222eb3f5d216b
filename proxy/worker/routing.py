"""A worker's routing: Host -> app -> instance, admission of local instances, retries.

Owns where candidates come from (the shared-memory table's ordered views, or the
config while there is none), local in-flight accounting (inc on dispatch, dec on the
end), "full" marks and the tried set of a request. The choice itself follows the
router core's rules (proxy.core.router over the config's lists, proxy.worker.walk
over the table's views). It must not do network I/O.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy.config import CLOSEST, LEASTLOAD, STRATEGIES
from proxy.config_table import table_layout, table_name
from proxy.core.router import FullMarks, NoPick, pick
from proxy.core.target import Target
from proxy.telemetry.metrics import (
    ADMIT_EDGE,
    ADMIT_PEER,
    NO_PICK_ALL_FAILED,
    NO_PICK_ALL_FULL,
    NO_PICK_NO_INSTANCES,
    NO_PICK_NOT_FOUND,
)
from proxy.worker.walk import Walk
from shm.candidate import Candidate
from shm.errors import ShmError
from shm.hosts import app_for_host
from shm.reader import TableReader
from shm.view import AppView, group_name

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.telemetry.metrics import WorkerStats
    from shm.inflight import InflightCells

FULL_HOLD = 0.1  # seconds an instance that said "full" is avoided by this worker
DOWN_HOLD = 1.0  # seconds an instance that refused a connection is avoided
MAX_TRIES = 3


class Routed(Protocol):
    """What routing reads and writes on a request."""

    target: Target | None
    tries: int
    force: bytes
    prefer: bytes
    tried: set[str] | None
    full: int  # how many of `tried` were found full rather than failed
    slot: int


@dataclass(frozen=True, slots=True)
class _AppInfo:
    strategy: str
    k: int


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Routing:
    def __init__(
        self,
        config: Config,
        cells: InflightCells | None,
        rng: random.Random,
        stats: WorkerStats | None = None,
    ) -> None:
        self.config = config
        self.stats = stats  # the worker's counters: no-pick reasons, refused admissions
        self.cells = cells
        self.rng = rng
        self.marks = FullMarks()
        self.down: dict[str, float] = {}  # instance id -> refused a connection, avoid until
        self.reader: TableReader | None = None
        self.walk: Walk | None = None
        self.gen = -1
        self.targets: dict[str, Target] = {}
        self.hard: dict[str, int] = {}  # instance id -> hard limit
        self.apps: dict[str, _AppInfo] = {}
        self.node = config.node.id
        # The config's view: used while no table can be read.
        self.static: dict[str, list[Candidate]] = {}
        self.static_apps = {a.name: _AppInfo(a.strategy, a.sample_k) for a in config.apps}
        self.static_hosts = dict(config.hosts)
        peers = {p.id: p for p in config.peers}
        for a in config.apps:
            self.static[a.name] = []
        for inst in config.instances:
            app = config.app(inst.app)
            local = inst.node == self.node
            peer = peers.get(inst.node)
            rtt = 0 if local else int((peer.rtt_ms or 0) * 1000) if peer else -1
            self.static[inst.app].append(
                Candidate(
                    inst.id,
                    inst.node,
                    local,
                    0,
                    app.soft_limit,
                    app.hard_limit,
                    rtt,
                    address=str(inst.address),
                    app=inst.app,
                )
            )
            self.hard[inst.id] = app.hard_limit
            self.targets[inst.id] = self._target(
                inst.id, inst.app, inst.node, str(inst.address), str(peer.backhaul) if peer else ""
            )

    # the table ---------------------------------------------------------------------------
    def attach(self) -> bool:
        """Try to read the table (again); False while it is not there."""
        if self.reader is not None:
            return True
        try:
            t = self.config.table
            self.reader = TableReader.attach(table_layout(t), table_name(t), self.node)
        except (ShmError, OSError):
            return False
        self.walk = Walk(self.reader, self.cells)
        self.gen = -1
        return True

    def _target(self, iid: str, app: str, node: str, address: str, backhaul: str) -> Target:
        local = node == self.node
        slot = -1
        if local and self.cells is not None:
            s = self.cells.slot_of(iid)
            slot = -1 if s is None else s
        if local:
            host, port = _split(address)
            return Target(
                address, iid, app, node, host, port, True, slot, self.config.timeouts.connect, b""
            )
        host, port = _split(backhaul) if backhaul else ("", 0)
        extra = b"X-Edgeproxy-Instance: " + iid.encode() + b"\r\n"
        # The pool key names the node as well as the address: a pooled connection was
        # verified as that node (proxy.worker.backhaul_tls), so it is never reused for
        # another node that took over the address.
        return Target(
            "bh:" + node + "\n" + backhaul,
            iid,
            app,
            node,
            host,
            port,
            False,
            -1,
            self.config.timeouts.backhaul_connect,
            extra,
        )

    def _refresh(self, reader: TableReader) -> None:
        """The topology moved: rebuild targets and app info from the table."""
        self.gen = reader.generation
        targets: dict[str, Target] = {}
        self.hard = {}
        for c in reader.cached():
            self.hard[c.id] = c.hard_limit
            node = reader.node(c.node)
            backhaul = node.backhaul if node is not None else ""
            old = self.targets.get(c.id)
            t = self._target(c.id, c.app, c.node, c.address, backhaul)
            targets[c.id] = old if old is not None and old == t else t
            c.cell = t.slot if c.local else -1  # the walk reads a local load from its cell
            c.target = targets[c.id]  # no lookup in a fleet-sized dict per request
        self.targets = targets
        self.apps = {}
        for a in reader.apps():
            self.apps[a.name] = _AppInfo(a.strategy, a.sample_k)

    def app_for_host(self, host: str) -> str | None:
        reader = self.reader
        if reader is not None:
            app = reader.app_for_host(host)
            if reader.generation != self.gen:
                self._refresh(reader)
            return app
        return app_for_host(self.static_hosts, host)

    def _candidates(self, app: str) -> tuple[Sequence[Candidate], _AppInfo | None]:
        reader = self.reader
        if reader is not None:
            # Local instances are counted in the in-flight cells: their published load
            # (older) is not read unless one has no cell (pick reads it then).
            cands = reader.candidates(app, self.cells is not None)
            if reader.generation != self.gen:
                self._refresh(reader)
            return cands, self.apps.get(app)
        return self.static.get(app, ()), self.static_apps.get(app)

    # choosing ----------------------------------------------------------------------------
    def pick(self, app: str, r: Routed, now: float) -> tuple[Target | None, int, str]:
        """(target, status, reason): status and reason explain a None target."""
        reader = self.reader
        if reader is not None:  # the table: read only what the choice examines
            view = reader.view(app)
            if reader.generation != self.gen:
                self._refresh(reader)
            got: Sequence[Candidate] | AppView = view if view is not None else ()
            return self.choose(app, got, self.apps.get(app), r, now)
        cands, info = self.view(app)
        return self.choose(app, cands, info, r, now)

    def view(self, app: str) -> tuple[Sequence[Candidate], _AppInfo | None]:
        """The app's candidates with their loads read now (first half of `pick`)."""
        cands, info = self._candidates(app)
        if info is None:
            return cands, None
        cells = self.cells
        targets = self.targets
        for c in cands:
            if c.local:
                if cells is not None:
                    t = targets.get(c.id)
                    if t is not None and t.slot >= 0:
                        c.load = cells.total(t.slot)  # fresher than any published load
                    elif self.reader is not None:
                        self.reader.load_of(c)  # no cell: the published load it is
            elif not c.node_up:
                c.rtt_us = -1  # a node the pinger sees down ranks after every measured one
        return cands, info

    def choose(
        self,
        app: str,
        cands: Sequence[Candidate] | AppView,
        info: _AppInfo | None,
        r: Routed,
        now: float,
    ) -> tuple[Target | None, int, str]:
        """The second half of `pick`: choose among `view(app)` (or the table's view of the
        app, read as the choice goes) and admit. Another worker may take a local
        instance's last slot between the two; admission then finds it full."""
        if info is None:
            text = f"edgeproxy: app {app!r} is not in the routing table\n"
            return self._none(NO_PICK_NOT_FOUND, 404, text)
        targets = self.targets
        if r.force:
            name = r.force.decode("latin-1")
            c = self._named(cands, name)
            if c is not None:
                t = targets.get(name)
                if t is not None and (t.local or t.port):
                    if not self._admit(t, r, c.hard_limit, ADMIT_EDGE):
                        text = f"edgeproxy: instance {name!r} is at capacity\n"
                        return self._none(NO_PICK_ALL_FULL, 503, text)
                    return t, 0, ""
            text = f"edgeproxy: app {app!r} has no instance {name!r}\n"
            return self._none(NO_PICK_NOT_FOUND, 404, text)
        if r.prefer and r.tries == 0:
            name = r.prefer.decode("latin-1")
            c = self._named(cands, name)
            if c is not None and c.load < c.hard_limit and not self.marks.is_full(name, now):
                t = targets.get(name)
                if (
                    t is not None
                    and (t.local or t.port)
                    and self._admit(t, r, c.hard_limit, ADMIT_EDGE)
                ):
                    return t, 0, ""
        for _ in range(len(cands) + 1):
            tried = r.tried
            got = self._select(cands, info, now, tried or (), self.marks)
            if got is NoPick.ALL_FULL and len(self.marks):
                # Full in this worker's own view (marks, what it sent): a remote node's own
                # count decides, so ask one rather than answer 503 on a guess. Never a local
                # instance (its count is exact) nor one that just refused a connection.
                skip = self._not_guessed(cands, tried, now)
                again = self._select(cands, info, now, skip, None)
                if not isinstance(again, NoPick):
                    got = again
            if isinstance(got, NoPick):
                # Every candidate is tried or full. Full ones, and tried ones that were found
                # full, free up soon: "come back later" (RFC 9110 section 15.6.4). Only when
                # every try failed is it a gateway error (RFC 9110 section 15.6.3).
                if got is NoPick.ALL_FULL or r.full:
                    return self._none(NO_PICK_ALL_FULL, 503, _at_capacity(app))
                if tried:
                    text = f"edgeproxy: app {app!r} has no other instance to try\n"
                    return self._none(NO_PICK_ALL_FAILED, 502, text)
                text = f"edgeproxy: app {app!r} has no instance\n"
                return self._none(NO_PICK_NO_INSTANCES, 503, text)
            t = _target_of(got) if isinstance(cands, AppView) else targets.get(got.id)
            if t is None or not (t.local or t.port):
                self.exclude(r, got.id)  # not reachable from here: no address to send to
                continue
            if not self._admit(t, r, got.hard_limit, ADMIT_EDGE):
                # Another worker took the last slot since the loads were read: full.
                r.full += 1
                self.exclude(r, got.id)
                continue
            if not t.local:
                # Count what we send until the instance's node reports its load again (one
                # more than the load we used: never below the table's, so not filed by group).
                self.marks.feedback(got.id, self.marks.load_of(got, now) + 1, now)
            return t, 0, ""
        return self._none(NO_PICK_ALL_FULL, 503, _at_capacity(app))

    def _select(
        self,
        cands: Sequence[Candidate] | AppView,
        info: _AppInfo,
        now: float,
        tried: Collection[str],
        marks: FullMarks | None,
    ) -> Candidate | NoPick:
        if isinstance(cands, AppView):
            walk = self.walk
            assert walk is not None  # a view comes from the reader the walk reads
            if info.strategy == CLOSEST:
                return walk.closest(cands, self.rng, now, tried, marks)
            if info.strategy == LEASTLOAD:
                return walk.leastload(cands, self.rng, now, tried, marks, info.k)
            raise ValueError(
                f"unknown routing strategy {info.strategy!r}; expected one of {STRATEGIES}"
            )
        return pick(cands, info.strategy, self.rng, now, tried, marks, info.k)

    def _named(self, cands: Sequence[Candidate] | AppView, name: str) -> Candidate | None:
        """The app's instance `name` with its load read now, or None."""
        if isinstance(cands, AppView):
            reader, walk = self.reader, self.walk
            c = reader.candidate(name) if reader is not None else None
            if c is None or c.app != cands.app or walk is None:
                return None
            walk.read(c)
            return c
        for c in cands:
            if c.id == name:
                return c
        return None

    def _none(self, reason: int, status: int, text: str) -> tuple[Target | None, int, str]:
        """No instance takes the request: count why, and answer `status` with `text`."""
        if self.stats is not None:
            self.stats.no_pick[reason] += 1
        return None, status, text

    def _not_guessed(
        self, cands: Sequence[Candidate] | AppView, tried: set[str] | None, now: float
    ) -> set[str]:
        """Ids the all-full fallback must not pick: tried, local, or recently unreachable."""
        down = self.down
        skip = set(tried) if tried else set()
        if isinstance(cands, AppView):  # the local group, and what is down (not every one)
            for g in cands.groups:
                if g.local:
                    skip.update(c.id for c in g.members)
            skip.update(i for i, until in down.items() if now < until)
            return skip
        for c in cands:
            if c.local or now < down.get(c.id, now):
                skip.add(c.id)
        return skip

    def admit(self, t: Target, r: Routed, hard: int, now: float) -> bool:
        """Count a peer's (backhauled) request on a local instance if it is under its hard
        limit; False: the caller answers "full"."""
        return self._admit(t, r, hard, ADMIT_PEER)

    def _admit(self, t: Target, r: Routed, hard: int, source: int) -> bool:
        """Count the request on a local instance if it is under its hard limit."""
        if not t.local or t.slot < 0 or self.cells is None:
            return True
        cells = self.cells
        cells.inc(t.slot)
        if cells.total(t.slot) > hard:  # counted first, so two workers never both pass
            cells.dec(t.slot)
            if self.stats is not None:
                self.stats.admissions_refused[source] += 1
            return False  # no mark: the counters say exactly when a slot frees up
        r.slot = t.slot
        return True

    def local_target(self, iid: str) -> tuple[Target | None, int]:
        """(target, hard limit) of an instance on this node, for a backhauled request."""
        reader = self.reader
        if reader is not None:
            reader.app_for_host("")  # refreshes the cached topology if it moved
            if reader.generation != self.gen:
                self._refresh(reader)
        t = self.targets.get(iid)
        if t is None or not t.local:
            return None, 0
        hard = self.hard.get(iid, 0)
        return t, hard

    def load_of(self, t: Target) -> int:
        if t.slot < 0 or self.cells is None:
            return 0
        return self.cells.total(t.slot)

    def exclude(self, r: Routed, iid: str) -> None:
        if r.tried is None:
            r.tried = {iid}
        else:
            r.tried.add(iid)

    def release(self, r: Routed) -> None:
        """The request no longer occupies its local instance."""
        if r.slot >= 0 and self.cells is not None:
            self.cells.dec(r.slot)
            r.slot = -1

    def retry(
        self, r: Routed, app: str, now: float, unreachable: bool = False
    ) -> tuple[Target | None, int, str]:
        """The next target after r.target failed before the request reached it:
        `unreachable` when it could not be reached or failed, else it answered "full"."""
        self.release(r)
        t = r.target
        if unreachable and t is not None:
            self.marks.mark_full(t.instance, now, DOWN_HOLD)  # don't pay a refused connect again
            self.down[t.instance] = now + DOWN_HOLD
        if not unreachable:
            r.full += 1  # it answered "full, come back later"
        if r.force or t is None or r.tries >= MAX_TRIES:
            if r.full:
                return self._none(NO_PICK_ALL_FULL, 503, _at_capacity(app))
            return self._none(NO_PICK_ALL_FAILED, 502, "")
        self.exclude(r, t.instance)
        return self.pick(app, r, now)

    def rejected(self, r: Routed, now: float) -> None:
        """r.target answered "full, come back later"."""
        if r.target is not None:
            self.marks.mark_full(r.target.instance, now, FULL_HOLD)

    def feedback(self, iid: str, load: int, now: float) -> None:
        """An instance's node said how loaded it is now (may be below the table's load)."""
        t = self.targets.get(iid)
        self.marks.feedback(iid, load, now, group_name(t.app, t.node) if t is not None else "")

    def prune(self, now: float, max_age: float) -> None:
        """Forget expired marks, down holds and feedback older than `max_age` (off the hot path)."""
        self.marks.prune(now, max_age)
        if self.down:
            self.down = {i: u for i, u in self.down.items() if now < u}

    def stale(self, now: float) -> bool:
        if self.reader is None:
            return True
        return self.reader.stale(now, self.config.table.stale_after)[0]


def _target_of(c: Candidate) -> Target | None:
    """The target _refresh filed on a table candidate (None if it has none yet)."""
    t = c.target
    return t if isinstance(t, Target) else None


def _at_capacity(app: str) -> str:
    return f"edgeproxy: app {app!r} is at capacity, retry later\n"
