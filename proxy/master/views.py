"""What the master shows: `edgeproxy status`, `GET /metrics`, `GET /healthz`.

Owns turning the master's workers, their stats blocks and the table into the
status document, the Prometheus text and the health answer. It must not change
any state: it only reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

from proxy import __version__, build
from proxy.config_table import table_layout, table_name
from proxy.master.worker_proc import WorkerProc
from proxy.telemetry import peers
from proxy.telemetry.aggregate import Aggregator
from proxy.telemetry.metrics import Snapshot, SnapshotError
from shm.errors import ShmError
from shm.reader import TableReader

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.master.listeners import ListenerSet
    from proxy.master.static_table import SharedState


class MasterViews:
    """Mixed into Master: read-only views of it."""

    if TYPE_CHECKING:
        config: Config
        config_path: str
        workers: dict[int, WorkerProc]
        generation: int
        stopping: bool
        started: float
        listeners: ListenerSet
        aggregator: Aggregator
        shared: SharedState | None
        table_reader: TableReader | None

        def current(self) -> list[WorkerProc]: ...

    def status(self) -> dict[str, Any]:
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot)):
            info: dict[str, Any] = {
                "pid": w.pid,
                "slot": w.slot,
                "generation": w.generation,
                "state": w.state,
            }
            snap = self.read_block(w)
            if snap is not None:
                info["open_connections"] = snap.open_connections
                info["inflight"] = snap.inflight
                info["requests"] = sum(snap.requests)
                info["accepted"] = snap.accepted
            workers.append(info)
        return {
            "master": {
                "pid": os.getpid(),
                "generation": self.generation,
                "version": __version__,
                "build": build(),
                "config": self.config_path,
                "config_realpath": os.path.realpath(self.config_path),
                "uptime": round(time.time() - self.started, 1),
                "stopping": self.stopping,
            },
            "workers": workers,
            "listeners": self.listeners.describe(),
            # What `edgeproxy table` needs to read the table when the file on disk is
            # mid-edit and does not parse: the running config's node and table.
            "node": self.config.node.id,
            "table": dataclasses.asdict(self.config.table),
        }

    def read_block(self, w: WorkerProc) -> Snapshot | None:
        data = w.block.read()
        if data is None:
            return None
        try:
            return self.aggregator.update(data)
        except SnapshotError:
            return None

    def metrics_text(self) -> str:
        for w in self.workers.values():
            self.read_block(w)
        return self.aggregator.render() + self.table_metrics()

    def table_metrics(self) -> str:
        """The table as the workers see it: stale or not, heartbeat age, writer errors."""
        if self.table_reader is None:
            with contextlib.suppress(ShmError, OSError):
                t = self.config.table
                self.table_reader = TableReader.attach(table_layout(t), table_name(t))
        stale, age, store = True, -1.0, "unknown"
        fleet: list[peers.Peer] = []
        if self.table_reader is not None:
            now = time.time()
            stale, age = self.table_reader.stale(now, self.config.table.stale_after)
            store = self.table_reader.store_health(now)[0]
            with contextlib.suppress(ShmError, OSError):
                for row, st in self.table_reader.nodes():
                    fleet.append(peers.Peer(row.id, st.rtt_us, st.loss_permille, st.up))
        errors = self.shared.table_errors if self.shared is not None else 0
        lines = [
            "# HELP edgeproxy_table_stale 1 when the table's writer has not beaten in time.",
            "# TYPE edgeproxy_table_stale gauge",
            f"edgeproxy_table_stale {int(stale)}",
            "# HELP edgeproxy_table_heartbeat_age_seconds Age of the writer's heartbeat.",
            "# TYPE edgeproxy_table_heartbeat_age_seconds gauge",
            f"edgeproxy_table_heartbeat_age_seconds {age if age != float('inf') else -1:.3f}",
            "# HELP edgeproxy_table_store_healthy 1 unless the writer reports its cluster store"
            " down or not connected yet.",
            "# TYPE edgeproxy_table_store_healthy gauge",
            f"edgeproxy_table_store_healthy {int(store in ('none', 'ok'))}",
            "# HELP edgeproxy_table_write_errors_total Table writes that failed (e.g. full).",
            "# TYPE edgeproxy_table_write_errors_total counter",
            f"edgeproxy_table_write_errors_total {errors}",
            *peers.render(fleet, self.config.node.id, self.config.metrics.max_peers),
        ]
        return "\n".join(lines) + "\n"

    def health(self) -> tuple[int, str]:
        if self.stopping:
            return 503, "stopping\n"
        if not any(w.state == "serving" for w in self.current()):
            return 503, "no worker serves\n"
        return 200, "ok\n"
