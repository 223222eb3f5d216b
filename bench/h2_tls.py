"""HTTP/2 vs HTTP/1.1 over TLS: h2load against edgeproxy (and HAProxy), same certificate.

    python -m bench.h2_tls [--duration 5] [--rounds 2] [--clients 16] [--streams 10]
        [--edgeproxy-cmd CMD] [--no-haproxy] [--out FILE]

Both proxies terminate TLS with one ECDSA P-256 certificate (a throwaway CA made here)
and ALPN h2,http/1.1, in front of the same nginx upstream (HTTP/1.1), 2 workers /
nbthread 2. Modes, interleaved by round, each h2load run bounded by --duration:

- h1: `h2load --h1 -c CLIENTS -m 1` (HTTP/1.1 keep-alive, one request at a time each);
- h2: `h2load -c CLIENTS -m STREAMS` (HTTP/2, STREAMS concurrent streams per connection).

For each run: requests/s, failures, and the proxy's CPU per request (its process tree's
CPU over the run / requests done). Medians are printed and written to
bench/results/h2-tls-<date>.md (or --out). The machine may be shared: say so with them.

To measure another (compiled) checkout, run it from there: `--edgeproxy-cmd "env -C DIR
PYTHONPATH=DIR python -m proxy.cli"` (`python -m` puts the working directory first on
sys.path, so PYTHONPATH alone would run this checkout's modules).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Managed
from bench.targets import (
    BENCH_DIR,
    EDGEPROXY_HOSTNAME,
    HOST,
    Target,
    Upstream,
    default_edgeproxy_cmd,
    render,
)
from bench.wrk_compare import cpu_model
from bench.wrk_tls import EdgeProxyTls, make_certificate

MODES = ("h1", "h2")


class HAProxyH2(Target):
    """HAProxy 2.6, nbthread 2, `bind ... ssl crt ... alpn h2,http/1.1`."""

    name = "haproxy"

    def __init__(self, root: Path, upstream_port: int, cert: Path) -> None:
        super().__init__(root)
        self.upstream_port = upstream_port
        self.cert = cert

    def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        values = {"DIR": self.dir, "PORT": self.port, "UPSTREAM_PORT": self.upstream_port}
        text = render("haproxy-tls.cfg.tmpl", CERT=self.cert, **values)
        text = text.replace("alpn http/1.1", "alpn h2,http/1.1")
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(text)
        self.proc = Managed(
            self.name, [haproxy, "-W", "-db", "-f", str(cfg)], str(self.dir / "stderr.log")
        )
        self.proc.start()
        self.proc.wait_port(HOST, self.port)


class EdgeProxyH2(EdgeProxyTls):
    """bench.wrk_tls's edgeproxy (HTTPS, ALPN h2 and http/1.1), with TOML added."""

    extra_toml = ""

    def config_text(self) -> str:
        return super().config_text() + "\n" + self.extra_toml


@dataclass
class H2loadResult:
    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int

    @classmethod
    def parse(cls, text: str) -> H2loadResult:
        m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text)
        r = re.search(
            r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
            r" (\d+) errored",
            text,
        )
        if m is None or r is None:
            raise RuntimeError(f"unexpected h2load output:\n{text}")
        return cls(
            float(m.group(1)), int(r.group(3)), int(r.group(4)), int(r.group(5)), int(r.group(6))
        )


def h2load(port: int, mode: str, args: argparse.Namespace, duration: float) -> H2loadResult:
    argv = [
        "h2load",
        "-c", str(args.clients),
        "-m", "1" if mode == "h1" else str(args.streams),
        "-D", f"{duration:g}",
        "-H", f":authority: {EDGEPROXY_HOSTNAME}",
        f"https://{HOST}:{port}/small",
    ]  # fmt: skip
    if mode == "h1":
        argv.insert(1, "--h1")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: {done.stderr.strip()}")
    return H2loadResult.parse(done.stdout)


@dataclass
class Run:
    target: str
    mode: str
    round: int
    res: H2loadResult
    cpu_s: float
    upstream_conns: int  # connections the upstream accepted during the run

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.res.done * 1e6 if self.res.done else 0.0


def table(runs: list[Run], args: argparse.Namespace, load: str) -> str:
    out = [
        f"# HTTP/2 vs HTTP/1.1 over TLS (h2load), {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {platform.node()}, {cpu_model()}, {os.cpu_count()} cores,"
        f" {platform.platform()}; shared with other agents (load average before the run:"
        f" {load}): figures are noisy",
        f"- command: python -m bench.h2_tls {' '.join(sys.argv[1:])}",
        f"- {args.rounds} rounds of {args.duration:g} s (after a 1 s warm-up per mode),"
        " interleaved; medians."
        f" h1: h2load --h1 -c {args.clients} -m 1; h2: h2load -c {args.clients} -m {args.streams};"
        " GET /small (13 bytes) from nginx; one ECDSA P-256 certificate; 2 workers / nbthread 2.",
        "",
        "| mode | target | req/s | failed+errored | CPU µs/req | upstream conns opened |",
        "|---|---|---:|---:|---:|---:|",
    ]
    med: dict[tuple[str, str], float] = {}
    for mode in MODES:
        for name in ("haproxy", "edgeproxy"):
            rs = [r for r in runs if r.mode == mode and r.target == name]
            if not rs:
                continue
            rps = statistics.median(r.res.rps for r in rs)
            med[mode, name] = rps
            bad = sum(r.res.failed + r.res.errored for r in rs)
            cpu = statistics.median(r.cpu_us for r in rs)
            opened = statistics.median(r.upstream_conns for r in rs)
            out.append(f"| {mode} | {name} | {rps:,.0f} | {bad} | {cpu:,.1f} | {opened:,.0f} |")
    out.append("")
    for name in ("haproxy", "edgeproxy"):
        if ("h1", name) in med and ("h2", name) in med and med["h1", name]:
            out.append(f"- {name}: h2 / h1 req/s = {med['h2', name] / med['h1', name]:.2f}")
    if ("h2", "haproxy") in med and ("h2", "edgeproxy") in med and med["h2", "haproxy"]:
        out.append(
            f"- h2: edgeproxy / HAProxy = {med['h2', 'edgeproxy'] / med['h2', 'haproxy']:.2f}"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--edgeproxy-cmd", default=default_edgeproxy_cmd())
    p.add_argument("--no-haproxy", action="store_true")
    p.add_argument(
        "--pool-max-idle",
        type=int,
        default=0,
        help="edgeproxy [pool] max_idle (0: the default, 64 per worker)",
    )
    p.add_argument("--out", default="")
    p.add_argument("--modes", default=",".join(MODES), help="which of h1,h2 to run")
    args = p.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m in MODES]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="edgeproxy-h2-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        cert = make_certificate(root)
        upstream = Upstream(root)
        targets: list[Target] = []
        try:
            upstream.start()
            if not args.no_haproxy and (
                shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")
            ):
                targets.append(HAProxyH2(root, upstream.port, cert))
            ep = EdgeProxyH2(root, upstream.port, args.edgeproxy_cmd, cert)
            if args.pool_max_idle:
                ep.extra_toml = f"[pool]\nmax_idle = {args.pool_max_idle}\n"
            targets.append(ep)
            for t in targets:
                t.start()
            for t in targets:  # warm up: pools, caches, first connections
                for mode in modes:
                    h2load(t.port, mode, args, 1.0)
            for rnd in range(1, args.rounds + 1):
                for mode in modes:
                    for t in targets:
                        t.check_alive()
                        c0 = t.cpu_seconds()
                        a0 = upstream.accepted() or 0
                        res = h2load(t.port, mode, args, args.duration)
                        cpu = t.cpu_seconds() - c0
                        opened = (upstream.accepted() or 0) - a0
                        runs.append(Run(t.name, mode, rnd, res, cpu, opened))
                        print(f"round {rnd} {mode} {t.name}: {res.rps:,.0f} req/s", file=sys.stderr)
        finally:
            for t in reversed(targets):
                t.stop()
            upstream.stop()
    text = table(runs, args, load)
    print(text)
    out = (
        Path(args.out)
        if args.out
        else BENCH_DIR / "results" / f"h2-tls-{dt.datetime.now():%Y%m%d-%H%M}.md"
    )
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
