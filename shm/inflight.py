"""In-flight request counters shared by the proxy master and its workers.

Owns the counter segment's shell: the master's InflightWriter (creates it,
assigns local instance slots, clears a dead worker's column) and the workers'
InflightCells (inc/dec of their own cells, totals over all workers). Each cell
has exactly one writer process; nothing here locks on the request path.
"""

from __future__ import annotations

import collections
import mmap
import os
import struct
from collections.abc import Iterable

from shm import codec
from shm.errors import LayoutMismatchError, SegmentMissingError, TableFull
from shm.inflight_codec import (
    DIR_ENTRY,
    IGEN_AT,
    INFLIGHT_MAGIC,
    INFLIGHT_VERSION,
    MASTER_AT,
    InflightLayout,
    decode_entry,
    decode_istatic,
    encode_entry,
)
from shm.segment import Segment, fence

_SEQ = struct.Struct("<Q")
_RETRIES = 16


def _holder_pid(mm: mmap.mmap) -> int:
    got = codec.decode_hot(mm, MASTER_AT) if len(mm) >= MASTER_AT + codec.HOT_SIZE else None
    return got[1] if got else 0


class InflightSegment:
    """A mapped counter segment with the slot directory cached by its generation."""

    def __init__(self, seg: Segment, layout: InflightLayout) -> None:
        self._seg = seg
        self.name = seg.name
        self.layout = layout
        self.max_workers = layout.max_workers
        self.max_local_instances = layout.max_local
        self.mm = seg.mm
        end = layout.cells_at + layout.max_local * layout.max_workers * 8
        self.cells = memoryview(seg.mm)[layout.cells_at : end].cast("q")
        self._column = struct.Struct(f"<{layout.max_workers}q")
        self._gen = -1
        self._slots: dict[str, int] = {}
        self._ids: dict[int, str] = {}

    @classmethod
    def attach(
        cls, name: str, max_workers: int | None = None, max_local_instances: int | None = None
    ) -> InflightSegment:
        """Map an existing counter segment read-write (workers not forked by the master).

        Dimensions default to the header's; when given they must match it.
        """
        seg = Segment.attach(name, writable=True)
        try:
            magic, version, _, total, workers, local = decode_istatic(seg.mm)
            if magic == bytes(8):
                raise SegmentMissingError(f"in-flight segment {name} is not initialised yet")
            if magic != INFLIGHT_MAGIC or version != INFLIGHT_VERSION:
                raise LayoutMismatchError(
                    f"in-flight segment {name}: magic {magic!r} version {version}, this code "
                    f"reads {INFLIGHT_MAGIC!r} version {INFLIGHT_VERSION}"
                )
            layout = InflightLayout(workers, local)
            want = (max_workers or workers, max_local_instances or local, layout.total_size)
            if (workers, local, total) != want or seg.size != total:
                raise LayoutMismatchError(
                    f"in-flight segment {name}: {workers} workers x {local} instances "
                    f"({seg.size} bytes), expected {want[0]} x {want[1]} ({want[2]} bytes)"
                )
        except BaseException:
            seg.close()
            raise
        return cls(seg, layout)

    def close(self) -> None:
        """Release the cell view and unmap."""
        self.cells.release()
        self._seg.close()

    def slots(self) -> dict[str, int]:
        """instance id -> local slot, re-read only when the directory generation moved."""
        gen = codec.decode_gen(self.mm, IGEN_AT)
        if gen is not None and gen != self._gen:
            fence()
            slots: dict[str, int] = {}
            for slot in range(self.layout.max_local):
                at = self.layout.entry(slot)
                for _ in range(_RETRIES):
                    got = decode_entry(self.mm[at : at + DIR_ENTRY])
                    if got is not None:
                        if got[1] is not None:
                            slots[got[1]] = slot
                        break
                else:
                    old = self._ids.get(slot)
                    if old is not None:  # writer mid-update: keep what we had
                        slots[old] = slot
            self._slots = slots
            self._ids = {s: i for i, s in slots.items()}
            self._gen = gen
        return self._slots

    def slot_of(self, instance_id: str) -> int | None:
        """The local slot of `instance_id`, or None if the master assigned none."""
        return self.slots().get(instance_id)

    def total(self, slot: int) -> int:
        """In-flight requests on `slot`, summed over every worker's cell."""
        at = self.layout.cells_at + slot * self.max_workers * 8
        return sum(self._column.unpack_from(self.mm, at))

    def totals(self) -> dict[str, int]:
        """instance id -> in-flight requests over all workers (status, pinger)."""
        return {iid: self.total(slot) for iid, slot in self.slots().items()}


_HEAD = struct.Struct("<4q")  # the first cells of a column, where live workers usually are
_HEAD_BYTES = _HEAD.size


class InflightCells:
    """One worker's cells: it is the only process that writes them."""

    __slots__ = (
        "_cells",
        "_column",
        "_idx",
        "_mm",
        "_seg",
        "_size",
        "_starts",
        "_zero_tail",
        "cell_index",
    )

    def __init__(self, segment: InflightSegment, cell_index: int) -> None:
        if not 0 <= cell_index < segment.max_workers:
            raise ValueError(f"cell index {cell_index} not in 0..{segment.max_workers - 1}")
        self._seg = segment
        self.cell_index = cell_index
        self._cells = segment.cells
        self._mm = segment.mm
        self._column = segment._column
        lay = segment.layout
        self._idx = [lay.cell(s, cell_index) for s in range(lay.max_local)]
        self._starts = [lay.cells_at + s * lay.max_workers * 8 for s in range(lay.max_local)]
        self._size = lay.max_workers * 8
        self._zero_tail = bytes(max(0, self._size - _HEAD_BYTES))

    def inc(self, slot: int) -> None:
        """One more request in flight on `slot` (this worker's cell)."""
        self._cells[self._idx[slot]] += 1

    def dec(self, slot: int) -> None:
        """One request on `slot` finished."""
        self._cells[self._idx[slot]] -= 1

    def mine(self, slot: int) -> int:
        """This worker's own count on `slot`."""
        return self._cells[self._idx[slot]]

    def total(self, slot: int) -> int:
        """In-flight requests on `slot` over all workers (the hard-limit check)."""
        # Live workers usually hold the low cells: when the rest of the column is all
        # zero bytes (one compare), only the first few are unpacked.
        at = self._starts[slot]
        mm = self._mm
        if self._size > _HEAD_BYTES and mm[at + _HEAD_BYTES : at + self._size] == self._zero_tail:
            return sum(_HEAD.unpack_from(mm, at))
        return sum(self._column.unpack_from(mm, at))

    def slot_of(self, instance_id: str) -> int | None:
        """The local slot of `instance_id` (directory cached by generation)."""
        return self._seg.slot_of(instance_id)


class InflightWriter:
    """The master's side: creates the segment, owns the slot directory."""

    def __init__(self, seg: Segment, layout: InflightLayout, fresh: bool) -> None:
        self._seg = seg
        self._mm = seg.mm
        self._layout = layout
        self._slots: dict[str, int] = {}
        self._free: collections.deque[int] = collections.deque()
        mm = seg.mm
        if fresh:
            mm[0 : len(layout.static())] = bytes(8) + layout.static()[8:]
            self._gen = 0
            epoch = 1
        else:
            prev = codec.decode_hot(mm, MASTER_AT)
            epoch = (prev[2] if prev else 0) + 1
            self._gen = codec.decode_gen(mm, IGEN_AT) or 0
            for slot in range(layout.max_local):
                at = layout.entry(slot)
                got = decode_entry(mm[at : at + DIR_ENTRY])
                if got is not None and got[1] is not None and got[1] not in self._slots:
                    self._slots[got[1]] = slot
                elif got is None or got[1] is not None:  # torn or duplicate: make it free
                    self._write_entry(slot, None)
        used = set(self._slots.values())
        self._free.extend(s for s in range(layout.max_local) if s not in used)
        self.boot_epoch = epoch
        seq = (_SEQ.unpack_from(mm, MASTER_AT)[0] | 1) + 1
        mm[MASTER_AT : MASTER_AT + codec.HOT_SIZE] = codec.encode_hot(seq, os.getpid(), epoch, 0, 0)
        self._bump()
        if fresh:
            fence()
            mm[0:8] = INFLIGHT_MAGIC
        self.segment = InflightSegment(seg, layout)

    @classmethod
    def create(
        cls, name: str, max_workers: int = 64, max_local_instances: int = 256
    ) -> InflightWriter:
        """Create the counter segment, or take over one a dead master left (cells and
        slots kept: old workers may still be draining). WriterBusyError if a live master
        holds it, LayoutMismatchError if it exists with other dimensions."""
        layout = InflightLayout(max_workers, max_local_instances)
        seg, fresh = Segment.open_writer(name, layout.total_size, _holder_pid)
        try:
            if not fresh:
                found = decode_istatic(seg.mm)
                want = decode_istatic(layout.static())
                if found[0] == bytes(8):
                    fresh = True
                elif found != want:
                    raise LayoutMismatchError(
                        f"in-flight segment {name}: header {found[:2]} {found[3:]}, "
                        f"this master needs {want[:2]} {want[3:]}"
                    )
            return cls(seg, layout, fresh)
        except BaseException:
            seg.close()
            raise

    def close(self, *, unlink: bool = False) -> None:
        """Release the lock and unmap; the segment stays unless `unlink`."""
        if unlink:
            self._seg.unlink()
        self.segment.close()

    def assign_instances(self, ids: Iterable[str]) -> dict[str, int]:
        """Give every id a slot: ids that stay keep theirs, removed ids free theirs.

        A freed slot is reused last (FIFO), so workers still finishing requests on it
        have time to drain; its cells are not zeroed. TableFull if the ids do not fit.
        """
        wanted = list(dict.fromkeys(ids))
        keep = set(wanted)
        new = [i for i in wanted if i not in self._slots]
        gone = [i for i in self._slots if i not in keep]
        if len(new) > len(self._free) + len(gone):
            raise TableFull("local instances", self._layout.max_local)
        for iid in new:
            encode_entry(0, iid)  # RowTooLargeError before anything changes
        for iid in gone:
            slot = self._slots.pop(iid)
            self._write_entry(slot, None)
            self._free.append(slot)
        for iid in new:
            slot = self._free.popleft()
            self._write_entry(slot, iid)
            self._slots[iid] = slot
        if new or gone:
            self._bump()
        return dict(self._slots)

    def slots(self) -> dict[str, int]:
        """instance id -> slot (a copy)."""
        return dict(self._slots)

    def clear_worker(self, cell_index: int) -> None:
        """Zero a dead worker's column before its cell index is given to a new worker."""
        lay = self._layout
        if not 0 <= cell_index < lay.max_workers:
            raise ValueError(f"cell index {cell_index} not in 0..{lay.max_workers - 1}")
        cells = self.segment.cells
        for slot in range(lay.max_local):
            cells[lay.cell(slot, cell_index)] = 0

    def totals(self) -> dict[str, int]:
        """instance id -> in-flight requests over all workers."""
        return {iid: self.segment.total(slot) for iid, slot in self._slots.items()}

    def _write_entry(self, slot: int, instance_id: str | None) -> None:
        mm = self._mm
        at = self._layout.entry(slot)
        seq = (_SEQ.unpack_from(mm, at)[0] | 1) + 1
        encoded = encode_entry(seq, instance_id)
        _SEQ.pack_into(mm, at, seq - 1)
        mm[at + 8 : at + len(encoded)] = encoded[8:]
        _SEQ.pack_into(mm, at, seq)

    def _bump(self) -> None:
        fence()
        self._gen += 1
        self._mm[IGEN_AT : IGEN_AT + codec.GEN.size] = codec.encode_gen(self._gen)
