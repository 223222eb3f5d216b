"""Round trips and tear detection of the pure table codecs."""

from __future__ import annotations

import ast
import struct
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shm import codec, inflight_codec
from shm.errors import RowTooLargeError

i64 = st.integers(-(2**63), 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)
seqs = st.integers(0, 2**62).map(lambda s: s * 2)


def text(max_bytes: int, *, empty: bool = False) -> st.SearchStrategy[str]:
    alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
    return st.text(alphabet, min_size=0 if empty else 1, max_size=max_bytes // 4)


nodes = st.builds(
    codec.NodeRow,
    id=text(codec.ID_BYTES),
    region=text(codec.REGION_BYTES),
    backhaul=text(codec.ADDRESS_BYTES),
    boot_epoch=i64,
)
hosts = st.lists(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True), max_size=8)
apps = st.builds(
    codec.AppRow,
    name=text(codec.ID_BYTES),
    hosts=hosts.map(tuple),
    strategy=st.sampled_from(["closest", "leastload"]),
    soft_limit=i64,
    hard_limit=i64,
    sample_k=i64,
)
instances = st.builds(
    codec.InstanceRow,
    app=text(codec.ID_BYTES),
    id=text(codec.ID_BYTES),
    node=text(codec.ID_BYTES),
    address=text(codec.ADDRESS_BYTES),
    soft_limit=i64,
    hard_limit=i64,
)


@given(seqs, nodes)
def test_node_round_trip(seq: int, row: codec.NodeRow) -> None:
    """A node row decodes to the row and seq it was encoded with."""
    raw = codec.encode_node(seq, row)
    assert len(raw) == codec.NODE_COLD
    assert codec.decode_node(raw) == (seq, row)


@given(seqs, apps)
def test_app_round_trip(seq: int, row: codec.AppRow) -> None:
    """An app row, hosts included, decodes to what was encoded."""
    raw = codec.encode_app(seq, row)
    assert len(raw) == codec.APP_COLD
    assert codec.decode_app(raw) == (seq, row)


@given(seqs, instances)
def test_instance_round_trip(seq: int, row: codec.InstanceRow) -> None:
    """An instance row decodes to what was encoded."""
    raw = codec.encode_instance(seq, row)
    assert len(raw) == codec.INSTANCE_COLD
    assert codec.decode_instance(raw) == (seq, row)


@given(seqs)
def test_free_rows_round_trip(seq: int) -> None:
    """A free slot of every kind decodes as free (None), not as a row."""
    assert codec.decode_node(codec.encode_node(seq, None)) == (seq, None)
    assert codec.decode_app(codec.encode_app(seq, None)) == (seq, None)
    assert codec.decode_instance(codec.encode_instance(seq, None)) == (seq, None)


@given(seqs, i64, i64, u32, st.booleans(), i64)
def test_node_state_round_trip(
    seq: int, rtt: int, jitter: int, loss: int, up: bool, heard: int
) -> None:
    """A node's hot RTT block decodes to the state it was encoded from."""
    state = codec.NodeState(rtt, jitter, loss, up, heard)
    got = codec.decode_hot(codec.encode_hot(seq, *codec.node_state_fields(state)))
    assert got is not None and got[0] == seq
    assert codec.node_state_from(*got[1:]) == state


@given(seqs, i64, i64, i64)
def test_load_state_round_trip(seq: int, load: int, when: int, epoch: int) -> None:
    """An instance's hot load block decodes to the state it was encoded from."""
    state = codec.LoadState(load, when, epoch)
    got = codec.decode_hot(codec.encode_hot(seq, *codec.load_state_fields(state)))
    assert got is not None and got[0] == seq
    assert codec.load_state_from(*got[1:]) == state


@given(seqs, text(codec.ID_BYTES) | st.none())
def test_directory_entry_round_trip(seq: int, iid: str | None) -> None:
    """An in-flight directory entry decodes to its instance id (or free)."""
    raw = inflight_codec.encode_entry(seq, iid)
    assert len(raw) == inflight_codec.DIR_ENTRY
    assert inflight_codec.decode_entry(raw) == (seq, iid)


@given(st.integers(0, 2**64 - 1))
def test_generation_round_trip(gen: int) -> None:
    """The generation pair decodes to its value and a torn pair to None."""
    raw = codec.encode_gen(gen)
    assert codec.decode_gen(raw, 0) == gen
    torn = raw[:8] + codec.encode_gen(gen ^ 1)[8:]
    assert codec.decode_gen(torn, 0) is None


@given(
    seqs,
    st.tuples(i64, i64, i64, i64),
    st.tuples(i64, i64, i64, i64),
    st.lists(st.booleans(), min_size=codec.HOT_SIZE, max_size=codec.HOT_SIZE),
)
def test_hot_block_tear_is_detected(
    seq: int, old: tuple[int, ...], new: tuple[int, ...], take_new: list[bool]
) -> None:
    """Any byte-wise mix of two hot block versions yields one version's fields, or is refused."""
    a = codec.encode_hot(seq, *old)
    b = codec.encode_hot(seq + 2, *new)
    mixed = bytes(b[i] if take_new[i] else a[i] for i in range(codec.HOT_SIZE))
    got = codec.decode_hot(mixed)
    # Only the fields are ever used; the seq word only tells "being written" (odd).
    assert got is None or got[1:] in (old, new)


@given(seqs, instances, instances, st.integers(1, codec.INSTANCE_COLD - 1))
def test_cold_row_tear_is_detected(
    seq: int, old: codec.InstanceRow, new: codec.InstanceRow, cut: int
) -> None:
    """A cold row copied half old, half new is refused unless it equals one version."""
    a = codec.encode_instance(seq, old)
    b = codec.encode_instance(seq + 2, new)
    for mixed in (a[:cut] + b[cut:], b[:cut] + a[cut:]):
        got = codec.decode_instance(mixed)
        assert got is None or got in ((seq, old), (seq + 2, new))


def test_odd_seq_is_a_write_in_progress() -> None:
    """A block whose seq is odd is never decoded, even with a valid check."""
    assert codec.decode_hot(codec.encode_hot(3, 1, 2, 3, 4)) is None
    assert codec.decode_node(codec.encode_node(5, codec.NodeRow("n", "r", "a:1", 1))) is None


def test_oversized_fields_are_refused() -> None:
    """A field longer than its slot raises RowTooLargeError naming the field."""
    with pytest.raises(RowTooLargeError, match="node id"):
        codec.encode_node(0, codec.NodeRow("x" * 65, "r", "a:1", 1))
    with pytest.raises(RowTooLargeError, match="hosts"):
        codec.encode_app(0, codec.AppRow("a", ("h" * 200,) * 6, "closest", 1, 2, 2))
    with pytest.raises(RowTooLargeError):
        codec.encode_hot(0, 2**63, 0, 0, 0)
    with pytest.raises(RowTooLargeError):
        inflight_codec.encode_entry(0, "")


def _method_source(path: Path, cls: str | None, name: str) -> str:
    """The source of function `name` (in class `cls`) of the module file `path`."""
    text = path.read_text()
    scope: list[ast.stmt] = ast.parse(text).body
    if cls is not None:
        scope = next(n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == cls)
    node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(text, node) or ""


Block = tuple[int, int, int, int, int, int]


def _inlined_rejects() -> list[Callable[[Block], bool]]:
    """The reader's inlined "is this hot block torn" tests, one per place it reads a hot
    block, as functions of (seq, a, b, c, d, check). Read from the source file: compiled
    (setup.py), the reader has no Python source at run time."""
    src = _method_source(Path(codec.__file__).with_name("reader.py"), "TableReader", "candidates")
    fn = ast.parse(textwrap.dedent(src)).body[0]
    chks = [
        n.value
        for n in ast.walk(fn)
        if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["chk"]
    ]
    tests = [
        n.test
        for n in ast.walk(fn)
        if isinstance(n, ast.If)
        and "chk" in {x.id for x in ast.walk(n.test) if isinstance(x, ast.Name)}
    ]
    assert len(chks) == len(tests) == 2, "the reader inlines the check for loads and nodes"
    out = []
    for chk, test in zip(chks, tests, strict=True):
        code = (
            f"lambda s, a, b, x, y, k: (lambda chk: bool({ast.unparse(test)}))({ast.unparse(chk)})"
        )
        f = eval(code, {})  # our own source, parsed above
        out.append(lambda blk, f=f: f(*blk))
    return out


INLINED_REJECTS = _inlined_rejects()
u64 = st.integers(0, 2**64 - 1)


@st.composite
def hot_blocks(draw: st.DrawFn) -> Block:
    """A hot block as the reader unpacks it (<QqqqqQ): with its valid check, a check one
    bit off, or any check."""
    seq, a, b, c, d = draw(u64), draw(i64), draw(i64), draw(i64), draw(i64)
    good = codec.hot_check(seq, a, b, c, d)
    chk = draw(st.one_of(st.just(good), st.integers(0, 63).map(lambda i: good ^ 1 << i), u64))
    return seq, a, b, c, d, chk


@given(hot_blocks())
def test_reader_inlined_check_matches_codec(blk: Block) -> None:
    """The check inlined in the reader's hot path rejects exactly the blocks codec rejects
    (odd seq, or a check word unequal to codec.hot_check)."""
    seq, a, b, c, d, chk = blk
    expected = bool(seq & 1 or chk != codec.hot_check(seq, a, b, c, d))
    for rejects in INLINED_REJECTS:
        assert rejects(blk) == expected
    assert struct.calcsize("<QqqqqQ") == codec.HOT_SIZE
