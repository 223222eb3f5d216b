"""One fleet scenario: start, converge, measure a steady window, join, kill, collect.

Every wait is a poll with a deadline inside the run's overall budget (`max_seconds`).
The figures come back as a plain dict (the report and the test read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.fleetsim import etcdstats
from bench.fleetsim.realnode import LOAD_STEP, RealNode
from bench.fleetsim.sim import UDP_OVERHEAD, SimFleet, add_many
from pinger.store.errors import StoreError
from pinger.store.etcd import _b64, _unb64, prefix_end
from pinger.store.http import Http

POLL = 0.01  # seconds between table reads while timing a join or a kill


@dataclass
class Options:
    nodes: int = 300  # the whole fleet: real + simulated (the joiner included)
    real: int = 2
    ttl: float = 10.0
    interval: float = 1.0
    window: float = 30.0  # seconds of steady state measured
    max_seconds: float = 540.0  # the whole scenario, etcd excluded
    watch: bool = True  # simulated nodes hold a watch each, as real ones do
    distance: bool = True  # simulated nodes answer after their region's RTT (sim.py)
    kill_real: bool = True  # SIGKILL a real node at the end (needs real >= 2)
    workdir: Path | None = None
    log: Callable[[str], None] = print


class Observer:
    """One watch on the prefix that decodes every event: writes per node, by kind."""

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        self.http = Http(endpoints, timeout=5.0)
        self.prefix = prefix
        self.puts: Counter[str] = Counter()  # node -> puts
        self.kinds: Counter[str] = Counter()  # nodes / instances / load / delete
        self.events = 0
        self.marks: dict[tuple[str, str], float] = {}  # (PUT|DELETE, node) -> first seen
        self.revision = 0  # the highest mod revision delivered so far
        self.task: asyncio.Task[None] | None = None

    async def _on(self, line: bytes) -> None:
        msg = orjson.loads(line)
        for ev in (msg.get("result") or {}).get("events", ()):
            self.revision = max(self.revision, int(ev["kv"].get("mod_revision", 0)))
            key = _unb64(ev["kv"]["key"]).decode("utf-8", "replace")[len(self.prefix) :]
            parts = key.split("/")
            self.events += 1
            if parts[0] == "nodes" and len(parts) == 2:
                self.marks.setdefault((ev.get("type", "PUT"), parts[1]), time.monotonic())
            if ev.get("type") == "DELETE":
                self.kinds["delete"] += 1
                continue
            self.kinds[parts[0]] += 1
            if len(parts) >= 2:
                self.puts[parts[1]] += 1

    def start(self) -> None:
        raw = self.prefix.encode()
        req = {"create_request": {"key": _b64(raw), "range_end": _b64(prefix_end(raw))}}
        self.task = asyncio.create_task(self.http.stream("/v3/watch", orjson.dumps(req), self._on))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await self.task
        self.http.close()


class LagMeter:
    """The bench's own event-loop lag (timings below are only as good as this)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            self.lags.append(time.monotonic() - t - 0.05)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def summary(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        return {"p50_ms": lags[len(lags) // 2] * 1e3, "max_ms": lags[-1] * 1e3}


async def _until(cond: Callable[[], bool], deadline: float) -> float | None:
    """Seconds until `cond()` held (from now), or None at the deadline."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(POLL)


async def _times(
    reals: list[RealNode], cond: Callable[[RealNode], bool], t0: float, deadline: float
) -> dict[str, float | None]:
    """Per real node: seconds from t0 until cond held on it (None: not by the deadline)."""
    out: dict[str, float | None] = {r.id: None for r in reals}
    while True:
        now = time.monotonic()
        for r in reals:
            if out[r.id] is None and cond(r):
                out[r.id] = round(now - t0, 3)
        if all(v is not None for v in out.values()) or now >= deadline:
            return out
        await asyncio.sleep(POLL)


async def scenario(opts: Options, endpoints: list[str], etcd_pids: list[int]) -> dict[str, Any]:
    """Run the whole scenario against a running etcd; returns the figures."""
    t_start = time.monotonic()
    deadline = t_start + opts.max_seconds
    log = opts.log
    uid = uuid.uuid4().hex[:8]
    prefix = f"/fleetsim-{uid}/"
    tmp = None if opts.workdir else tempfile.TemporaryDirectory(prefix="fleetsim-")
    workdir = opts.workdir or Path(tmp.name if tmp else ".")
    n_sim = opts.nodes - opts.real - 1  # one more joins during the run
    max_nodes = max(1024, 1 << (opts.nodes + 64).bit_length())
    reals = [
        RealNode(
            f"real{k}",
            f"127.0.0.{2 + k}",
            uid,
            workdir,
            endpoints,
            prefix,
            opts.ttl,
            opts.interval,
            max_nodes,
        )
        for k in range(opts.real)
    ]
    paced = _store_pace(opts.nodes)
    sims = SimFleet(
        endpoints=tuple(endpoints),
        prefix=prefix,
        ttl=opts.ttl,
        interval=opts.interval,
        targets={r.id: (r.ip, r.port) for r in reals},
        publish_every=paced,
        watch=opts.watch,
        distance=opts.distance,
    )
    out: dict[str, Any] = {"options": {k: v for k, v in vars(opts).items() if k != "log"}}
    out["options"]["workdir"] = str(workdir)
    observer = Observer(endpoints, prefix)
    lag = LagMeter()
    tasks: list[asyncio.Task[None]] = []
    try:
        observer.start()
        lag.start()
        t = time.monotonic()
        sims.start()  # keep-alives from the first registration on (a slow start outlasts TTL)
        try:
            await add_many(sims, 0, n_sim, deadline)
        except (StoreError, TimeoutError) as e:
            out["error"] = f"simulated nodes could not register: {e}"
            out["at_failure"] = await _diagnose(reals, sims, observer, endpoints, etcd_pids)
            return out
        out["sim_start_s"] = round(time.monotonic() - t, 2)
        log(f"{n_sim} simulated nodes registered in {out['sim_start_s']} s")
        t = time.monotonic()
        for r in reals:
            await asyncio.get_running_loop().run_in_executor(None, r.start)
        tasks.append(asyncio.create_task(_drive_loads(reals)))
        others = opts.nodes - 2  # everyone but itself and the joiner
        conv = await _times(
            reals,
            lambda r: r.count() == (others, others),
            t,
            min(deadline, t + 60 + opts.nodes / 10),
        )
        out["converge_s"] = conv
        out["converge_rows"] = {r.id: r.count() for r in reals}
        log(f"real nodes converged: {conv} (rows, up: {out['converge_rows']})")
        if any(v is None for v in conv.values()):
            out["error"] = "the real nodes did not converge in time"
            out["at_failure"] = await _diagnose(reals, sims, observer, endpoints, etcd_pids)
            return out
        await _steady(opts, reals, sims, observer, endpoints, etcd_pids, out, deadline)
        log(f"steady window done: {out['steady']['summary']}")
        # --- a join ---
        joiner = f"sim{n_sim:05d}"
        t0 = time.monotonic()
        await sims.add(n_sim, own_client=True)
        out["join_register_s"] = round(time.monotonic() - t0, 3)
        dl = min(deadline, time.monotonic() + 15)
        out["join_seen_s"] = await _times(reals, lambda r: r.has(joiner), t0, dl)
        out["join_up_s"] = await _times(reals, lambda r: r.up(joiner), t0, dl)
        seen = observer.marks.get(("PUT", joiner))
        out["join_watch_event_s"] = None if seen is None else round(seen - t0, 3)
        log(f"join {joiner}: seen {out['join_seen_s']}, up {out['join_up_s']}")
        # --- a simulated node killed (socket gone, lease not revoked) ---
        victim = next(
            (s.id for s in sims.alive() if all(r.up(s.id) for r in reals)), sims.alive()[0].id
        )
        t0 = time.monotonic()
        out["kill_since_keepalive_s"] = round(t0 - sims.nodes[victim].last_keepalive, 3)
        sims.kill(victim)
        dl = min(deadline, t0 + opts.ttl + 15)
        down = asyncio.create_task(_times(reals, lambda r: not r.up(victim), t0, dl))
        out["kill_sim_gone_s"] = await _times(reals, lambda r: not r.has(victim), t0, dl)
        out["kill_sim_down_s"] = await down
        seen = observer.marks.get(("DELETE", victim))
        out["kill_watch_event_s"] = None if seen is None else round(seen - t0, 3)
        log(f"kill {victim}: down {out['kill_sim_down_s']}, gone {out['kill_sim_gone_s']}")
        # --- a real node killed with SIGKILL ---
        if opts.kill_real and len(reals) >= 2:
            dead, watchers = reals[-1], reals[:-1]
            t0 = time.monotonic()
            dead.kill9()
            dl = min(deadline, t0 + opts.ttl + 15)
            out["kill_real_gone_s"] = await _times(watchers, lambda r: not r.has(dead.id), t0, dl)
            log(f"kill -9 {dead.id}: gone {out['kill_real_gone_s']}")
        out["sim_totals"] = dict(sims.totals())
        out["real_store_log"] = {r.id: r.store_log() for r in reals}
        out["lag"] = lag.summary()
        return out
    finally:
        for tk in [*tasks, *(x for x in (lag.task,) if x)]:
            tk.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sims.close()
        await observer.close()
        for r in reals:
            r.stop()
        out["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if tmp is not None:
            tmp.cleanup()


def _store_pace(nodes: int) -> Callable[[], float]:
    """Seconds between a node's store load publishes, as the real daemon paces them."""
    try:
        from pinger.daemon import store_load_pace
    except ImportError:  # a daemon that publishes every change (every load_publish_ms)
        return lambda: 0.1
    return lambda: float(store_load_pace(nodes - 1))


async def _diagnose(
    reals: list[RealNode],
    sims: SimFleet,
    observer: Observer,
    endpoints: list[str],
    etcd_pids: list[int],
) -> dict[str, Any]:
    """What a run that did not converge can still say: etcd's totals, what the watch and
    the simulated nodes saw, the real pingers' store log."""
    loop = asyncio.get_running_loop()
    e = await loop.run_in_executor(None, etcdstats.sample, endpoints, etcd_pids)
    return {
        "etcd_cpu_seconds": [round(c, 1) for c in e.cpu],
        "etcd_rss_mb": [round(x / 2**20, 1) for x in e.rss],
        "etcd_events_sent_total": e.counter("etcd_debugging_mvcc_events_total"),
        "etcd_revision": e.revision,
        "etcd_watchers": e.counter("etcd_debugging_mvcc_watcher_total"),
        "observer_events": observer.events,
        "observer_revision": observer.revision,
        "sim_totals": dict(sims.totals()),
        "real_rows": {r.id: r.count() for r in reals},
        "real_cpu_seconds": {r.id: round(r.cpu(), 1) for r in reals},
        "real_store_log": {r.id: r.store_log() for r in reals},
    }


async def _drive_loads(reals: list[RealNode]) -> None:
    while True:
        for r in reals:
            if r.proc is not None and r.proc.alive():
                r.step_load()
        await asyncio.sleep(LOAD_STEP)


async def _steady(
    opts: Options,
    reals: list[RealNode],
    sims: SimFleet,
    observer: Observer,
    endpoints: list[str],
    etcd_pids: list[int],
    out: dict[str, Any],
    deadline: float,
) -> None:
    """Measure a steady window: store writes, watch events, ping bytes, CPU, etcd."""
    loop = asyncio.get_running_loop()
    # Steady means the start-up burst (every node's first load publish) was delivered:
    # wait until a watch has seen the store's current revision.
    rev = await loop.run_in_executor(None, etcdstats.revision, endpoints[0])
    t = time.monotonic()
    caught_up = await _until(lambda: observer.revision >= rev, min(deadline, t + 60))
    out["watch_caught_up_s"] = None if caught_up is None else round(caught_up, 2)
    window = max(1.0, min(opts.window, deadline - time.monotonic() - 2 * opts.ttl - 30))
    e0 = await loop.run_in_executor(None, etcdstats.sample, endpoints, etcd_pids)
    puts0, kinds0 = Counter(observer.puts), Counter(observer.kinds)
    tr0 = {a: (t.dg_in, t.dg_out, t.bytes_in, t.bytes_out) for a, t in sims.traffic.items()}
    cpu0 = {r.id: r.cpu() for r in reals}
    own0, w0 = os.times(), sims.watch_events
    ka0, t0 = sims.keepalives, time.monotonic()
    await asyncio.sleep(window)  # the measured window itself, not synchronisation
    dt = time.monotonic() - t0
    e1 = await loop.run_in_executor(None, etcdstats.sample, endpoints, etcd_pids)
    own1 = os.times()
    n = opts.nodes - 1
    puts = observer.puts - puts0
    kinds = observer.kinds - kinds0
    real_w = {r.id: round(puts[r.id] / dt, 3) for r in reals}
    sim_rates = [puts[s] / dt for s in sims.nodes]
    watchers = len(sims.alive()) if opts.watch else 0
    per_real: dict[str, Any] = {}
    for r in reals:
        t = sims.traffic[(r.ip, r.port)]
        a = tr0[(r.ip, r.port)]
        dg = (t.dg_in - a[0]) + (t.dg_out - a[1])
        payload = (t.bytes_in - a[2]) + (t.bytes_out - a[3])
        scale = (n - 1) / max(1, n - len(reals))  # real-real traffic: same per peer
        per_real[r.id] = {
            "ping_payload_Bps": round(payload * scale / dt),
            "ping_wire_Bps": round((payload + dg * UDP_OVERHEAD) * scale / dt),
            "datagrams_per_s": round(dg * scale / dt),
            "cpu_share": round((r.cpu() - cpu0[r.id]) / dt, 4),
            "writes_per_s": real_w[r.id],
            "rows": r.count(),
        }
    mcount = len(e1.metrics)
    out["steady"] = {
        "window_s": round(dt, 1),
        "real": per_real,
        "writes_per_node_s": {
            "all_nodes_mean": round(sum(puts.values()) / dt / n, 3),
            "sim_mean": round(statistics.fmean(sim_rates), 3) if sim_rates else 0.0,
            "sim_max": round(max(sim_rates), 3) if sim_rates else 0.0,
            "real": real_w,
        },
        "put_events_by_kind_per_s": {k: round(v / dt, 2) for k, v in kinds.items()},
        "revisions_per_s": round((e1.revision - e0.revision) / dt, 2),
        "revisions_per_node_s": round((e1.revision - e0.revision) / dt / n, 3),
        "watch_events_per_node_s": round((sims.watch_events - w0) / dt / max(1, watchers), 2),
        "watchers_counted": watchers,
        "etcd_events_sent_per_s": round(
            (
                e1.counter("etcd_debugging_mvcc_events_total")
                - e0.counter("etcd_debugging_mvcc_events_total")
            )
            / dt,
            1,
        ),
        "keepalives_per_node_s": round((sims.keepalives - ka0) / dt / max(1, len(sims.alive())), 3),
        "etcd": {
            "members": mcount,
            "cpu_share": [round((c1 - c0) / dt, 4) for c0, c1 in zip(e0.cpu, e1.cpu, strict=True)],
            "rss_mb": [round(x / 2**20, 1) for x in e1.rss],
            "db_size_mb": round(e1.leader_max("etcd_mvcc_db_total_size_in_bytes") / 2**20, 2),
            "db_in_use_mb": round(
                e1.leader_max("etcd_mvcc_db_total_size_in_use_in_bytes") / 2**20, 2
            ),
            "keys": int(e1.leader_max("etcd_debugging_mvcc_keys_total")),
            "watchers": int(e1.counter("etcd_debugging_mvcc_watcher_total")),
            "revision": e1.revision,
        },
        "bench_cpu_share": round(((own1.user - own0.user) + (own1.system - own0.system)) / dt, 3),
    }
    s = out["steady"]
    out["steady"]["summary"] = (
        f"writes/node/s {s['writes_per_node_s']}, events/node/s "
        f"{s['watch_events_per_node_s']}, real {per_real}"
    )
