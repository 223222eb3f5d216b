"""Certificate cache costs: check + build time, memory per cached context, loop lag.

- time: load_bundle, check and server_context for one ECDSA P-256 leaf + CA bundle
  (median and p90 of --rounds runs each), and CertCache.lookup on a hit;
- memory: RSS growth over --contexts distinct bundles, then over their contexts (the
  cost per cached SSLContext), and a CertCache over a directory of as many files;
- loop lag: a 1 ms ticker's lateness while --names names are resolved by CertCache (on
  its certificate thread) and, for comparison, the same parse + check + build run on
  the event loop itself, one callback per name.

Usage: .venv/bin/python -m bench.certs [--rounds 300] [--contexts 1000] [--names 100]
       [--lag-rounds 5]
Writes bench/results/certs-<date>.md (and prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))

import uvloop  # noqa: E402
from certgen import CA  # noqa: E402

from proxy.core.certcheck import check, load_bundle  # noqa: E402
from proxy.worker.certs import CertCache, server_context  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def timed(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median, p90) in µs over `rounds` calls."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.9)]


def bench_time(rounds: int) -> list[str]:
    ca = CA.new()
    leaf = ca.issue(("a.example.com",))
    pem = leaf.bundle_pem()
    bundle = load_bundle(pem)
    now = time.time()

    def whole() -> None:
        b = load_bundle(pem)
        check(b, "a.example.com", now)
        server_context(b, ("http/1.1",))

    rows = [
        ("load_bundle (parse PEM, 2 certificates + key)", lambda: load_bundle(pem)),
        ("check (chain signature, key, name, dates)", lambda: check(bundle, "a.example.com", now)),
        ("server_context (SSLContext + memfd load)", lambda: server_context(bundle, ("http/1.1",))),
        ("all three (one cache fill)", whole),
    ]
    out = ["| step | median µs | p90 µs |", "|---|---:|---:|"]
    for label, fn in rows:
        fn()  # warm
        med, p90 = timed(fn, rounds)
        out.append(f"| {label} | {med:.0f} | {p90:.0f} |")
    return out


def bench_memory(n: int) -> tuple[list[str], list[bytes], CA]:
    ca = CA.new()
    pems = [ca.issue((f"n{i}.example.com",)).bundle_pem() for i in range(n)]
    r0 = rss()
    bundles = [load_bundle(p) for p in pems]
    r1 = rss()
    ctxs = [server_context(b, ("http/1.1",)) for b in bundles]
    r2 = rss()
    out = [
        f"- {n} distinct bundles: RSS +{(r1 - r0) / n / 1024:.1f} KiB per parsed Bundle",
        f"- their {n} SSLContexts: RSS +{(r2 - r1) / n / 1024:.1f} KiB per context",
    ]
    assert len(ctxs) == n
    return out, pems, ca


async def cache_memory(pems: list[bytes], scratch: Path) -> list[str]:
    d = scratch / "certs"
    d.mkdir()
    for i, p in enumerate(pems):
        (d / f"{i}.pem").write_bytes(p)
    r0 = rss()
    c = CertCache(str(d), None, cache_size=len(pems), scan_interval=3600.0)
    t = time.perf_counter()
    await c.start()
    t_scan = time.perf_counter() - t
    r1 = rss()
    t = time.perf_counter()
    for i in range(len(pems)):
        assert await c.get(f"n{i}.example.com") is not None
    t_fill = time.perf_counter() - t
    r2 = rss()
    t = time.perf_counter()
    await c.rescan()
    t_rescan = time.perf_counter() - t
    n = len(pems)
    # lookup on a hit: the handshake path
    names = [f"n{i}.example.com" for i in range(n)]
    t = time.perf_counter()
    for _ in range(20):
        for name in names:
            c.lookup(name)
    t_lookup = (time.perf_counter() - t) / (20 * n) * 1e9
    await c.close()
    return [
        f"- CertCache over a directory of {n} files: first scan (read, parse, check every "
        f"file) {t_scan * 1e3:.0f} ms, RSS +{(r1 - r0) / n / 1024:.1f} KiB per file",
        f"- get() of all {n} names one after another (each a thread hop, check, build): "
        f"{t_fill * 1e3:.0f} ms ({t_fill / n * 1e6:.0f} µs per name), RSS "
        f"+{(r2 - r1) / n / 1024:.1f} KiB per cached context",
        f"- a rescan with nothing changed ({n} stat calls): {t_rescan * 1e3:.1f} ms",
        f"- lookup() on a hit: {t_lookup:.0f} ns",
    ]


async def ticker_lag(work: Callable[[], Awaitable[None]], period: float = 0.001) -> list[float]:
    """Lateness (ms) of each tick of a `period` ticker while `work()` runs (perf_counter:
    uvloop's loop.time() counts whole milliseconds)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(period)
            lags.append((time.perf_counter() - t - period) * 1e3)

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    await work()
    done.set()
    await task
    return lags


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


async def lag_compare(pems: list[bytes], scratch: Path, names: int, rounds: int) -> list[str]:
    d = scratch / "lag"
    d.mkdir()
    for i, p in enumerate(pems[:names]):
        (d / f"{i}.pem").write_bytes(p)
    lag: dict[str, list[float]] = {"thread": [], "loop": []}
    wall: dict[str, float] = {"thread": 0.0, "loop": 0.0}

    for _ in range(rounds):
        c = CertCache(str(d), None, cache_size=names, scan_interval=3600.0)
        await c.start()

        async def via_cache(c: CertCache = c) -> None:
            await asyncio.gather(*(c.get(f"n{i}.example.com") for i in range(names)))

        async def in_loop() -> None:
            # the fairest in-loop design: one name per loop iteration, yielding between
            now = time.time()
            for i in range(names):
                b = load_bundle(pems[i])
                check(b, f"n{i}.example.com", now)
                server_context(b, ("http/1.1",))
                await asyncio.sleep(0)

        for kind, work in (("thread", via_cache), ("loop", in_loop)):
            t = time.perf_counter()
            lag[kind] += await ticker_lag(work)
            wall[kind] += time.perf_counter() - t
        await c.close()
    rows = [
        f"{names} names resolved at once, {rounds} rounds alternating; the lateness of a 1 ms "
        "ticker on the same loop (uvloop), over all ticks:",
        "",
        "| where parse + check + build run | ticks | p50 ms | p90 ms | p99 ms | max ms | "
        "wall ms per round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (("thread", "CertCache: its certificate thread"), ("loop", "on the loop")):
        xs = lag[kind]
        rows.append(
            f"| {label} | {len(xs)} | {pct(xs, 0.5):.2f} | {pct(xs, 0.9):.2f} | "
            f"{pct(xs, 0.99):.2f} | {max(xs):.2f} | {wall[kind] / rounds * 1e3:.0f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--contexts", type=int, default=1000)
    ap.add_argument("--names", type=int, default=100)
    ap.add_argument("--lag-rounds", type=int, default=5)
    args = ap.parse_args()
    up0 = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    import ssl

    lines = [
        "# Certificate cache: check + build time, memory per context, loop lag",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.node()}, {platform.machine()}, nproc {os.cpu_count()}; "
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}",
        f"- uptime before: `{up0}`",
        f"- command: `python -m bench.certs --rounds {args.rounds} --contexts "
        f"{args.contexts} --names {args.names} --lag-rounds {args.lag_rounds}`",
        "- code: "
        + subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout.strip(),
        "- bundle: ECDSA P-256 leaf signed by an ECDSA P-256 CA (tests/support/certgen.py), "
        "leaf + CA + PKCS#8 key, ~1.3 KB of PEM",
        "- the machine is shared with other agents' tests: times are noisy",
        "",
        "## Time per step",
        "",
        *bench_time(args.rounds),
        "",
        "## Memory",
        "",
    ]
    mem, pems, _ = bench_memory(args.contexts)
    lines += mem
    with (
        tempfile.TemporaryDirectory() as tmp,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        lines += runner.run(cache_memory(pems, Path(tmp)))
        lines += ["", "## Event-loop lag while resolving", ""]
        lines += runner.run(lag_compare(pems, Path(tmp), args.names, args.lag_rounds))
    up1 = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    lines += ["", f"- uptime after: `{up1}`", ""]
    text = "\n".join(lines)
    print(text)
    out = REPO / "bench" / "results" / f"certs-{stamp}.md"
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
