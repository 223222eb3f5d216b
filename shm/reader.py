"""Lock-free reader of a table segment, used by every proxy worker on every request.

Owns the decoded-topology cache (re-read only when the header generation moves),
the apps' ordered views (re-sorted only when the RTT order epoch moves) and the
hot-path reads a pick makes through them: one candidate's load and RTT (`fresh`),
a group's hint block (`hint`), an order entry (`entry`), each under its seqlock
check; `candidates()` reads a whole app. Also retry/fallback counting, host -> app
lookup and writer liveness. It must never write to the segment, take a lock, or
block on the writer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from shm import codec
from shm.candidate import Candidate
from shm.errors import LayoutMismatchError, SegmentMissingError
from shm.hosts import app_for_host
from shm.layout import Layout
from shm.segment import Segment, fence
from shm.view import AppView, Group, build, group_name

MAX_RETRIES: Final = 16  # hot path: tries of one block before serving its last good value
# Slow paths (topology reload, new candidates, status) then also yield the CPU this many
# times, so a writer preempted in the middle of a row can finish it. Never a lock or a wait.
PATIENT_YIELDS: Final = 200
_GEN_AT: Final = codec.GEN_AT
_ORDER_AT: Final = codec.ORDER_AT
_ENTRY = codec.ORDER_ENTRY
_WORD = struct.Struct("<Q")
_M64: Final = 0xFFFFFFFFFFFFFFFF
_SEQ = struct.Struct("<Q")
R = TypeVar("R")
_Offset = Callable[[int], int]
_Decode = Callable[[bytes], tuple[int, R | None] | None]


_EMPTY: Final[Sequence[Candidate]] = ()


class TableReader:
    """A worker's view of the table. Not thread-safe: one per thread (it caches)."""

    def __init__(self, seg: Segment, layout: Layout) -> None:
        self._seg = seg
        self._mm = seg.mm
        self._layout = layout
        self._gen = -1
        self.retries = 0  # blocks re-read because a write was in progress or torn
        self.fallbacks = 0  # blocks served from their last good value after MAX_RETRIES
        self._nodes: dict[int, tuple[int, codec.NodeRow]] = {}  # slot -> (seq, row)
        self._apps: dict[int, tuple[int, codec.AppRow]] = {}
        self._instances: dict[int, tuple[int, codec.InstanceRow]] = {}
        self._cands: dict[str, Candidate] = {}  # instance id -> candidate
        self._by_app: dict[str, list[Candidate]] = {}
        self._app_rows: dict[str, codec.AppRow] = {}
        self._node_rows: dict[str, tuple[codec.NodeRow, int]] = {}  # id -> (row, hot at)
        self._hosts: dict[str, str] = {}
        self._by_slot: list[Candidate | None] = []  # instance slot -> candidate
        self._groups: dict[str, list[Group]] = {}  # app -> its groups (table order)
        self._views: dict[str, AppView] = {}  # app -> its view, for the current epoch
        self._node_keys: dict[str, int] = {}  # node id -> order key at the epoch
        self._epoch = -1  # RTT order epoch the views were sorted at (-1: sort again)
        self.picks = 0  # numbered by the picks made through it (shm.view.Group.seen)
        self._tag = -1  # group layout the topology was read with
        self._app_slots: dict[str, int] = {}  # app -> its slot (its summary's place)
        self._words = codec.summary_words(layout.max_nodes)
        self._heartbeat_us = 0
        self._store = (0, 0)  # (store state, since µs) from the heartbeat block
        self._writer = (0, 0)
        self.local_node = ""  # candidates on this node get local = True (set before reading)

    @classmethod
    def attach(cls, layout: Layout, name: str, local_node: str = "") -> TableReader:
        """Map the segment `name` read-only and check its header against `layout`.

        Candidates on `local_node` (the reader's own node) get `local = True`.

        SegmentMissingError if it does not exist or is not initialised yet (retry later);
        LayoutMismatchError, naming the first difference, if it is not the layout we expect.
        """
        seg = Segment.attach(name)
        try:
            found = codec.decode_static(seg.mm) if seg.size >= codec.STATIC.size else None
            if found is None or found.magic == bytes(8):
                raise SegmentMissingError(f"shared-memory segment {name} is not initialised yet")
            problem = codec.mismatch(found, layout.static())
            if problem is None and seg.size != layout.total_size:
                problem = f"segment is {seg.size} bytes, header says {layout.total_size}"
            if problem is not None:
                raise LayoutMismatchError(f"shared-memory segment {name}: {problem}")
        except BaseException:
            seg.close()
            raise
        reader = cls(seg, layout)
        reader.local_node = local_node
        reader.refresh()
        return reader

    def close(self) -> None:
        """Drop the caches and unmap."""
        self._cands.clear()
        self._by_app.clear()
        self._by_slot = []
        self._groups.clear()
        self._views.clear()
        self._seg.close()

    @property
    def name(self) -> str:
        """The segment name."""
        return self._seg.name

    @property
    def generation(self) -> int:
        """The generation the cached topology was read at."""
        return self._gen

    # --- the hot path ---------------------------------------------------------------------
    def candidates(self, app: str, skip_local: bool = False) -> Sequence[Candidate]:
        """The app's instances with load and node RTT read now (empty if none).

        `skip_local`: leave local instances' published load unread (a caller that counts
        them itself); `load_of` reads one when it needs it after all.
        """
        mm = self._mm
        g, ng = codec.GEN.unpack_from(mm, _GEN_AT)
        if g != self._gen or g ^ ng != _M64:
            self.refresh()
        cands = self._by_app.get(app)
        if cands is None:
            return _EMPTY
        unpack = codec.HOT.unpack_from
        for c in cands:
            if skip_local and c.local:
                continue
            s, a, b, x, y, k = unpack(mm, c.load_at)
            # codec.hot_check(), inlined: a call costs as much as the check itself
            chk = s ^ a * 0xC2B2AE3D27D4EB4F ^ b * 0x165667B19E3779F9 ^ x * 0x27D4EB2F165667C5
            if s & 1 or k != (chk ^ y * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:
                self._reread_load(c)
            else:
                c.load = a
                c.load_time_us = b
                c.publisher_epoch = x
            at = c.node_at
            if at:
                s, a, b, x, y, k = unpack(mm, at)
                chk = s ^ a * 0xC2B2AE3D27D4EB4F ^ b * 0x165667B19E3779F9 ^ x * 0x27D4EB2F165667C5
                if s & 1 or k != (chk ^ y * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:
                    self._reread_node(c)
                else:
                    c.rtt_us = a
                    c.jitter_us = b
                    c.loss_permille = x & 0xFFFFFFFF
                    c.node_up = x > 0xFFFFFFFF
                    c.last_heard_us = y
        return cands

    def load_of(self, c: Candidate) -> None:
        """Read `c`'s published load now (one candidate; see `candidates(skip_local=True)`)."""
        self._reread_load(c)

    def view(self, app: str) -> AppView | None:
        """The app's ordered view (cached by generation and RTT order epoch), or None.

        Its candidates hold the values last read: a pick reads the ones it examines
        with `fresh`, and a group's counts with `hint`.
        """
        mm = self._mm
        # The generation word alone: equal to the cached one, it was not being replaced
        # (a torn read of a new one differs); refresh() checks the pair.
        if _WORD.unpack_from(mm, _GEN_AT)[0] != self._gen:
            self.refresh()
        if _WORD.unpack_from(mm, _ORDER_AT + 8)[0] != self._epoch:  # torn: _sort checks
            self._sort()
        v = self._views.get(app)
        if v is None:
            groups = self._groups.get(app)
            if groups is None:
                return None
            v = build(app, groups, self._by_app[app], self._node_keys, self.local_node)
            slot = self._app_slots.get(app)
            if slot is not None and len(groups) <= 64 * self._words:
                v.summary_at = self._layout.summary(slot)
            self._views[app] = v
        return v

    def soft_bits(self, v: AppView) -> int:
        """Bit p: the table counts an instance under soft in `v`'s group at position p
        (groups of RTT 0 excluded: a pick reads those itself); -1 when the table's
        summary of the app is not for this order (or is being written)."""
        at = v.summary_at
        if at < 0:
            return -1
        # The signature word before and after the bits (a writer sets it to 0 before it
        # rewrites them, and to the new order's after): the same, the bits are this
        # order's. No check word: a signature torn between two values equals neither.
        mm = self._mm
        sig = v.sig
        if _WORD.unpack_from(mm, at + 8)[0] != sig:
            return -1
        bits = int.from_bytes(
            mm[at + codec.HOT_SIZE : at + codec.HOT_SIZE + 8 * self._words], "little"
        )
        if _WORD.unpack_from(mm, at + 8)[0] != sig:
            return -1
        return bits

    def low_bits(self, v: AppView) -> tuple[int, int] | None:
        """(the app's lowest load over soft and under hard, bit p: `v`'s group at position
        p has it), RTT 0 excluded; None when the summary is not usable for `v`."""
        at = v.summary_at
        if at < 0:
            return None
        got = self._read_hot(at)
        if got is None or got[0] != v.sig:
            return None
        at += codec.HOT_SIZE + 8 * self._words
        return got[1], int.from_bytes(self._mm[at : at + 8 * self._words], "little")

    def fresh_load(self, c: Candidate) -> None:
        """Read `c`'s load now (not its node's RTT: a view's order stands for it)."""
        s, a, b, x, y, k = codec.HOT.unpack_from(self._mm, c.load_at)
        chk = s ^ a * 0xC2B2AE3D27D4EB4F ^ b * 0x165667B19E3779F9 ^ x * 0x27D4EB2F165667C5
        if s & 1 or k != (chk ^ y * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:
            self._reread_load(c)
        else:
            c.load = a
            c.load_time_us = b
            c.publisher_epoch = x

    def fresh(self, c: Candidate) -> None:
        """Read `c`'s load and its node's RTT now (what `candidates()` does for each)."""
        mm = self._mm
        s, a, b, x, y, k = codec.HOT.unpack_from(mm, c.load_at)
        chk = s ^ a * 0xC2B2AE3D27D4EB4F ^ b * 0x165667B19E3779F9 ^ x * 0x27D4EB2F165667C5
        if s & 1 or k != (chk ^ y * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:
            self._reread_load(c)
        else:
            c.load = a
            c.load_time_us = b
            c.publisher_epoch = x
        at = c.node_at
        if at:
            s, a, b, x, y, k = codec.HOT.unpack_from(mm, at)
            chk = s ^ a * 0xC2B2AE3D27D4EB4F ^ b * 0x165667B19E3779F9 ^ x * 0x27D4EB2F165667C5
            if s & 1 or k != (chk ^ y * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:
                self._reread_node(c)
            else:
                c.rtt_us = a
                c.jitter_us = b
                c.loss_permille = x & 0xFFFFFFFF
                c.node_up = x > 0xFFFFFFFF
                c.last_heard_us = y

    def hint(self, g: Group) -> bool:
        """Read `g`'s block into its `n_soft`, `n_hard`, `min_load`, `n_min`; False when
        it cannot be used (being written, torn, another layout's, or impossible counts)."""
        s, tag, n, low, n_min, k = codec.HOT.unpack_from(self._mm, g.block_at)
        chk = s ^ tag * 0xC2B2AE3D27D4EB4F ^ n * 0x165667B19E3779F9 ^ low * 0x27D4EB2F165667C5
        if s & 1 or k != (chk ^ n_min * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:
            got = self._read_hot(g.block_at)
            if got is None:
                return False
            tag, n, low, n_min = got
        n_soft = n & 0xFFFFFFFF
        n_hard = n >> 32
        if tag != self._tag or n_soft > n_hard or n_hard > len(g.members) or n_min < 0:
            return False
        if n_soft + n_min > n_hard:
            return False
        g.n_soft = n_soft
        g.n_hard = n_hard
        g.min_load = low
        g.n_min = n_min
        return True

    def entry(self, g: Group, j: int) -> Candidate | None:
        """The candidate at entry `j` (0 <= j < len(g.members)) of `g`'s segment, None
        unless it is a member of `g` (the entry is a hint: it may be mid-move)."""
        slot: int = _ENTRY.unpack_from(self._mm, g.order_at + 4 * j)[0]
        by_slot = self._by_slot
        if slot >= len(by_slot):
            return None
        c = by_slot[slot]
        if c is None or c.group != g.index:
            return None
        return c

    def candidate(self, instance_id: str) -> Candidate | None:
        """An instance by id as of the cached topology (its values as last read)."""
        return self._cands.get(instance_id)

    def cached(self) -> list[Candidate]:
        """Every instance as of the cached topology, nothing read now (refreshes first)."""
        self.app_for_host("")
        return list(self._cands.values())

    def app_for_host(self, host: str) -> str | None:
        """The app serving `host` (lower-case, port stripped by the caller), or None."""
        g, ng = codec.GEN.unpack_from(self._mm, _GEN_AT)
        if g != self._gen or g ^ ng != _M64:
            self.refresh()
        return app_for_host(self._hosts, host)

    def node(self, node_id: str) -> codec.NodeRow | None:
        """The node's row as of the cached topology (call after candidates())."""
        got = self._node_rows.get(node_id)
        return got[0] if got is not None else None

    def app(self, name: str) -> codec.AppRow | None:
        """The app's row (strategy, limits, sample_k), or None."""
        g, ng = codec.GEN.unpack_from(self._mm, _GEN_AT)
        if g != self._gen or g ^ ng != _M64:
            self.refresh()
        return self._app_rows.get(name)

    # --- slow paths -------------------------------------------------------------------------
    def _read_hot(self, at: int, patient: bool = False) -> tuple[int, int, int, int] | None:
        for i in range(MAX_RETRIES + (PATIENT_YIELDS if patient else 0)):
            got = codec.decode_hot(self._mm, at)
            if got is not None:
                return got[1:]
            self.retries += 1
            if i >= MAX_RETRIES:
                os.sched_yield()
        self.fallbacks += 1
        return None

    def _reread_load(self, c: Candidate, patient: bool = False) -> None:
        got = self._read_hot(c.load_at, patient)
        if got is not None:  # else: keep the last good values in `c`
            c.load, c.load_time_us, c.publisher_epoch, _ = got

    def _reread_node(self, c: Candidate, patient: bool = False) -> None:
        got = self._read_hot(c.node_at, patient)
        if got is not None:
            state = codec.node_state_from(*got)
            c.rtt_us, c.jitter_us = state.rtt_us, state.jitter_us
            c.loss_permille, c.node_up = state.loss_permille, state.up
            c.last_heard_us = state.last_heard_us

    def refresh(self) -> None:
        """Re-read the topology if the generation moved (called by the lookups)."""
        mm = self._mm
        gen: int | None = None
        for _ in range(MAX_RETRIES):
            gen = codec.decode_gen(mm)
            if gen is not None:
                break
            self.retries += 1
        if gen is None:
            self.fallbacks += 1  # serve the cached topology; try again next call
            return
        fence()  # the rows below are at least as new as the generation
        hwm = self._read_hot(codec.HWM_AT, patient=True)
        if hwm is None:
            return
        order = self._read_hot(_ORDER_AT, patient=True)
        if order is None:
            return
        lay = self._layout
        self._nodes = self._read_table(
            self._nodes, hwm[0], lay.node, codec.NODE_COLD, codec.decode_node
        )
        self._apps = self._read_table(self._apps, hwm[1], lay.app, codec.APP_COLD, codec.decode_app)
        self._instances = self._read_table(
            self._instances, hwm[2], lay.instance, codec.INSTANCE_COLD, codec.decode_instance
        )
        self._rebuild()
        self._tag = order[1]
        self._epoch = -1  # nodes may have come or gone: sort again
        got = self._read_hot(codec.WRITER_AT, patient=True)
        if got is not None:
            self._writer = (got[0], got[1])
        self._gen = gen

    def _read_table(
        self,
        prev: dict[int, tuple[int, R]],
        hwm: int,
        offset: _Offset,
        size: int,
        decode: _Decode[R],
    ) -> dict[int, tuple[int, R]]:
        mm = self._mm
        seq_of = _SEQ.unpack_from
        out: dict[int, tuple[int, R]] = {}
        for slot in range(hwm):
            at = offset(slot)
            old = prev.get(slot)
            if old is not None and seq_of(mm, at)[0] == old[0]:
                out[slot] = old  # unchanged since the last read
                continue
            for i in range(MAX_RETRIES + PATIENT_YIELDS):
                got = decode(mm[at : at + size])
                if got is not None:
                    if got[1] is not None:
                        out[slot] = (got[0], got[1])
                    break
                self.retries += 1
                if i >= MAX_RETRIES:
                    os.sched_yield()
            else:
                self.fallbacks += 1
                if old is not None:
                    out[slot] = old
        return out

    def _rebuild(self) -> None:
        lay = self._layout
        self._node_rows = {
            row.id: (row, lay.node(slot) + codec.NODE_HOT_AT)
            for slot, (_, row) in self._nodes.items()
        }
        self._app_rows = {row.name: row for _, row in self._apps.values()}
        self._app_slots = {row.name: slot for slot, (_, row) in self._apps.items()}
        self._hosts = {h: row.name for row in self._app_rows.values() for h in row.hosts}
        cands: dict[str, Candidate] = {}
        by_app: dict[str, list[Candidate]] = {}
        for slot, (_, row) in sorted(self._instances.items()):
            node = self._node_rows.get(row.node)
            node_at = node[1] if node else 0
            load_at = lay.instance(slot) + codec.INSTANCE_HOT_AT
            c = self._cands.get(row.id)
            if (
                c is None
                or c.index != slot
                or c.node_at != node_at
                or (c.app, c.node, c.address, c.soft_limit, c.hard_limit)
                != (row.app, row.node, row.address, row.soft_limit, row.hard_limit)
            ):
                fresh = Candidate(
                    row.id,
                    row.node,
                    False,
                    0,
                    row.soft_limit,
                    row.hard_limit,
                    -1,
                    address=row.address,
                    index=slot,
                    app=row.app,
                    node_up=False,
                    load_at=load_at,
                    node_at=node_at,
                )
                if c is not None and c.index == slot:  # last good values, if the read fails
                    fresh.load, fresh.load_time_us = c.load, c.load_time_us
                    fresh.publisher_epoch = c.publisher_epoch
                if c is not None and c.node_at == node_at:
                    fresh.rtt_us, fresh.jitter_us = c.rtt_us, c.jitter_us
                    fresh.loss_permille, fresh.node_up = c.loss_permille, c.node_up
                    fresh.last_heard_us = c.last_heard_us
                c = fresh
                self._reread_load(c, patient=True)
                if node_at:
                    self._reread_node(c, patient=True)
            c.local = row.node == self.local_node
            cands[row.id] = c
            by_app.setdefault(row.app, []).append(c)
        self._cands = cands
        self._by_app = by_app
        self._rebuild_groups(hwm=max((c.index for c in cands.values()), default=-1) + 1)

    def _rebuild_groups(self, hwm: int) -> None:
        """Number the groups as the writer does ((app, node) order, segments end to end)."""
        lay = self._layout
        members: dict[tuple[str, str], list[Candidate]] = {}
        by_slot: list[Candidate | None] = [None] * hwm
        for c in self._cands.values():
            by_slot[c.index] = c
        for slot in by_slot:
            if slot is not None:
                members.setdefault((slot.app, slot.node), []).append(slot)
        groups: dict[str, list[Group]] = {}
        start = 0
        for index, (app, node) in enumerate(sorted(members)):
            ms = members[app, node]
            g = Group(group_name(app, node), node, index, ms, lay.group(index), lay.entry(start))
            start += len(ms)
            for c in ms:
                c.group = index
            groups.setdefault(app, []).append(g)
        self._by_slot = by_slot
        self._groups = groups
        self._views = {}

    def _sort(self) -> None:
        """The RTT order epoch moved: read every node's order key, views are rebuilt."""
        got = self._read_hot(_ORDER_AT, patient=True)
        if got is None:
            return  # keep the views we have; the next pick tries again
        keys: dict[str, int] = {}
        for nid, (_, at) in self._node_rows.items():
            h = self._read_hot(at, patient=True)
            if h is not None:
                state = codec.node_state_from(*h)
                keys[nid] = codec.order_key(state.rtt_us, state.up)
            else:
                keys[nid] = self._node_keys.get(nid, codec.RTT_UNKNOWN)
        self._node_keys = keys
        self._views = {}
        self._epoch = got[0]

    # --- liveness and views -----------------------------------------------------------------
    def stale(self, now: float, max_age: float) -> tuple[bool, float]:
        """(stale, heartbeat age in seconds): stale when the writer's heartbeat is older than
        `max_age`, or was never written (age is then inf). Stale data is still served."""
        got = self._read_hot(codec.HEARTBEAT_AT, patient=True)
        if got is not None:
            self._heartbeat_us = got[0]
            self._store = (got[1], got[2])
        if not self._heartbeat_us:
            return True, float("inf")
        age = now - self._heartbeat_us / 1e6
        return age > max_age, age

    def store_health(self, now: float) -> tuple[str, float | None]:
        """(state, seconds since it changed) of the cluster store as the writer last said
        (read by the last `stale()` call): "none", "ok", "down" or "connecting"."""
        state, since_us = self._store
        name = codec.STORE_STATES[state] if 0 <= state < len(codec.STORE_STATES) else "unknown"
        return name, (now - since_us / 1e6) if since_us else None

    def writer(self) -> tuple[int, int]:
        """(pid, boot epoch) of the writer, as of the last topology read."""
        return self._writer

    def nodes(self) -> list[tuple[codec.NodeRow, codec.NodeState]]:
        """Every node with its hot state read now (slow path: status and dumps)."""
        self.app_for_host("")
        out = []
        for row, at in self._node_rows.values():
            got = self._read_hot(at, patient=True)
            state = codec.node_state_from(*got) if got else codec.NodeState(-1, 0, 0, False, 0)
            out.append((row, state))
        return out

    def apps(self) -> list[codec.AppRow]:
        """Every app row (slow path)."""
        self.app_for_host("")
        return list(self._app_rows.values())

    def instances(self) -> list[Candidate]:
        """Every instance with load and RTT read now (slow path: status and dumps)."""
        self.app_for_host("")
        out: list[Candidate] = []
        for app in list(self._by_app):
            out.extend(self.candidates(app))
        return out
