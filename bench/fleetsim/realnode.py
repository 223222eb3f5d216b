"""The real nodes: `python -m pinger` processes on 127.0.0.x, their load and their tables.

Each real node is the real pinger with a store config (etcd), its own table, and an
in-flight counter segment made the way the proxy's master makes it; the bench moves the
counters (as a busy proxy's workers would) instead of running a proxy, so the pinger
reads and publishes a load that changes every LOAD_STEP seconds. Its table is read with
shm's TableReader, the proxy workers' reader.
"""

from __future__ import annotations

import contextlib
import random
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Managed
from proxy.config import load as load_config
from proxy.config_table import inflight_name, table_layout, table_name
from shm.errors import ShmError
from shm.inflight import InflightCells, InflightWriter
from shm.reader import TableReader

REPO = Path(__file__).resolve().parents[2]
LOAD_STEP = 0.1  # seconds between in-flight changes on a real node (a busy proxy)


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _section(head: str, values: dict[str, object]) -> str:
    return head + "\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"


@dataclass
class RealNode:
    id: str
    ip: str
    uid: str
    workdir: Path
    endpoints: list[str]
    prefix: str
    ttl: float
    interval: float
    max_nodes: int
    port: int = 0
    proc: Managed | None = None
    cells: InflightCells | None = None
    slot: int = 0
    inflight: InflightWriter | None = None
    reader: TableReader | None = None
    load: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def __post_init__(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((self.ip, 0))
            self.port = int(s.getsockname()[1])

    @property
    def instance(self) -> str:
        return f"hello-{self.id}"

    @property
    def table(self) -> str:
        return f"edgeproxy-fleetsim-{self.uid}-{self.id}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.id}.toml"

    def write_config(self) -> None:
        out = _section("[node]", {"id": self.id, "region": "real"})
        out += _section("[listen]", {"control": f"/tmp/{self.table}.sock"})
        out += _section("[pinger]", {"listen": f"{self.ip}:{self.port}", "interval": self.interval})
        out += _section(
            "[cluster]",
            {"store": "etcd", "endpoints": self.endpoints, "ttl": self.ttl, "prefix": self.prefix},
        )
        out += _section(
            "[table]",
            {"name": self.table, "writer": "pinger", "max_nodes": self.max_nodes},
        )
        out += _section("[[app]]", {"name": "hello", "hosts": ["hello.test"]})
        out += _section(
            "[[instance]]", {"app": "hello", "id": self.instance, "address": f"{self.ip}:9"}
        )
        self.config_path.write_text(out)

    def start(self) -> None:
        """Config, in-flight segment (as the master makes it), then the pinger (READY)."""
        self.write_config()
        cfg = load_config(str(self.config_path))
        self.inflight = InflightWriter.create(inflight_name(cfg.table))
        self.slot = self.inflight.assign_instances([self.instance])[self.instance]
        self.cells = InflightCells(self.inflight.segment, 0)
        argv = [sys.executable, "-m", "pinger", "-c", str(self.config_path)]
        self.proc = Managed(f"pinger-{self.id}", argv, str(self.workdir / f"{self.id}.log"))
        self.proc.start(capture_stdout=True)
        self.proc.wait_ready_line("READY", timeout=30.0)
        self.reader = TableReader.attach(table_layout(cfg.table), table_name(cfg.table), self.id)

    def step_load(self) -> None:
        """A new in-flight count (random walk 0..25), as requests start and finish."""
        if self.cells is None:
            return
        target = max(0, min(25, self.load + self.rng.choice((-2, -1, 1, 2))))
        while self.load < target:
            self.cells.inc(self.slot)
            self.load += 1
        while self.load > target:
            self.cells.dec(self.slot)
            self.load -= 1

    def has(self, nid: str) -> bool:
        """`nid` has a row in this node's table now."""
        r = self.reader
        if r is None:
            return False
        try:
            r.app_for_host("")
        except (ShmError, ValueError):
            return False
        return r.node(nid) is not None

    def up(self, nid: str) -> bool:
        """`nid` is in this node's table and marked up (answering pings)."""
        if self.reader is None or not self.has(nid):
            return False
        return any(row.id == nid and st.up for row, st in self.reader.nodes())

    def count(self) -> tuple[int, int]:
        """(rows, rows up) of other nodes in this node's table."""
        if self.reader is None:
            return 0, 0
        rows = [(row, st) for row, st in self.reader.nodes() if row.id != self.id]
        return len(rows), sum(1 for _, st in rows if st.up)

    def store_log(self, limit: int = 8) -> list[str]:
        """The pinger's store warnings (lost sessions, watch re-lists), the last few."""
        try:
            text = (self.workdir / f"{self.id}.log").read_text(errors="replace")
        except OSError:
            return []
        keep = ("WARNING", "re-listing", "session up", "took over")
        return [ln for ln in text.splitlines() if any(k in ln for k in keep)][-limit:]

    def cpu(self) -> float:
        return self.proc.cpu_seconds() if self.proc is not None else 0.0

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.signal(9)

    def stop(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.proc is not None:
            self.proc.stop()
        if self.inflight is not None:
            with contextlib.suppress(OSError, ShmError):
                self.inflight.close(unlink=True)
            self.inflight = None
        for p in Path("/dev/shm").glob(f"{self.table}*"):
            with contextlib.suppress(OSError):
                p.unlink()
