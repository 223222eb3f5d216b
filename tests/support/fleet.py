"""Test fleet harness: N nodes (proxy + pinger each) on 127.0.0.x, relays between them.

Owns writing each node's config (unique table names per fleet), starting and
stopping the proxy, pinger, upstream and relay processes, and reading their
`table --json`. Every wait polls with a deadline; teardown is SIGTERM, then kill.
Shared by tests, the demo and benches; it must never address anything outside 127/8.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fleet_certs import FleetCerts
from ports import free_port
from proxyctl import REPO, TESTS, LineReader, env, stop_session, toml_value

READY_TIMEOUT = 20.0
T = TypeVar("T")


def poll(fn: Callable[[], T | None], timeout: float, step: float = 0.05) -> T | None:
    """Call `fn` until it returns something other than None, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got is not None or time.monotonic() >= deadline:
            return got
        time.sleep(step)


class Proc:
    """A child process in its own session, with stdout drained and stderr to a file."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, ready: str | None) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env(),
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.ready_prefix = ready
        self.ready_line: str | None = None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        if self.ready_line is None and self.ready_prefix is not None:
            self.ready_line = self.reader.wait_for(self.ready_prefix, timeout)
            if self.ready_line is None:
                raise RuntimeError(
                    f"{self.name} printed no {self.ready_prefix} within {timeout}s "
                    f"(exit {self.proc.poll()}); stdout {self.reader.all!r}\n{self.stderr()}"
                )
        return self.ready_line or ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then kill the whole session (workers may outlive a master)."""
        rc = stop_session(self.proc, signal.SIGTERM, timeout)
        self.reader.close()
        self._stderr.close()
        return rc


def _table(header: str, values: Mapping[str, Any]) -> str:
    return header + "\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"


@dataclass
class Node:
    """One node's addresses and processes."""

    id: str
    region: str
    ip: str
    uid: str
    http: int = 0
    backhaul: int = 0
    admin: int = 0
    ping: int = 0
    upstream: str = ""  # host:port of its local instance
    config_path: Path = Path()
    proxy: Proc | None = None
    pinger: Proc | None = None

    def __post_init__(self) -> None:
        self.http = free_port(self.ip)
        self.backhaul = free_port(self.ip)
        self.admin = free_port(self.ip)
        self.ping = free_port(self.ip, socket.SOCK_DGRAM)

    @property
    def table_name(self) -> str:
        return f"edgeproxy-fleet-{self.uid}-{self.id}"

    @property
    def instance(self) -> str:
        return f"hello-{self.id}"

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "-c", str(self.config_path)],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def table(self) -> dict[str, Any] | None:
        """`edgeproxy table --json` on this node, or None if it failed."""
        r = self.cli("table", "--json")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def dump(self) -> dict[str, Any] | None:
        """The same dict as `edgeproxy table --json`, read in this process (fast polls)."""
        from proxy.config import load as load_config
        from proxy.config_table import table_layout, table_name
        from shm.dump import table_dump
        from shm.errors import ShmError
        from shm.reader import TableReader

        cfg = load_config(str(self.config_path))
        try:
            reader = TableReader.attach(table_layout(cfg.table), table_name(cfg.table), self.id)
        except (ShmError, OSError):
            return None
        try:
            return table_dump(reader, time.time(), cfg.table.stale_after)
        finally:
            reader.close()

    def pinger_status(self) -> dict[str, Any] | None:
        """The pinger's status file (pinger.daemon.status_path), or None."""
        try:
            return dict(json.loads(Path(f"/dev/shm/{self.table_name}.pinger.json").read_text()))
        except (OSError, ValueError):
            return None

    def start_pinger(
        self, workdir: Path, extra: Sequence[str] = (), n: int = 0, config: Path | None = None
    ) -> Proc:
        argv = [sys.executable, "-m", "pinger", "-c", str(config or self.config_path), *extra]
        self.pinger = Proc(f"pinger-{self.id}-{n}", argv, workdir, "READY")
        return self.pinger


@dataclass
class Fleet:
    """Nodes on 127.0.0.2, .3, ... with one-way delays and loss between them.

    `delays[(a, b)]` is the one-way time a -> b in ms (symmetric if only one order is
    given); `loss[(a, b)]` drops that share of a's datagrams to b (a's probes).
    """

    workdir: Path
    nodes_spec: Sequence[tuple[str, str]]  # (id, region)
    delays: Mapping[tuple[str, str], float] = field(default_factory=dict)
    loss: Mapping[tuple[str, str], float] = field(default_factory=dict)
    interval: float = 0.25
    store: str = "none"
    endpoints: Sequence[str] = ()
    stale_after: float = 2.0
    ttl: float = 3.0
    pinger_args: Sequence[str] = ()
    seed: int = 1
    first_ip: int = 2
    upstreams: bool = True
    demo_instances: bool = False  # instances are proxy.demo.app (answers "instance <id>")
    proxies: bool = True  # False: pingers only (the table tests need no proxy)
    tls: bool = True  # the backhaul is mutual TLS (a CA of this fleet's); False: insecure
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    nodes: dict[str, Node] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    relay: Proc | None = None
    advertise: dict[str, str] = field(default_factory=dict)  # store fleets: node -> ping addr
    via: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    upstream_procs: dict[str, Proc] = field(default_factory=dict)
    certs: FleetCerts | None = None

    def __post_init__(self) -> None:
        if self.tls:
            self.certs = FleetCerts(self.workdir / f"fleet-{self.uid}")
        for i, (nid, region) in enumerate(self.nodes_spec):
            self.nodes[nid] = Node(nid, region, f"127.0.0.{self.first_ip + i}", self.uid)

    def delay(self, a: str, b: str) -> float | None:
        d = self.delays.get((a, b))
        return self.delays.get((b, a)) if d is None else d

    # --- relays ---------------------------------------------------------------------------
    def _relay_routes(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(a, b) -> (udp, tcp) addresses a uses to reach b through the relay."""
        if self.store != "none":
            self._store_relay()
            return {}
        out: dict[tuple[str, str], tuple[str, str]] = {}
        routes: list[str] = []
        for a in self.nodes.values():
            for b in self.nodes.values():
                if a.id == b.id:
                    continue
                d = self.delay(a.id, b.id)
                back = self.delay(b.id, a.id)
                lossy = self.loss.get((a.id, b.id), 0.0)
                if d is None and not lossy:
                    continue
                d, back = d or 0.0, back or 0.0
                u = f"{a.ip}:{free_port(a.ip, socket.SOCK_DGRAM)}"
                t = f"{a.ip}:{free_port(a.ip)}"
                routes.append(f"udp,{u},{b.ip}:{b.ping},{d},{back},{lossy}")
                routes.append(f"tcp,{t},{b.ip}:{b.backhaul},{d},{back}")
                out[(a.id, b.id)] = (u, t)
        if routes:
            argv = [sys.executable, "-m", "pinger.relay", "--seed", str(self.seed)]
            for r in routes:
                argv += ["--route", r]
            self.relay = Proc(f"relay-{self.uid}", argv, self.workdir, "READY")
            self.procs.append(self.relay)
        return out

    def _store_relay(self) -> None:
        """With a store each node advertises one ping address to all: a source-aware relay.

        Node b's advertised ping address is a relay route to b whose delay is chosen by
        the sender's IP (tests/support/fleet_relay.py). Backhaul (TCP) is not delayed in store
        fleets: the proxy's outgoing connections do not carry the node's IP, and routing
        ranks remote instances by the pinger's RTT, which the UDP relay sets.
        """
        routes: list[str] = []
        for b in self.nodes.values():
            per = []
            for a in self.nodes.values():
                if a.id == b.id:
                    continue
                d, back = self.delay(a.id, b.id), self.delay(b.id, a.id)
                lossy = self.loss.get((a.id, b.id), 0.0)
                if d is None and back is None and not lossy:
                    continue
                per.append(f"{a.ip}={d or 0.0}/{back or 0.0}/{lossy}")
            if per:
                listen = f"{b.ip}:{free_port(b.ip, socket.SOCK_DGRAM)}"
                routes.append(f"{listen},{b.ip}:{b.ping}," + ";".join(per))
                self.advertise[b.id] = listen
        if routes:
            argv = [sys.executable, str(TESTS / "fleet_relay.py"), "--seed", str(self.seed)]
            for r in routes:
                argv += ["--route", r]
            self.relay = Proc(f"relay-{self.uid}", argv, self.workdir, "READY")
            self.procs.append(self.relay)

    # --- configs ---------------------------------------------------------------------------
    def _write_config(
        self,
        n: Node,
        via: Mapping[tuple[str, str], tuple[str, str]],
        instance: bool = True,
        path: Path | None = None,
    ) -> Path:
        out = _table("[node]", {"id": n.id, "region": n.region})
        out += _table(
            "[listen]",
            {
                "http": [f"{n.ip}:{n.http}"],
                "backhaul": f"{n.ip}:{n.backhaul}",
                "admin": f"{n.ip}:{n.admin}",
                "control": f"/tmp/edgeproxy-fleet-{self.uid}-{n.id}.sock",
            },
        )
        out += _table("[workers]", {"count": 1})
        ping = f"{n.ip}:{n.ping}"
        advertise = self.advertise.get(n.id, ping)
        out += _table(
            "[pinger]", {"listen": ping, "advertise": advertise, "interval": self.interval}
        )
        cluster: dict[str, Any] = {"store": self.store, "ttl": self.ttl}
        if self.endpoints:
            cluster["endpoints"] = list(self.endpoints)
            cluster["prefix"] = f"/edgeproxy-{self.uid}/"
        out += _table("[cluster]", cluster)
        out += _table(
            "[table]",
            {"name": n.table_name, "writer": "pinger", "stale_after": self.stale_after},
        )
        if self.certs is not None:
            out += _table("[backhaul]", self.certs.backhaul_keys(n.id))
        else:
            out += _table("[backhaul]", {"insecure": True})
        out += _table(
            "[[app]]",
            {"name": "hello", "hosts": ["hello.test"], "soft_limit": 20, "hard_limit": 25},
        )
        if instance:
            out += _table(
                "[[instance]]",
                {"app": "hello", "id": n.instance, "address": n.upstream or "127.0.0.1:9"},
            )
        if self.store == "none":
            for p in self.nodes.values():
                if p.id == n.id:
                    continue
                u, t = via.get((n.id, p.id), (f"{p.ip}:{p.ping}", f"{p.ip}:{p.backhaul}"))
                out += _table(
                    "[[peer]]", {"id": p.id, "region": p.region, "backhaul": t, "ping": u}
                )
                address = p.upstream or "127.0.0.1:9"
                out += _table(
                    "[[instance]]",
                    {"app": "hello", "id": p.instance, "address": address, "node": p.id},
                )
        if path is None:
            path = n.config_path = self.workdir / f"{n.id}.toml"
        path.write_text(out)
        return path

    def config_without_instance(self, nid: str) -> Path:
        """Another config file for node `nid`: the same node without its local instance."""
        n = self.nodes[nid]
        return self._write_config(n, self.via, False, self.workdir / f"{nid}-no-instance.toml")

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> Fleet:
        via = self.via = self._relay_routes()
        if self.upstreams:
            ups = []
            for n in self.nodes.values():
                argv = [sys.executable, str(TESTS / "upstream.py"), "--listen", f"{n.ip}:0"]
                if self.demo_instances:
                    argv = [sys.executable, "-m", "proxy.demo.app", "--id", n.instance]
                    argv += ["--listen", f"{n.ip}:0"]
                p = Proc(f"upstream-{n.id}", argv, self.workdir, "READY")
                self.procs.append(p)
                self.upstream_procs[n.id] = p
                ups.append((n, p))
            for n, p in ups:
                n.upstream = p.wait_ready().split()[1]
        for n in self.nodes.values():
            self._write_config(n, via)
        for n in self.nodes.values():
            if self.proxies:
                argv = [sys.executable, "-m", "proxy.cli", "run", "-c", str(n.config_path)]
                n.proxy = Proc(f"proxy-{n.id}", argv, self.workdir, "READY")
                self.procs.append(n.proxy)
            self.procs.append(n.start_pinger(self.workdir, self.pinger_args))
        for p in self.procs:
            p.wait_ready()
        return self

    def restart_pinger(self, nid: str, config: Path | None = None) -> Proc:
        """Start node `nid`'s pinger again (the old one must be gone), optionally on `config`."""
        n = self.nodes[nid]
        count = sum(1 for p in self.procs if p.name.startswith(f"pinger-{nid}-"))
        p = n.start_pinger(self.workdir, self.pinger_args, count, config)
        self.procs.append(p)
        p.wait_ready()
        return p

    def stop(self) -> dict[str, int | None]:
        """Stop every process (pingers first), then remove this fleet's shm segments."""
        codes: dict[str, int | None] = {}
        for p in sorted(self.procs, key=lambda p: not p.name.startswith("pinger")):
            codes[p.name] = p.stop()
        for n in self.nodes.values():
            for path in Path("/dev/shm").glob(f"{n.table_name}*"):
                with contextlib.suppress(OSError):
                    path.unlink()
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.stderr()[-4000:]}" for p in self.procs)


@contextlib.contextmanager
def fleet(workdir: Path, nodes: Sequence[tuple[str, str]], **kw: Any) -> Iterator[Fleet]:
    """A started Fleet, stopped on exit; process logs are printed if the body fails."""
    f = Fleet(workdir, nodes, **kw)
    try:
        f.start()
        yield f
    except BaseException:
        print(f.logs())
        raise
    finally:
        f.stop()
