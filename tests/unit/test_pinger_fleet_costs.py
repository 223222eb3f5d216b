"""The pinger's per-fleet costs, in one process: a real table, views, RTTs and in-flight
counters fed by hand to pinger.daemon.Daemon, both clocks injected.

What bench/fleet_sim.py measured at 300 nodes and the daemon now bounds: store load
publishes are paced (each is delivered to every node's watch), a view that only changed
loads applies only those, and a peer's RTT moves in the table only past its deadband
(each move that passes another node re-sorts the table's per-app order).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator, Mapping

import pytest

from pinger.daemon import STORE_LOAD_EVERY, Daemon, store_load_pace
from pinger.store.records import ClusterView, InstanceRecord, LoadRecord, NodeRecord
from proxy.config import loads
from proxy.config_table import inflight_name
from shm import segment
from shm.inflight import InflightCells, InflightWriter
from shm.layout import Layout
from shm.reader import TableReader
from shm.writer import TableWriter

_COUNTER = itertools.count()
E1 = 1_000


class Recorder:
    """A store that records what the daemon publishes (the store's own code is tested
    against real etcd in tests/fleet)."""

    healthy = True

    def __init__(self) -> None:
        self.published: list[tuple[dict[str, int], float]] = []

    async def publish_loads(self, loads: Mapping[str, int], now: float) -> None:
        self.published.append((dict(loads), now))


class Node:
    """nrt's daemon on a table of its own, with a local instance and in-flight counters."""

    def __init__(self, tag: str) -> None:
        self.name = f"/ept-costs-{os.getpid()}-{tag}"
        cfg = (
            '[node]\nid = "nrt"\nregion = "nrt"\n'
            '[cluster]\nstore = "etcd"\nendpoints = ["http://127.0.0.1:9"]\n'
            f'[table]\nname = "ept-costs-{os.getpid()}-{tag}"\n'
            '[[app]]\nname = "hello"\nhosts = ["hello.test"]\n'
            '[[instance]]\napp = "hello"\nid = "hello-nrt"\naddress = "127.0.0.2:8001"\n'
        )
        self.config = loads(cfg)
        self.layout = Layout(8, 4, 16)
        self.w = TableWriter.open(self.layout, self.name)
        self.r = TableReader.attach(self.layout, self.name)
        self.wall, self.mono = 100.0, 10.0
        self.d = Daemon(
            self.config, self.w, epoch=E1, wall=lambda: self.wall, mono=lambda: self.mono
        )
        self.d.write_rows(self.d.adopted_rows())
        self.inflight = InflightWriter.create(inflight_name(self.config.table))
        self.slot = self.inflight.assign_instances(["hello-nrt"])["hello-nrt"]
        self.cells = InflightCells(self.inflight.segment, 0)

    def view(self, ping: str = "127.0.0.3:4281", load: LoadRecord | None = None) -> None:
        node = NodeRecord("hkg", "hkg", ping, "127.0.0.3:4280", E1)
        inst = InstanceRecord("hello", "hello-hkg", "hkg", "127.0.0.3:8001", 20, 25, E1)
        got = {} if load is None else {load.instance: load}
        self.d.apply_view(ClusterView({"hkg": node}, {inst.id: inst}, got))

    def row(self, nid: str) -> tuple[int, bool]:
        """(rtt_us, up) of node `nid` in the table."""
        return next((st.rtt_us, st.up) for row, st in self.r.nodes() if row.id == nid)

    def load_of(self, iid: str) -> int:
        return next(c.load for c in self.r.instances() if c.id == iid)

    def close(self) -> None:
        self.inflight.close(unlink=True)
        self.r.close()
        self.w.close()
        segment.unlink(self.name)


@pytest.fixture
def nrt() -> Iterator[Node]:
    n = Node(str(next(_COUNTER)))
    try:
        yield n
    finally:
        n.close()


def test_store_load_publishes_are_paced(nrt: Node) -> None:
    """A load that changes every read (100 ms) reaches the store once per pace, newest
    value each time, while the table has every value at once."""
    rec = Recorder()
    nrt.d.store = rec  # type: ignore[assignment]

    async def drive() -> None:
        for step in range(101):  # 10 s of reads, the load +1 each
            nrt.cells.inc(nrt.slot)
            nrt.mono = 10.0 + step * 0.1
            nrt.wall = 100.0 + step * 0.1
            nrt.d.read_local_load()
            await asyncio.sleep(0)  # the publish task runs
            await asyncio.sleep(0)
            assert nrt.load_of("hello-nrt") == step + 1

    asyncio.run(drive())
    assert store_load_pace(1) == STORE_LOAD_EVERY
    assert [loads["hello-nrt"] for loads, _ in rec.published] == [1, 51, 101]


def test_store_load_pace_grows_with_the_fleet() -> None:
    """Past STORE_LOAD_EVENTS * STORE_LOAD_EVERY peers, the pace grows with the peer count."""
    assert store_load_pace(3) == STORE_LOAD_EVERY
    assert store_load_pace(300) == 150.0
    assert store_load_pace(3000) == 1500.0


def test_a_view_that_only_changed_a_load_applies_it(nrt: Node) -> None:
    """Same nodes and instances, a new load record: the table takes the new load."""
    nrt.view(load=LoadRecord("hello-hkg", "hkg", 3, 99.0, E1))
    assert nrt.load_of("hello-hkg") == 3
    nrt.view(load=LoadRecord("hello-hkg", "hkg", 7, 99.5, E1))
    assert nrt.load_of("hello-hkg") == 7
    nrt.view(load=LoadRecord("hello-hkg", "hkg", 2, 99.2, E1))  # older than 7's: ignored
    assert nrt.load_of("hello-hkg") == 7


def test_a_view_that_changed_a_node_is_applied_whole(nrt: Node) -> None:
    """A node record that changed (its ping address) still reaches the mesh."""
    nrt.view()
    assert nrt.d.mesh.peers["hkg"].addr == ("127.0.0.3", 4281)
    nrt.view(ping="127.0.0.3:4999")
    assert nrt.d.mesh.peers["hkg"].addr == ("127.0.0.3", 4999)


def test_rtt_noise_stays_out_of_the_table(nrt: Node) -> None:
    """A peer answering 46/54 ms in turn: once its jitter is known the table keeps one
    value however the smoothed RTT wobbles; a real change (80 ms) gets through; going
    down is written at once whatever the RTT did."""
    nrt.view()
    est = nrt.d.mesh.peers["hkg"].est
    for k in range(40):
        est.answered(0.046 if k % 2 else 0.054, nrt.mono)
    nrt.d.write_peer("hkg")
    kept = nrt.row("hkg")[0]
    seen = set()
    for k in range(20):
        est.answered(0.046 if k % 2 else 0.054, nrt.mono)
        nrt.d.write_peer("hkg")
        assert est.srtt is not None
        seen.add(round(est.srtt * 1e6))
        assert nrt.row("hkg")[0] == kept
    assert len(seen) > 10  # the smoothed RTT did move
    for _ in range(8):
        est.answered(0.080, nrt.mono)
        nrt.d.write_peer("hkg")
    assert nrt.row("hkg")[0] > 60_000
    kept = nrt.row("hkg")[0]
    for _ in range(est.down_after):
        est.missed()
    nrt.d.write_peer("hkg")
    assert nrt.row("hkg") == (kept, False)


def test_a_quiet_peer_rtt_is_written_within_its_jitter(nrt: Node) -> None:
    """A first sample 3 ms high, then steady answers: the table follows the smoothed RTT
    to within the deadband (the injected-delay fleet test needs +-2 ms)."""
    nrt.view()
    est = nrt.d.mesh.peers["hkg"].est
    est.answered(0.073, nrt.mono)
    nrt.d.write_peer("hkg")
    for _ in range(40):
        est.answered(0.070, nrt.mono)
        nrt.d.write_peer("hkg")
    assert est.srtt is not None
    assert abs(nrt.row("hkg")[0] - est.srtt * 1e6) <= 200
    assert abs(nrt.row("hkg")[0] - 70_000) <= 300
