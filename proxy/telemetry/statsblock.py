"""A shared-memory mailbox that carries one worker's stats snapshot to the master.

Owns the memfd segment layout (header, seqlock, length, crc32) and the single-writer
publish / lock-free read protocol. It does not know what the bytes mean (see
proxy.telemetry.metrics) and must never be written on a per-request path: a worker publishes
about once a second from a timer.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from types import TracebackType

MAGIC = b"EPSTATS\x00"
LAYOUT_VERSION = 1
DEFAULT_SIZE = 64 * 1024

# magic[8] version:u32 size:u32 | seq:u64 length:u32 crc32:u32 | payload ...
_HEADER = struct.Struct("<8sII")
_SEQ = struct.Struct("<Q")
_META = struct.Struct("<II")
_SEQ_OFFSET = _HEADER.size  # 16, 8-byte aligned
_META_OFFSET = _SEQ_OFFSET + _SEQ.size  # 24
PAYLOAD_OFFSET = 64  # one cache line of header
_MIN_SIZE = PAYLOAD_OFFSET + 64
_READ_ATTEMPTS = 64


class StatsBlockError(Exception):
    """The segment cannot be used: wrong magic, layout version or size."""


class StatsBlock:
    """One shared segment between the master (reader) and one worker (the only writer).

    The master calls `create()`, passes `fd` to the worker with `pass_fds`, then may
    `release_fd()`; the worker calls `attach(fd)`. Writers bump `seq` to odd, write
    length, crc32 and payload, then bump it to even; a reader accepts a copy only if
    `seq` was even and unchanged around it and the crc32 matches, so a torn copy is
    never returned.
    """

    __slots__ = ("_fd", "_mm", "_seq", "size")

    def __init__(self, fd: int, mm: mmap.mmap, size: int) -> None:
        self._fd = fd
        self._mm = mm
        self.size = size
        self._seq = _SEQ.unpack_from(mm, _SEQ_OFFSET)[0]

    @classmethod
    def create(cls, size: int = DEFAULT_SIZE, name: str = "edgeproxy-stats") -> StatsBlock:
        """Master side: a fresh zeroed segment with its header written."""
        if size < _MIN_SIZE or size % mmap.PAGESIZE:
            raise ValueError(f"size must be a multiple of {mmap.PAGESIZE} >= {_MIN_SIZE}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        _HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, size)
        return cls(fd, mm, size)

    @classmethod
    def attach(cls, fd: int) -> StatsBlock:
        """Worker side: map the inherited `fd` (owned from now on); refuse a mismatch."""
        try:
            size = os.fstat(fd).st_size
            if size < _MIN_SIZE:
                raise StatsBlockError(f"stats block fd {fd}: {size} bytes is too small")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        magic, version, declared = _HEADER.unpack_from(mm, 0)
        problem = ""
        if magic != MAGIC:
            problem = f"bad magic {magic!r}"
        elif version != LAYOUT_VERSION:
            problem = f"layout version {version}, this code reads {LAYOUT_VERSION}"
        elif declared != size:
            problem = f"header says {declared} bytes, segment has {size}"
        if problem:
            mm.close()
            os.close(fd)
            raise StatsBlockError(f"stats block fd {fd}: {problem}")
        return cls(fd, mm, size)

    @property
    def fd(self) -> int:
        """The memfd to hand to the worker; -1 after `release_fd()`."""
        return self._fd

    @property
    def capacity(self) -> int:
        """The largest payload `publish()` accepts."""
        return self.size - PAYLOAD_OFFSET

    def release_fd(self) -> None:
        """Close the fd but keep the mapping (the master, once the worker has it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def publish(self, data: bytes) -> None:
        """Writer: replace the payload; ValueError if it does not fit."""
        n = len(data)
        if n > self.capacity:
            raise ValueError(f"snapshot of {n} bytes exceeds the block's {self.capacity}")
        mm = self._mm
        crc = zlib.crc32(data)
        seq = self._seq + 1 | 1  # odd: a write is in progress
        _SEQ.pack_into(mm, _SEQ_OFFSET, seq)
        _META.pack_into(mm, _META_OFFSET, n, crc)
        mm[PAYLOAD_OFFSET : PAYLOAD_OFFSET + n] = data
        self._seq = seq + 1
        _SEQ.pack_into(mm, _SEQ_OFFSET, self._seq)

    def read(self, attempts: int = _READ_ATTEMPTS) -> bytes | None:
        """Reader: the last complete payload, or None (never published, or always torn)."""
        mm = self._mm
        cap = self.capacity
        for _ in range(attempts):
            before = _SEQ.unpack_from(mm, _SEQ_OFFSET)[0]
            if before == 0:
                return None
            if before & 1:
                continue
            n, crc = _META.unpack_from(mm, _META_OFFSET)
            if n > cap:
                continue
            data = mm[PAYLOAD_OFFSET : PAYLOAD_OFFSET + n]
            if _SEQ.unpack_from(mm, _SEQ_OFFSET)[0] != before:
                continue
            if zlib.crc32(data) != crc:
                continue
            return data
        return None

    def sequence(self) -> int:
        """The current sequence number (even when idle); grows by 2 per publish."""
        value: int = _SEQ.unpack_from(self._mm, _SEQ_OFFSET)[0]
        return value

    def close(self) -> None:
        """Unmap and close the fd if still held; idempotent."""
        if not self._mm.closed:
            self._mm.close()
        self.release_fd()

    def __enter__(self) -> StatsBlock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
