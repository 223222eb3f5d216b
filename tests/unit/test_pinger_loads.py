"""The pinger's ordering of remote loads, in one process: a real table, views and pings
fed by hand to pinger.daemon.Daemon, the wall clock injected.

A remote instance's load arrives two ways, through the store and piggybacked on pings;
both carry the publisher's wall time of the value, and the newest of this life wins.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from pinger.daemon import Daemon
from pinger.store.records import ClusterView, InstanceRecord, LoadRecord, NodeRecord
from proxy.config import Config, loads
from shm import segment
from shm.dump import table_dump
from shm.layout import Layout
from shm.reader import TableReader
from shm.writer import TableWriter

_COUNTER = itertools.count()
E1, E2 = 1_000, 2_000  # hkg's boot epochs: its first life and a quick restart

CONFIG = """
[node]
id = "nrt"
region = "nrt"
[cluster]
store = "etcd"
endpoints = ["http://127.0.0.1:9"]
[table]
name = "unused"
[[app]]
name = "hello"
hosts = ["hello.test"]
"""


class Watcher:
    """nrt's pinger daemon on a table of its own, with a wall clock the test sets."""

    def __init__(self, name: str) -> None:
        self.config: Config = loads(CONFIG)
        self.layout = Layout(8, 4, 16)
        self.w = TableWriter.open(self.layout, name)
        self.r = TableReader.attach(self.layout, name)
        self.now = 100.0
        self.d = Daemon(self.config, self.w, epoch=1, wall=lambda: self.now)

    def view(self, epoch: int, load: LoadRecord | None) -> None:
        """A store view holding hkg (this boot epoch), its instance, and `load` if any."""
        node = NodeRecord("hkg", "hkg", "127.0.0.3:4281", "127.0.0.3:4280", epoch)
        inst = InstanceRecord("hello", "hello-hkg", "hkg", "127.0.0.3:8001", 20, 25, epoch)
        loads = {} if load is None else {load.instance: load}
        self.d.apply_view(ClusterView({"hkg": node}, {inst.id: inst}, loads))

    def ping(self, epoch: int, load: int, at: float | None) -> None:
        """A ping from hkg carrying its load vector, read at its time `at`, arriving now."""
        self.d.mesh.learned.append(("hkg", epoch, {"hello-hkg": load}, at))
        self.d.on_mesh_change()

    def row(self) -> tuple[int, int]:
        """(load, publisher epoch) of hello-hkg in the table."""
        got: dict[str, Any] = {i["id"]: i for i in table_dump(self.r, self.now, 5.0)["instances"]}
        return got["hello-hkg"]["load"], got["hello-hkg"]["publisher_epoch"]

    def close(self) -> None:
        self.r.close()
        self.w.close()


@pytest.fixture
def nrt() -> Iterator[Watcher]:
    name = f"/ept-loads-{os.getpid()}-{next(_COUNTER)}"
    w = Watcher(name)
    try:
        yield w
    finally:
        w.close()
        segment.unlink(name)


def test_a_ping_read_before_a_store_record_does_not_replace_it(nrt: Watcher) -> None:
    """A ping whose loads were read before the store's newer record, arriving after it,
    changes nothing (its time, not its arrival, orders it); a later ping does."""
    nrt.view(E1, LoadRecord("hello-hkg", "hkg", 0, 99.0, E1))
    nrt.now = 100.50
    nrt.view(E1, LoadRecord("hello-hkg", "hkg", 5, 100.45, E1))  # the store: 5 at 100.45
    assert nrt.row() == (5, E1)
    nrt.now = 100.52
    nrt.ping(E1, 0, at=100.40)  # read at 100.40, on the way while the store was quicker
    assert nrt.row() == (5, E1)
    nrt.now = 100.80
    nrt.ping(E1, 3, at=100.75)
    assert nrt.row() == (3, E1)


def test_a_ping_without_a_time_is_ordered_by_its_arrival(nrt: Watcher) -> None:
    """From a pinger that sends no time with its loads, the arrival time stands in."""
    nrt.view(E1, LoadRecord("hello-hkg", "hkg", 5, 100.0, E1))
    nrt.now = 100.3
    nrt.ping(E1, 2, at=None)
    assert nrt.row() == (2, E1)
    nrt.view(E1, LoadRecord("hello-hkg", "hkg", 7, 100.2, E1))  # older than that arrival
    assert nrt.row() == (2, E1)


def test_a_new_life_drops_the_load_of_the_last(nrt: Watcher) -> None:
    """hkg restarted within its TTL: once the view shows its new epoch, its instance is at
    0 under that epoch, even if the view still carried the old life's load record or a
    ping of the old life (with a newer time) arrives late."""
    nrt.view(E1, LoadRecord("hello-hkg", "hkg", 5, 100.0, E1))
    assert nrt.row() == (5, E1)
    nrt.now = 101.0
    nrt.view(E2, LoadRecord("hello-hkg", "hkg", 5, 100.0, E1))
    assert nrt.row() == (0, E2)
    nrt.ping(E1, 5, at=100.9)
    assert nrt.row() == (0, E2)
    nrt.now = 101.2
    nrt.ping(E2, 1, at=101.1)
    assert nrt.row() == (1, E2)
