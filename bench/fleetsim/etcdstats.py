"""etcd's own figures: its /metrics counters, CPU and RSS from /proc, the store revision.

Counters are read at the start and the end of a window; the deltas are what the fleet
cost etcd in it. Names are etcd 3.4's (Debian's etcd-server).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass

from bench.procs import tree_cpu_seconds

COUNTERS = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_mvcc_range_total",
    "etcd_debugging_mvcc_events_total",
    "etcd_server_proposals_committed_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "grpc_server_handled_total",
)
GAUGES = (
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_mvcc_keys_total",
)


def metrics(url: str) -> dict[str, float]:
    """Sum of every series of the names above (labels folded), from one member."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in COUNTERS or name in GAUGES:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def revision(url: str) -> int:
    """The store's current revision (a range of one key answers with it)."""
    req = urllib.request.Request(
        url + "/v3/kv/range", data=json.dumps({"key": "AA=="}).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(json.loads(r.read())["header"]["revision"])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sample:
    """One look at every member: metrics per member, CPU seconds per member, revision."""

    metrics: list[dict[str, float]]
    cpu: list[float]
    rss: list[int]
    revision: int

    def counter(self, name: str) -> float:
        return sum(m.get(name, 0.0) for m in self.metrics)

    def leader_max(self, name: str) -> float:
        return max((m.get(name, 0.0) for m in self.metrics), default=0.0)


def sample(urls: list[str], pids: list[int]) -> Sample:
    return Sample(
        metrics=[metrics(u) for u in urls],
        cpu=[tree_cpu_seconds(p) for p in pids],
        rss=[rss_bytes(p) for p in pids],
        revision=revision(urls[0]),
    )
