"""Pins the ping wire format: msgpack arrays that round-trip, and garbage that is refused."""

from __future__ import annotations

import contextlib

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type stubs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pinger.ping_codec import (
    MAX_DATAGRAM,
    PROBE,
    REPLY,
    Ping,
    PingDecodeError,
    decode,
    encode,
    reply_to,
)

ids = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20
)
u63 = st.integers(0, (1 << 63) - 1)
loads = st.none() | st.dictionaries(ids, st.integers(0, (1 << 31) - 1), max_size=20)
times = st.none() | st.floats(0.0, 1e10, allow_nan=False) | st.integers(0, 10**10)
pings = st.builds(Ping, st.sampled_from([PROBE, REPLY]), ids, u63, ids, u63, u63, loads, times)


@given(pings)
def test_round_trip(p: Ping) -> None:
    """decode(encode(p)) == p (an empty load vector travels as none, and with it its time)."""
    got = decode(encode(p))
    want = p if p.loads else Ping(p.kind, p.sender, p.epoch, p.target, p.seq, p.sent_ns)
    assert got == want
    assert got.loads_at is None or isinstance(got.loads_at, float)


def test_loads_without_a_time_still_decode() -> None:
    """The 7-item form (loads, no time: older pingers) decodes, with no time."""
    got = decode(msgpack.packb([PROBE, "a", 1, "b", 1, 1, {"i": 3}]))
    assert (got.loads, got.loads_at) == ({"i": 3}, None)


@given(st.binary(max_size=200))
def test_garbage_raises_only_ping_decode_error(data: bytes) -> None:
    """Any byte string either decodes or raises PingDecodeError, nothing else."""
    with contextlib.suppress(PingDecodeError):
        decode(data)


@pytest.mark.parametrize(
    "msg",
    [
        [3, "a", 1, "b", 1, 1],
        [1, "", 1, "b", 1, 1],
        [1, "a", -1, "b", 1, 1],
        [1, "a", 1, "b", 1],
        [True, "a", 1, "b", 1, 1],
        [1, "a", 1, "b", 1, 1, [1]],
        [1, "a", 1, "b", 1, 1, {"x": -5}],
        [1, "a", 1, "b", 1, 1, {"x": 1}, -1.0],
        [1, "a", 1, "b", 1, 1, {"x": 1}, float("nan")],
        [1, "a", 1, "b", 1, 1, {"x": 1}, float("inf")],
        [1, "a", 1, "b", 1, 1, {"x": 1}, 1e300],
        [1, "a", 1, "b", 1, 1, {"x": 1}, True],
        [1, "a", 1, "b", 1, 1, {"x": 1}, "1700000000"],
        [1, "a", 1, "b", 1, 1, {"x": 1}, 1.0, 2],
        {"kind": 1},
    ],
)
def test_malformed_messages_are_refused(msg: object) -> None:
    """Wrong kinds, empty ids, negative numbers, bad load times, wrong shapes are
    PingDecodeError."""
    with pytest.raises(PingDecodeError):
        decode(msgpack.packb(msg))


def test_trailing_bytes_are_refused() -> None:
    """A datagram is exactly one message."""
    with pytest.raises(PingDecodeError):
        decode(encode(Ping(PROBE, "a", 1, "b", 1, 1)) + b"\x00")


def test_reply_echoes_seq_and_send_time() -> None:
    """A reply swaps sender and target and echoes seq and send time."""
    p = Ping(PROBE, "nrt", 7, "hkg", 42, 123456789)
    r = reply_to(p, "hkg", 9, {"hello-hkg": 3}, 1700000000.5)
    assert (r.kind, r.sender, r.epoch, r.target, r.seq, r.sent_ns) == (
        REPLY,
        "hkg",
        9,
        "nrt",
        42,
        123456789,
    )
    got = decode(encode(r))
    assert (got.loads, got.loads_at) == ({"hello-hkg": 3}, 1700000000.5)


def test_oversized_load_vector_is_left_out() -> None:
    """A load vector that would not fit one datagram is dropped, the probe still goes."""
    big = {f"instance-{i:05d}": i for i in range(2000)}
    data = encode(Ping(PROBE, "a", 1, "b", 1, 1, big))
    assert len(data) <= MAX_DATAGRAM
    assert decode(data).loads is None
