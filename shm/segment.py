"""The mmap shell of a POSIX shared-memory segment: open, map, lock, unlink.

Owns the file descriptor, the mapping, the writer lock (flock on the shm fd,
closed in forked children so only the writer process ever holds it), the file
mode and the trust check (owner and mode, by fstat, on every open). It knows
nothing about rows; the table and in-flight shells build on it. It must not be
used on the request path (all of it is setup).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Callable

import posix_ipc

from shm.errors import (
    LayoutMismatchError,
    SegmentMissingError,
    SegmentTrustError,
    WriterBusyError,
)

MODE = 0o640
# Group and other bits beyond MODE's: write for anyone but the owner lets a local user
# forge rows or counters, so a segment that grants any of them is refused.
_UNTRUSTED_BITS = 0o077 & ~MODE

# Lock fds of writers in this process: a forked child closes its copies at once, so a
# child (a forked proxy worker, say) never keeps a dead writer's lock alive.
_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)

_FENCE = threading.Lock()


def fence() -> None:
    """Order earlier loads/stores before later ones (Python has no barrier primitive).

    An uncontended lock acquire/release is an atomic read-modify-write in C, a full
    barrier on x86 and acquire+release on arm64. Used where a writer publishes the
    generation after rows, and where a reader reads rows after the generation.
    """
    _FENCE.acquire()
    _FENCE.release()


class Segment:
    """One mapped segment: `mm` is the whole segment, `size` its length in bytes."""

    def __init__(self, name: str, mm: mmap.mmap, fd: int | None, writable: bool) -> None:
        self.name = name
        self.mm = mm
        self.size = len(mm)
        self.writable = writable
        self._fd = fd

    @classmethod
    def attach(cls, name: str, *, writable: bool = False) -> Segment:
        """Map an existing segment (readers). SegmentMissingError if it does not exist yet."""
        try:
            shm = posix_ipc.SharedMemory(name, flags=0, read_only=not writable)
        except posix_ipc.ExistentialError:
            raise SegmentMissingError(
                f"shared-memory segment {name} does not exist (yet)"
            ) from None
        try:
            size = check_trusted(name, shm.fd, writer=False).st_size
            if size == 0:
                raise SegmentMissingError(f"shared-memory segment {name} is not initialised yet")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            shm.close_fd()
        return cls(name, mm, None, writable)

    @classmethod
    def open_writer(
        cls, name: str, size: int, holder_pid: Callable[[mmap.mmap], int]
    ) -> tuple[Segment, bool]:
        """Create or open `name` and take its exclusive writer lock.

        Returns (segment, fresh): fresh means the segment was empty (new, or a writer died
        before sizing it) and has now been sized to `size`, all zeros. An existing segment of
        another size raises LayoutMismatchError. A held lock raises WriterBusyError naming
        the pid that `holder_pid` reads from the mapped header.
        """
        shm = _create_or_open(name)
        # The lock lives on its own open file description: mmap() dups the fd it maps,
        # and a dup (kept by the mapping, inherited by forks) would hold the lock too.
        fd: int = posix_ipc.SharedMemory(name, flags=0).fd
        try:
            st = check_trusted(name, fd, writer=True)
            if st.st_ino != os.fstat(shm.fd).st_ino:
                raise WriterBusyError(name, 0)  # unlinked and recreated under us
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise WriterBusyError(name, _peek_pid(fd, holder_pid)) from None
            current = os.fstat(fd).st_size
            fresh = current == 0
            if fresh:
                os.ftruncate(fd, size)
            elif current != size:
                raise LayoutMismatchError(
                    f"shared-memory segment {name} is {current} bytes, this config needs "
                    f"{size}: stop its readers and unlink it (or use the old config)"
                )
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=prot)
        except BaseException:
            os.close(fd)
            raise
        finally:
            shm.close_fd()
        _LOCK_FDS.add(fd)
        return cls(name, mm, fd, True), fresh

    def close(self) -> None:
        """Unmap and close; a writer's lock is released with its fd."""
        if self._fd is not None:
            _LOCK_FDS.discard(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(BufferError):  # a caller still holds a memoryview
            self.mm.close()

    def unlink(self) -> None:
        """Remove the name; processes that mapped it keep their mapping."""
        unlink(self.name)


def unlink(name: str) -> bool:
    """Remove a segment name; False if it did not exist."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


# Owners a reader in this process trusts besides itself and root: the operator's CLI adds
# the uid of the running master it asked over its (credential-checked) control socket.
_READER_OWNERS: set[int] = set()


def trust_owner(uid: int) -> None:
    """Let this process's readers accept segments owned by `uid` (never its writers)."""
    _READER_OWNERS.add(uid)


def check_trusted(name: str, fd: int, *, writer: bool) -> os.stat_result:
    """fstat `fd` and refuse a segment another local user could have written.

    The owner must be our effective uid (a reader also accepts root, who can write
    anything anyway) and the mode must grant group/other nothing beyond MODE (group
    read). SegmentTrustError names the segment, its owner and mode.
    """
    st = os.fstat(fd)
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != me and (writer or (st.st_uid != 0 and st.st_uid not in _READER_OWNERS)):
        who = "our uid" if writer else "our uid or root"
        raise SegmentTrustError(name, st.st_uid, mode, f"expected {who} ({me})")
    if mode & _UNTRUSTED_BITS:
        raise SegmentTrustError(name, st.st_uid, mode, f"grants more than {MODE:04o}")
    return st


def _create_or_open(name: str) -> posix_ipc.SharedMemory:
    """Create `name` exclusively (O_EXCL), or open the one that exists.

    An existing segment is only taken over after `check_trusted` (by the caller) shows it
    is ours: a dead writer's segment keeps its rows and counts for readers and draining
    workers, so it is adopted, not unlinked. Whoever created it first owns the inode, so
    a segment a local user planted under our name fails that check and is refused.
    """
    for _ in range(3):  # it may vanish between the two calls (unlinked by its owner)
        try:
            return posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=MODE)
        except posix_ipc.ExistentialError:
            pass
        try:
            return posix_ipc.SharedMemory(name, flags=0)
        except posix_ipc.ExistentialError:
            continue
    raise WriterBusyError(name, 0)


def _peek_pid(fd: int, holder_pid: Callable[[mmap.mmap], int]) -> int:
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
            return holder_pid(mm)
    except (OSError, ValueError):
        return 0
