"""Pure parts of the store layer, and protocol corners of each backend.

The Consul corners run against tests/support/consul_double.py: no Consul server can be installed
here; this double follows the documented HTTP API. etcd corners use a real etcd-server.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest
from consul_double import ConsulDouble
from etcd_harness import EtcdCluster
from test_pinger_store import Watcher, inst, make_store, node, run

from pinger.store.backoff import Backoff
from pinger.store.consul import ConsulStore, next_index, parse_duration
from pinger.store.etcd import EtcdStore, prefix_end
from pinger.store.records import LoadRecord, Records, decode, encode, record_key


def test_view_keeps_only_the_newest_epoch_of_each_node() -> None:
    """Records of an older epoch of a node, and records of unknown nodes, never reach a view."""
    r = Records("/p/")
    for rec in (
        node("n1", 2),
        inst("n1", "a1", 2),
        inst("n1", "old", 1),
        LoadRecord("a1", "n1", 5, 1.0, 1),
        LoadRecord("old", "n1", 5, 1.0, 1),
        inst("ghost", "g1", 1),
        node("n2", 1),
        LoadRecord("b1", "n2", 3, 1.0, 1),
    ):
        assert r.put("/p/" + record_key(rec), encode(rec))
    v = r.view()
    assert set(v.nodes) == {"n1", "n2"}
    assert set(v.instances) == {"a1"}
    assert set(v.loads) == {"b1"}
    # a newer instance than the node record (a restart half-registered) hides the old node
    r.put("/p/instances/n1/a1", encode(inst("n1", "a1", 3)))
    assert "n1" not in r.view().nodes
    assert r.delete("/p/instances/n1/a1") and "n1" in r.view().nodes


def test_malformed_records_are_ignored() -> None:
    """A record that is not JSON, lacks fields, has wrong types or names another key is skipped."""
    good = encode(node("n1", 1))
    assert decode("nodes/n1", good) == node("n1", 1)
    assert decode("nodes/n2", good) is None
    assert decode("nodes/n1", b"{") is None
    assert decode("nodes/n1", b'{"id": "n1"}') is None
    bad = orjson.loads(good)
    bad["boot_epoch"] = "1"
    assert decode("nodes/n1", orjson.dumps(bad)) is None
    bad["boot_epoch"] = True
    assert decode("nodes/n1", orjson.dumps(bad)) is None
    assert decode("other/n1", good) is None
    r = Records("/p/")
    assert not r.put("/p/nodes/n1", b"junk") and not r.view().nodes


def test_backoff_is_bounded_with_jitter() -> None:
    """Delays double up to the cap, each between half and all of the nominal delay."""
    b = Backoff(base=0.2, cap=3.0)
    delays = [b.next() for _ in range(12)]
    assert 0.1 <= delays[0] <= 0.2
    assert all(d <= 3.0 for d in delays) and delays[-1] >= 1.5
    b.reset()
    assert b.next() <= 0.2


def test_consul_index_rules_and_durations() -> None:
    """Consul's documented index rules: reset to 0 when it goes backwards, never below 1."""
    assert next_index(0, 10) == 10
    assert next_index(10, 12) == 12
    assert next_index(12, 12) == 12
    assert next_index(12, 5) == 0
    assert next_index(0, 0) == 1
    assert next_index(0, -3) == 1
    assert parse_duration("10s") == 10.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("10")
    assert prefix_end(b"/p/") == b"/p0"
    assert prefix_end(b"a\xff") == b"b"


def test_consul_renew_honours_a_longer_ttl(consul: ConsulDouble) -> None:
    """When a renewal answers a longer TTL, the store renews at half of it from then on."""

    async def main() -> None:
        s = make_store("consul", [consul.url], "n1", ttl=1.0)
        assert isinstance(s, ConsulStore)
        await s.start(node("n1", 1), [])
        assert s.renew_every == 0.5
        consul.state.renew_ttl = 4.0
        deadline = time.monotonic() + 3
        while s.renew_every != 2.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert s.renew_every == 2.0 and s.healthy
        await s.close()

    run(main())


def test_consul_index_going_backwards_relists(consul: ConsulDouble) -> None:
    """An X-Consul-Index that goes backwards resets the loop to a fresh read; views stay right."""

    async def main() -> None:
        a = make_store("consul", [consul.url], "n1")
        await a.start(node("n1", 1), [inst("n1", "a1", 1)])
        b = make_store("consul", [consul.url], "n2")
        assert isinstance(b, ConsulStore)
        await b.start(node("n2", 1), [])
        w = Watcher(b)
        await w.until(lambda v: "a1" in v.instances, 5)
        before = b.index
        consul.index_offset = before  # the server's index now reads far lower
        await a.publish_loads({"a1": 1}, 1.0)
        await w.until(lambda v: "a1" in v.loads, 5)
        consul.index_offset = 0
        await a.publish_loads({"a1": 2}, 2.0)
        await w.until(lambda v: v.loads["a1"].load == 2, 5)
        assert b.index > before and b.healthy
        await a.close()
        await b.close()

    run(main())


def test_consul_restart_destroys_the_old_session(consul: ConsulDouble) -> None:
    """A restarted node ends its previous life's session so its keys can be acquired at once."""

    async def main() -> None:
        a = make_store("consul", [consul.url], "n1", ttl=30.0)
        await a.start(node("n1", 1), [inst("n1", "a1", 1), inst("n1", "old", 1)])
        await a.simulate_crash()
        a2 = make_store("consul", [consul.url], "n1", ttl=30.0)
        await a2.start(node("n1", 2), [inst("n1", "a1", 2)])
        assert a2.healthy
        assert "ept/instances/n1/old" not in consul.key_names()
        await a2.close()
        assert consul.key_names() == []

    run(main())


class WatchGate:
    """A TCP relay on 127.0.0.1 between a store and one etcd member that can cut the store's
    watch streams (a lost connection) and hold a new watch request on its way to etcd
    until released, so the cluster can move on (writes, a compaction) meanwhile."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.open = asyncio.Event()
        self.open.set()
        self.held = 0  # watch requests waiting at the gate
        self.watches: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.open.set()
        self.cut()
        if self.server is not None:
            self.server.close()

    def cut(self) -> None:
        """Drop every watch stream's connection, as a network failure would."""
        for w in self.watches:
            w.transport.abort()
        self.watches.clear()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        first = await cr.read(65536)
        if first.startswith(b"POST /v3/watch"):
            self.watches.append(cw)
            if not self.open.is_set():
                self.held += 1
                await self.open.wait()
                self.held -= 1
        sw.write(first)
        await asyncio.gather(self._pump(cr, sw), self._pump(sr, cw))

    @staticmethod
    async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.transport.abort()


def test_etcd_compaction_forces_a_relist(
    etcd1: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A watch that resumes from a revision etcd has compacted away is refused by etcd, and
    the store re-lists because of it and then sees what was written meanwhile."""

    async def main() -> None:
        gate = WatchGate(etcd1.endpoints[0])
        via_gate = await gate.start()
        a = make_store("etcd", etcd1.endpoints, "n1")
        await a.start(node("n1", 1), [inst("n1", "a1", 1)])
        b = make_store("etcd", [via_gate], "n2")
        assert isinstance(b, EtcdStore)
        await b.start(node("n2", 1), [])
        w = Watcher(b)
        await w.until(lambda v: "a1" in v.instances, 5)
        # The watch stream is lost; the store re-lists and asks for a new watch from the
        # revision it listed, which waits at the gate.
        gate.open.clear()
        gate.cut()
        for _ in range(200):
            if gate.held:
                break
            await asyncio.sleep(0.02)
        assert gate.held == 1, "the store opened no new watch after losing its stream"
        resume_from = b.revision + 1
        # Meanwhile the cluster moves on and compacts past that revision.
        for n in range(5):
            await a.publish_loads({"a1": n}, float(n))
        resp = await a.http.request("POST", "/v3/kv/range", orjson.dumps({"key": "AA=="}))
        head = orjson.loads(resp.body)["header"]["revision"]
        assert int(head) > resume_from
        resp = await a.http.request(
            "POST", "/v3/kv/compaction", orjson.dumps({"revision": head, "physical": True})
        )
        assert resp.status == 200, resp.body
        caplog.clear()
        gate.open.set()
        # etcd refuses the watch from below the compaction; the store re-lists for it and
        # gets the loads written while it was away (the watch could not deliver them).
        await w.until(lambda v: "a1" in v.loads and v.loads["a1"].load == 4, 5)
        relists = [r.getMessage() for r in caplog.records if "re-listing" in r.getMessage()]
        assert any(f"compacted at {head}" in m for m in relists), relists
        assert b.revision >= int(head) and b.healthy
        await a.close()
        await b.close()
        await gate.close()

    with caplog.at_level(logging.INFO, logger="edgeproxy.store"):
        run(main())
