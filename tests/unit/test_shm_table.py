"""Writer and reader of the table in one process: model checking and edge cases."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shm import codec, segment
from shm.dump import table_dump
from shm.errors import TableFull, WriterBusyError
from shm.layout import Layout
from shm.reader import TableReader
from shm.writer import TableWriter

_COUNTER = itertools.count()


def unique_name(tag: str) -> str:
    return f"/ept-{tag}-{os.getpid()}-{next(_COUNTER)}"


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    n = unique_name("tbl")
    yield n
    segment.unlink(n)


def cfg(nodes: int = 4, apps: int = 4, instances: int = 8) -> Layout:
    return Layout(nodes, apps, instances)


NODE_IDS = ["n0", "n1", "n2", "n3", "n4"]
APP_NAMES = ["a0", "a1", "a2", "a3"]
INSTANCE_IDS = [f"i{k}" for k in range(8)]


class TableModel(RuleBasedStateMachine):
    """Writer operations against a plain-dict model; the reader view must match after each."""

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name("sm")
        self.cfg = cfg(nodes=3, apps=2, instances=5)
        self.w = TableWriter.open(self.cfg, self.name)
        self.r = TableReader.attach(self.cfg, self.name)
        self.nodes: dict[str, codec.NodeRow] = {}
        self.rtt: dict[str, codec.NodeState] = {}
        self.apps: dict[str, codec.AppRow] = {}
        self.instances: dict[str, codec.InstanceRow] = {}
        self.load: dict[str, tuple[int, int, int]] = {}

    def teardown(self) -> None:
        self.r.close()
        self.w.close(unlink=True)

    @rule(
        nid=st.sampled_from(NODE_IDS),
        region=st.sampled_from(["nrt", "hkg"]),
        epoch=st.integers(0, 9),
    )
    def put_node(self, nid: str, region: str, epoch: int) -> None:
        row = codec.NodeRow(nid, region, f"127.0.0.2:{4280 + epoch}", epoch)
        if nid not in self.nodes and len(self.nodes) == self.cfg.max_nodes:
            with pytest.raises(TableFull):
                self.w.put_node(row)
            return
        self.w.put_node(row)
        if nid not in self.nodes:
            self.rtt[nid] = codec.NodeState(0, 0, 0, False, 0)
        self.nodes[nid] = row

    @rule(nid=st.sampled_from(NODE_IDS))
    def remove_node(self, nid: str) -> None:
        if nid not in self.nodes:
            with pytest.raises(KeyError):
                self.w.remove_node(nid)
            return
        self.w.remove_node(nid)
        del self.nodes[nid], self.rtt[nid]

    @rule(name=st.sampled_from(APP_NAMES), n_hosts=st.integers(0, 3), soft=st.integers(1, 50))
    def put_app(self, name: str, n_hosts: int, soft: int) -> None:
        hosts = tuple(f"{name}-{k}.test" for k in range(n_hosts))
        row = codec.AppRow(name, hosts, "closest", soft, soft + 5, 2)
        if name not in self.apps and len(self.apps) == self.cfg.max_apps:
            with pytest.raises(TableFull):
                self.w.put_app(row)
            return
        self.w.put_app(row)
        self.apps[name] = row

    @rule(name=st.sampled_from(APP_NAMES))
    def remove_app(self, name: str) -> None:
        if name in self.apps:
            self.w.remove_app(name)
            del self.apps[name]

    @rule(
        iid=st.sampled_from(INSTANCE_IDS),
        app=st.sampled_from(APP_NAMES),
        node=st.sampled_from(NODE_IDS),
        port=st.integers(1, 65535),
    )
    def put_instance(self, iid: str, app: str, node: str, port: int) -> None:
        row = codec.InstanceRow(app, iid, node, f"127.0.0.1:{port}", 10, 20)
        if iid not in self.instances and len(self.instances) == self.cfg.max_instances:
            with pytest.raises(TableFull):
                self.w.put_instance(row)
            return
        self.w.put_instance(row)
        if iid not in self.instances:
            self.load[iid] = (0, 0, 0)
        self.instances[iid] = row

    @rule(iid=st.sampled_from(INSTANCE_IDS))
    def remove_instance(self, iid: str) -> None:
        if iid in self.instances:
            self.w.remove_instance(iid)
            del self.instances[iid], self.load[iid]

    @rule(iid=st.sampled_from(INSTANCE_IDS), load=st.integers(0, 10**6), t=st.integers(0, 10**9))
    def set_load(self, iid: str, load: int, t: int) -> None:
        if iid not in self.instances:
            with pytest.raises(KeyError):
                self.w.set_load(iid, load, float(t), 7)
            return
        gen = self.w.generation
        self.w.set_load(iid, load, float(t), 7)
        assert self.w.generation == gen  # in place, no topology change
        self.load[iid] = (load, t * 1_000_000, 7)

    @rule(
        nid=st.sampled_from(NODE_IDS),
        rtt=st.integers(0, 10**7),
        loss=st.integers(0, 1000),
        up=st.booleans(),
    )
    def set_rtt(self, nid: str, rtt: int, loss: int, up: bool) -> None:
        if nid not in self.nodes:
            return
        gen = self.w.generation
        self.w.set_rtt(
            nid, rtt_us=rtt, jitter_us=rtt // 10, loss_permille=loss, last_heard=5.0, up=up
        )
        assert self.w.generation == gen
        self.rtt[nid] = codec.NodeState(rtt, rtt // 10, loss, up, 5_000_000)

    @invariant()
    def reader_matches_model(self) -> None:
        for app in APP_NAMES:
            got = {
                c.id: (
                    codec.InstanceRow(c.app, c.id, c.node, c.address, c.soft_limit, c.hard_limit),
                    (c.load, c.load_time_us, c.publisher_epoch),
                    codec.NodeState(
                        c.rtt_us, c.jitter_us, c.loss_permille, c.node_up, c.last_heard_us
                    ),
                )
                for c in self.r.candidates(app)
            }
            want = {
                iid: (
                    row,
                    self.load[iid],
                    self.rtt.get(row.node, codec.NodeState(-1, 0, 0, False, 0)),
                )
                for iid, row in self.instances.items()
                if row.app == app
            }
            assert got == want
            assert self.r.app(app) == self.apps.get(app)
            for k in range(3):
                host = f"{app}-{k}.test"
                owner = app if app in self.apps and host in self.apps[app].hosts else None
                assert self.r.app_for_host(host) == owner
        assert {n.id: (n, s) for n, s in self.r.nodes()} == {
            nid: (row, self.rtt[nid]) for nid, row in self.nodes.items()
        }
        assert self.w.instances() == self.instances
        assert self.r.fallbacks == 0


TestTableModel = TableModel.TestCase
TestTableModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_table_full_leaves_existing_rows_intact(name: str) -> None:
    """Adding past capacity raises TableFull; every existing row still reads the same."""
    w = TableWriter.open(cfg(nodes=1, apps=1, instances=2), name)
    w.put_node(codec.NodeRow("n0", "r", "a:1", 1))
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 1, 2, 2))
    for k in range(2):
        w.put_instance(codec.InstanceRow("a", f"i{k}", "n0", f"h:{k + 1}", 1, 2))
        w.set_load(f"i{k}", 10 + k, 1.0, 1)
    gen = w.generation
    with pytest.raises(
        TableFull, match=r"instances table is full \(2 rows\); raise table\.max_instances"
    ):
        w.put_instance(codec.InstanceRow("a", "i9", "n0", "h:9", 1, 2))
    with pytest.raises(TableFull, match="nodes"):
        w.put_node(codec.NodeRow("n1", "r", "a:1", 1))
    with pytest.raises(TableFull, match="apps"):
        w.put_app(codec.AppRow("b", ("b.test",), "closest", 1, 2, 2))
    assert w.generation == gen
    r = TableReader.attach(cfg(nodes=1, apps=1, instances=2), name)
    assert [(c.id, c.load, c.address) for c in r.candidates("a")] == [
        ("i0", 10, "h:1"),
        ("i1", 11, "h:2"),
    ]
    assert r.app_for_host("b.test") is None
    # A freed row is reused.
    w.remove_instance("i0")
    w.put_instance(codec.InstanceRow("a", "i9", "n0", "h:9", 1, 2))
    assert sorted(c.id for c in r.candidates("a")) == ["i1", "i9"]
    r.close()
    w.close()


def test_second_writer_is_refused_naming_the_holder(name: str) -> None:
    """Only one writer: another one gets WriterBusyError with the holder's pid."""
    w = TableWriter.open(cfg(), name)
    with pytest.raises(WriterBusyError, match=f"pid {os.getpid()}"):
        TableWriter.open(cfg(), name)
    w.close()
    w2 = TableWriter.open(cfg(), name)  # released with the first writer's fd
    assert w2.boot_epoch == 2
    w2.close()


def test_forked_child_does_not_inherit_the_writer_lock(name: str) -> None:
    """A child forked by the writer (a proxy worker, say) cannot keep the lock alive."""
    w = TableWriter.open(cfg(), name)
    r_fd, w_fd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: wait until the parent has closed, then report what it holds
        os.close(r_fd)
        os.read(go_r, 1)
        try:
            TableWriter.open(cfg(), name).close()
            os.write(w_fd, b"free")
        except WriterBusyError:
            os.write(w_fd, b"held")
        os._exit(0)
    os.close(w_fd)
    w.close()
    os.write(go_w, b"x")
    assert os.read(r_fd, 4) == b"free"
    os.waitpid(pid, 0)
    for fd in (r_fd, go_r, go_w):
        os.close(fd)


def test_batch_bumps_the_generation_once(name: str) -> None:
    """Topology changes in a batch are published by a single generation bump."""
    w = TableWriter.open(cfg(), name)
    gen = w.generation
    with w.batch():
        w.put_node(codec.NodeRow("n0", "r", "a:1", 1))
        w.put_app(codec.AppRow("a", ("a.test",), "closest", 1, 2, 2))
        w.put_instance(codec.InstanceRow("a", "i0", "n0", "h:1", 1, 2))
        assert w.generation == gen
    assert w.generation == gen + 1
    w.close()


def test_host_conflict_is_refused(name: str) -> None:
    """A host already served by another app is refused; the first app keeps it."""
    w = TableWriter.open(cfg(), name)
    w.put_app(codec.AppRow("a", ("x.test",), "closest", 1, 2, 2))
    with pytest.raises(ValueError, match="already belongs to app 'a'"):
        w.put_app(codec.AppRow("b", ("x.test",), "closest", 1, 2, 2))
    w.put_app(codec.AppRow("a", ("y.test",), "closest", 1, 2, 2))  # a moves away
    w.put_app(codec.AppRow("b", ("x.test",), "closest", 1, 2, 2))
    r = TableReader.attach(cfg(), name)
    assert (r.app_for_host("x.test"), r.app_for_host("y.test")) == ("b", "a")
    r.close()
    w.close()


def test_stale_follows_the_heartbeat_with_an_injected_clock(name: str) -> None:
    """stale() is true once the heartbeat is older than max_age, and says how old it is."""
    w = TableWriter.open(cfg(), name)
    r = TableReader.attach(cfg(), name)
    assert r.stale(1000.0, 5.0) == (True, float("inf"))  # never beaten
    w.heartbeat(1000.0)
    assert r.stale(1004.0, 5.0) == (False, 4.0)
    assert r.stale(1005.5, 5.0) == (True, 5.5)
    w.heartbeat(1005.0)
    assert r.stale(1005.5, 5.0) == (False, 0.5)
    r.close()
    w.close()


def test_dump_is_plain_json(name: str) -> None:
    """table_dump() gives nodes, instances, staleness and counters as plain JSON data."""
    w = TableWriter.open(cfg(), name)
    w.put_node(codec.NodeRow("hkg1", "hkg", "127.0.0.3:4280", 3))
    w.set_rtt("hkg1", rtt_us=50_000, jitter_us=1500, loss_permille=20, last_heard=99.0, up=True)
    w.put_app(codec.AppRow("hello", ("hello.test",), "closest", 20, 25, 2))
    w.put_instance(codec.InstanceRow("hello", "hello-hkg", "hkg1", "127.0.0.3:9001", 20, 25))
    w.set_load("hello-hkg", 4, 98.0, 3)
    w.heartbeat(100.0)
    r = TableReader.attach(cfg(), name)
    d = table_dump(r, now=101.0, max_age=5.0)
    assert json.loads(json.dumps(d)) == d
    assert d["stale"] is False and d["heartbeat_age"] == 1.0 and d["fallbacks"] == 0
    assert d["writer"] == {"pid": os.getpid(), "boot_epoch": 1}
    assert d["nodes"] == [
        {
            "id": "hkg1",
            "region": "hkg",
            "backhaul": "127.0.0.3:4280",
            "boot_epoch": 3,
            "up": True,
            "rtt_ms": 50.0,
            "jitter_ms": 1.5,
            "loss": 0.02,
            "age": 2.0,
        }
    ]
    assert d["instances"] == [
        {
            "id": "hello-hkg",
            "app": "hello",
            "node": "hkg1",
            "address": "127.0.0.3:9001",
            "load": 4,
            "soft_limit": 20,
            "hard_limit": 25,
            "age": 3.0,
            "publisher_epoch": 3,
        }
    ]
    assert d["apps"][0]["hosts"] == ["hello.test"]
    r.close()
    w.close()


def test_reader_caches_topology_until_the_generation_moves(name: str) -> None:
    """candidates() returns the same cached objects until a topology change, with fresh load."""
    w = TableWriter.open(cfg(), name)
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 1, 2, 2))
    w.put_instance(codec.InstanceRow("a", "i0", "n0", "h:1", 1, 2))
    r = TableReader.attach(cfg(), name)
    first = r.candidates("a")
    w.set_load("i0", 5, 1.0, 1)
    again = r.candidates("a")
    assert again is first and again[0].load == 5
    w.put_instance(codec.InstanceRow("a", "i1", "n0", "h:2", 1, 2))
    moved = r.candidates("a")
    assert [c.id for c in moved] == ["i0", "i1"] and moved[0] is first[0]
    assert moved[0].load == 5 and moved[0].rtt_us == -1 and not moved[0].node_up
    assert r.candidates("nope") == ()
    r.close()
    w.close()


def test_candidates_can_leave_local_loads_unread(name: str) -> None:
    """skip_local: a caller that counts its node's instances itself gets remote loads read
    now and local ones untouched (not even a torn-read check); load_of reads one on demand."""
    w = TableWriter.open(cfg(), name)
    w.put_node(codec.NodeRow("far", "r", "127.0.0.3:4280", 1))
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 5, 8, 2))
    w.put_instance(codec.InstanceRow("a", "mine", "here", "127.0.0.1:1", 5, 8))
    w.put_instance(codec.InstanceRow("a", "theirs", "far", "127.0.0.3:1", 5, 8))
    w.set_load("mine", 3, 1.0, 1)
    w.set_load("theirs", 4, 1.0, 1)
    r = TableReader.attach(cfg(), name, local_node="here")
    by_id = {c.id: c for c in r.candidates("a")}
    assert by_id["mine"].local and not by_id["theirs"].local
    assert (by_id["mine"].load, by_id["theirs"].load) == (3, 4)
    by_id["mine"].load = 99  # what the caller's own count said
    w.set_load("mine", 6, 2.0, 1)
    w.set_load("theirs", 7, 2.0, 1)
    by_id = {c.id: c for c in r.candidates("a", skip_local=True)}
    assert (by_id["mine"].load, by_id["theirs"].load) == (99, 7)
    r.load_of(by_id["mine"])
    assert by_id["mine"].load == 6
    by_id = {c.id: c for c in r.candidates("a")}
    assert by_id["mine"].load == 6
    r.close()
    w.close()
