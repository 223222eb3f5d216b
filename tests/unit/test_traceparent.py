"""W3C Trace Context (proxy.core.traceparent): the strict traceparent and tracestate readers
(bytes in, verdict out, against an independent reading of the spec), the ids and the head
sampling decision of a request, and the one traceparent the instance receives."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.request import Request
from proxy.core.request_head import FWD_SET, Front
from proxy.core.traceparent import (
    MAX_MEMBERS,
    TraceContext,
    clean_tracestate,
    parse_traceparent,
    pass_on,
)

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"
VALID = b"00-" + TRACE + b"-" + PARENT + b"-01"  # the spec's own example
HEX = "0123456789abcdef"


def oracle(v: bytes) -> tuple[bytes, bytes, int] | None:
    """The spec's rules, read character by character (an independent implementation)."""
    try:
        s = v.decode("ascii")
    except UnicodeDecodeError:
        return None
    if len(s) < 55:
        return None
    ver, trace, parent, flags = s[0:2], s[3:35], s[36:52], s[53:55]
    if s[2] != "-" or s[35] != "-" or s[52] != "-":
        return None
    if not all(c in HEX for c in ver + trace + parent + flags):
        return None
    if ver == "ff" or trace == "0" * 32 or parent == "0" * 16:
        return None
    if ver == "00" and len(s) != 55:
        return None
    if len(s) > 55 and s[55] != "-":
        return None
    return trace.encode(), parent.encode(), int(flags, 16)


def hexes(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=n, max_size=n)


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid value of any version with at most one field broken by one of the spec's rules."""
    parts = {
        "ver": draw(st.sampled_from(["00", "01", "cc", "fe"]) | hexes(2)),
        "trace": draw(hexes(32)),
        "parent": draw(hexes(16)),
        "flags": draw(hexes(2)),
        "tail": "",
    }
    if parts["ver"] != "00":
        parts["tail"] = draw(st.sampled_from(["", "-", "-future", "-01-02"]))
    broken = {
        "ver": ["ff", "0A", "A0", "g0", "0", "000"],
        "trace": ["0" * 32, "4BF92F3577B34DA6A3CE929D0E0E4736", "4bf92f3577b34da6a3ce929d0e0e473"],
        "parent": ["0" * 16, "00F067AA0BA902B7", "00f067aa0ba902b"],
        "flags": ["0F", "1", "001", "0g"],
        "tail": ["x", " ", "\r\n", "0"],
    }
    field = draw(st.sampled_from([None, *broken]))
    if field is not None:
        parts[field] = draw(st.sampled_from(broken[field]))
    return "{ver}-{trace}-{parent}-{flags}{tail}".format(**parts).encode()


def mutate(v: bytes, data: st.DataObject) -> bytes:
    at = data.draw(st.integers(0, len(v)))
    op = data.draw(st.sampled_from(["replace", "insert", "delete", "upper"]))
    byte = bytes([data.draw(st.integers(0, 255))])
    if op == "replace" and at < len(v):
        return v[:at] + byte + v[at + 1 :]
    if op == "insert":
        return v[:at] + byte + v[at:]
    if op == "delete" and at < len(v):
        return v[:at] + v[at + 1 :]
    return v.upper()


@settings(max_examples=600)
@given(near_valid())
def test_the_parser_agrees_with_the_spec_read_char_by_char(v: bytes) -> None:
    """On near-valid values (every version; one field broken by one rule: ff, uppercase,
    zero ids, short fields, tails), the parser's verdict and fields are the independent
    reading's."""
    assert parse_traceparent(v) == oracle(v)


@given(st.binary(max_size=80))
def test_random_bytes_get_the_spec_verdict(v: bytes) -> None:
    """Any bytes at all: the parser's verdict is the independent reading's (no exception)."""
    assert parse_traceparent(v) == oracle(v)


@given(st.data())
def test_any_mutation_of_a_valid_value_is_judged_like_the_spec(data: st.DataObject) -> None:
    """A valid value with one byte replaced, inserted or deleted, or upper-cased: the parser
    still agrees with the independent reading (most such values are refused)."""
    v = mutate(VALID, data)
    assert parse_traceparent(v) == oracle(v)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (VALID.upper(), "uppercase hex"),
        (VALID[:-1], "54 characters"),
        (VALID + b"0", "version 00 with 56 characters"),
        (VALID + b"-x", "version 00 with a tail"),
        (b"ff" + VALID[2:], "version ff"),
        (b"00-" + b"0" * 32 + b"-" + PARENT + b"-01", "an all-zero trace-id"),
        (b"00-" + TRACE + b"-" + b"0" * 16 + b"-01", "an all-zero parent-id"),
        (b" " + VALID[:-1], "leading space"),
        (VALID.replace(b"-", b"_", 1), "a separator other than -"),
        (b"cc" + VALID[2:] + b"x", "a later version whose 56th character is not -"),
        (b"", "empty"),
    ],
)
def test_invalid_traceparent_values_are_refused(value: bytes, why: str) -> None:
    """Each value the spec calls invalid is refused (no repair: the trace restarts)."""
    assert parse_traceparent(value) is None, why


def test_valid_values_and_later_versions_are_read() -> None:
    """Version 00 gives its ids and flags; a later version is read as 00 when its first 55
    characters are that and the rest starts with a dash (spec: versioning)."""
    assert parse_traceparent(VALID) == (TRACE, PARENT, 1)
    assert parse_traceparent(VALID[:-2] + b"00") == (TRACE, PARENT, 0)
    assert parse_traceparent(b"cc" + VALID[2:]) == (TRACE, PARENT, 1)
    assert parse_traceparent(b"cc" + VALID[2:] + b"-what-the-future-holds") == (TRACE, PARENT, 1)


member_key = st.from_regex(
    re.compile(r"[a-z][a-z0-9_*/-]{0,10}(@[a-z][a-z0-9]{0,5})?"), fullmatch=True
)
member_value = st.from_regex(re.compile(r"[!-+\--<>-~]{1,12}"), fullmatch=True)


@given(st.lists(st.tuples(member_key, member_value), max_size=40, unique_by=lambda kv: kv[0]))
def test_tracestate_passes_on_valid_lists_of_at_most_32_members(kvs: list[tuple[str, str]]) -> None:
    """A list of valid members goes on (OWS and empty members removed) when it has at most
    32 members and fits 512 bytes; otherwise it is dropped whole."""
    raw = " , ".join(f"{k}={v}" for k, v in kvs).encode() + b",,"
    want = ",".join(f"{k}={v}" for k, v in kvs).encode()
    got = clean_tracestate(raw)
    if len(kvs) <= MAX_MEMBERS and len(want) <= 512:
        assert got == want
    else:
        assert got == b""


@pytest.mark.parametrize(
    "value",
    [
        b"Congo=t61rcWkgMzE",  # uppercase key
        b"congo=t61rcWkgMzE,congo=other",  # a key twice
        b"congo=",  # empty value
        b"congo=caf\xc3\xa9",  # a value outside printable ASCII
        b"congo=a=b",  # "=" in a value
        b"rojo=00f067aa0ba902b7,\x00=1",
        b"a=" + b"x" * 600,  # over 512 bytes
        b",".join(b"k%d=v" % i for i in range(33)),  # 33 members
    ],
)
def test_bad_tracestate_is_dropped_whole(value: bytes) -> None:
    """A tracestate outside the grammar, with a key twice, too long or too many members is
    not passed on at all."""
    assert clean_tracestate(value) == b""


def request(*fields: tuple[bytes, bytes]) -> Request:
    r = Request(100, 65536)
    r.on_url(b"/")
    r.on_header(b"Host", b"hello.test")
    for name, value in fields:
        r.on_header(name, value)
    r.decide(b"GET", "1.1", False, True, frozenset())
    return r


def context(rate: float = 0.0, seed: int = 1) -> TraceContext:
    rng = random.Random(seed)
    return TraceContext(rng.randbytes, rate, rng.random)


def sent(r: Request) -> list[bytes]:
    """The trace context lines of the head the instance receives."""
    head = r.build(Front(FWD_SET, b"192.0.2.1", b"http", b"80"), r.trace_line)
    return [line for line in head.split(b"\r\n") if line.lower().startswith(b"trace")]


def test_a_valid_client_traceparent_is_continued_with_our_span_as_parent() -> None:
    """The instance gets exactly one traceparent: the client's trace-id, our span id as its
    parent-id; the client's own field is not forwarded; its tracestate goes on."""
    r = request((b"traceparent", VALID), (b"tracestate", b"congo=t61rcWkgMzE"))
    context().begin(r, trusted=False)
    assert r.trace_id == TRACE and r.parent_id == PARENT
    assert len(r.span_id) == 16 and r.span_id != PARENT
    assert sent(r) == [
        b"traceparent: 00-" + TRACE + b"-" + r.span_id + b"-00",
        b"tracestate: congo=t61rcWkgMzE",
    ]


@pytest.mark.parametrize(
    "fields",
    [
        [(b"traceparent", VALID), (b"traceparent", VALID)],
        [(b"traceparent", VALID.upper()), (b"tracestate", b"congo=t61rcWkgMzE")],
        [(b"tracestate", b"congo=t61rcWkgMzE")],
        [],
    ],
)
def test_an_absent_invalid_or_repeated_traceparent_starts_a_new_trace(
    fields: list[tuple[bytes, bytes]],
) -> None:
    """Two traceparent fields, an invalid one, or none: a new trace (no parent), one
    traceparent of ours, and no tracestate."""
    r = request(*fields)
    ctx = context()
    ctx.begin(r, trusted=True)
    assert r.parent_id == b"" and r.trace_id.endswith(r.span_id) and r.trace_id != TRACE
    assert re.fullmatch(rb"[0-9a-f]{32}", r.trace_id)
    assert sent(r) == [b"traceparent: 00-" + r.trace_id + b"-" + r.span_id + b"-00"]


def test_a_peer_sampled_flag_is_followed_a_client_one_is_not() -> None:
    """With sample_rate 0, a trusted peer's sampled flag samples the request (and goes on
    set); a client's does not; a peer's unsampled flag is followed even at rate 1."""
    r = request((b"traceparent", VALID))
    context(0.0).begin(r, trusted=True)
    assert r.sampled and sent(r)[0].endswith(b"-01")
    r = request((b"traceparent", VALID))
    context(0.0).begin(r, trusted=False)
    assert not r.sampled and sent(r)[0].endswith(b"-00")
    r = request((b"traceparent", VALID[:-2] + b"00"))
    context(1.0).begin(r, trusted=True)
    assert not r.sampled


def test_sample_rate_one_and_zero_decide_every_request() -> None:
    """Rate 1.0 samples every new trace, 0.0 none; a fixed seed at 0.25 samples a share
    within wide bounds."""
    one, zero, quarter = context(1.0), context(0.0), context(0.25, seed=7)
    got = []
    for _ in range(2000):
        for ctx in (one, zero, quarter):
            r = request()
            ctx.begin(r, trusted=False)
            got.append(r.sampled)
    assert all(got[0::3]) and not any(got[1::3])
    assert 300 < sum(got[2::3]) < 700


def test_span_ids_come_from_the_entropy_and_are_never_zero() -> None:
    """Ids are the entropy source's bytes in hex, 16 characters each across block refills;
    a zero block yields no id of zeros (it draws again); 100 000 ids are distinct."""
    blocks = [bytes(range(256)) * 8, bytes(2048), bytes([7]) * 2048]
    ctx = TraceContext(lambda n: blocks.pop(0)[:n], 0.0, random.random)
    first = [ctx.span_id() for _ in range(256)]
    assert b"".join(first) == (bytes(range(256)) * 8).hex().encode()
    assert ctx.span_id() == b"07" * 8  # the all-zero block was skipped
    ctx = context()
    ids = {ctx.span_id() for _ in range(100_000)}
    assert len(ids) == 100_000
    assert all(re.fullmatch(rb"[0-9a-f]{16}", i) for i in ids)


def test_tracing_off_passes_a_valid_traceparent_on_unchanged_and_drops_the_rest() -> None:
    """Without tracing the proxy is no participant: a valid traceparent (and its valid
    tracestate) reach the instance as they came; an invalid or repeated one does not."""
    r = request((b"traceparent", VALID), (b"tracestate", b"congo=t61rcWkgMzE"))
    pass_on(r)
    assert sent(r) == [b"traceparent: " + VALID, b"tracestate: congo=t61rcWkgMzE"]
    for fields in ([(b"traceparent", VALID.upper())], [(b"traceparent", VALID)] * 2):
        r = request(*fields, (b"tracestate", b"congo=t61rcWkgMzE"))
        pass_on(r)
        assert sent(r) == []


header_value = st.binary(max_size=70).filter(lambda v: not set(v) & set(b"\r\n\x00"))


@given(
    tps=st.lists(st.one_of(st.just(VALID), near_valid(), header_value), max_size=3),
    states=st.lists(st.one_of(st.just(b"congo=t61rcWkgMzE"), header_value), max_size=3),
    trusted=st.booleans(),
)
def test_whatever_is_sent_the_instance_gets_one_valid_traceparent_of_ours(
    tps: list[bytes], states: list[bytes], trusted: bool
) -> None:
    """Any traceparent and tracestate fields in: exactly one version 00 traceparent out,
    parent-id our span; the sender's trace only when its one field was valid (its flag only
    when trusted); a tracestate only then, and only as the cleaner passed it."""
    r = request(*[(b"traceparent", v) for v in tps], *[(b"tracestate", v) for v in states])
    context(0.0).begin(r, trusted=trusted)
    lines = sent(r)
    name, _, value = lines[0].partition(b": ")
    assert name == b"traceparent" and len(value) == 55 and value[:3] == b"00-"
    got = parse_traceparent(value)
    assert got is not None and got[1] == r.span_id
    theirs = parse_traceparent(tps[0]) if len(tps) == 1 else None
    if theirs is None:
        assert got[0] != TRACE or VALID not in tps
        assert got[2] == 0 and lines[1:] == []
        return
    assert got[0] == theirs[0] and r.parent_id == theirs[1]
    assert got[2] == (theirs[2] & 1 if trusted else 0)
    state = clean_tracestate(b",".join(states)) if states else b""
    assert lines[1:] == ([b"tracestate: " + state] if state else [])
