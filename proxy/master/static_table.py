"""The master's share of shared memory: in-flight counters, and the static table writer.

Owns the in-flight segment (worker cell indexes, local instance slots, clearing a
dead worker's cells) and, when `[table] writer = "master"`, filling the table
from the config and publishing local load. It must not route: workers read.
"""

from __future__ import annotations

import logging
import time

from proxy.config import Config
from proxy.config_table import inflight_name, static_rows, table_layout, table_name
from shm.errors import SegmentTrustError, ShmError
from shm.inflight import InflightWriter
from shm.reader import TableReader
from shm.sync import reconcile
from shm.writer import TableWriter

log = logging.getLogger("edgeproxy.table")


class SharedState:
    """What the master holds in shared memory for its workers."""

    def __init__(self, config: Config, reserved: list[int] | None = None) -> None:
        t = config.table
        self.inflight = InflightWriter.create(
            inflight_name(t), t.max_workers, t.max_local_instances
        )
        used = set(reserved or ())  # cells of adopted workers
        self.free_cells = [c for c in range(t.max_workers - 1, -1, -1) if c not in used]
        self.closed = False
        self.writer: TableWriter | None = None
        self.config = config
        self.last_loads: dict[str, int] = {}
        self.table_errors = 0
        self.apply(config)

    def apply(self, config: Config) -> None:
        """A (re)loaded config: local instance slots, and the static rows if we write."""
        self.config = config
        self.inflight.assign_instances([i.id for i in config.local_instances()])
        if config.table.writer != "master":
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            _say_if_untrusted(config)
            return
        try:
            if self.writer is None:
                self.writer = TableWriter.open(table_layout(config.table), table_name(config.table))
            w = self.writer
            reconcile(w, static_rows(config, w.boot_epoch))
            now = time.time()
            w.set_rtt(
                config.node.id, rtt_us=0, jitter_us=0, loss_permille=0, last_heard=now, up=True
            )
            for p in config.peers:
                rtt = int((p.rtt_ms or 0) * 1000)
                w.set_rtt(p.id, rtt_us=rtt, jitter_us=0, loss_permille=0, last_heard=now, up=True)
            self.last_loads.clear()
            self.tick(now)
        except ShmError as e:
            self.table_errors += 1
            log.error("table %s: %s (workers route from the config)", config.table.name, e)

    def take_cell(self) -> int:
        if not self.free_cells:
            raise RuntimeError("no free in-flight cell: raise [table] max_workers")
        return self.free_cells.pop()

    def give_cell(self, cell: int) -> None:
        self.inflight.clear_worker(cell)
        self.free_cells.append(cell)

    def tick(self, now: float) -> None:
        """Heartbeat and local load, when the master is the table's writer."""
        w = self.writer
        if w is None or self.closed:
            return
        w.heartbeat(now)
        node = self.config.node.id
        w.set_rtt(node, rtt_us=0, jitter_us=0, loss_permille=0, last_heard=now, up=True)
        epoch = w.boot_epoch
        for iid, load in self.inflight.totals().items():
            if self.last_loads.get(iid) != load:
                try:
                    w.set_load(iid, load, now, epoch)
                except KeyError:
                    continue
                self.last_loads[iid] = load

    def close(self, unlink: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.writer is not None:
            self.writer.close(unlink=unlink)
            self.writer = None
        self.inflight.close(unlink=unlink)


def _say_if_untrusted(config: Config) -> None:
    """Log why the workers will not read a table someone else planted under our name.

    Workers retry the table quietly while it is missing; a segment refused by the
    owner/mode check would stay refused, so the master says so once per (re)load.
    """
    try:
        TableReader.attach(table_layout(config.table), table_name(config.table)).close()
    except SegmentTrustError as e:
        log.error("table %s: %s (workers route from the config)", config.table.name, e)
    except (ShmError, OSError):
        pass
