"""TLS at the edge: wrk over HTTPS against HAProxy and edgeproxy, same certificate, same run.

    python -m bench.wrk_tls [--duration 10] [--rounds 3] [--connections 64]
        [--handshake-connections 16] [--edgeproxy-cmd CMD]

Both proxies terminate TLS with one ECDSA P-256 certificate (a throwaway CA made here)
in front of the same nginx upstream, 2 workers / 2 threads each. Two measurements,
interleaved by round:

- keepalive: wrk on https, 64 keep-alive connections, GET /small;
- handshake: wrk on https with `Connection: close`, so every request is a new TCP
  connection and a full TLS handshake (wrk keeps no sessions: TLS 1.3, ECDHE P-256
  or X25519 and an ECDSA signature each time); handshakes/s = requests/s there.

For each run: requests/s, p50/p99, errors, and the proxy's CPU per request (per
handshake in the second mode). The table (medians, and edgeproxy/HAProxy ratios) is
printed and written to bench/results/tls-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Managed, StartError, free_port
from bench.targets import (
    BENCH_DIR,
    EDGEPROXY_HOSTNAME,
    HOST,
    EdgeProxy,
    Target,
    Upstream,
    default_edgeproxy_cmd,
    render,
)
from bench.wrk_compare import WrkResult, cpu_model, fmt_errors, fmt_num, fmt_us, wrk_argv

MODES = ("keepalive", "handshake")


def make_certificate(where: Path) -> Path:
    """A CA and a bench.test leaf (ECDSA P-256): the leaf's chain + key in one PEM."""
    sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))
    from certgen import CA

    leaf = CA.new("edgeproxy bench CA").issue((EDGEPROXY_HOSTNAME,))
    certs = where / "certs"
    certs.mkdir(mode=0o755)
    return leaf.write(certs / f"{EDGEPROXY_HOSTNAME}.pem")


class HAProxyTls(Target):
    """HAProxy 2.6, nbthread 2, `bind ... ssl crt` on the bench certificate."""

    name = "haproxy"

    def __init__(self, root: Path, upstream_port: int, cert: Path) -> None:
        super().__init__(root)
        self.upstream_port = upstream_port
        self.cert = cert

    def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        cfg = self.dir / "haproxy.cfg"
        values = {
            "DIR": self.dir,
            "PORT": self.port,
            "UPSTREAM_PORT": self.upstream_port,
            "CERT": self.cert,
        }
        cfg.write_text(render("haproxy-tls.cfg.tmpl", **values))
        argv = [haproxy, "-W", "-db", "-f", str(cfg)]
        self.proc = Managed(self.name, argv, str(self.dir / "stderr.log"))
        self.proc.start()
        self.proc.wait_port(HOST, self.port)


class EdgeProxyTls(EdgeProxy):
    """edgeproxy, 2 workers, an HTTPS listener with certs_dir holding the certificate."""

    def __init__(self, root: Path, upstream_port: int, cmd: str, cert: Path) -> None:
        super().__init__(root, upstream_port, cmd)
        self.plain_port = self.port
        self.port = free_port(HOST)  # the port wrk measures: HTTPS
        self.cert = cert

    def config_text(self) -> str:
        text = super().config_text().replace(f"{HOST}:{self.port}", f"{HOST}:{self.plain_port}")
        text = text.replace("[listen]\n", f'[listen]\nhttps = ["{HOST}:{self.port}"]\n', 1)
        # wrk sends the address it was given as SNI: taken as no SNI, so the default host.
        tls = f'[tls]\ncerts_dir = "{self.cert.parent}"\ndefault_host = "{EDGEPROXY_HOSTNAME}"\n'
        return text + "\n" + tls


def wrk(port: int, duration: float, connections: int, close: bool) -> WrkResult:
    headers = ("Connection: close",) if close else ()
    argv = wrk_argv(port, "/small", duration, connections, "https", headers)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return WrkResult.parse(done.stdout)


@dataclass
class Run:
    target: str
    mode: str
    round: int
    wrk: WrkResult
    cpu_s: float

    @property
    def cpu_us(self) -> float | None:
        return self.cpu_s / self.wrk.requests * 1e6 if self.wrk.requests else None


def measure(t: Target, mode: str, rnd: int, args: argparse.Namespace) -> Run:
    t.check_alive()
    close = mode == "handshake"
    conns = args.handshake_connections if close else args.connections
    c0 = t.cpu_seconds()
    result = wrk(t.port, args.duration, conns, close)
    return Run(t.name, mode, rnd, result, t.cpu_seconds() - c0)


def table(runs: list[Run], args: argparse.Namespace) -> str:
    out = [
        f"# TLS: edgeproxy vs HAProxy, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {platform.node()}, {cpu_model()}, {platform.platform()}",
        f"- command: python -m bench.wrk_tls {' '.join(sys.argv[1:])}",
        f"- {args.rounds} rounds of {args.duration:g} s, interleaved; medians. keepalive:"
        f" {args.connections} connections; handshake: {args.handshake_connections}"
        " connections, `Connection: close` (one full handshake per request).",
        "",
        "| mode | target | req/s | p50 | p99 | errors | CPU µs/req |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    med: dict[tuple[str, str], float] = {}
    for mode in MODES:
        for name in ("haproxy", "edgeproxy"):
            rs = [r for r in runs if r.mode == mode and r.target == name]
            if not rs:
                continue
            rps = statistics.median(r.wrk.rps for r in rs)
            med[mode, name] = rps
            cpu = statistics.median(r.cpu_us or 0.0 for r in rs)
            errors: dict[str, int] = {}
            for r in rs:
                for k, v in r.wrk.errors.items():
                    errors[k] = errors.get(k, 0) + v
            out.append(
                f"| {mode} | {name} | {rps:,.0f} | "
                f"{fmt_us(statistics.median(r.wrk.p50_us for r in rs))} | "
                f"{fmt_us(statistics.median(r.wrk.p99_us for r in rs))} | "
                f"{fmt_errors(errors)} | {fmt_num(cpu)} |"
            )
    out.append("")
    for mode in MODES:
        if (mode, "haproxy") in med and (mode, "edgeproxy") in med and med[mode, "haproxy"]:
            ratio = med[mode, "edgeproxy"] / med[mode, "haproxy"]
            out.append(f"- {mode}: edgeproxy / HAProxy = {ratio:.2f}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--handshake-connections", type=int, default=16)
    p.add_argument("--edgeproxy-cmd", default=default_edgeproxy_cmd())
    args = p.parse_args(argv)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="edgeproxy-tls-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        cert = make_certificate(root)
        upstream = Upstream(root)
        targets: list[Target] = []
        try:
            upstream.start()
            targets = [
                HAProxyTls(root, upstream.port, cert),
                EdgeProxyTls(root, upstream.port, args.edgeproxy_cmd, cert),
            ]
            for t in targets:
                t.start()
            for t in targets:  # warm up: caches, pools, the compiled path
                wrk(t.port, 2, args.connections, False)
            for rnd in range(1, args.rounds + 1):
                for mode in MODES:
                    for t in targets:
                        r = measure(t, mode, rnd, args)
                        runs.append(r)
                        print(
                            f"round {rnd} {mode:9} {t.name:9} {r.wrk.rps:9.0f} req/s"
                            f"  p99 {fmt_us(r.wrk.p99_us):>8}  errors {fmt_errors(r.wrk.errors)}"
                            f"  cpu {fmt_num(r.cpu_us)} us/req",
                            flush=True,
                        )
        except StartError as e:
            print(f"!! {e}", file=sys.stderr)
            return 1
        finally:
            for t in reversed([upstream, *targets]):
                t.stop()
    text = table(runs, args)
    print(text)
    out = BENCH_DIR / "results" / f"tls-{dt.datetime.now().strftime('%Y%m%d-%H%M')}.md"
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
