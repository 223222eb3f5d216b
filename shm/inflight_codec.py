"""Byte layout of the in-flight counter segment: header, slot directory, cells.

Owns INFLIGHT_VERSION, the header fields, the directory entry codec (instance id
per local slot, CRC-guarded like table rows) and the cell index arithmetic
(cell index = slot * max_workers + worker, so one instance's cells are
contiguous). Pure: no mmap, no processes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from shm import codec
from shm.errors import RowTooLargeError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

INFLIGHT_VERSION: Final = 1
INFLIGHT_MAGIC: Final = b"EPXINFL\x00"
INFLIGHT_HEADER: Final = 128

# 0 magic | 8 version | 12 header size | 16 total size | 24 max workers | 28 max local
# 32 directory offset | 36 cells offset | 40 master block (pid, boot epoch) | 88 generation
ISTATIC: Final = struct.Struct("<8sIIQIIII")
MASTER_AT: Final = 40
IGEN_AT: Final = 88

DIR_BODY: Final = struct.Struct(f"<{codec.ID_BYTES}s")
DIR_ENTRY: Final = codec.encode_cold(DIR_BODY, 0, False, (b"",)).__len__()


def inflight_segment_name(base: str) -> str:
    """POSIX shm name of the in-flight counters: "/<base>-inflight.v<INFLIGHT_VERSION>"."""
    return f"/{base.lstrip('/')}-inflight.v{INFLIGHT_VERSION}"


@dataclass(frozen=True, slots=True)
class InflightLayout:
    """Offsets of the directory and the cells for these dimensions."""

    max_workers: int
    max_local: int

    def __post_init__(self) -> None:
        if not 0 < self.max_workers <= 4096 or not 0 < self.max_local <= 1 << 20:
            raise ValueError(
                f"max_workers must be 1..4096 and max_local_instances 1..2**20, "
                f"not {self.max_workers} and {self.max_local}"
            )

    @property
    def dir_at(self) -> int:
        return INFLIGHT_HEADER

    @property
    def cells_at(self) -> int:
        return (self.dir_at + self.max_local * DIR_ENTRY + 63) // 64 * 64

    @property
    def total_size(self) -> int:
        end = self.cells_at + self.max_local * self.max_workers * 8
        return (end + 4095) // 4096 * 4096

    def entry(self, slot: int) -> int:
        """Offset of directory entry `slot`."""
        return self.dir_at + slot * DIR_ENTRY

    def cell(self, slot: int, worker: int) -> int:
        """Index (in int64 units from cells_at) of the cell of (slot, worker)."""
        return slot * self.max_workers + worker

    def static(self) -> bytes:
        """The static header this layout carries."""
        return ISTATIC.pack(
            INFLIGHT_MAGIC,
            INFLIGHT_VERSION,
            INFLIGHT_HEADER,
            self.total_size,
            self.max_workers,
            self.max_local,
            self.dir_at,
            self.cells_at,
        )


def decode_istatic(buf: ReadableBuffer) -> tuple[bytes, int, int, int, int, int]:
    """(magic, version, header size, total size, max workers, max local) of a header."""
    magic, version, hsize, total, workers, local, _, _ = ISTATIC.unpack_from(buf, 0)
    return magic, version, hsize, total, workers, local


def encode_entry(seq: int, instance_id: str | None) -> bytes:
    """A directory entry: the instance holding the slot, or None when free."""
    if instance_id is None:
        return codec.encode_cold(DIR_BODY, seq, False, (b"",))
    raw = instance_id.encode("utf-8")
    if not raw or len(raw) > codec.ID_BYTES or b"\0" in raw:
        raise RowTooLargeError(f"instance id {instance_id!r} does not fit a slot entry")
    return codec.encode_cold(DIR_BODY, seq, True, (raw,))


def decode_entry(buf: bytes) -> tuple[int, str | None] | None:
    """(seq, instance id or None when free), or None when torn."""
    got = codec.decode_cold(DIR_BODY, buf)
    if got is None:
        return None
    seq, used, (raw,) = got
    assert isinstance(raw, bytes)
    return seq, raw.rstrip(b"\0").decode("utf-8", "replace") if used else None
