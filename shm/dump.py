"""A plain-dict snapshot of the table for `edgeproxy table [--json]`.

Owns the shape of that dump (units converted for humans: ms, seconds of age).
It reads through a TableReader like a worker does and must not write anything.
"""

from __future__ import annotations

from typing import Any

from shm.inflight import InflightSegment
from shm.reader import TableReader


def _age(now: float, us: int) -> float | None:
    return round(now - us / 1e6, 3) if us else None


def table_dump(
    reader: TableReader,
    now: float,
    max_age: float,
    inflight: InflightSegment | None = None,
) -> dict[str, Any]:
    """The table as the workers see it at `now` (wall-clock seconds); JSON-serialisable.

    Ages are None when the value was never written. `inflight` adds the local
    in-flight totals per instance when the caller has the counter segment.
    """
    stale, hb_age = reader.stale(now, max_age)
    store_state, store_age = reader.store_health(now)
    pid, epoch = reader.writer()
    nodes = [
        {
            "id": row.id,
            "region": row.region,
            "backhaul": row.backhaul,
            "boot_epoch": row.boot_epoch,
            "up": state.up,
            "rtt_ms": round(state.rtt_us / 1000, 3) if state.rtt_us >= 0 else None,
            "jitter_ms": round(state.jitter_us / 1000, 3),
            "loss": state.loss_permille / 1000,
            "age": _age(now, state.last_heard_us),
        }
        for row, state in sorted(reader.nodes(), key=lambda n: n[0].id)
    ]
    apps = [
        {
            "name": a.name,
            "hosts": list(a.hosts),
            "strategy": a.strategy,
            "soft_limit": a.soft_limit,
            "hard_limit": a.hard_limit,
            "sample_k": a.sample_k,
        }
        for a in sorted(reader.apps(), key=lambda a: a.name)
    ]
    local = inflight.totals() if inflight is not None else {}
    instances = []
    for c in sorted(reader.instances(), key=lambda c: (c.app, c.id)):
        item: dict[str, Any] = {
            "id": c.id,
            "app": c.app,
            "node": c.node,
            "address": c.address,
            "load": c.load,
            "soft_limit": c.soft_limit,
            "hard_limit": c.hard_limit,
            "age": _age(now, c.load_time_us),
            "publisher_epoch": c.publisher_epoch,
        }
        if c.id in local:
            item["inflight"] = local[c.id]
        instances.append(item)
    return {
        "segment": reader.name,
        "generation": reader.generation,
        "writer": {"pid": pid, "boot_epoch": epoch},
        "stale": stale,
        "store": {
            "state": store_state,
            "age": None if store_age is None else round(store_age, 3),
        },
        "heartbeat_age": None if hb_age == float("inf") else round(hb_age, 3),
        "fallbacks": reader.fallbacks,
        "retries": reader.retries,
        "nodes": nodes,
        "apps": apps,
        "instances": instances,
    }
