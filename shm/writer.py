"""The single writer of a table segment (the pinger, or the master without one).

Owns seqlocked row writes (slots and id -> slot indexes: shm.slots), the
generation bump after topology changes, the heartbeat and takeover after a dead
writer, and what lets a reader pick without reading every instance: the groups'
order array and blocks (rewritten whole when instances come or go, patched in place
when a load changes class) and the RTT order epoch. It must never block readers, and
a failed write (TableFull, RowTooLargeError) must leave every row as it was.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from shm import codec
from shm.errors import LayoutMismatchError
from shm.groups import Group
from shm.layout import Layout
from shm.rtt_order import RttOrder
from shm.segment import Segment, fence
from shm.slots import Slots
from shm.summary import Summary, word

R = TypeVar("R")
_Encode = Callable[[int, R | None], bytes]
_Decode = Callable[[bytes], tuple[int, R | None] | None]
_Offset = Callable[[int], int]
_Key = Callable[[R], str]
_SEQ = struct.Struct("<Q")
_HOT_TAIL = struct.Struct("<qqqqQ")  # a hot block after its seq word


def _us(t: float) -> int:
    return int(t * 1_000_000)


def _holder_pid(mm: mmap.mmap) -> int:
    got = codec.decode_hot(mm, codec.WRITER_AT) if len(mm) >= codec.HEADER_SIZE else None
    return got[1] if got else 0


class TableWriter:
    """Writes nodes, apps and instances into a segment; one per segment, lock-enforced."""

    def __init__(self, seg: Segment, layout: Layout, fresh: bool) -> None:
        self._seg = seg
        self._mm = seg.mm
        self._layout = layout
        self._nodes: Slots[codec.NodeRow] = Slots("nodes", layout.max_nodes)
        self._apps: Slots[codec.AppRow] = Slots("apps", layout.max_apps)
        self._instances: Slots[codec.InstanceRow] = Slots("instances", layout.max_instances)
        self._hosts: dict[str, str] = {}
        self._defer = 0
        self._dirty = False
        self._groups: dict[tuple[str, str], Group] = {}  # (app, node) -> its members
        self._loads: dict[str, int] = {}  # instance id -> the load last written
        self._relayout = True  # the groups' membership changed: rewrite the order array
        self._rtt = RttOrder()
        self._epoch = 0  # the RTT order epoch
        self._tag = 0  # the group layout's number
        self._summaries: dict[str, Summary] = {}  # app -> its groups in walk order
        self._apps_on: dict[str, set[str]] = {}  # node -> apps with a group on it
        self._resummarize = True  # an order changed: write every app's summary again
        if fresh:
            self._gen = 0
            self.boot_epoch = 1
            self._init_fresh()
        else:
            self._gen = codec.decode_gen(self._mm) or 0
            prev = codec.decode_hot(self._mm, codec.WRITER_AT)
            self.boot_epoch = (prev[2] if prev else 0) + 1
            order = codec.decode_hot(self._mm, codec.ORDER_AT)
            if order is not None:  # go on from the dead writer's numbers: readers compare
                self._epoch, self._tag = order[1] + 1, order[2]
            self._adopt()
        self._write_hot(codec.WRITER_AT, os.getpid(), self.boot_epoch, 0, 0)
        self._bump()

    @classmethod
    def open(cls, layout: Layout, name: str) -> TableWriter:
        """Create the segment `name`, or take over an existing one of the same `layout`.

        WriterBusyError if a live writer holds it; LayoutMismatchError if it exists with another
        layout or size. A taken-over segment keeps its rows (readers go on serving them);
        the caller reconciles with put_*/remove_* and the boot epoch is bumped.
        """
        seg, fresh = Segment.open_writer(name, layout.total_size, _holder_pid)
        try:
            if not fresh:
                problem = codec.mismatch(codec.decode_static(seg.mm), layout.static())
                if problem is not None and codec.decode_static(seg.mm).magic != bytes(8):
                    raise _mismatch(name, problem)
                fresh = problem is not None  # never initialised: the creator died first
            return cls(seg, layout, fresh)
        except BaseException:
            seg.close()
            raise

    @property
    def name(self) -> str:
        return self._seg.name

    @property
    def generation(self) -> int:
        return self._gen

    def close(self, *, unlink: bool = False) -> None:
        """Release the writer lock; the segment stays for readers unless `unlink`."""
        if unlink:
            self._seg.unlink()
        self._seg.close()

    # --- topology (bumps the generation) ------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group topology changes under one generation bump (e.g. a full resync)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
            if not self._defer and self._dirty:
                self._bump()

    def put_node(self, row: codec.NodeRow) -> None:
        """Add or update a node (its RTT block is kept on update, zeroed on add)."""
        with self.batch():  # the summaries follow before readers see the new node
            self._put(
                slots=self._nodes,
                key=row.id,
                row=row,
                encode=codec.encode_node,
                offset=self._layout.node,
                hot_at=codec.NODE_HOT_AT,
            )
            if row.id not in self._rtt.keys:  # a zeroed RTT block: down, not measured
                self._rtt.set(row.id, codec.order_key(0, False))
                self._resummarize = True

    def remove_node(self, node_id: str) -> None:
        """Remove a node; KeyError if unknown."""
        with self.batch():  # the summaries follow before readers miss the node
            self._remove(self._nodes, node_id, codec.encode_node, self._layout.node)
            self._rtt.remove(node_id)
            self._resummarize = True

    def put_app(self, row: codec.AppRow) -> None:
        """Add or update an app; ValueError if one of its hosts belongs to another app."""
        for h in row.hosts:
            owner = self._hosts.get(h)
            if owner is not None and owner != row.name:
                raise ValueError(f"host {h!r} already belongs to app {owner!r}")
        self._resummarize = True  # written by the generation bump below
        self._put(
            slots=self._apps,
            key=row.name,
            row=row,
            encode=codec.encode_app,
            offset=self._layout.app,
            hot_at=None,
        )
        old = [h for h, a in self._hosts.items() if a == row.name]
        for h in old:
            del self._hosts[h]
        self._hosts.update(dict.fromkeys(row.hosts, row.name))

    def remove_app(self, name: str) -> None:
        """Remove an app (its instances stay until removed); KeyError if unknown."""
        if name not in self._apps.index:
            raise KeyError(name)
        self._resummarize = True  # written by the generation bump below
        self._remove(self._apps, name, codec.encode_app, self._layout.app)
        for h in [h for h, a in self._hosts.items() if a == name]:
            del self._hosts[h]

    def put_instance(self, row: codec.InstanceRow) -> None:
        """Add or update an instance (its load block is kept on update, zeroed on add)."""
        old = self._instances.rows.get(row.id)
        with self.batch():  # its group changes before the generation that shows it
            self._put(
                slots=self._instances,
                key=row.id,
                row=row,
                encode=codec.encode_instance,
                offset=self._layout.instance,
                hot_at=codec.INSTANCE_HOT_AT,
            )
            slot = self._instances.index[row.id]
            load = self._loads.setdefault(row.id, 0)
            key = codec.class_key(load, row.soft_limit, row.hard_limit)
            if old is None:
                self._join(row, slot, key)
            elif (old.app, old.node) != (row.app, row.node):
                self._leave(old, slot)
                self._join(row, slot, key)
            elif (old.soft_limit, old.hard_limit) != (row.soft_limit, row.hard_limit):
                self._rekey(self._groups[row.app, row.node], slot, key)

    def remove_instance(self, instance_id: str) -> None:
        """Remove an instance; KeyError if unknown."""
        row = self._instances.rows.get(instance_id)
        slot = self._instances.index.get(instance_id, -1)
        with self.batch():
            self._remove(self._instances, instance_id, codec.encode_instance, self._layout.instance)
            if row is not None:
                self._leave(row, slot)
                del self._loads[instance_id]

    def clear(self) -> None:
        """Remove every row (a new session: nothing from the last life is kept)."""
        with self.batch():
            for iid in list(self._instances.index):
                self.remove_instance(iid)
            for name in list(self._apps.index):
                self.remove_app(name)
            for nid in list(self._nodes.index):
                self.remove_node(nid)

    def nodes(self) -> dict[str, codec.NodeRow]:
        """The nodes this writer holds (a copy, for reconciliation)."""
        return dict(self._nodes.rows)

    def apps(self) -> dict[str, codec.AppRow]:
        """The apps this writer holds (a copy)."""
        return dict(self._apps.rows)

    def instances(self) -> dict[str, codec.InstanceRow]:
        """The instances this writer holds (a copy)."""
        return dict(self._instances.rows)

    # --- hot data (in place, no generation bump) ----------------------------------------
    def set_load(self, instance_id: str, load: int, load_time: float, publisher_epoch: int) -> None:
        """Publish an instance's load; KeyError if the instance is unknown."""
        slot = self._instances.index[instance_id]
        at = self._layout.instance(slot) + codec.INSTANCE_HOT_AT
        self._write_hot(at, load, _us(load_time), publisher_epoch, 0)
        if self._loads[instance_id] != load:
            self._loads[instance_id] = load
            row = self._instances.rows[instance_id]
            key = codec.class_key(load, row.soft_limit, row.hard_limit)
            self._rekey(self._groups[row.app, row.node], slot, key)

    def set_rtt(
        self,
        node_id: str,
        *,
        rtt_us: int,
        jitter_us: int,
        loss_permille: int,
        last_heard: float,
        up: bool,
    ) -> None:
        """Publish a node's RTT, jitter, loss and up/down; KeyError if the node is unknown."""
        at = self._layout.node(self._nodes.index[node_id]) + codec.NODE_HOT_AT
        state = codec.NodeState(rtt_us, jitter_us, loss_permille, up, _us(last_heard))
        self._write_hot(at, *codec.node_state_fields(state))
        if self._rtt.set(node_id, codec.order_key(rtt_us, up)):
            self._epoch += 1  # after the RTT: a reader that sees the epoch sees the RTT
            self._write_order()
            # only the apps with a group on this node have another order now
            self._write_summaries(self._apps_on.get(node_id, set()))

    def heartbeat(self, now: float, store_state: int = 0, store_since: float = 0.0) -> None:
        """Say the writer is alive at `now` (wall-clock seconds); call it periodically.

        `store_state` is the cluster store's health as the writer sees it (see
        codec.STORE_STATES) and `store_since` when it last changed (wall seconds).
        """
        self._write_hot(codec.HEARTBEAT_AT, _us(now), store_state, _us(store_since), 0)

    # --- groups ---------------------------------------------------------------------------
    def _join(self, row: codec.InstanceRow, slot: int, key: int) -> None:
        group = self._groups.get((row.app, row.node))
        if group is None:
            group = self._groups[row.app, row.node] = Group(row.app, row.node)
            self._apps_on.setdefault(row.node, set()).add(row.app)
        group.add(slot, key)
        self._relayout = True

    def _leave(self, row: codec.InstanceRow, slot: int) -> None:
        group = self._groups[row.app, row.node]
        group.remove(slot)
        if not len(group):
            del self._groups[row.app, row.node]
            self._apps_on[row.node].discard(row.app)
        self._relayout = True

    def _rekey(self, group: Group, slot: int, key: int) -> None:
        """An instance's class changed: patch its group's segment and block in place."""
        if group.key_of(slot) == key:
            return
        touched = group.move(slot, key)
        if self._relayout or group.index < 0:
            return  # the whole layout is rewritten before the next generation
        mm = self._mm
        pack = codec.ORDER_ENTRY.pack_into
        for p in touched:
            pack(mm, self._layout.entry(group.start + p), group.slots[p])
        self._write_group(group)

    def _write_group(self, group: Group, always: bool = False) -> None:
        """`group`'s block (when its counts changed, or `always`: a new layout), and what
        that changes in its app's summary."""
        counts = group.counts()
        old = group.published
        if counts == old and not always:
            return
        group.published = counts
        at = self._layout.group(group.index)
        self._write_hot(at, *codec.group_fields(self._tag, *counts))
        summary = self._summaries.get(group.app)
        if self._resummarize or summary is None or counts == old:
            return  # every summary is written again before the next generation
        was_low = old[1] > old[0] and old[2] == summary.low
        soft_moved, low_moved = summary.update(group, old, counts)
        slot = self._apps.index[group.app]
        at = self._layout.summary(slot)
        words = summary.words
        if soft_moved:
            w = group.rank // 64
            self._write_word(at + codec.HOT_SIZE + 8 * w, word(summary.soft, w))
        if low_moved:
            self._write_summary(slot, summary)
        elif group.counted and was_low != (counts[1] > counts[0] and counts[2] == summary.low):
            summary.at_low_bits ^= 1 << group.rank
            w = group.rank // 64
            self._write_word(at + codec.HOT_SIZE + 8 * (words + w), word(summary.at_low_bits, w))

    def _write_word(self, at: int, value: int) -> None:
        codec.SUMMARY_WORD.pack_into(self._mm, at, value)

    def _write_summaries(self, only: set[str] | None = None) -> None:
        """Apps' groups in walk order again: every app's (groups or apps changed), or the
        apps in `only` (RTTs crossed on a node they have groups on)."""
        words = codec.summary_words(self._layout.max_nodes)
        if only is not None:
            for app in only:
                slot = self._apps.index.get(app)
                old = self._summaries.get(app)
                if slot is not None and old is not None:
                    summary = Summary(old.groups, self._rtt.keys, words)
                    self._summaries[app] = summary
                    self._write_summary(slot, summary)
            return
        by_app: dict[str, list[Group]] = {}
        for group in self._groups.values():
            by_app.setdefault(group.app, []).append(group)
        self._summaries = {}
        for app, slot in self._apps.index.items():
            summary = Summary(by_app.get(app, []), self._rtt.keys, words)
            self._summaries[app] = summary
            self._write_summary(slot, summary)
        self._resummarize = False

    def _write_summary(self, slot: int, summary: Summary) -> None:
        """An app's whole summary: signature 0 first, so a reader of the old order stops
        trusting the bits before they change, the bits, then the signature."""
        at = self._layout.summary(slot)
        self._write_hot(at, 0, -1, 0, 0)
        summary.at_low_bits = summary.at_low()
        bits_at = at + codec.HOT_SIZE
        for w in range(summary.words):
            self._write_word(bits_at + 8 * w, word(summary.soft, w))
            self._write_word(bits_at + 8 * (summary.words + w), word(summary.at_low_bits, w))
        self._write_hot(at, summary.sig, summary.low, 0, 0)

    def _write_order(self) -> None:
        self._write_hot(codec.ORDER_AT, self._epoch, self._tag, 0, 0)

    def _write_layout(self) -> None:
        """Number the groups in (app, node) order, lay their segments end to end, and
        write the order array and every group block under a new layout tag."""
        self._tag += 1
        entries = array("I")
        groups = sorted(self._groups.items())
        for index, (_, group) in enumerate(groups):
            group.index = index
            group.start = len(entries)
            entries.extend(group.slots)
        if sys.byteorder != "little":
            entries.byteswap()
        at = self._layout.order_at
        self._mm[at : at + len(entries) * entries.itemsize] = entries.tobytes()
        self._resummarize = True
        for _, group in groups:
            self._write_group(group, always=True)
        self._write_order()
        self._relayout = False

    # --- internals ------------------------------------------------------------------------
    def _write_hot(self, at: int, a: int, b: int, c: int, d: int) -> None:
        mm = self._mm
        seq = (_SEQ.unpack_from(mm, at)[0] | 1) + 1
        tail = _HOT_TAIL.pack(a, b, c, d, codec.hot_check(seq, a, b, c, d))  # may raise first
        _SEQ.pack_into(mm, at, seq - 1)
        mm[at + 8 : at + codec.HOT_SIZE] = tail
        _SEQ.pack_into(mm, at, seq)

    def _write_cold(self, at: int, encoded: bytes) -> None:
        mm = self._mm
        seq = codec.cold_seq(encoded)
        _SEQ.pack_into(mm, at, seq - 1)
        mm[at + 8 : at + len(encoded)] = encoded[8:]
        _SEQ.pack_into(mm, at, seq)

    def _next_seq(self, at: int) -> int:
        return int((codec.cold_seq(self._mm, at) | 1) + 1)

    def _put(
        self,
        *,
        slots: Slots[R],
        key: str,
        row: R,
        encode: _Encode[R],
        offset: _Offset,
        hot_at: int | None,
    ) -> None:
        slot = slots.index.get(key)
        if slot is not None:
            at = offset(slot)
            self._write_cold(at, encode(self._next_seq(at), row))
        else:
            slot = slots.take()  # TableFull leaves everything as it was
            at = offset(slot)
            try:
                encoded = encode(self._next_seq(at), row)
            except BaseException:
                slots.give_back(slot)
                raise
            if hot_at is not None:
                self._write_hot(at + hot_at, 0, 0, 0, 0)
            self._write_cold(at, encoded)
            slots.index[key] = slot
            self._write_hwm()
        slots.rows[key] = row
        self._changed()

    def _remove(self, slots: Slots[R], key: str, encode: _Encode[R], offset: _Offset) -> None:
        slot = slots.index.pop(key)
        del slots.rows[key]
        at = offset(slot)
        self._write_cold(at, encode(self._next_seq(at), None))
        slots.give_back(slot)
        self._changed()

    def _write_hwm(self) -> None:
        self._write_hot(codec.HWM_AT, self._nodes.hwm, self._apps.hwm, self._instances.hwm, 0)

    def _changed(self) -> None:
        if self._defer:
            self._dirty = True
        else:
            self._bump()

    def _bump(self) -> None:
        if self._relayout:
            self._write_layout()
        if self._resummarize:
            self._write_summaries()
        fence()  # rows before the generation that announces them
        self._gen += 1
        self._mm[codec.GEN_AT : codec.GEN_AT + codec.GEN.size] = codec.encode_gen(self._gen)
        self._dirty = False

    def _init_fresh(self) -> None:
        mm = self._mm
        static = self._layout.static()
        blank = codec.Static(bytes(8), *[getattr(static, n) for n in codec.Static.__slots__[1:]])
        mm[0 : codec.STATIC.size] = codec.encode_static(blank)
        mm[codec.GEN_AT : codec.GEN_AT + codec.GEN.size] = codec.encode_gen(0)
        self._write_hwm()
        self._write_hot(codec.HEARTBEAT_AT, 0, 0, 0, 0)
        self._write_order()
        fence()
        mm[0:8] = codec.MAGIC  # last: a reader never sees a half-initialised table

    def _adopt(self) -> None:
        """Take over rows left by a dead writer; repair the ones it died writing."""
        mm = self._mm
        lay = self._layout
        hwm = codec.decode_hot(mm, codec.HWM_AT)
        # Died writing the hwm block: scan every slot (free ones decode as free).
        n_hwm, a_hwm, i_hwm = hwm[1:4] if hwm else (lay.max_nodes, lay.max_apps, lay.max_instances)
        self._adopt_table(
            slots=self._nodes,
            hwm=n_hwm,
            cold_size=codec.NODE_COLD,
            decode=codec.decode_node,
            encode=codec.encode_node,
            offset=lay.node,
            hot_at=codec.NODE_HOT_AT,
            key=lambda r: r.id,
        )
        self._adopt_table(
            slots=self._apps,
            hwm=a_hwm,
            cold_size=codec.APP_COLD,
            decode=codec.decode_app,
            encode=codec.encode_app,
            offset=lay.app,
            hot_at=None,
            key=lambda r: r.name,
        )
        self._adopt_table(
            slots=self._instances,
            hwm=i_hwm,
            cold_size=codec.INSTANCE_COLD,
            decode=codec.decode_instance,
            encode=codec.encode_instance,
            offset=lay.instance,
            hot_at=codec.INSTANCE_HOT_AT,
            key=lambda r: r.id,
        )
        for app in self._apps.rows.values():
            self._hosts.update(dict.fromkeys(app.hosts, app.name))
        for nid, slot in self._nodes.index.items():
            got = codec.decode_hot(mm, lay.node(slot) + codec.NODE_HOT_AT)
            state = codec.node_state_from(*got[1:]) if got else codec.NodeState(0, 0, 0, False, 0)
            self._rtt.set(nid, codec.order_key(state.rtt_us, state.up))
        for iid, row in self._instances.rows.items():
            slot = self._instances.index[iid]
            got = codec.decode_hot(mm, lay.instance(slot) + codec.INSTANCE_HOT_AT)
            load = got[1] if got else 0
            self._loads[iid] = load
            self._join(row, slot, codec.class_key(load, row.soft_limit, row.hard_limit))
        self._write_hwm()
        if codec.decode_hot(mm, codec.HEARTBEAT_AT) is None:
            self._write_hot(codec.HEARTBEAT_AT, 0, 0, 0, 0)

    def _adopt_table(
        self,
        *,
        slots: Slots[R],
        hwm: int,
        cold_size: int,
        decode: _Decode[R],
        encode: _Encode[R],
        offset: _Offset,
        hot_at: int | None,
        key: _Key[R],
    ) -> None:
        mm = self._mm
        torn, kept = slots.adopt(
            hwm, lambda slot: decode(mm[offset(slot) : offset(slot) + cold_size]), key
        )
        for slot in torn:  # torn by the dead writer: make it a valid free row
            at = offset(slot)
            self._write_cold(at, encode(self._next_seq(at), None))
        if hot_at is not None:
            for slot in kept:
                at = offset(slot) + hot_at
                if codec.decode_hot(mm, at) is None:
                    self._write_hot(at, 0, 0, 0, 0)


def _mismatch(name: str, problem: str) -> Exception:
    return LayoutMismatchError(f"shared-memory segment {name}: {problem}")
