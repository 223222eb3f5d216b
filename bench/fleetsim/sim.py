"""Many simulated nodes in one asyncio process, over the real protocols.

Each simulated node has its own UDP socket on its own 127.1.x.y address and speaks the
real ping codec (pinger.ping_codec): it answers every probe addressed to it with its load
vector, and probes the real nodes once per interval as a real pinger would. Each holds
its own etcd lease and puts its node, instance and load records through the real
backend's code (pinger.store.etcd.EtcdStore: lease grant, register txn, load txn), keeps
the lease alive every TTL/3, and (optionally) holds a watch on the prefix like a real
node, counting what etcd delivers without decoding it. The simulated nodes share one
HTTP client (its connections pooled), not one lease. A kill drops the node's socket
and stops its keep-alive without revoking: its keys go when the lease expires.
Simulated nodes do not probe each other (that traffic would not touch what is measured).
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from pinger import ping_codec
from pinger.ping_codec import PROBE, REPLY, Ping, PingDecodeError
from pinger.store.errors import StoreError
from pinger.store.etcd import EtcdStore, _b64, prefix_end
from pinger.store.http import Http
from pinger.store.records import InstanceRecord, NodeRecord
from proxy.config import ClusterConfig

Addr = tuple[str, int]
TICK = 0.05  # seconds between scheduler passes (probes, keep-alives)
# Round-trip time each region's simulated nodes stand for, ms (loopback answers in
# microseconds: 300 peers all within a few µs of each other would swap places in the
# RTT order on every answer, which no real fleet does); each node adds 0-10 % of it.
REGION_RTT_MS = (2.0, 8.0, 20.0, 35.0, 50.0, 70.0, 90.0, 120.0, 160.0, 220.0)
REGISTER_ATTEMPTS = 5  # a simulated node's registration, tried this often at most
UDP_OVERHEAD = 28  # IPv4 + UDP header bytes per datagram (on the wire, not counted by recv)


def sim_ip(i: int) -> str:
    """The loopback address of simulated node i (127.1.0.1 on): one per node."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


@dataclass
class Traffic:
    """Datagrams and payload bytes exchanged with one real node (seen from the sims)."""

    dg_in: int = 0
    dg_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class SimNode:
    id: str
    ip: str
    region: str
    epoch: int
    instance: str
    store: EtcdStore
    transport: asyncio.DatagramTransport | None = None
    load: int = 0
    loads_at: float = 0.0
    published: int | None = None
    last_publish: float = -1e9
    seq: int = 0
    last_keepalive: float = 0.0  # monotonic time of the last keep-alive answered
    delay: float = 0.0  # seconds before a reply leaves: the distance this node stands for
    publishing: bool = False  # one load publish in flight at a time, as the daemon does
    alive: bool = True
    watch: asyncio.Task[None] | None = None

    @property
    def ping(self) -> Addr:
        assert self.transport is not None
        return cast(Addr, self.transport.get_extra_info("sockname"))


class _SimProto(asyncio.DatagramProtocol):
    def __init__(self, fleet: SimFleet, node: SimNode) -> None:
        self.fleet = fleet
        self.node = node

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        f, n = self.fleet, self.node
        t = f.traffic.get(addr)
        if t is not None:
            t.dg_in += 1
            t.bytes_in += len(data)
        try:
            p = ping_codec.decode(data)
        except PingDecodeError:
            f.bad += 1
            return
        if p.target != n.id:
            f.bad += 1
            return
        if p.kind == REPLY:
            f.replies += 1
            return
        loads = {n.instance: n.load}
        out = ping_codec.encode(ping_codec.reply_to(p, n.id, n.epoch, loads, n.loads_at))
        if n.delay > 0:
            asyncio.get_running_loop().call_later(n.delay, self._send, out, addr, t)
        else:
            self._send(out, addr, t)
        f.answered += 1

    def _send(self, out: bytes, addr: Addr, t: Traffic | None) -> None:
        n = self.node
        if n.transport is not None:
            n.transport.sendto(out, addr)
            if t is not None:
                t.dg_out += 1
                t.bytes_out += len(out)


@dataclass
class SimFleet:
    """The simulated nodes; `targets` are the real nodes' ping addresses (id -> addr)."""

    endpoints: tuple[str, ...]
    prefix: str
    ttl: float
    interval: float
    targets: dict[str, Addr]
    publish_every: Callable[[], float]  # seconds between a node's store load publishes
    load_period: float = 0.1  # seconds between load changes of a simulated node
    watch: bool = True
    distance: bool = True  # replies delayed by region (REGION_RTT_MS) + a per-node offset
    concurrency: int = 32
    nodes: dict[str, SimNode] = field(default_factory=dict)
    traffic: dict[Addr, Traffic] = field(default_factory=dict)
    answered: int = 0
    replies: int = 0
    sent: int = 0
    bad: int = 0
    store_errors: int = 0
    register_retries: int = 0
    keepalives: int = 0
    publishes: int = 0
    watch_events: int = 0
    watch_bytes: int = 0
    watch_failures: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(1))

    def __post_init__(self) -> None:
        self.http = Http(list(self.endpoints), timeout=max(0.5, min(5.0, self.ttl / 3)))
        self.sem = asyncio.Semaphore(self.concurrency)  # registrations and load publishes
        self.ka_sem = asyncio.Semaphore(self.concurrency)  # keep-alives never wait on those
        self.cluster = ClusterConfig("etcd", self.endpoints, self.ttl, self.prefix)
        self._due: list[tuple[float, int, str, str]] = []  # (when, tiebreak, what, node id)
        self._tie = 0
        self._tasks: list[asyncio.Task[None]] = []
        for addr in self.targets.values():
            self.traffic[addr] = Traffic()

    # --- membership -------------------------------------------------------------------
    async def add(self, i: int, own_client: bool = False) -> SimNode:
        """Start simulated node i: socket, lease, records, watch; returns when registered.

        `own_client`: register on a connection of its own, not behind the shared queue
        (the timed joiner: its join must not wait on the simulator's backlog).
        """
        nid = f"sim{i:05d}"
        ip = sim_ip(i)
        store = EtcdStore(self.cluster)
        if not own_client:
            store.http = self.http  # shared client; the lease stays this node's own
        n = SimNode(nid, ip, f"r{i % 10}", int(time.time() * 1000), f"hello-{nid}", store)
        if self.distance:
            n.delay = REGION_RTT_MS[i % 10] * self.rng.uniform(1.0, 1.1) / 1000
        loop = asyncio.get_running_loop()
        tr, _ = await loop.create_datagram_endpoint(lambda: _SimProto(self, n), local_addr=(ip, 0))
        n.transport = cast(asyncio.DatagramTransport, tr)
        host, port = n.ping
        store.me = NodeRecord(nid, n.region, f"{host}:{port}", f"{ip}:4280", n.epoch)
        store.instances = (InstanceRecord("hello", n.instance, nid, f"{ip}:8080", 20, 25, n.epoch),)
        if own_client:
            await store.open_session()
            await store.register()
            store.http.close()
            store.http = self.http
        else:
            for attempt in range(REGISTER_ATTEMPTS):  # the daemon retries too (backoff)
                try:
                    async with self.sem:
                        if not store.lease:
                            await store.open_session()
                        await store.register()
                    break
                except StoreError:
                    self.register_retries += 1
                    if attempt + 1 == REGISTER_ATTEMPTS:
                        raise
                    await asyncio.sleep(0.5 * 2**attempt)
        store.healthy = True
        n.last_keepalive = time.monotonic()  # the lease was granted just now
        self.nodes[nid] = n
        now = time.monotonic()
        self._push(now + self.rng.uniform(0, self.ttl / 3), "keepalive", nid)
        self._push(now + self.rng.uniform(0, min(self.interval, 0.25)), "probe", nid)
        self._push(now + self.rng.uniform(0, self.load_period), "load", nid)
        if self.watch:
            n.watch = asyncio.create_task(self._watch(n))
        return n

    def kill(self, nid: str) -> SimNode:
        """As kill -9 would: the socket goes, nothing is revoked, the lease expires."""
        n = self.nodes[nid]
        n.alive = False
        if n.transport is not None:
            n.transport.close()
            n.transport = None
        if n.watch is not None:
            n.watch.cancel()
        return n

    def alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    # --- the scheduler ------------------------------------------------------------------
    def _push(self, when: float, what: str, nid: str) -> None:
        self._tie += 1
        heapq.heappush(self._due, (when, self._tie, what, nid))

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run()))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            q = self._due
            while q and q[0][0] <= now:
                _, _, what, nid = heapq.heappop(q)
                n = self.nodes[nid]
                if not n.alive:
                    continue
                if what == "probe":
                    self._probe(n, now)
                    nxt = self.interval * self.rng.uniform(0.9, 1.1)
                elif what == "load":
                    self._load(n)
                    nxt = self.load_period
                else:
                    self._spawn(self._keepalive(n))
                    nxt = self.ttl / 3
                self._push(now + nxt, what, nid)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.append(t)
        t.add_done_callback(self._tasks.remove)

    def _probe(self, n: SimNode, now: float) -> None:
        tr = n.transport
        if tr is None:
            return
        loads = {n.instance: n.load}
        for tid, addr in self.targets.items():
            n.seq += 1
            p = Ping(PROBE, n.id, n.epoch, tid, n.seq, int(now * 1e9), loads, n.loads_at)
            data = ping_codec.encode(p)
            tr.sendto(data, addr)
            t = self.traffic[addr]
            t.dg_out += 1
            t.bytes_out += len(data)
            self.sent += 1

    def _load(self, n: SimNode) -> None:
        """A new load (a random walk, 0..25); to the store as often as the daemon would."""
        n.load = max(0, min(25, n.load + self.rng.choice((-1, 0, 1))))
        n.loads_at = time.time()
        mono = time.monotonic()
        if n.publishing or n.load == n.published:
            return
        if mono - n.last_publish >= self.publish_every():
            n.last_publish = mono
            n.published = n.load
            n.publishing = True
            self._spawn(self._publish(n, n.load, n.loads_at))

    async def _publish(self, n: SimNode, load: int, at: float) -> None:
        try:
            async with self.sem:
                await n.store.publish_loads({n.instance: load}, at)
                self.publishes += 1
        except StoreError:
            self.store_errors += 1
        finally:
            n.publishing = False

    async def _keepalive(self, n: SimNode) -> None:
        async with self.ka_sem:
            if not n.alive:
                return
            try:
                resp = await self.http.request(
                    "POST", "/v3/lease/keepalive", orjson.dumps({"ID": str(n.store.lease)})
                )
                self.keepalives += 1
                n.last_keepalive = time.monotonic()
                if b'"TTL"' not in resp.body:
                    self.store_errors += 1  # the lease is gone (expired under a stall)
            except StoreError:
                self.store_errors += 1

    async def _watch(self, n: SimNode) -> None:
        raw = self.prefix.encode()
        req = {"create_request": {"key": _b64(raw), "range_end": _b64(prefix_end(raw))}}

        async def count(line: bytes) -> None:
            self.watch_events += line.count(b'"kv":')
            self.watch_bytes += len(line) + 1

        try:
            await self.http.stream("/v3/watch", orjson.dumps(req), count)
        except StoreError:
            self.watch_failures += 1

    async def close(self) -> None:
        for n in self.nodes.values():
            if n.transport is not None:
                n.transport.close()
            if n.watch is not None:
                n.watch.cancel()
        tasks = [*self._tasks, *(n.watch for n in self.nodes.values() if n.watch)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.http.close()

    def totals(self) -> Mapping[str, int]:
        return {
            "answered": self.answered,
            "replies": self.replies,
            "sent": self.sent,
            "bad": self.bad,
            "store_errors": self.store_errors,
            "register_retries": self.register_retries,
            "keepalives": self.keepalives,
            "publishes": self.publishes,
            "watch_events": self.watch_events,
            "watch_bytes": self.watch_bytes,
            "watch_failures": self.watch_failures,
        }


async def add_many(fleet: SimFleet, first: int, count: int, deadline: float) -> list[SimNode]:
    """Start `count` simulated nodes (bounded concurrency inside), before `deadline`."""
    out: list[SimNode] = []
    batch = 64
    for start in range(first, first + count, batch):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(out)} of {count} simulated nodes started in time")
        got = await asyncio.gather(
            *(fleet.add(i) for i in range(start, min(start + batch, first + count)))
        )
        out.extend(got)
    return out
