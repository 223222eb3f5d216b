"""Row and header codec of the shared-memory table: bytes in, records out.

Owns the byte layout of every row kind (cold topology rows guarded by a
seqlock word and a CRC-32, hot load/RTT blocks guarded by a seqlock word and a
multiplicative check), the segment header and LAYOUT_VERSION. Pure functions
only: no mmap, no clock, no process state.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from shm.errors import RowTooLargeError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# Bump on ANY change of the bytes below; tests/unit/test_shm_header.py pins it with the
# row sizes, so an accidental change fails. The version is part of the segment name.
LAYOUT_VERSION: Final = 2
# Cluster store health, carried in the heartbeat block's spare fields (no layout change).
STORE_NONE, STORE_OK, STORE_DOWN, STORE_CONNECTING = range(4)
STORE_STATES: Final = ("none", "ok", "down", "connecting")
MAGIC: Final = b"EPXTABL\x00"
HEADER_SIZE: Final = 256

ID_BYTES: Final = 64
REGION_BYTES: Final = 32
ADDRESS_BYTES: Final = 96
STRATEGY_BYTES: Final = 16
HOSTS_BYTES: Final = 1024

# The CRC-32 of a message followed by its own little-endian CRC is this constant.
CRC_RESIDUE: Final = 0x2144DF1C
_M64: Final = 0xFFFFFFFFFFFFFFFF

# --- hot blocks: seq, four int64 fields, check -------------------------------------------
# Used for instance load, node RTT and the header's writer/heartbeat/high-water blocks.
# The check mixes the seq and every field with odd 64-bit multipliers (a bijection per
# field), so a read that mixes old and new bytes of any single field never matches, and
# a read mixing several fields matches with probability ~2**-64. Readers inline the same
# expression (shm/reader.py); tests compare it with hot_check().
HOT: Final = struct.Struct("<QqqqqQ")
HOT_SIZE: Final = HOT.size  # 48


def hot_check(seq: int, a: int, b: int, c: int, d: int) -> int:
    """The check word of a hot block."""
    return (
        seq
        ^ a * 0xC2B2AE3D27D4EB4F
        ^ b * 0x165667B19E3779F9
        ^ c * 0x27D4EB2F165667C5
        ^ d * 0x9E3779B97F4A7C15
    ) & _M64


def encode_hot(seq: int, a: int, b: int, c: int, d: int) -> bytes:
    """A hot block whose check is valid for `seq` (which must be even to be read)."""
    try:
        return HOT.pack(seq, a, b, c, d, hot_check(seq, a, b, c, d))
    except struct.error as e:
        raise RowTooLargeError(f"hot block field out of int64 range: {e}") from None


def decode_hot(buf: ReadableBuffer, offset: int = 0) -> tuple[int, int, int, int, int] | None:
    """(seq, a, b, c, d), or None when the block is being written or torn."""
    seq, a, b, c, d, chk = HOT.unpack_from(buf, offset)
    if seq & 1 or chk != hot_check(seq, a, b, c, d):
        return None
    return seq, a, b, c, d


@dataclass(frozen=True, slots=True)
class NodeState:
    """Hot per-node data written in place by the pinger (no generation bump)."""

    rtt_us: int
    jitter_us: int
    loss_permille: int
    up: bool
    last_heard_us: int


@dataclass(frozen=True, slots=True)
class LoadState:
    """Hot per-instance data: the load its node published, and when."""

    load: int
    load_time_us: int
    publisher_epoch: int


def node_state_fields(s: NodeState) -> tuple[int, int, int, int]:
    """NodeState -> the four hot fields (loss and up share one word)."""
    if not 0 <= s.loss_permille <= 0xFFFFFFFF:
        raise RowTooLargeError(f"loss_permille {s.loss_permille} out of range")
    return s.rtt_us, s.jitter_us, s.loss_permille | (int(s.up) << 32), s.last_heard_us


def node_state_from(a: int, b: int, c: int, d: int) -> NodeState:
    """The four hot fields -> NodeState."""
    return NodeState(a, b, c & 0xFFFFFFFF, bool(c >> 32), d)


def load_state_fields(s: LoadState) -> tuple[int, int, int, int]:
    """LoadState -> the four hot fields."""
    return s.load, s.load_time_us, s.publisher_epoch, 0


def load_state_from(a: int, b: int, c: int, d: int) -> LoadState:
    """The four hot fields -> LoadState."""
    del d
    return LoadState(a, b, c)


# --- cold rows: seq, used flag, body, CRC-32 ----------------------------------------------
# A cold row is [seq u64][used u8][7 pad][body][crc32 u32][pad to 8]. The CRC covers the
# seq, the flag and the body, so a torn copy, or a copy whose seq does not belong to its
# body, fails the residue check.
_COLD_HEAD: Final = struct.Struct("<QB7x")
_CRC: Final = struct.Struct("<I")


def _cold_size(body: struct.Struct) -> int:
    return (_COLD_HEAD.size + body.size + _CRC.size + 7) // 8 * 8


def encode_cold(
    body_struct: struct.Struct, seq: int, used: bool, fields: tuple[object, ...]
) -> bytes:
    """A cold row (padded to its slot size) holding `fields` packed with `body_struct`."""
    try:
        covered = _COLD_HEAD.pack(seq, int(used)) + body_struct.pack(*fields)
    except struct.error as e:
        raise RowTooLargeError(f"row field out of range: {e}") from None
    raw = covered + _CRC.pack(zlib.crc32(covered))
    return raw.ljust(_cold_size(body_struct), b"\0")


def decode_cold(
    body_struct: struct.Struct, buf: bytes
) -> tuple[int, bool, tuple[object, ...]] | None:
    """(seq, used, body fields) of a cold row copy, or None when torn or being written."""
    end = _COLD_HEAD.size + body_struct.size + _CRC.size
    if zlib.crc32(buf[:end]) != CRC_RESIDUE:
        return None
    seq, used = _COLD_HEAD.unpack_from(buf, 0)
    if seq & 1:
        return None
    return seq, bool(used), body_struct.unpack_from(buf, _COLD_HEAD.size)


def cold_seq(buf: ReadableBuffer, offset: int = 0) -> int:
    """The seq word of a cold row (no check: the writer reads its own rows)."""
    seq: int = _COLD_HEAD.unpack_from(buf, offset)[0]
    return seq


def _enc_str(value: str, size: int, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > size or b"\0" in raw:
        raise RowTooLargeError(f"{what} {value!r} does not fit {size} bytes (or contains NUL)")
    return raw


def _dec_str(raw: object) -> str:
    assert isinstance(raw, bytes)
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _int(raw: object) -> int:
    assert isinstance(raw, int)
    return raw


# --- row kinds ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node of the fleet (cold part: changes bump the generation)."""

    id: str
    region: str
    backhaul: str  # host:port of its backhaul listener
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class AppRow:
    """An app: its host names, routing strategy and default limits."""

    name: str
    hosts: tuple[str, ...]
    strategy: str
    soft_limit: int
    hard_limit: int
    sample_k: int


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """An instance of an app on a node (cold part: changes bump the generation)."""

    app: str
    id: str
    node: str
    address: str
    soft_limit: int
    hard_limit: int


NODE_BODY: Final = struct.Struct(f"<{ID_BYTES}s{REGION_BYTES}s{ADDRESS_BYTES}sq")
APP_BODY: Final = struct.Struct(f"<{ID_BYTES}s{STRATEGY_BYTES}sqqq{HOSTS_BYTES}s")
INSTANCE_BODY: Final = struct.Struct(f"<{ID_BYTES}s{ID_BYTES}s{ID_BYTES}s{ADDRESS_BYTES}sqq")

NODE_COLD: Final = _cold_size(NODE_BODY)
APP_COLD: Final = _cold_size(APP_BODY)
INSTANCE_COLD: Final = _cold_size(INSTANCE_BODY)


def _row_size(cold: int, hot: int) -> int:
    return (cold + hot + 63) // 64 * 64


NODE_HOT_AT: Final = NODE_COLD  # offset of the node's RTT block inside its row
INSTANCE_HOT_AT: Final = INSTANCE_COLD  # offset of the instance's load block inside its row
NODE_ROW: Final = _row_size(NODE_COLD, HOT_SIZE)
APP_ROW: Final = _row_size(APP_COLD, 0)
INSTANCE_ROW: Final = _row_size(INSTANCE_COLD, HOT_SIZE)


def encode_node(seq: int, row: NodeRow | None) -> bytes:
    """The cold part of a node slot; None encodes a free slot."""
    if row is None:
        return encode_cold(NODE_BODY, seq, False, (b"", b"", b"", 0))
    fields = (
        _enc_str(row.id, ID_BYTES, "node id"),
        _enc_str(row.region, REGION_BYTES, "region"),
        _enc_str(row.backhaul, ADDRESS_BYTES, "backhaul address"),
        row.boot_epoch,
    )
    return encode_cold(NODE_BODY, seq, True, fields)


def decode_node(buf: bytes) -> tuple[int, NodeRow | None] | None:
    """(seq, row or None when free), or None when the copy is torn."""
    got = decode_cold(NODE_BODY, buf)
    if got is None:
        return None
    seq, used, f = got
    if not used:
        return seq, None
    return seq, NodeRow(_dec_str(f[0]), _dec_str(f[1]), _dec_str(f[2]), _int(f[3]))


def encode_app(seq: int, row: AppRow | None) -> bytes:
    """The cold part of an app slot; None encodes a free slot."""
    if row is None:
        return encode_cold(APP_BODY, seq, False, (b"", b"", 0, 0, 0, b""))
    for h in row.hosts:
        if not h or "," in h:
            raise RowTooLargeError(f"app {row.name!r}: host {h!r} is empty or contains ','")
    fields = (
        _enc_str(row.name, ID_BYTES, "app name"),
        _enc_str(row.strategy, STRATEGY_BYTES, "strategy"),
        row.soft_limit,
        row.hard_limit,
        row.sample_k,
        _enc_str(",".join(row.hosts), HOSTS_BYTES, f"app {row.name!r} hosts"),
    )
    return encode_cold(APP_BODY, seq, True, fields)


def decode_app(buf: bytes) -> tuple[int, AppRow | None] | None:
    """(seq, row or None when free), or None when the copy is torn."""
    got = decode_cold(APP_BODY, buf)
    if got is None:
        return None
    seq, used, f = got
    if not used:
        return seq, None
    hosts = _dec_str(f[5])
    row = AppRow(
        name=_dec_str(f[0]),
        hosts=tuple(hosts.split(",")) if hosts else (),
        strategy=_dec_str(f[1]),
        soft_limit=_int(f[2]),
        hard_limit=_int(f[3]),
        sample_k=_int(f[4]),
    )
    return seq, row


def encode_instance(seq: int, row: InstanceRow | None) -> bytes:
    """The cold part of an instance slot; None encodes a free slot."""
    if row is None:
        return encode_cold(INSTANCE_BODY, seq, False, (b"", b"", b"", b"", 0, 0))
    fields = (
        _enc_str(row.app, ID_BYTES, "app name"),
        _enc_str(row.id, ID_BYTES, "instance id"),
        _enc_str(row.node, ID_BYTES, "node id"),
        _enc_str(row.address, ADDRESS_BYTES, "instance address"),
        row.soft_limit,
        row.hard_limit,
    )
    return encode_cold(INSTANCE_BODY, seq, True, fields)


def decode_instance(buf: bytes) -> tuple[int, InstanceRow | None] | None:
    """(seq, row or None when free), or None when the copy is torn."""
    got = decode_cold(INSTANCE_BODY, buf)
    if got is None:
        return None
    seq, used, f = got
    if not used:
        return seq, None
    row = InstanceRow(
        app=_dec_str(f[0]),
        id=_dec_str(f[1]),
        node=_dec_str(f[2]),
        address=_dec_str(f[3]),
        soft_limit=_int(f[4]),
        hard_limit=_int(f[5]),
    )
    return seq, row


# The order of nodes readers walk: up nodes with a measured RTT by RTT, then the others
# (down, or not measured yet), which rank alike after every measured one.
RTT_UNKNOWN: Final = 1 << 62


def order_key(rtt_us: int, up: bool) -> int:
    """A node's place in the order readers walk (equal keys: equally close)."""
    return rtt_us if up and rtt_us >= 0 else RTT_UNKNOWN


# --- groups: what a pick reads instead of every instance ----------------------------------
# A group is the instances of one app on one node (they share the node's RTT). The writer
# keeps each group's instance slots in a segment of the order array, sorted by a class key
# (under soft first, then under hard by load, then the full ones), and a hot block per
# group with the class counts. Groups are numbered, and their segments laid end to end,
# in (app, node) order of the instance rows, so a reader derives both from the rows it
# has. Everything here is a hint a reader checks against the rows it reads: the block
# carries the layout number it belongs to, an entry is used only if its row is in the group.
ORDER_ENTRY: Final = struct.Struct("<I")  # an instance slot
KEY_UNDER_SOFT: Final = -(1 << 62)  # class key: load under min(soft, hard)
KEY_FULL: Final = 1 << 62  # class key: load at or over hard; between them, the load itself


def class_key(load: int, soft: int, hard: int) -> int:
    """The class key of an instance at `load` (the writer's sort key within a group).

    A load beyond the keys' range (only a nonsensical one) is clamped: the group block
    then names a load no row has, which a reader takes for a stale hint.
    """
    if load >= hard:
        return KEY_FULL
    if load < soft:
        return KEY_UNDER_SOFT
    return min(max(load, KEY_UNDER_SOFT + 1), KEY_FULL - 1)


def group_fields(
    tag: int, n_soft: int, n_hard: int, min_load: int, n_min: int
) -> tuple[int, int, int, int]:
    """A group block's four hot fields: the layout tag, the number under soft and under
    hard (packed), the lowest load over soft and under hard, and how many have it."""
    if not (0 <= n_soft <= n_hard <= 0xFFFFFFFF):
        raise RowTooLargeError(f"group counts {n_soft}/{n_hard} out of range")
    return tag, n_soft | n_hard << 32, min_load, n_min


# --- app summaries: the groups of an app in the order a reader walks them -----------------
# Per app slot: a hot block (signature of the order, the app's lowest load over soft) and
# two bitmaps over the order's positions, SUMMARY_WORDS(max_nodes) words each: groups
# with an instance under soft, groups at the app's lowest load. A reader uses them only
# when its own order has the same signature; every bit is checked against the group's
# block before it is trusted.
def summary_words(max_nodes: int) -> int:
    """64-bit words per bitmap: one bit per node, and room for a few nodes with no row."""
    return max_nodes // 64 + 1


def summary_size(max_nodes: int) -> int:
    return HOT_SIZE + 2 * 8 * summary_words(max_nodes)


def summary_signature(indexes: list[int]) -> int:
    """The signature of an order of group numbers (never 0: 0 means "no summary")."""
    h = len(indexes) + 1
    for i in indexes:
        h = (h * 0x100000001B3 ^ (i + 1)) & 0x1FFFFFFFFFFFFFFF
    return h or 1


SUMMARY_WORD: Final = struct.Struct("<Q")


# --- header -------------------------------------------------------------------------------
# 0 magic | 8 version | 12 header size | 16 total size | 24 capacities and row sizes
# 48 writer block (pid, boot epoch) | 96 heartbeat block (time us)
# 144 generation (gen, ~gen) | 160 high-water block (rows in use below)
# 208 order block (RTT order epoch, group layout tag)
STATIC: Final = struct.Struct("<8sIIQIIIIII")
WRITER_AT: Final = 48
HEARTBEAT_AT: Final = 96
GEN_AT: Final = 144
GEN: Final = struct.Struct("<QQ")
HWM_AT: Final = 160
# The epoch moves whenever the nodes' order by RTT may have changed (one passed or met
# another, or went up or down), so a reader's sorted view of the nodes holds until it
# moves. The tag is the number of the group layout last written (see `groups` above).
ORDER_AT: Final = 208


@dataclass(frozen=True, slots=True)
class Static:
    """The write-once part of the header that an attaching process checks."""

    magic: bytes
    version: int
    header_size: int
    total_size: int
    max_nodes: int
    max_apps: int
    max_instances: int
    node_row: int
    app_row: int
    instance_row: int


def encode_static(s: Static) -> bytes:
    """The first STATIC.size bytes of the header."""
    return STATIC.pack(
        s.magic,
        s.version,
        s.header_size,
        s.total_size,
        s.max_nodes,
        s.max_apps,
        s.max_instances,
        s.node_row,
        s.app_row,
        s.instance_row,
    )


def decode_static(buf: ReadableBuffer) -> Static:
    """The static header fields (unchecked: compare with expected_static())."""
    return Static(*STATIC.unpack_from(buf, 0))


def encode_gen(gen: int) -> bytes:
    """The generation word and its complement (a torn pair never matches)."""
    return GEN.pack(gen, gen ^ _M64)


def decode_gen(buf: ReadableBuffer, offset: int = GEN_AT) -> int | None:
    """The generation, or None when the pair is torn."""
    g, ng = GEN.unpack_from(buf, offset)
    return int(g) if g ^ ng == _M64 else None


def mismatch(found: Static, expected: Static) -> str | None:
    """Why `found` is not `expected` (first difference, in words), or None."""
    if found.magic != expected.magic:
        return f"bad magic {found.magic!r} (expected {expected.magic!r}): not an edgeproxy table"
    if found.version != expected.version:
        return f"layout version {found.version}, this code reads version {expected.version}"
    for name in Static.__slots__:
        a, b = getattr(found, name), getattr(expected, name)
        if a != b:
            return f"{name} is {a}, this process expects {b} (different table config?)"
    return None
