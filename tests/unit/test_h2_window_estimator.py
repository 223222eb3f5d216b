"""The adaptive HTTP/2 window: the BDP estimator (bytes and times in, window decisions
out) and its application to a real h2 connection pair, frames carried in memory."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config_http2 import Http2Config
from proxy.core.h2_window import FIRST_DELAY, BdpEstimator
from proxy.worker.h2window import WindowTuner

KIB = 1024
MIB = 1024 * KIB


def window_limited(e: BdpEstimator, rtt: float, rounds: int, now: float = 0.0) -> float:
    """A peer with an unbounded link: each round trip it sends one full window."""
    for _ in range(rounds):
        now = max(now, e.next_at)
        if not e.data(16 * KIB, now):
            assert e.window == e.maximum  # nothing more to learn
            break
        e.data(e.window - 16 * KIB, now + rtt / 2)
        e.ack(now + rtt)
        now += rtt
    return now


def test_a_window_limited_peer_doubles_the_window_per_sample() -> None:
    """Each ack after a full window of bytes doubles the window: 64 KiB -> 128 -> 256 KiB."""
    e = BdpEstimator(64 * KIB, 16 * MIB)
    assert e.data(16 * KIB, 0.0)  # the first DATA asks for a PING
    assert not e.data(48 * KIB, 0.01)  # one is outstanding: counted, no second PING
    assert e.ack(0.05) == 128 * KIB
    assert e.rtt == pytest.approx(0.05)
    assert not e.data(KIB, 0.05 + FIRST_DELAY / 4)  # too soon after the ack: not sampled
    assert e.data(64 * KIB, 0.2)
    assert not e.data(64 * KIB, 0.22)
    assert e.ack(0.25) == 256 * KIB


def test_the_window_stops_at_the_maximum() -> None:
    """However fast the peer, the window ends at the configured maximum, and no PING is
    asked for once it is there."""
    e = BdpEstimator(64 * KIB, MIB)
    window_limited(e, 0.05, 12)
    assert e.window == MIB
    assert not e.data(64 * KIB, 1000.0)


def test_a_peer_below_the_window_does_not_grow_it() -> None:
    """A sample of less than 2/3 of the window (the peer was not held back) changes
    nothing, and the next PING waits longer (x4 after two such samples)."""
    e = BdpEstimator(MIB, 16 * MIB)
    now = 0.0
    delays = []
    for _ in range(4):
        now = max(now, e.next_at)
        assert e.data(100 * KIB, now)
        assert e.ack(now + 0.05) == 0
        delays.append(e.next_at - (now + 0.05))
        now += 0.05
    assert e.window == MIB
    d = FIRST_DELAY
    assert delays == pytest.approx([d, d * 4, d * 4, d * 16])


def test_a_slower_sample_does_not_grow_it() -> None:
    """A full-window sample at a lower bandwidth than one already seen (RTT grew) does
    not raise the window."""
    e = BdpEstimator(64 * KIB, 16 * MIB)
    assert e.data(64 * KIB, 0.0) and e.ack(0.01) == 128 * KIB  # fast: 128 KiB
    assert e.data(90 * KIB, 1.0)  # 90 KiB >= 2/3 of 128 KiB, but over a much longer RTT
    assert e.ack(3.0) == 0
    assert e.window == 128 * KIB


def test_an_ack_without_a_ping_is_no_sample() -> None:
    """An unsolicited or repeated ack changes nothing."""
    e = BdpEstimator(64 * KIB, 16 * MIB)
    assert e.ack(1.0) == 0
    assert e.data(64 * KIB, 2.0)
    assert e.ack(2.05) == 128 * KIB
    assert e.ack(2.06) == 0
    assert e.window == 128 * KIB


def test_bad_bounds_are_refused() -> None:
    """An initial window of 0 or above the maximum is a programming error."""
    with pytest.raises(ValueError):
        BdpEstimator(0, MIB)
    with pytest.raises(ValueError):
        BdpEstimator(2 * MIB, MIB)


_step = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 4 * MIB), st.floats(0, 2)),
    st.tuples(st.just("ack"), st.just(0), st.floats(0, 2)),
    st.tuples(st.just("lost"), st.just(0), st.just(0.0)),
)


@settings(max_examples=300, deadline=None)
@given(
    initial=st.integers(1, 4 * MIB),
    extra=st.integers(0, 32 * MIB),
    steps=st.lists(_step, max_size=60),
)
def test_the_window_never_shrinks_nor_passes_the_maximum(
    initial: int, extra: int, steps: list[tuple[str, int, float]]
) -> None:
    """Any sequence of DATA, acks and lost PINGs: the window never shrinks, never
    passes the maximum, a growth is reported exactly when it happens, and a PING is
    asked for only when none is outstanding."""
    e = BdpEstimator(initial, initial + extra)
    now = 0.0
    for kind, n, dt in steps:
        now += dt
        before = e.window
        if kind == "data":
            was_waiting = e.waiting
            if e.data(n, now):
                assert not was_waiting and e.waiting
        elif kind == "ack":
            grown = e.ack(now)
            assert grown == (e.window if e.window != before else 0)
        else:
            e.lost()
        assert before <= e.window <= e.maximum


# The tuner on a real h2 connection pair ----------------------------------------------
POST = [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/")]


def pair(cfg: Http2Config) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.initiate_connection()
    if cfg.connection_window > 65535:
        server.increment_flow_control_window(cfg.connection_window - 65535)
    carry(client, server)
    return client, server


def carry(a: h2.connection.H2Connection, b: h2.connection.H2Connection) -> list[object]:
    """Frames both ways until neither has anything to send; b's events returned."""
    seen: list[object] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return seen
        if out_a:
            seen += b.receive_data(out_a)
        if out_b:
            a.receive_data(out_b)


def test_growth_reaches_the_peers_send_windows() -> None:
    """A BDP sample that doubles the window while a full window is unacknowledged: once
    it is acknowledged the client may send 128 KiB on the open stream, on a new stream,
    and on the connection (SETTINGS + WINDOW_UPDATE)."""
    cfg = Http2Config(initial_window=65535, connection_window=65535, max_window=MIB)
    client, server = pair(cfg)
    tuner = WindowTuner(server, cfg)
    client.send_headers(1, POST)
    for at in range(0, 65535, 16384):
        client.send_data(1, b"x" * min(16384, 65535 - at))
    events = carry(client, server)
    got = sum(ev.flow_controlled_length for ev in events if isinstance(ev, h2.events.DataReceived))
    assert got == 65535
    tuner.data(16384, 0.0)  # the PING goes out
    tuner.data(got - 16384, 0.0)
    acks = carry(client, server)  # the PING out, its ack back
    pong = [ev for ev in acks if isinstance(ev, h2.events.PingAckReceived)]
    assert len(pong) == 1
    tuner.ack(pong[0].ping_data, 0.05)
    assert tuner.stream_window == tuner.conn_window == 2 * 65535
    carry(client, server)
    # Credit still out when the window grew comes back in full, on top of the growth.
    server.acknowledge_received_data(got, 1)
    carry(client, server)
    assert client.local_flow_control_window(1) == 2 * 65535
    client.send_headers(3, POST)
    assert client.local_flow_control_window(3) == 2 * 65535
    assert client.outbound_flow_control_window == 2 * 65535


def test_someone_elses_ping_ack_is_no_sample() -> None:
    """An ack whose payload is not the BDP PING's (a replay, a client's own) grows nothing."""
    cfg = Http2Config(initial_window=65535, connection_window=65535, max_window=MIB)
    _client, server = pair(cfg)
    tuner = WindowTuner(server, cfg)
    tuner.data(65535, 0.0)
    tuner.ack(b"12345678", 0.05)
    assert tuner.bdp.waiting and tuner.stream_window == 65535
