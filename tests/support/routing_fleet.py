"""A three-node edgeproxy fleet on 127.0.0.2-4 for the routing tests.

Owns starting and stopping the fleet (one demo-app instance and one proxy per
node, static peers with fixed RTTs), a raw HTTP/1.1 client for any loopback
address, instance /stats, and bounded load generators (threads of sequential
keep-alive clients). Reuses tests/support/proxyctl.py for the proxy process, its CLI,
/metrics and response framing. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_certs import FleetCerts
from ports import free_port
from proxyctl import REPO, Client, LineReader, Proxy, Response, env

APP = "shop"
APP_HOST = "shop.test"
SOFT = 5
HARD = 8
NODES = (2, 3, 4)
# One-way symmetric static RTTs (ms) between nodes; the issue fixes 2-3 and 2-4.
RTT_MS = {frozenset((2, 3)): 10.0, frozenset((2, 4)): 50.0, frozenset((3, 4)): 40.0}
READY_TIMEOUT = 15.0
_counter = itertools.count()


def ip(n: int) -> str:
    return f"127.0.0.{n}"


def instance_id(n: int) -> str:
    return f"shop-n{n}"


def node_id(n: int) -> str:
    return f"n{n}"


# -- raw HTTP client to any loopback address -------------------------------------------


def request_bytes(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    chunked: bool = False,
    close: bool = False,
    host: str = APP_HOST,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    payload = b""
    if body is not None:
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            step = 16384
            for i in range(0, len(body), step):
                piece = body[i : i + step]
                payload += b"%x\r\n%s\r\n" % (len(piece), piece)
            payload += b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def one_request(host: str, port: int, raw: bytes, timeout: float = 10.0) -> Response:
    with Client(port, timeout=timeout, host=host) as c:
        c.send(raw)
        return c.response()


# -- the demo-app instance -------------------------------------------------------------


class Instance:
    """`python -m proxy.demo.app` on 127.0.0.N."""

    def __init__(self, n: int, port: int | None = None) -> None:
        self.n = n
        self.id = instance_id(n)
        self.host = ip(n)
        self.port = port if port is not None else free_port(self.host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: LineReader | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.demo.app", "--id", self.id, "--listen", self.address],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env(),
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        if self.reader.wait_for("READY", READY_TIMEOUT) is None:
            self.stop()
            raise RuntimeError(f"demo instance {self.id} printed no READY")

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """The instance's own counters, asked directly (not through a proxy)."""
        path = "/stats?reset=1" if reset else "/stats"
        r = one_request(self.host, self.port, request_bytes("GET", path, close=True), timeout=5)
        assert r.status == 200, r
        return dict(json.loads(r.body))

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self.reader is not None:
            self.reader.close()


# -- a node's proxy --------------------------------------------------------------------


@dataclass
class NodeConfig:
    """Duck-types proxyctl.ProxyConfig (uid, port, admin_port, render) for proxyctl.Proxy."""

    n: int
    instances: dict[int, Instance]
    tag: str
    backhauls: dict[int, int]
    pings: dict[int, int]
    certs: FleetCerts | None = None  # None: [backhaul] insecure = true
    port: int = 0
    admin_port: int = 0
    workers: int = 2
    uid: str = ""

    def __post_init__(self) -> None:
        self.port = free_port(ip(self.n))
        self.admin_port = free_port("127.0.0.1")
        self.uid = f"{self.tag}-n{self.n}"

    @property
    def table_name(self) -> str:
        return f"ept-{self.uid}"

    @property
    def control(self) -> str:
        return f"/tmp/edgeproxy-rt-{self.uid}.sock"

    def render(self) -> str:
        n = self.n
        out = f'[node]\nid = "{node_id(n)}"\nregion = "r{n}"\n\n'
        out += "[listen]\n"
        out += f'http = ["{ip(n)}:{self.port}"]\n'
        out += f'backhaul = "{ip(n)}:{self.backhauls[n]}"\n'
        out += f'admin = "127.0.0.1:{self.admin_port}"\n'
        out += f'control = "{self.control}"\n\n'
        out += f"[workers]\ncount = {self.workers}\ndrain_timeout = 5\nquiet_period = 1\n\n"
        out += f'[pinger]\nlisten = "{ip(n)}:{self.pings[n]}"\n\n'
        out += f'[table]\nname = "{self.table_name}"\nwriter = "master"\n\n'
        if self.certs is not None:
            out += self.certs.section(node_id(n))
        else:
            out += "[backhaul]\ninsecure = true\n\n"
        out += (
            f'[[app]]\nname = "{APP}"\nhosts = ["{APP_HOST}"]\nstrategy = "closest"\n'
            f"soft_limit = {SOFT}\nhard_limit = {HARD}\n\n"
        )
        for m in NODES:
            if m == n:
                continue
            out += (
                f'[[peer]]\nid = "{node_id(m)}"\nregion = "r{m}"\n'
                f'backhaul = "{ip(m)}:{self.backhauls[m]}"\nping = "{ip(m)}:{self.pings[m]}"\n'
                f"rtt_ms = {RTT_MS[frozenset((n, m))]}\n\n"
            )
        for m, inst in self.instances.items():
            out += f'[[instance]]\napp = "{APP}"\nid = "{inst.id}"\naddress = "{inst.address}"\n'
            if m != n:
                out += f'node = "{node_id(m)}"\n'
            out += "\n"
        return out


@dataclass
class Node:
    n: int
    cfg: NodeConfig
    proxy: Proxy
    instance: Instance

    @property
    def host(self) -> str:
        return ip(self.n)

    @property
    def port(self) -> int:
        return self.cfg.port

    def request(self, raw: bytes, timeout: float = 10.0) -> Response:
        return one_request(self.host, self.port, raw, timeout)

    def wait_retries(self, reason: str, above: float, timeout: float = 5.0) -> dict[str, float]:
        """Poll /metrics (workers publish about once a second) until the retries counter
        for `reason` exceeds `above`; return the last reading either way."""
        deadline = time.monotonic() + timeout
        got = self.retries()
        while got.get(reason, 0.0) <= above and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.retries()
        return got

    def retries(self) -> dict[str, float]:
        """edgeproxy_retries_total by reason, summed over series."""
        out: dict[str, float] = {}
        for line in self.proxy.metrics().splitlines():
            if line.startswith("edgeproxy_retries_total{"):
                labels, _, value = line.rpartition(" ")
                reason = labels.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0.0) + float(value)
        return out

    def table(self) -> dict[str, Any]:
        r = self.proxy.cli("table", "--json")
        assert r.returncode == 0, f"table failed ({r.returncode}): {r.stderr}"
        return dict(json.loads(r.stdout))

    def local_inflight(self) -> int | None:
        """In-flight count of this node's own instance as `edgeproxy table` shows it."""
        for i in self.table()["instances"]:
            if i["id"] == self.instance.id:
                return i.get("inflight", i.get("load"))
        return None


@dataclass
class Fleet:
    nodes: dict[int, Node]
    tag: str
    workdir: Path
    stopped: bool = False
    errors: list[str] = field(default_factory=list)

    def __getitem__(self, n: int) -> Node:
        return self.nodes[n]

    def instances(self) -> dict[int, Instance]:
        return {n: node.instance for n, node in self.nodes.items()}

    def reset_stats(self) -> None:
        for inst in self.instances().values():
            inst.stats(reset=True)

    def all_stats(self) -> dict[int, dict[str, Any]]:
        return {n: inst.stats() for n, inst in self.instances().items()}

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Poll until no instance has a request in flight."""
        deadline = time.monotonic() + timeout
        while True:
            cur = {n: s["current"] for n, s in self.all_stats().items()}
            if not any(cur.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"instances still busy after {timeout}s: {cur}")
            time.sleep(0.02)

    def shm_leftovers(self) -> list[str]:
        try:
            names = os.listdir("/dev/shm")
        except OSError:
            return []
        return sorted(x for x in names if x.startswith(f"ept-{self.tag}-"))

    def stop(self) -> dict[int, int | None]:
        rcs: dict[int, int | None] = {}
        for n, node in self.nodes.items():
            rcs[n] = node.proxy.stop()
        for node in self.nodes.values():
            node.instance.stop()
        self.stopped = True
        return rcs


def start_fleet(workdir: Path, tls: bool = True) -> Fleet:
    """Three instances, then three proxies (started in parallel, each waiting for READY);
    the backhaul is mutual TLS with a CA of this fleet's own, or plaintext (`tls` False)."""
    tag = f"{os.getpid()}-{next(_counter)}"
    instances: dict[int, Instance] = {}
    started: dict[int, Proxy] = {}
    try:
        for n in NODES:
            instances[n] = Instance(n)
        backhauls = {n: free_port(ip(n)) for n in NODES}
        pings = {n: free_port(ip(n), socket.SOCK_DGRAM) for n in NODES}
        certs = FleetCerts(workdir / f"fleet-{tag}") if tls else None
        cfgs = {n: NodeConfig(n, instances, tag, backhauls, pings, certs) for n in NODES}
        failures: list[BaseException] = []

        def boot(n: int) -> None:
            try:
                started[n] = Proxy(cfgs[n], workdir)  # type: ignore[arg-type]
            except BaseException as e:  # reported below, after every boot ended
                failures.append(e)

        threads = [threading.Thread(target=boot, args=(n,)) for n in NODES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=READY_TIMEOUT + 15)
        if failures or len(started) != len(NODES):
            raise RuntimeError(f"fleet did not start: {failures!r}")
        nodes = {n: Node(n, cfgs[n], started[n], instances[n]) for n in NODES}
        return Fleet(nodes, tag, workdir)
    except BaseException:
        for p in started.values():
            p.stop()
        for inst in instances.values():
            inst.stop()
        raise


# -- load ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One client request: what was sent and what came back (status 0: a client error)."""

    rid: str
    status: int
    instance: str | None
    retry_after: str | None
    internal_headers: list[str]
    body: bytes
    error: str = ""
    at: float = field(default_factory=time.monotonic)  # when the outcome was known


def _outcome(rid: str, r: Response) -> Outcome:
    internal = [n for n, _ in r.headers if n.lower().startswith("x-edgeproxy-")]
    return Outcome(rid, r.status, r.header("x-instance"), r.header("retry-after"), internal, r.body)


def run_clients(
    host: str,
    port: int,
    clients: int,
    per_client: int,
    path: str = "/?sleep=50",
    prefix: str = "rid",
    deadline_s: float = 25.0,
    on_progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """`clients` threads, each sending `per_client` GETs in sequence on a keep-alive
    connection (reconnecting when the proxy closes it, as after a 503). Each request
    carries a unique X-Request-Id. A transport error is recorded as status 0."""
    results: list[list[Outcome]] = [[] for _ in range(clients)]
    done = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s
    start = threading.Barrier(clients, timeout=10)

    def client(k: int) -> None:
        out = results[k]
        conn: Client | None = None
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait()
        try:
            for i in range(per_client):
                if time.monotonic() > stop_at:
                    out.append(Outcome(f"{prefix}-{k}-{i}", 0, None, None, [], b"", "deadline"))
                    break
                rid = f"{prefix}-{k}-{i}"
                raw = request_bytes("GET", path, [("X-Request-Id", rid)])
                try:
                    if conn is None:
                        conn = Client(port, timeout=10, host=host)
                    conn.send(raw)
                    r = conn.response()
                except (OSError, EOFError, AssertionError, ValueError) as e:
                    out.append(Outcome(rid, 0, None, None, [], b"", f"{type(e).__name__}: {e}"))
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                out.append(_outcome(rid, r))
                if "close" in r.tokens("connection"):
                    conn.close()
                    conn = None
                with lock:
                    done[0] += 1
                    n = done[0]
                if on_progress is not None:
                    on_progress(n)
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.1, stop_at - time.monotonic() + 12))
    assert not any(t.is_alive() for t in threads), "a client thread is still running"
    return [o for per in results for o in per]


class Held:
    """Requests held open in flight (slow ones), each on its own connection."""

    def __init__(self) -> None:
        self.conns: list[Client] = []

    def open(self, host: str, port: int, raw: bytes) -> None:
        c = Client(port, timeout=30, host=host)
        self.conns.append(c)
        c.send(raw)

    def finish(self, timeout: float = 15.0) -> list[Response]:
        """Read every held request's response (each within `timeout`), then close."""
        try:
            return [c.response(timeout=timeout) for c in self.conns]
        finally:
            self.close()

    def close(self) -> None:
        """Close every connection (the demo app still finishes what it was sleeping on)."""
        for c in self.conns:
            c.close()
        self.conns.clear()


def wait_for(
    what: str, cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll `cond` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
