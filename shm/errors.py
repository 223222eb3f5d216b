"""Errors raised by the shared-memory tables.

Owns the exception types and their messages; every message names the segment
and says what the caller can do. It must not import anything from the shells.
"""

from __future__ import annotations


class ShmError(Exception):
    """Base class of every shared-memory table error."""


class SegmentMissingError(ShmError):
    """The named segment does not exist (yet): the writer has not created it."""


class LayoutMismatchError(ShmError):
    """The segment exists but its header is not what this code expects.

    Not retryable by the same code: the writer and the reader disagree on the
    layout (version, capacities) and one of them must be upgraded or reconfigured.
    """


class WriterBusyError(ShmError):
    """Another live process holds the writer lock of the segment."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"shared-memory table {name} is already held by a writer ({who})")


class SegmentTrustError(ShmError):
    """The segment exists but someone we do not trust could have written it.

    A segment must be owned by our effective uid (a reader also accepts root) and grant
    nothing beyond the owner's read-write and the group's read; anything else means a
    local user could forge rows or counters. Not retryable until the operator removes it.
    """

    def __init__(self, name: str, uid: int, mode: int, why: str) -> None:
        self.name = name
        self.uid = uid
        self.mode = mode
        super().__init__(
            f"shared-memory segment {name} is owned by uid {uid} with mode {mode:04o}: {why}; "
            f"refusing to use it (remove /dev/shm{name} if it is not ours)"
        )


class TableFull(ShmError):  # noqa: N818  (the name the writer's callers catch)
    """A table has no free row; the row was not written and nothing else changed."""

    def __init__(self, table: str, capacity: int) -> None:
        self.table = table
        self.capacity = capacity
        super().__init__(f"{table} table is full ({capacity} rows); raise table.max_{table}")


class RowTooLargeError(ShmError, ValueError):
    """A field does not fit its fixed-size slot in the row."""
