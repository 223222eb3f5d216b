"""Pins the sans-io ping mesh: probe schedule, reply matching, timeouts, bad datagrams."""

from __future__ import annotations

import itertools
import random

import pytest

from pinger.mesh import Mesh
from pinger.ping_codec import PROBE, Ping, decode, encode

A = ("127.0.0.2", 4281)
B = ("127.0.0.3", 4281)


def _mesh(me: str, interval: float = 1.0, **kw: int) -> Mesh:
    return Mesh(
        me,
        epoch=kw.pop("epoch", 1),
        interval=interval,
        up_after=kw.pop("up_after", 2),
        down_after=kw.pop("down_after", 3),
        rng=random.Random(7),
    )


def _run(
    a: Mesh, b: Mesh, until: float, one_way: float, drop: frozenset[int] = frozenset()
) -> None:
    """Drive two meshes with a simulated clock and a fixed one-way delay."""
    now = 0.0
    k = 0
    while now < until:
        wake = [w for w in (a.next_wakeup(), b.next_wakeup()) if w is not None]
        now = max(now, min(wake))
        for src, dst in ((a, b), (b, a)):
            for _, data in src.due(now):
                k += 1
                if k in drop:
                    continue
                reply = dst.receive(data, now + one_way)
                if reply is not None:
                    src.receive(reply, now + 2 * one_way)


def test_two_meshes_measure_the_round_trip() -> None:
    """Probes answered after 2 x 25 ms give an SRTT of 50 ms and both peers up."""
    a, b = _mesh("nrt"), _mesh("hkg")
    a.set_peers({"hkg": B}, 0.0)
    b.set_peers({"nrt": A}, 0.0)
    _run(a, b, until=5.0, one_way=0.025)
    for m, peer in ((a, "hkg"), (b, "nrt")):
        s = m.snapshot(peer)
        assert abs(s.rtt_us - 50_000) <= 1, s
        assert s.up and s.loss_permille == 0
    assert a.counters.replies >= 4 and a.counters.probes_answered >= 4


def test_probes_follow_the_interval_with_jitter() -> None:
    """Consecutive probes to a peer are interval x [0.9, 1.1] apart; the first within 0.25 s."""
    m = _mesh("nrt", interval=1.0)
    m.set_peers({"hkg": B}, 0.0)
    times: list[float] = []
    now = 0.0
    while len(times) < 30:
        now = m.next_wakeup() or now
        for _ in m.due(now):
            times.append(now)
    assert times[0] <= 0.25
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.9 <= g <= 1.1 for g in gaps), gaps


def test_unanswered_probes_time_out_as_losses_then_down() -> None:
    """Probes nobody answers count as lost after 1 s; down_after of them mark the peer down."""
    m = _mesh("nrt", down_after=3)
    m.set_peers({"hkg": B}, 0.0)
    now = 0.0
    while now < 10.0:
        now = m.next_wakeup() or now
        m.due(now)
    s = m.snapshot("hkg")
    assert s.loss_permille == 1000 and not s.up and s.rtt_us == -1
    assert "hkg" in m.changed


def test_a_lost_probe_counts_in_the_loss_window() -> None:
    """Dropping one probe of n resolved ones shows as a loss of exactly 1/n."""
    a, b = _mesh("nrt", interval=1.0), _mesh("hkg", interval=1000.0)
    a.set_peers({"hkg": B}, 0.0)
    _run(a, b, until=11.5, one_way=0.001, drop=frozenset({3}))
    est = a.peers["hkg"].est
    n = a.counters.replies + est.lost_in_window
    assert est.lost_in_window == 1 and n >= 10
    assert a.snapshot("hkg").loss_permille == round(1000 / n)


def test_reply_after_timeout_is_late_not_an_answer() -> None:
    """A reply that arrives after its probe was counted lost is counted as late."""
    a, b = _mesh("nrt"), _mesh("hkg")
    a.set_peers({"hkg": B}, 0.0)
    t = a.next_wakeup() or 0.0
    ((_, probe),) = a.due(t)
    a.due(t + 1.01)  # the timeout fires
    reply = b.receive(probe, t + 0.001)
    assert reply is not None
    a.receive(reply, t + 1.02)
    assert a.counters.late == 1 and a.counters.replies == 0


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"hello", encode(Ping(PROBE, "x", 1, "y", 1, 1))[:-1], b"\x93\x01\x02\x03"],
)
def test_undecodable_datagrams_are_counted_and_ignored(data: bytes) -> None:
    """A datagram that fails to decode gets no reply and bumps bad_datagrams."""
    m = _mesh("nrt")
    assert m.receive(data, 1.0) is None
    assert m.counters.bad_datagrams == 1


def test_probe_for_another_node_is_not_answered() -> None:
    """A probe addressed to another node id (a stale address) is misdirected, not answered."""
    m = _mesh("nrt")
    probe = encode(Ping(PROBE, "hkg", 1, "sin", 1, 1))
    assert m.receive(probe, 1.0) is None
    assert m.counters.misdirected == 1


def test_reply_carries_the_load_vector_and_epoch() -> None:
    """A probe from a node we do not probe yet is answered with our loads and the time we
    read them; its loads are learned with the time the sender read them."""
    m = _mesh("nrt", epoch=5)
    m.local_loads = {"hello-nrt": 4}
    m.local_loads_at = 1700000000.25
    probe = encode(Ping(PROBE, "hkg", 9, "nrt", 1, 77, {"hello-hkg": 2}, 1700000000.5))
    reply = m.receive(probe, 1.0)
    assert reply is not None
    r = decode(reply)
    assert (r.sender, r.epoch, r.target, r.seq, r.sent_ns) == ("nrt", 5, "hkg", 1, 77)
    assert (r.loads, r.loads_at) == ({"hello-nrt": 4}, 1700000000.25)
    assert m.learned == [("hkg", 9, {"hello-hkg": 2}, 1700000000.5)]


def test_probes_carry_the_load_vector_and_its_time() -> None:
    """A probe carries this node's load vector and the wall time it was read."""
    m = _mesh("nrt", epoch=5)
    m.set_peers({"hkg": B}, 0.0)
    m.local_loads = {"hello-nrt": 4}
    m.local_loads_at = 1700000000.25
    (addr, data), *_ = m.due(2.0)
    p = decode(data)
    assert (addr, p.kind, p.loads, p.loads_at) == (B, PROBE, {"hello-nrt": 4}, 1700000000.25)


def test_loads_from_an_older_epoch_are_ignored() -> None:
    """Once a peer spoke with epoch 9, a datagram from its epoch 8 teaches nothing."""
    m = _mesh("nrt")
    m.set_peers({"hkg": B}, 0.0)
    m.receive(encode(Ping(PROBE, "hkg", 9, "nrt", 1, 1, {"i": 1})), 1.0)
    m.receive(encode(Ping(PROBE, "hkg", 8, "nrt", 2, 1, {"i": 99})), 1.1)
    assert m.learned == [("hkg", 9, {"i": 1}, None)]
    assert m.peers["hkg"].epoch == 9


def test_removed_peers_are_no_longer_probed() -> None:
    """set_peers drops a peer: no more probes go to it, its pending timers are ignored."""
    m = _mesh("nrt")
    m.set_peers({"hkg": B, "sin": A}, 0.0)
    now = m.next_wakeup() or 0.0
    m.due(now + 0.3)
    m.set_peers({"sin": A}, now + 0.3)
    sent = []
    t = now + 0.3
    while t < 5:
        t = m.next_wakeup() or t
        sent += [addr for addr, _ in m.due(t)]
    assert sent and set(sent) == {A}
    assert "hkg" not in m.peers
