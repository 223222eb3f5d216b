"""A stand-in table writer process for tests: fills the table from a config, heartbeats.

It plays the pinger's role (the table's single writer) so tests can kill -9 the writer
without the pinger; prints `READY <boot_epoch>` once the rows are written.
"""

from __future__ import annotations

import sys
import time

from proxy.config import load
from proxy.config_table import static_rows, table_layout, table_name
from shm.sync import reconcile
from shm.writer import TableWriter


def main() -> None:
    config = load(sys.argv[1])
    w = TableWriter.open(table_layout(config.table), table_name(config.table))
    reconcile(w, static_rows(config, w.boot_epoch))
    now = time.time()
    w.set_rtt(config.node.id, rtt_us=0, jitter_us=0, loss_permille=0, last_heard=now, up=True)
    w.heartbeat(now)
    print(f"READY {w.boot_epoch}", flush=True)
    deadline = time.monotonic() + 120  # bounded: a test kills it long before
    while time.monotonic() < deadline:
        time.sleep(0.1)
        w.heartbeat(time.time())


if __name__ == "__main__":
    main()
