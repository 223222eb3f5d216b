"""The cluster store backends, behaviour by behaviour, for etcd and for Consul.

etcd is a real etcd-server started by tests/support/etcd_harness.py. No Consul server can be
installed here: the Consul backend runs against tests/support/consul_double.py, a test double that
follows Consul's documented HTTP API (sessions, TTL, Behavior=delete, acquire, blocking index).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from consul_double import ConsulDouble
from etcd_harness import EtcdCluster, require_etcd

from pinger.store import open_store
from pinger.store.base import BaseStore
from pinger.store.records import ClusterView, InstanceRecord, NodeRecord
from proxy.config import loads

TTL = 2.0


@dataclass
class Backend:
    kind: str
    endpoints: list[str]
    stop: Callable[[], None]
    start: Callable[[], None]


@pytest.fixture(params=["etcd", "consul"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh store per test: a one-member etcd, or the Consul double (1 s minimum TTL)."""
    if request.param == "etcd":
        require_etcd()
        c = EtcdCluster(1, tmp_path / "etcd")
        c.start()
        yield Backend("etcd", c.endpoints, c.stop, c.start)
        c.close()
    else:
        d = ConsulDouble(session_ttl_min=1.0)
        d.start()
        yield Backend("consul", [d.url], d.stop, d.start)
        d.close()


def make_store(kind: str, endpoints: list[str], node: str, ttl: float = TTL) -> BaseStore:
    eps = ", ".join(f'"{e}"' for e in endpoints)
    cfg = loads(
        f'[node]\nid = "{node}"\nregion = "r"\n'
        f'[cluster]\nstore = "{kind}"\nendpoints = [{eps}]\nttl = {ttl}\nprefix = "/ept/"\n'
    )
    store = open_store(cfg)
    assert isinstance(store, BaseStore)
    return store


def node(nid: str, epoch: int) -> NodeRecord:
    return NodeRecord(nid, "r", "127.0.0.2:4281", "127.0.0.2:4280", epoch)


def inst(nid: str, iid: str, epoch: int) -> InstanceRecord:
    return InstanceRecord("hello", iid, nid, "127.0.0.2:9001", 20, 25, epoch)


class Watcher:
    """Collects every view a store yields, with the time it arrived."""

    def __init__(self, store: BaseStore) -> None:
        self.views: list[tuple[float, ClusterView]] = []
        self._new = asyncio.Event()
        self.task = asyncio.create_task(self._run(store))

    async def _run(self, store: BaseStore) -> None:
        async for v in store.views():
            self.views.append((time.monotonic(), v))
            self._new.set()

    @property
    def last(self) -> ClusterView:
        return self.views[-1][1]

    async def until(self, pred: Callable[[ClusterView], bool], timeout: float) -> float:
        """Wait for a view that satisfies `pred`; returns the monotonic time it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            if self.views and pred(self.views[-1][1]):
                return self.views[-1][0]
            self._new.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                last = self.views[-1][1] if self.views else None
                raise AssertionError(f"no matching view within {timeout}s; last: {last}")
            try:
                async with asyncio.timeout(left):
                    await self._new.wait()
            except TimeoutError:
                pass


def run(coro: Coroutine[Any, Any, None], timeout: float = 60) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(bounded())


async def pair(b: Backend, ttl: float = TTL) -> tuple[BaseStore, BaseStore, Watcher]:
    """Node n1 (epoch 1, instance a1) and node n2 watching; waits until n2 sees n1."""
    a = make_store(b.kind, b.endpoints, "n1", ttl)
    await a.start(node("n1", 1), [inst("n1", "a1", 1)])
    other = make_store(b.kind, b.endpoints, "n2", ttl)
    await other.start(node("n2", 1), [inst("n2", "b1", 1)])
    w = Watcher(other)
    await w.until(lambda v: "n1" in v.nodes and "a1" in v.instances, 5)
    return a, other, w


def test_start_registers_and_peer_sees_it(backend: Backend) -> None:
    """A started store registers node and instances, and another node's store sees them."""

    async def main() -> None:
        a, b, wb = await pair(backend)
        assert a.healthy and b.healthy
        wa = Watcher(a)
        await wa.until(lambda v: {"n1", "n2"} <= set(v.nodes) and "b1" in v.instances, 5)
        assert wb.last.nodes["n1"] == node("n1", 1)
        assert wb.last.instances["a1"] == inst("n1", "a1", 1)
        await a.close()
        await b.close()

    run(main())


def test_loads_carry_the_epoch(backend: Backend) -> None:
    """publish_loads shows up on the other node with the publisher's boot epoch."""

    async def main() -> None:
        a, b, wb = await pair(backend)
        await a.publish_loads({"a1": 3}, 1000.0)
        await wb.until(lambda v: "a1" in v.loads and v.loads["a1"].load == 3, 5)
        rec = wb.last.loads["a1"]
        assert (rec.node, rec.boot_epoch, rec.time) == ("n1", 1, 1000.0)
        await a.publish_loads({"a1": 5}, 1001.0)
        await wb.until(lambda v: v.loads["a1"].load == 5, 5)
        await a.close()
        await b.close()

    run(main())


def test_clean_close_removes_keys_at_once(backend: Backend) -> None:
    """A clean close revokes the lease / destroys the session: the keys vanish in < 1 s."""

    async def main() -> None:
        a, b, wb = await pair(backend)
        await a.publish_loads({"a1": 2}, 1.0)
        await wb.until(lambda v: "a1" in v.loads, 5)
        t0 = time.monotonic()
        await a.close()
        t1 = await wb.until(lambda v: "n1" not in v.nodes and "a1" not in v.instances, 5)
        print(f"{backend.kind}: keys gone {t1 - t0:.3f}s after a clean close")
        assert t1 - t0 < 1.0
        assert "a1" not in wb.last.loads
        await b.close()

    run(main())


@pytest.mark.slow
def test_crash_keys_expire_within_ttl(backend: Backend) -> None:
    """A crash (no revoke, no renewal) lets the keys vanish within TTL + 1 s."""

    async def main() -> None:
        a, b, wb = await pair(backend)
        t0 = time.monotonic()
        await a.simulate_crash()
        t1 = await wb.until(lambda v: "n1" not in v.nodes and "a1" not in v.instances, TTL + 3)
        print(f"{backend.kind}: keys gone {t1 - t0:.3f}s after a crash (TTL {TTL}s)")
        assert t1 - t0 < TTL + 1
        await b.close()

    run(main())


def test_restart_replaces_old_epoch(backend: Backend) -> None:
    """A restart with a new epoch replaces the old records; old-epoch loads are never yielded."""

    async def main() -> None:
        a = make_store(backend.kind, backend.endpoints, "n1")
        await a.start(node("n1", 1), [inst("n1", "a1", 1), inst("n1", "gone", 1)])
        b = make_store(backend.kind, backend.endpoints, "n2")
        await b.start(node("n2", 1), [])
        wb = Watcher(b)
        await a.publish_loads({"a1": 7, "gone": 1}, 1.0)
        await wb.until(lambda v: "a1" in v.loads and "gone" in v.loads, 5)
        await a.simulate_crash()
        a2 = make_store(backend.kind, backend.endpoints, "n1")
        await a2.start(node("n1", 2), [inst("n1", "a1", 2)])
        await wb.until(lambda v: "n1" in v.nodes and v.nodes["n1"].boot_epoch == 2, 5)
        await asyncio.sleep(0.3)
        await a2.publish_loads({"a1": 1}, 2.0)
        await wb.until(lambda v: "a1" in v.loads and v.loads["a1"].boot_epoch == 2, 5)
        for _, v in wb.views:
            if "n1" in v.nodes and v.nodes["n1"].boot_epoch == 2:
                assert all(r.boot_epoch == 2 for r in v.loads.values() if r.node == "n1"), v
                assert all(r.boot_epoch == 2 for r in v.instances.values() if r.node == "n1"), v
                assert "gone" not in v.instances and "gone" not in v.loads
        assert wb.last.loads["a1"].load == 1
        await a2.close()
        await b.close()

    run(main())


@pytest.mark.slow
def test_store_outage_keeps_view_then_reregisters(backend: Backend) -> None:
    """Store down: unhealthy, last view kept; back: re-registered and healthy within TTL."""

    async def main() -> None:
        a, b, wb = await pair(backend)
        await a.publish_loads({"a1": 4}, 1.0)
        await wb.until(lambda v: "a1" in v.loads, 5)
        before = len(wb.views)
        await asyncio.to_thread(backend.stop)
        deadline = time.monotonic() + TTL + 2
        while (a.healthy or b.healthy) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not a.healthy and not b.healthy
        await a.publish_loads({"a1": 9}, 2.0)  # must not raise; goes out on return
        await asyncio.sleep(TTL + 1)  # longer than the TTL: the old lease / session may lapse
        assert "n1" in wb.last.nodes and wb.last.loads["a1"].load == 4
        assert all("n1" in v.nodes for _, v in wb.views[before:])
        t0 = time.monotonic()
        await asyncio.to_thread(backend.start)
        t_up = time.monotonic()
        t1 = await wb.until(
            lambda v: "n1" in v.nodes and "a1" in v.loads and v.loads["a1"].load == 9, TTL + 5
        )
        while not (a.healthy and b.healthy) and time.monotonic() < t_up + TTL:
            await asyncio.sleep(0.05)
        print(f"{backend.kind}: store back (started in {t_up - t0:.2f}s); "
              f"re-registered view {t1 - t_up:.2f}s later")  # fmt: skip
        assert a.healthy and b.healthy
        assert t1 - t_up < TTL
        await a.close()
        await b.close()

    run(main())


@pytest.mark.slow
def test_etcd_one_member_of_three_stopped(etcd3: EtcdCluster) -> None:
    """One of three etcd members stopped: stores stay healthy and changes still flow."""

    async def main() -> None:
        b = Backend("etcd", etcd3.endpoints, etcd3.stop, etcd3.start)
        a, other, w = await pair(b)
        await asyncio.to_thread(etcd3.stop_member, 0)  # the endpoint both stores use
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < TTL * 1.5:
            n += 1
            await a.publish_loads({"a1": n}, float(n))
            assert a.healthy and other.healthy
            await asyncio.sleep(0.1)
        await w.until(lambda v: "a1" in v.loads and v.loads["a1"].load == n, 5)
        assert "n1" in w.last.nodes
        await a.close()
        await w.until(lambda v: "n1" not in v.nodes, 2)
        await other.close()

    run(main())


def etcd_follower(cluster: EtcdCluster) -> int:
    """The index of a member that is not the raft leader."""
    for i, url in enumerate(cluster.endpoints):
        req = urllib.request.Request(url + "/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            st = json.loads(r.read())
        if st["leader"] != st["header"]["member_id"]:
            return i
    raise AssertionError("no follower in the cluster")


def watch_ports(store: BaseStore) -> set[int]:
    """The etcd client ports the store's open watch streams are connected to."""
    http = getattr(store, "http", None)
    assert http is not None
    return {c.writer.get_extra_info("peername")[1] for c in http._streams}


def test_etcd_frozen_member_is_left_by_the_watch(etcd3: EtcdCluster) -> None:
    """A follower that both stores use first freezes (SIGSTOP: its connections stay up, nothing
    is answered; the leader and the leases are fine). Writes and keepalives move to another
    member; the watcher's stream on the frozen one is found stalled within about two TTLs and
    re-opened elsewhere, so changes still arrive, and neither store loses its lease."""
    ttl = 6.0  # room for a keepalive to time out on the frozen member and move on

    async def main() -> None:
        f = etcd_follower(etcd3)
        eps = [etcd3.endpoints[f]] + [e for i, e in enumerate(etcd3.endpoints) if i != f]
        b = Backend("etcd", eps, etcd3.stop, etcd3.start)
        a, other, w = await pair(b, ttl)
        leases = (getattr(a, "lease", None), getattr(other, "lease", None))
        # A change seen through the watch: its stream is established before the freeze.
        await a.publish_loads({"a1": 1000}, 0.5)
        await w.until(lambda v: "a1" in v.loads and v.loads["a1"].load == 1000, 5)
        frozen = etcd3.members[f].client_port
        assert watch_ports(other) == {frozen}, "the watch is not on the member to freeze"
        etcd3.members[f].freeze()
        try:
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < 1.0:
                n += 1
                await a.publish_loads({"a1": n}, float(n))
                await asyncio.sleep(0.1)
            seen_at = await w.until(lambda v: "a1" in v.loads and v.loads["a1"].load == n, 8 * ttl)
            took = seen_at - t0
            print(f"frozen member: the last load arrived {took:.1f} s after the freeze")
            # Found stalled within about two TTLs (a probe after a quiet TTL, then a TTL
            # owed, checked every third of a TTL); four is the generous bound, not a timing.
            assert took < 4 * ttl, f"the stall took {took:.1f} s to notice (TTL {ttl} s)"
            # The watch was re-opened on another member.
            for _ in range(100):
                ports = watch_ports(other)
                if ports:
                    break
                await asyncio.sleep(0.05)
            assert ports and frozen not in ports, (ports, frozen)
            assert (getattr(a, "lease", None), getattr(other, "lease", None)) == leases
            assert a.healthy and other.healthy
            await a.close()
            await w.until(lambda v: "n1" not in v.nodes, 5)
            await other.close()
        finally:
            etcd3.members[f].thaw()

    run(main())


_HOLDER = """
import asyncio, sys
from pinger.store import open_store
from pinger.store.records import InstanceRecord, NodeRecord
from proxy.config import loads

async def main():
    kind, eps, ttl = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    quoted = ", ".join(f'"{e}"' for e in eps)
    cfg = loads(f'[node]\\nid = "k1"\\n[cluster]\\nstore = "{kind}"\\nendpoints = [{quoted}]\\n'
                f'ttl = {ttl}\\nprefix = "/ept/"\\n')
    store = open_store(cfg)
    await store.start(NodeRecord("k1", "r", "127.0.0.3:1", "127.0.0.3:2", 7),
                      [InstanceRecord("hello", "k1-a", "k1", "127.0.0.3:9", 1, 2, 7)])
    print("ready" if store.healthy else "unhealthy", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_kill_9_of_the_holder_expires_within_ttl(backend: Backend) -> None:
    """kill -9 of a process holding the lease / session: its keys vanish within TTL + 1 s."""

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLDER, backend.kind, ",".join(backend.endpoints), str(TTL),
            stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).parents[2]),
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"ready"
            b = make_store(backend.kind, backend.endpoints, "n2")
            await b.start(node("n2", 1), [])
            w = Watcher(b)
            await w.until(lambda v: "k1" in v.nodes and "k1-a" in v.instances, 5)
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            proc.kill()
            await proc.wait()
            t1 = await w.until(lambda v: "k1" not in v.nodes and "k1-a" not in v.instances, TTL + 3)
            print(f"{backend.kind}: keys gone {t1 - t0:.3f}s after kill -9 (TTL {TTL}s)")
            assert t1 - t0 < TTL + 1
            await b.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(main())
