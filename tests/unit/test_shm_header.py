"""Segment header, names, attach checks and the pinned layout version."""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator

import posix_ipc
import pytest

from shm import codec, inflight_codec, segment
from shm.errors import LayoutMismatchError, SegmentMissingError
from shm.layout import Layout, table_segment_name
from shm.reader import TableReader
from shm.writer import TableWriter

_COUNTER = itertools.count()


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    n = f"/ept-hdr-{os.getpid()}-{next(_COUNTER)}"
    yield n
    segment.unlink(n)


def cfg(nodes: int = 4, apps: int = 4, instances: int = 8) -> Layout:
    return Layout(nodes, apps, instances)


def test_layout_version_and_row_sizes_are_pinned() -> None:
    """Changing any row layout must come with a LAYOUT_VERSION bump (update this test then)."""
    assert codec.LAYOUT_VERSION == 2
    assert codec.MAGIC == b"EPXTABL\x00"
    assert codec.HEADER_SIZE == 256
    assert (codec.NODE_COLD, codec.NODE_ROW) == (224, 320)
    assert (codec.APP_COLD, codec.APP_ROW) == (1152, 1152)
    assert (codec.INSTANCE_COLD, codec.INSTANCE_ROW) == (328, 384)
    assert codec.HOT_SIZE == 48
    assert (codec.NODE_HOT_AT, codec.INSTANCE_HOT_AT) == (224, 328)
    assert codec.STATIC.size == 48
    assert (codec.WRITER_AT, codec.HEARTBEAT_AT, codec.GEN_AT, codec.HWM_AT) == (48, 96, 144, 160)
    assert codec.ORDER_AT + codec.HOT_SIZE == codec.HEADER_SIZE == 256
    assert codec.ORDER_ENTRY.size == 4
    lay = Layout(1024, 1024, 16384)
    assert (lay.groups_at, lay.order_at, lay.summaries_at) == (7_799_040, 8_585_472, 8_651_008)
    assert codec.summary_words(1024) == 17 and codec.summary_size(1024) == 320
    assert lay.total_size == 8_982_528
    assert inflight_codec.INFLIGHT_VERSION == 1
    assert inflight_codec.DIR_ENTRY == 88
    assert inflight_codec.InflightLayout(64, 256).total_size == 155_648


def test_segment_names_carry_the_layout_version() -> None:
    """Old and new code use different names, so both can run during an upgrade."""
    assert table_segment_name("edgeproxy-nrt1") == "/edgeproxy-nrt1.v2"
    assert inflight_codec.inflight_segment_name("edgeproxy-nrt1") == "/edgeproxy-nrt1-inflight.v1"


def test_segment_mode_is_0640_or_stricter(name: str) -> None:
    """The writer creates the segment readable by owner and group only."""
    w = TableWriter.open(cfg(), name)
    try:
        mode = stat.S_IMODE(os.stat("/dev/shm" + name).st_mode)
        assert mode & ~0o640 == 0
    finally:
        w.close()


def test_missing_segment_is_a_clear_retryable_error(name: str) -> None:
    """Attaching before the writer created the segment raises SegmentMissingError."""
    with pytest.raises(SegmentMissingError, match="does not exist"):
        TableReader.attach(cfg(), name)


def test_uninitialised_segment_is_missing_not_mismatched(name: str) -> None:
    """A segment whose magic is still zero (writer mid-create) counts as missing."""
    shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.close_fd()
    with pytest.raises(SegmentMissingError, match="not initialised"):
        TableReader.attach(cfg(), name)


def _corrupt(name: str, offset: int, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(name)
    os.pwrite(shm.fd, data, offset)
    shm.close_fd()


def test_wrong_magic_is_refused(name: str) -> None:
    """A segment that is not an edgeproxy table is refused by name, for readers and writers."""
    TableWriter.open(cfg(), name).close()
    _corrupt(name, 0, b"NOTOURS!")
    with pytest.raises(LayoutMismatchError, match="bad magic"):
        TableReader.attach(cfg(), name)
    with pytest.raises(LayoutMismatchError, match="bad magic"):
        TableWriter.open(cfg(), name)


def test_wrong_version_is_refused(name: str) -> None:
    """A segment of another layout version is refused with both versions named."""
    TableWriter.open(cfg(), name).close()
    _corrupt(name, 8, (codec.LAYOUT_VERSION + 1).to_bytes(4, "little"))
    with pytest.raises(LayoutMismatchError, match="layout version 3, this code reads version 2"):
        TableReader.attach(cfg(), name)


def test_wrong_capacity_or_size_is_refused(name: str) -> None:
    """A reader configured for other capacities refuses; so does a writer (size differs)."""
    TableWriter.open(cfg(instances=8), name).close()
    with pytest.raises(LayoutMismatchError, match=r"total_size|max_instances"):
        TableReader.attach(cfg(instances=4096), name)
    with pytest.raises(LayoutMismatchError, match="bytes, this config needs"):
        TableWriter.open(cfg(instances=4096), name)
    r = TableReader.attach(cfg(instances=8), name)
    r.close()
