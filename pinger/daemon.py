"""The pinger daemon: the table's single writer, fed by the ping mesh, the store and local load.

Owns the process: the TableWriter, the UDP mesh, the store session (through the
store protocol), the heartbeat, local load publishing, READY and clean stop on
SIGTERM/SIGINT. Everything runs on one event loop; it must not block it, and it
never blanks the table: on a store outage the last known rows stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

from pinger.mesh import Addr, Mesh, MeshProtocol
from pinger.ping_state import LOSS_WINDOW, PeerState
from pinger.store import open_store
from pinger.store.base import Store
from pinger.store.records import ClusterView, InstanceRecord, NodeRecord
from proxy.config import Config, parse_address
from proxy.config_table import (
    app_rows,
    inflight_name,
    instance_rows,
    self_row,
    static_rows,
)
from shm.codec import STORE_CONNECTING, STORE_DOWN, STORE_NONE, STORE_OK, InstanceRow, NodeRow
from shm.errors import ShmError
from shm.inflight import InflightSegment
from shm.sync import Wanted, reconcile
from shm.writer import TableWriter

log = logging.getLogger("edgeproxy.pinger")
STORE_RETRY_MAX = 5.0  # seconds between attempts to start a store session, at most
STOP_TIMEOUT = 5.0  # seconds a clean stop may spend closing the store
# Load publishes to the store are paced. Loads travel on every ping (each peer hears
# them every interval); the store's copy only seeds a node that has not exchanged a ping
# yet. Every store write is delivered to every node's watch: a publish per change (every
# load_publish_ms) measured 3.8 writes/s per busy node, and N nodes publishing every P
# seconds cost etcd N^2/P events/s (bench/fleet_sim.py). So at most one publish every
# STORE_LOAD_EVERY seconds, and slower in a large fleet: the load records of all peers
# together bring each node at most STORE_LOAD_EVENTS events per second. (20 per node
# was too many: 300 watchers x 21 events/s through etcd's JSON gateway lagged a join's
# event by 6 s on this shared 2-core machine; none held a watch but the 2 real nodes:
# 25 ms, bench/results/fleet-sim-20261204-1252.md.)
STORE_LOAD_EVERY = 5.0
STORE_LOAD_EVENTS = 2.0
RTT_DEADBAND_US = 100  # a peer's RTT in the table moves past its jitter, or this (µs)


def store_load_pace(peers: int) -> float:
    """Seconds between two load publishes to the store in a fleet of `peers` other nodes."""
    return max(STORE_LOAD_EVERY, peers / STORE_LOAD_EVENTS)


STATUS_DIR = "/dev/shm"


def status_path(config: Config) -> str | None:
    """The pinger's status file: `/dev/shm/<[table] name>.pinger.json`.

    JSON: pid, node, boot_epoch, store, store_healthy, store_since (wall seconds of the
    last health change: the age of a store outage is now - store_since), last_view,
    views, store_outages. Written on change (at most every tick), removed on a clean stop.
    The table carries the store's state in its heartbeat block; the details live here.
    """
    if not os.path.isdir(STATUS_DIR):
        return None
    return os.path.join(STATUS_DIR, f"{config.table.name}.pinger.json")


# --- the daemon --------------------------------------------------------------------------
class Daemon:
    """One node's pinger: table writes from the mesh, the store view and local load."""

    def __init__(
        self,
        config: Config,
        writer: TableWriter,
        *,
        epoch: int,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        loss_window: int = LOSS_WINDOW,
    ) -> None:
        self.config = config
        self.w = writer
        self.epoch = epoch
        self.wall = wall
        self.mono = mono
        self.me = config.node.id
        self.mesh = Mesh(
            self.me,
            epoch,
            interval=config.pinger.interval,
            up_after=config.pinger.up_after,
            down_after=config.pinger.down_after,
            rng=random.Random(),
            window=loss_window,
        )
        self.fixed_rtt = {p.id: p.rtt_ms for p in config.peers if p.rtt_ms is not None}
        self.node_epochs: dict[str, int] = {}  # highest epoch known per remote node
        self.load_stamp: dict[str, tuple[int, float]] = {}  # remote instance -> (epoch, time)
        self.local_loads: dict[str, int] = {}
        self.unpublished: dict[str, int] = {}
        self.store: Store | None = None
        self.store_healthy: bool | None = None  # None: no session yet since the start
        self.store_since = wall()  # when store_healthy last changed
        self.store_outages = 0
        self.views_applied = 0
        self.last_view = 0.0
        self.status_path = status_path(config)
        self._status_written: dict[str, Any] | None = None
        self.table_errors = 0
        self.inflight: InflightSegment | None = None
        self.proto: MeshProtocol | None = None
        self._publishing = False
        self._next_publish = 0.0  # monotonic: no store load publish before this
        self._view: ClusterView | None = None  # the last view applied
        self.written_rtt: dict[str, int] = {}  # peer -> the RTT (µs) last written for it
        self._stop = asyncio.Event()

    # --- table --------------------------------------------------------------------------
    def write_rows(self, wanted: Wanted) -> None:
        """Reconcile the table to `wanted`; a new node starts with an unknown RTT, never 0.

        A remote instance whose row is new, or whose node came back with another boot
        epoch, starts at load 0 under that epoch: no load from a previous life is kept
        (unless this life already published one, e.g. through a ping).
        """
        w = self.w
        try:
            with w.batch():
                before = {nid: r.boot_epoch for nid, r in w.nodes().items()}
                had = set(w.instances())
                reconcile(w, wanted)
                now = self.wall()
                epochs = {r.id: r.boot_epoch for r in wanted.nodes}
                for nid in w.nodes():
                    if nid == self.me:
                        w.set_rtt(
                            nid, rtt_us=0, jitter_us=0, loss_permille=0, last_heard=now, up=True
                        )
                    elif nid not in before or nid in self.fixed_rtt:
                        self.write_peer(nid, initial=True)
                for iid in had.difference(r.id for r in wanted.instances):
                    self.load_stamp.pop(iid, None)
                for r in wanted.instances:
                    if r.node == self.me:
                        continue
                    e = epochs.get(r.node, 0)
                    kept = r.id in had
                    if kept and before.get(r.node) == e:
                        continue
                    stamp = self.load_stamp.get(r.id)
                    if kept and stamp is not None and stamp[0] == e and e:
                        continue  # this life's load already arrived (a ping was first)
                    self.load_stamp.pop(r.id, None)
                    w.set_load(r.id, 0, 0.0, e)
        except (ShmError, ValueError, KeyError) as e:
            self.table_errors += 1
            log.error("table %s: %s (the rows it had are kept)", w.name, e)

    def write_peer(self, nid: str, initial: bool = False) -> None:
        p = self.mesh.peers.get(nid)
        fixed = self.fixed_rtt.get(nid)
        if p is None or (initial and p.est.srtt is None):
            rtt = -1 if fixed is None else round(fixed * 1000)
            self._set_rtt(nid, rtt, 0, 0, 0.0, fixed is not None)
            return
        s = p.est.snapshot()
        rtt = self._steady_rtt(nid, s.rtt_us, s.jitter_us) if fixed is None else round(fixed * 1000)
        # last_heard is monotonic in the mesh; the table wants wall seconds
        heard = self.wall() - (self.mono() - s.last_heard) if s.last_heard else 0.0
        # Not decided yet (fewer than up_after answers in a row since this pinger started)
        # but answering: shown up, or a new or restarted pinger would make the workers rank
        # every peer as down (random choice) for its first up_after probes.
        recent = self.config.pinger.interval * 1.5 + p.est.timeout()
        up = s.up or (
            p.est.state is PeerState.UNKNOWN
            and s.rtt_us >= 0
            and self.mono() - s.last_heard <= recent
        )
        self._set_rtt(nid, rtt, s.jitter_us, s.loss_permille, heard, up)

    def _steady_rtt(self, nid: str, rtt: int, jitter: int) -> int:
        """The RTT (µs) to write for `nid`: the one written last, unless `rtt` left its
        deadband (the peer's jitter, at least RTT_DEADBAND_US).

        A node whose RTT passes another's reorders the table's per-app walk (the writer
        re-sorts those apps' summaries: O(nodes log nodes)); peers close to each other swap
        on every answer from measurement noise alone. With 300 peers 88 % of RTT writes
        did, most of the pinger's CPU (bench/fleet_sim.py). The smoothed RTT (gain 1/8)
        strays by its jitter (RFC 3550: about the samples' own spread) only on a real
        change, so the table stays within the noise of the measurement; loss, jitter, up
        and last_heard are written every time.
        """
        old = self.written_rtt.get(nid, -1)
        band = max(RTT_DEADBAND_US, jitter)
        if old >= 0 and rtt >= 0 and abs(rtt - old) <= band:
            return old
        self.written_rtt[nid] = rtt
        return rtt

    def _set_rtt(self, nid: str, rtt: int, jit: int, loss: int, heard: float, up: bool) -> None:
        # KeyError: a peer the table does not hold (yet): the next view adds it
        with contextlib.suppress(KeyError):
            self.w.set_rtt(
                nid, rtt_us=rtt, jitter_us=jit, loss_permille=loss, last_heard=heard, up=up
            )

    def on_mesh_change(self) -> None:
        mesh = self.mesh
        for nid in mesh.changed:
            self.write_peer(nid)
        mesh.changed.clear()
        if mesh.learned:
            now = self.wall()
            for node, epoch, loads, at in mesh.learned:
                t = now if at is None else at  # None: a pinger that does not send the time
                for iid, load in loads.items():
                    self.remote_load(node, iid, load, t, epoch)
            mesh.learned.clear()

    def remote_load(self, node: str, iid: str, load: int, t: float, epoch: int) -> None:
        """A load for a remote instance (from a ping or the store); older data is ignored.

        `t` is the publisher's wall time of the value: store records and pings both carry
        it, so the two paths order on one clock. (Stamped with its arrival instead, a ping
        sent just before a change and delayed on the way would replace the changed value
        the store brought first, and nothing corrects it if that pinger then dies.)
        """
        if node == self.me or epoch < self.node_epochs.get(node, 0):
            return
        self.node_epochs[node] = epoch
        row = self.w.instances().get(iid) if iid not in self.load_stamp else None
        if iid not in self.load_stamp and (row is None or row.node != node):
            return
        stamp = self.load_stamp.get(iid)
        if stamp is not None and (epoch, t) <= stamp:
            return
        try:
            self.w.set_load(iid, load, t, epoch)
        except KeyError:
            self.load_stamp.pop(iid, None)
            return
        self.load_stamp[iid] = (epoch, t)

    # --- the store view -----------------------------------------------------------------
    def apply_view(self, view: ClusterView) -> None:
        """Make the table and the mesh follow one whole store view.

        A view whose nodes and instances are those of the last one (the common change: a
        peer's load publish) only applies the load records that changed: rebuilding rows
        and peers from the whole view is O(fleet) per store event (7.5 ms per view at 300
        nodes, the pinger's largest cost in bench/fleet_sim.py).
        """
        last, self._view = self._view, view
        if last is not None and view.nodes == last.nodes and view.instances == last.instances:
            for iid, rec in view.loads.items():
                if last.loads.get(iid) is not rec:  # records are kept until replaced
                    self.remote_load(rec.node, rec.instance, rec.load, rec.time, rec.boot_epoch)
            self.views_applied += 1
            self.last_view = self.wall()
            return
        cfg = self.config
        nodes = [self_row(cfg, self.epoch)]
        peers: dict[str, Addr] = {}
        epochs: dict[str, int] = {}
        for n in view.nodes.values():
            if n.id == self.me:
                continue
            if n.boot_epoch < self.node_epochs.get(n.id, 0):
                continue  # an older life still in the view: its lease has not expired yet
            try:
                a = parse_address(n.ping)
            except ValueError:
                log.warning("node %s: bad ping address %r: skipped", n.id, n.ping)
                continue
            nodes.append(NodeRow(n.id, n.region, n.backhaul, n.boot_epoch))
            peers[n.id] = (a.host, a.port)
            epochs[n.id] = n.boot_epoch
        insts = list(instance_rows(cfg, local_only=True))
        for i in view.instances.values():
            if i.node != self.me and epochs.get(i.node) == i.boot_epoch:
                insts.append(
                    InstanceRow(i.app, i.id, i.node, i.address, i.soft_limit, i.hard_limit)
                )
        self.node_epochs.update(epochs)
        self.write_rows(Wanted(tuple(nodes), app_rows(cfg), tuple(insts)))
        for rec in view.loads.values():
            self.remote_load(rec.node, rec.instance, rec.load, rec.time, rec.boot_epoch)
        self.mesh.set_peers(peers, self.mono())
        for nid in [n for n in self.written_rtt if n not in peers]:
            del self.written_rtt[nid]
        if self.proto is not None:
            self.proto.rearm()
        self.views_applied += 1
        self.last_view = self.wall()

    def adopted_rows(self) -> Wanted:
        """With a store, before its first view: this node's rows, plus the remote rows a
        previous pinger left in the table (never blank the table on a restart)."""
        cfg = self.config
        nodes = [self_row(cfg, self.epoch)]
        keep: set[str] = set()
        for nid, row in self.w.nodes().items():
            if nid != self.me:
                nodes.append(row)
                keep.add(nid)
                self.node_epochs[nid] = max(self.node_epochs.get(nid, 0), row.boot_epoch)
        insts = list(instance_rows(cfg, local_only=True))
        insts += [r for r in self.w.instances().values() if r.node in keep]
        return Wanted(tuple(nodes), app_rows(cfg), tuple(insts))

    async def run_store(self) -> None:
        """Start the session (retrying with backoff), then follow the views until stopped."""
        store = self.store
        assert store is not None
        cfg = self.config
        me = NodeRecord(
            id=self.me,
            region=cfg.node.region,
            ping=str(cfg.pinger.advertise),
            backhaul=str(cfg.listen.backhaul) if cfg.listen.backhaul else "",
            boot_epoch=self.epoch,
        )
        insts = [
            InstanceRecord(
                app=r.app,
                id=r.id,
                node=r.node,
                address=r.address,
                soft_limit=r.soft_limit,
                hard_limit=r.hard_limit,
                boot_epoch=self.epoch,
            )
            for r in instance_rows(cfg, local_only=True)
        ]
        delay = 0.2
        while True:
            try:
                await store.start(me, insts)
                break
            except Exception as e:  # the store reports its own errors; we retry
                log.warning("store start failed: %s (retry in %.1f s)", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
        log.info("store session started")
        self.unpublished.update(self.local_loads)
        async for view in store.views():
            self.apply_view(view)

    # --- local load ---------------------------------------------------------------------
    def read_local_load(self) -> None:
        """In-flight totals -> the table (at once), the mesh vector and the store (coalesced)."""
        if self.inflight is None:
            try:
                self.inflight = InflightSegment.attach(inflight_name(self.config.table))
            except (ShmError, OSError):
                return  # the proxy has not created it yet
        try:
            totals = self.inflight.totals()
        except (ShmError, OSError, ValueError) as e:
            log.warning("in-flight segment: %s: re-attaching", e)
            self.inflight.close()
            self.inflight = None
            return
        now = self.wall()
        for iid, load in totals.items():
            if self.local_loads.get(iid) != load:
                try:
                    self.w.set_load(iid, load, now, self.epoch)
                except KeyError:
                    continue
                self.local_loads[iid] = load
                self.unpublished[iid] = load
        self.mesh.local_loads = dict(self.local_loads) if self.local_loads else None
        self.mesh.local_loads_at = now  # every value in it is the one read at `now`
        if (
            self.store is not None
            and self.unpublished
            and not self._publishing
            and self.mono() >= self._next_publish
        ):
            self._next_publish = self.mono() + store_load_pace(len(self.mesh.peers))
            self._publishing = True
            batch, self.unpublished = self.unpublished, {}
            asyncio.get_running_loop().create_task(self._publish(batch, now))

    async def _publish(self, batch: dict[str, int], now: float) -> None:
        assert self.store is not None
        try:
            await self.store.publish_loads(batch, now)
        except Exception as e:  # an outage: keep the values for the next round
            log.debug("publish loads: %s", e)
            for iid, load in batch.items():
                self.unpublished.setdefault(iid, load)
        finally:
            self._publishing = False

    # --- periodic work ------------------------------------------------------------------
    def tick(self) -> None:
        """Heartbeat (with store health), this node's own row, store health logged."""
        now = self.wall()
        if self.store is None:
            state = STORE_NONE
        elif self.store_healthy is None:
            state = STORE_CONNECTING
        else:
            state = STORE_OK if self.store_healthy else STORE_DOWN
        self.w.heartbeat(now, state, self.store_since)
        self._set_rtt(self.me, 0, 0, 0, now, True)
        if self.store is not None:
            healthy = bool(self.store.healthy)
            if healthy != self.store_healthy:
                was, self.store_healthy, self.store_since = self.store_healthy, healthy, now
                if healthy:
                    if was is None:
                        log.info("store session up")
                    else:
                        log.warning("store healthy again (outages so far: %d)", self.store_outages)
                    self.unpublished.update(self.local_loads)
                elif was:
                    self.store_outages += 1
                    log.warning("store unhealthy: keeping the last view, still pinging")
        self.write_status()

    def status(self) -> dict[str, Any]:
        """What the status file says (see `status_path`)."""
        store = self.config.cluster.store
        return {
            "pid": os.getpid(),
            "node": self.me,
            "boot_epoch": self.epoch,
            "table": self.w.name,
            "store": store,
            # None: no session yet since this pinger started ("none" stores: always True)
            "store_healthy": True if store == "none" else self.store_healthy,
            "store_since": round(self.store_since, 3),
            "last_view": round(self.last_view, 3) if self.last_view else None,
            "views": self.views_applied,
            "store_outages": self.store_outages,
        }

    def write_status(self) -> None:
        """Replace the status file when something in it changed (tmpfs: no real I/O)."""
        st = self.status()
        if st == self._status_written or self.status_path is None:
            return
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(st).encode() + b"\n")
            os.replace(tmp, self.status_path)
            self._status_written = st
        except OSError as e:
            self.status_path = None
            log.warning("status file: %s (not written any more)", e)

    async def every(self, period: float, fn: Callable[[], None]) -> None:
        while True:
            try:
                fn()
            except Exception:
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))
            await asyncio.sleep(period)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, ready: Callable[[str], None]) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            self.store = open_store(cfg)
        except Exception as e:
            log.error("cluster store %s: %s", cfg.cluster.store, e)
            return 1
        if self.store is None:
            self.write_rows(static_rows(cfg, self.epoch))
            for p in cfg.peers:
                self.node_epochs.setdefault(p.id, 0)
            peers = {p.id: (p.ping.host, p.ping.port) for p in cfg.peers}
            self.mesh.set_peers(peers, self.mono())
        else:
            self.write_rows(self.adopted_rows())
        self.tick()
        lis = cfg.pinger.listen
        try:
            transport, proto = await loop.create_datagram_endpoint(
                lambda: MeshProtocol(self.mesh, self.mono, self.on_mesh_change),
                local_addr=(lis.host, lis.port),
            )
        except OSError as e:
            log.error("pinger listen %s: %s", lis, e)
            return 1
        self.proto = proto
        tasks = [
            loop.create_task(self.every(min(cfg.table.stale_after / 4, 0.5), self.tick)),
            loop.create_task(self.every(cfg.pinger.load_publish_ms / 1000, self.read_local_load)),
        ]
        if self.store is not None:
            tasks.append(loop.create_task(self.run_store()))
        ready(
            f"READY pinger node={self.me} listen={lis} epoch={self.epoch} "
            f"table={self.w.name} store={cfg.cluster.store} peers={len(self.mesh.peers)}"
        )
        await self._stop.wait()
        log.info("stopping: %s", self.stats())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        transport.close()
        if self.store is not None:
            try:
                await asyncio.wait_for(self.store.close(), STOP_TIMEOUT)
            except Exception as e:
                log.warning("store close: %s (its keys expire with the TTL)", e)
        if self.status_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.status_path)
        return 0

    def stats(self) -> dict[str, Any]:
        c = self.mesh.counters
        return {
            "peers": len(self.mesh.peers),
            "sent": c.sent,
            "replies": c.replies,
            "answered": c.probes_answered,
            "bad_datagrams": c.bad_datagrams,
            "misdirected": c.misdirected,
            "late": c.late,
            "send_errors": c.send_errors,
            "store_healthy": self.store_healthy,
            "store_outages": self.store_outages,
            "views": self.views_applied,
            "table_errors": self.table_errors,
        }
