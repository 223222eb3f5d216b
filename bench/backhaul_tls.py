"""Backhauled requests over mutual TLS vs plaintext, and what a TLS reconnect costs.

    python -m bench.backhaul_tls [--rounds 3] [--duration 5] [--connections 16]

Two fleets of two nodes on loopback, started side by side: an edge (n2, one worker,
no instance of its own) whose every request crosses the backhaul to n3 (one worker,
an nginx instance serving /small and /64k). One fleet's backhaul is plaintext
([backhaul] insecure), the other's mutual TLS (a fleet CA of its own). wrk
(-t1 -cN keep-alive) loads each edge in turn, rounds interleaved; each run records
rps, latency, the CPU time of both nodes' processes per request, and the backhaul
handshakes both nodes counted (/metrics) during it, so "handshakes per 10,000
requests" is read, not assumed. Then, in this process, the cost of one reconnect:
a full TLS 1.3 handshake with client certificates vs one that resumes the session,
with the very contexts the proxy builds (proxy.fleettls), CPU time of both ends.
Written to bench/results/backhaul-tls-<UTC time>.md with the date, machine, load
and command. Traffic stays on 127.0.0.0/8; every run is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import tree_cpu_split
from bench.targets import BENCH_DIR, EDGEPROXY_HOSTNAME, Upstream
from bench.wrk_compare import SIZES, WrkResult, cpu_model, run_wrk, uptime

sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))

from backhaul_nodes import BackhaulNode
from fleet_certs import FleetCerts
from proxyctl import Proxy, metric_value

import proxy
from proxy.config import loads
from proxy.fleettls import client_context, server_context
from proxy.fleettls import load as load_material


@dataclass
class Pair:
    """One fleet: the edge and the node it backhauls to."""

    mode: str
    edge: Proxy
    peer: Proxy
    warmup: Run | None = None

    def cpu(self) -> tuple[float, float]:
        u1, s1 = tree_cpu_split(self.edge.proc.pid)
        u2, s2 = tree_cpu_split(self.peer.proc.pid)
        return u1 + u2, s1 + s2

    def handshakes(self) -> tuple[float, float]:
        """(the edge's connect-side handshakes, the peer's accept-side ones): full + resumed."""
        out = []
        for p, side in ((self.edge, "connect"), (self.peer, "accept")):
            text = p.metrics()
            out.append(
                sum(
                    metric_value(
                        text, f'edgeproxy_backhaul_tls_handshakes_total{{side="{side}",kind="{k}"}}'
                    )
                    for k in ("full", "resumed")
                )
            )
        return out[0], out[1]

    def stop(self) -> None:
        self.edge.stop()
        self.peer.stop()


@dataclass
class Run:
    mode: str
    size: str
    round: int
    wrk: WrkResult
    user_s: float
    sys_s: float
    handshakes_edge: float
    handshakes_peer: float

    @property
    def cpu_us(self) -> float:
        return (self.user_s + self.sys_s) / max(1, self.wrk.requests) * 1e6


def start_pair(
    mode: str, work: Path, upstream: str, peer_ip: str, certs: FleetCerts | None
) -> Pair:
    def backhaul(node: str) -> dict[str, object]:
        return {"insecure": True} if certs is None else dict(certs.backhaul_keys(node))

    hosts = (EDGEPROXY_HOSTNAME,)
    peer_cfg = BackhaulNode(
        "n3", peer_ip, backhaul("n3"), instances=[{"id": "up-n3", "address": upstream}], hosts=hosts
    )
    peer = Proxy(peer_cfg, work)  # type: ignore[arg-type]
    edge_cfg = BackhaulNode(
        "n2",
        "127.0.0.2",
        backhaul("n2"),
        instances=[{"id": "up-n3", "address": upstream, "node": "n3"}],
        peers=[{"id": "n3", "backhaul": peer_cfg.backhaul_address, "ping": f"{peer_ip}:9"}],
        listen_backhaul=False,
        hosts=hosts,
    )
    edge = Proxy(edge_cfg, work)  # type: ignore[arg-type]
    return Pair(mode, edge, peer)


def measure(pair: Pair, size: str, rnd: int, args: argparse.Namespace) -> Run:
    h0 = pair.handshakes()
    u0, s0 = pair.cpu()
    result = run_wrk(pair.edge.port, SIZES[size], args.duration, args.connections)
    u1, s1 = pair.cpu()
    time.sleep(1.2)  # workers publish their counters once a second
    h1 = pair.handshakes()
    return Run(pair.mode, size, rnd, result, u1 - u0, s1 - s0, h1[0] - h0[0], h1[1] - h0[1])


# -- one reconnect: full handshake vs resumption ------------------------------------------


def handshake_cost(certs: FleetCerts, n: int) -> dict[str, float]:
    """CPU µs per handshake (both ends, one process) and bytes on the wire, full vs resumed,
    over memory BIOs with the proxy's own contexts (proxy.fleettls)."""

    def material(node: str) -> object:
        keys = certs.backhaul_keys(node)
        text = f'[node]\nid = "{node}"\n[backhaul]\n' + "".join(
            f'{k} = "{v}"\n' for k, v in keys.items()
        )
        return load_material(loads(text))

    server = server_context(material("n3"))  # type: ignore[arg-type]
    client = client_context(material("n2"))  # type: ignore[arg-type]

    def once(session_of: str | None) -> tuple[ssl.SSLObject, int, bool]:
        ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(ci, co, server_hostname=session_of)
        s = server.wrap_bio(si, so, server_side=True)
        wire = 0
        for _ in range(10):
            for obj in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            a, b = co.read(), so.read()
            wire += len(a) + len(b)
            si.write(a)
            ci.write(b)
            if not a and not b:
                break
        # Let each end read what followed the handshake (TLS 1.3 tickets), as a connection does.
        for obj, out, into in ((s, so, ci), (c, co, si)):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.read(1)
            into.write(out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            c.read(1)
        return c, wire, c.session_reused

    out: dict[str, float] = {}
    for kind in ("full", "resumed"):
        client.sessions.clear()
        first, _, _ = once(None)
        if kind == "resumed":
            client.remember("n3", first)
        wires, reused = [], 0
        t0 = time.process_time()
        for _ in range(n):
            c, wire, r = once("n3" if kind == "resumed" else None)
            wires.append(wire)
            reused += r
            if kind == "resumed":
                client.remember("n3", c)
        cpu = time.process_time() - t0
        out[f"{kind}_us"] = cpu / n * 1e6
        out[f"{kind}_bytes"] = statistics.median(wires)
        out[f"{kind}_reused"] = reused / n
    return out


# -- the report ------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def report(
    runs: list[Run],
    warmups: list[Run],
    cost: dict[str, float],
    args: argparse.Namespace,
    argv: list[str],
    before: str,
) -> str:
    when = dt.datetime.now(dt.UTC)
    lines = [
        "# Backhauled requests: mutual TLS vs plaintext (bench/backhaul_tls.py)",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}; nproc: {len(os.sched_getaffinity(0))}; CPU: {cpu_model()};"
        f" kernel {platform.release()}; OpenSSL: {ssl.OPENSSL_VERSION}",
        f"- edgeproxy build: {proxy.build()}; Python {platform.python_version()}",
        f"- uptime before: `{before}`; after: `{uptime()}` (the machine is shared: other"
        " agents' tests ran meanwhile, so rps is noisy; ratios within a round are the figure)",
        "- command: `python -m bench.backhaul_tls " + shlex.join(argv) + "`",
        f"- load: wrk -t1 -c{args.connections} -d{args.duration}s keep-alive on the edge (n2, one"
        " worker); every request backhauled to n3 (one worker) in front of nginx; rounds"
        " interleaved plaintext / mTLS; CPU is both nodes' processes (master + worker)",
        "",
        "| size | backhaul | rps (median) | p50 ms | p99 ms | CPU us/req (user+sys) |"
        " handshakes (edge, peer) per run | errors |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for size in SIZES:
        for mode in ("plaintext", "mtls"):
            rs = [r for r in runs if r.size == size and r.mode == mode]
            if not rs:
                continue
            hs = ", ".join(f"{r.handshakes_edge:.0f}/{r.handshakes_peer:.0f}" for r in rs)
            lines.append(
                f"| {size} | {mode} | {_median([r.wrk.rps for r in rs]):.0f} |"
                f" {_median([r.wrk.p50_us / 1000 for r in rs]):.2f} |"
                f" {_median([r.wrk.p99_us / 1000 for r in rs]):.2f} |"
                f" {_median([r.cpu_us for r in rs]):.1f} |"
                f" {hs} | {sum(r.wrk.error_total for r in rs)} |"
            )
    lines += ["", "Per round (rps, CPU us/req):", ""]
    for r in runs:
        lines.append(
            f"- round {r.round} {r.size} {r.mode}: {r.wrk.requests} requests, {r.wrk.rps:.0f} rps,"
            f" {r.cpu_us:.1f} us/req (user {r.user_s:.2f} s, sys {r.sys_s:.2f} s),"
            f" handshakes edge {r.handshakes_edge:.0f} peer {r.handshakes_peer:.0f}"
        )
    lines += [
        "",
        "mTLS cost per request (median over rounds of mTLS minus plaintext, same round):",
        "",
    ]
    for size in SIZES:
        diffs = []
        for rnd in range(1, args.rounds + 1):
            p = [r for r in runs if (r.size, r.mode, r.round) == (size, "plaintext", rnd)]
            m = [r for r in runs if (r.size, r.mode, r.round) == (size, "mtls", rnd)]
            if p and m:
                diffs.append((m[0].cpu_us - p[0].cpu_us, m[0].wrk.rps / p[0].wrk.rps))
        if diffs:
            lines.append(
                f"- {size}: +{_median([d[0] for d in diffs]):.1f} us CPU per request,"
                f" rps ratio mTLS/plaintext {_median([d[1] for d in diffs]):.2f}"
            )
    mtls_runs = [r for r in runs if r.mode == "mtls"] + [r for r in warmups if r.mode == "mtls"]
    total_req = sum(r.wrk.requests for r in mtls_runs)
    total_hs = sum(r.handshakes_edge for r in mtls_runs)
    lines += [
        "",
        "Handshakes per 10,000 backhauled requests (mTLS, all runs): "
        f"{total_hs / max(1, total_req) * 1e4:.3f}"
        f" ({total_hs:.0f} handshakes for {total_req} requests; wrk keeps {args.connections}"
        " connections, so the edge pools up to that many backhaul connections, opened in the"
        " warm-up run and reused after: "
        + ", ".join(f"{r.mode} warm-up {r.handshakes_edge:.0f}" for r in warmups)
        + ")",
        "",
        f"One reconnect, in-process (client + server CPU, {args.handshakes} handshakes each, the"
        " proxy's contexts: TLS 1.3, ECDSA P-256, client certificate):",
        "",
        "| handshake | CPU us (both ends) | bytes on the wire | resumed |",
        "|---|---:|---:|---:|",
        f"| full | {cost['full_us']:.0f} | {cost['full_bytes']:.0f} | {cost['full_reused']:.0%} |",
        f"| resumed (session ticket) | {cost['resumed_us']:.0f} | {cost['resumed_bytes']:.0f} |"
        f" {cost['resumed_reused']:.0%} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.backhaul_tls", description=doc)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--handshakes", type=int, default=300)
    args = p.parse_args(argv)
    if not (1 <= args.rounds <= 10 and 1 <= args.duration <= 30 and 1 <= args.connections <= 256):
        p.error("1 <= --rounds <= 10, 1 <= --duration <= 30, 1 <= --connections <= 256")
    if not 10 <= args.handshakes <= 5000:
        p.error("10 <= --handshakes <= 5000")
    before = uptime()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-bh-bench-"))
    work.chmod(0o755)
    up = Upstream(work)
    up.start()
    certs = FleetCerts(work)
    pairs: list[Pair] = []
    runs: list[Run] = []
    try:
        upstream = f"127.0.0.1:{up.port}"
        pairs.append(start_pair("plaintext", work, upstream, "127.0.0.3", None))
        pairs.append(start_pair("mtls", work, upstream, "127.0.0.4", certs))
        for pair in pairs:  # warm-up, not reported: the pools fill (the handshakes happen here)
            warm = measure(pair, "small", 0, args)
            pair.warmup = warm
            print(f"warm-up {pair.mode}: handshakes {warm.handshakes_edge:.0f}", flush=True)
        for rnd in range(1, args.rounds + 1):
            for size in SIZES:
                for pair in pairs if rnd % 2 else reversed(pairs):
                    r = measure(pair, size, rnd, args)
                    runs.append(r)
                    print(
                        f"round {rnd} {size} {pair.mode}: {r.wrk.rps:.0f} rps {r.cpu_us:.1f} us/req"
                        f" handshakes {r.handshakes_edge:.0f}/{r.handshakes_peer:.0f}"
                        f" errors {r.wrk.error_total}",
                        flush=True,
                    )
    finally:
        for pair in pairs:
            pair.stop()
        up.stop()
    cost = handshake_cost(certs, args.handshakes)
    warmups = [p.warmup for p in pairs if p.warmup is not None]
    text = report(runs, warmups, cost, args, argv if argv is not None else sys.argv[1:], before)
    path = BENCH_DIR / "results" / f"backhaul-tls-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
