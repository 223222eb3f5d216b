"""The allocator, measured: one edgeproxy build with glibc malloc and with jemalloc.

    python -m bench.allocator ab   [--pairs 6] [--duration 3] [--cmd CMD]
    python -m bench.allocator soak [--minutes 10] [--warmup 20] [--connections 16] [--cmd CMD]

Both modes run the same command (by default this checkout, `bench.targets.default_edgeproxy_cmd`;
compile it in place first, or pass `--cmd "env PYTHONPATH=<compiled copy> python -m proxy.cli"`)
twice, as variant `glibc` and as variant `jemalloc` with `LD_PRELOAD=` libjemalloc (the
master passes its environment to the workers it starts; this script checks that every
worker of the jemalloc variant has the library mapped, in /proc/<pid>/maps, and that no
process of the other one has), in front of one nginx upstream (bench/targets.py).

- `ab`: paired runs in alternation (bench.ab's measure: wrk -t1 -c64 -dN, CPU of the
  proxy's process tree per request) for /small and /64k; per size the median of the
  per-pair rps ratio jemalloc/glibc and the median CPU µs per request of each.
- `soak`: both variants at the same time, side by side (whatever else loads the machine
  loads both alike), each under its own bounded wrk (-t1, --minutes long) running
  bench/alloc_mix.lua (small and 64 KiB responses, 4 KiB and 64 KiB request bodies,
  keep-alive and a new connection every 8th request). After a warm-up of the same mix,
  the RSS (VmRSS of /proc/<pid>/status) of the master and of every worker is sampled
  every --interval seconds; reported: start, end, growth and peak, total requests,
  errors and CPU µs per request. The samples go to a CSV next to the report.

Written to bench/results/allocator-{ab,soak}-<UTC time>.md with the date, the machine,
the command and the load average before and after.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.ab import Build, measure, version_of
from bench.procs import StartError, process_tree
from bench.targets import BENCH_DIR, HOST, Target, Upstream, default_edgeproxy_cmd
from bench.wrk_compare import SIZES, WrkResult, cpu_model, run_wrk, uptime, wrk_argv

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
VARIANTS = ("glibc", "jemalloc")
MIX_LUA = BENCH_DIR / "alloc_mix.lua"


def variant_cmd(cmd: str, variant: str) -> str:
    """`cmd`, with LD_PRELOAD=libjemalloc in front for the jemalloc variant."""
    return cmd if variant == "glibc" else shlex.join(["env", f"LD_PRELOAD={JEMALLOC}"]) + " " + cmd


def maps_jemalloc(pid: int) -> bool | None:
    """Whether libjemalloc is mapped in the process (None: the process is gone)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return b"libjemalloc" in f.read()
    except OSError:
        return None


def rss_kib(pid: int) -> int | None:
    """VmRSS of the process in KiB (None: the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_preload(targets: dict[str, Target]) -> list[str]:
    """One line per process of each variant: its pid, role and whether libjemalloc is
    mapped. Raises StartError when a variant's processes are not as they must be."""
    lines = []
    for variant, t in targets.items():
        assert t.proc is not None
        master = t.proc.pid
        tree = process_tree(master)
        if len(tree) < 2:
            raise StartError(f"{variant}: no worker under master {master}")
        for pid in tree:
            mapped = maps_jemalloc(pid)
            role = "master" if pid == master else "worker"
            lines.append(f"{variant} {role} {pid}: libjemalloc mapped: {mapped}")
            if mapped is not (variant == "jemalloc"):
                raise StartError(f"{variant} {role} {pid}: libjemalloc mapped is {mapped}")
    return lines


def start_variants(root: Path, cmd: str, started: list[Target]) -> dict[str, Build]:
    """The upstream and one edgeproxy per variant, started; each is appended to `started`
    before it starts, so the caller stops whatever did start when one fails."""
    upstream = Upstream(root)
    started.append(upstream)
    upstream.start()
    builds: dict[str, Build] = {}
    for variant in VARIANTS:
        (root / variant).mkdir()
        b = Build(root / variant, upstream.port, variant_cmd(cmd, variant), f"alloc-{variant}")
        started.append(b)
        b.start()
        builds[variant] = b
    return builds


def header(title: str, when: dt.datetime, argv: list[str], cmd: str, before: str) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: `{' '.join(platform.uname())}`, {os.cpu_count()} cores, {cpu_model()}",
        "- the machine is shared with other agents running tests and benches: figures are "
        "as measured under that load",
        f"- load before: `{before}`; after: `{uptime()}`",
        f"- command: `python -m bench.allocator {shlex.join(argv)}`",
        f"- build: `{cmd}` ({version_of(cmd)}); jemalloc variant: `LD_PRELOAD={JEMALLOC}`",
    ]


# --------------------------------------------------------------------------- paired A/B


def run_ab(args: argparse.Namespace, argv: list[str]) -> int:
    when = dt.datetime.now(dt.UTC)
    before = uptime()
    rows: dict[str, dict[str, list[float]]] = {s: {} for s in SIZES}
    errors = dict.fromkeys(SIZES, 0)
    with tempfile.TemporaryDirectory(prefix="edgeproxy-alloc-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # nginx workers (`nobody` under root) must reach www/
        started: list[Target] = []
        try:
            builds = start_variants(root, args.cmd, started)
            preload = check_preload(dict(builds))
            print("\n".join(preload), flush=True)
            for b in builds.values():
                for path in SIZES.values():
                    run_wrk(b.port, path, 1.0, args.connections)  # warm-up
            for i in range(args.pairs):
                order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
                for size, path in SIZES.items():
                    got = {v: measure(builds[v], path, args) for v in order}
                    r = rows[size]
                    for v in VARIANTS:
                        r.setdefault(f"rps {v}", []).append(got[v][0])
                        r.setdefault(f"cpu us/req {v}", []).append(got[v][1])
                    r.setdefault("rps jemalloc/glibc", []).append(
                        got["jemalloc"][0] / max(1.0, got["glibc"][0])
                    )
                    r.setdefault("cpu jemalloc/glibc", []).append(
                        got["jemalloc"][1] / max(1e-9, got["glibc"][1])
                    )
                    errors[size] += sum(g[2] for g in got.values())
                    print(
                        f"pair {i + 1} {size:5} "
                        + "  ".join(f"{v} {g[0]:.0f} rps {g[1]:.1f} us" for v, g in got.items()),
                        flush=True,
                    )
        except StartError as e:
            print(f"!! {e}", file=sys.stderr)
            return 1
        finally:
            for t in reversed(started):
                t.stop()
    lines = header("Allocator: paired A/B, glibc malloc vs jemalloc", when, argv, args.cmd, before)
    lines += [
        f"- {args.pairs} pairs x {args.duration:g} s wrk runs, -t1 -c{args.connections}, "
        f"order alternating, upstream nginx on {HOST}, 2 workers each",
        "- preload check (/proc/<pid>/maps): " + "; ".join(preload),
        "",
        "Medians over pairs (ratios per pair). wrk errors (non-2xx included): "
        + ", ".join(f"{s} {n}" for s, n in errors.items())
        + (" — A SIZE WITH ERRORS HAS NO VALID FIGURE" if any(errors.values()) else ""),
        "",
        "| size | metric | median | min | max |",
        "|---|---|---:|---:|---:|",
    ]
    for size, r in rows.items():
        for key, vals in r.items():
            lines.append(
                f"| {size} | {key} | {statistics.median(vals):.3f} | {min(vals):.3f} "
                f"| {max(vals):.3f} |"
            )
    write(lines, BENCH_DIR / "results" / f"allocator-ab-{when:%Y%m%d-%H%M}.md")
    return 0


# --------------------------------------------------------------------------- soak


@dataclass
class Series:
    """RSS samples of one variant: (seconds since start, {pid: KiB})."""

    master: int
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)

    def sample(self, t: float) -> None:
        got = {pid: kib for pid in process_tree(self.master) if (kib := rss_kib(pid)) is not None}
        self.samples.append((t, got))

    def workers(self) -> list[int]:
        return sorted({p for _, s in self.samples for p in s if p != self.master})

    def role_kib(self, s: dict[int, int], role: str) -> int:
        if role == "master":
            return s.get(self.master, 0)
        return sum(k for p, k in s.items() if p != self.master)

    def summary(self, role: str) -> tuple[int, int, int, int]:
        """(start, end, growth, peak) KiB of the master or of all workers summed."""
        vals = [self.role_kib(s, role) for _, s in self.samples]
        return vals[0], vals[-1], vals[-1] - vals[0], max(vals)


def start_wrk(port: int, seconds: int, connections: int) -> subprocess.Popen[str]:
    argv = wrk_argv(port, "/", seconds, connections)
    argv[argv.index(str(BENCH_DIR / "report.lua"))] = str(MIX_LUA)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen[str], seconds: float) -> WrkResult:
    out, err = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip()}")
    return WrkResult.parse(out)


def run_soak(args: argparse.Namespace, argv: list[str]) -> int:
    when = dt.datetime.now(dt.UTC)
    before = uptime()
    seconds = round(args.minutes * 60)
    results: dict[str, WrkResult] = {}
    cpu: dict[str, float] = {}
    series: dict[str, Series] = {}
    with tempfile.TemporaryDirectory(prefix="edgeproxy-alloc-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        started: list[Target] = []
        wrks: dict[str, subprocess.Popen[str]] = {}
        try:
            builds = start_variants(root, args.cmd, started)
            preload = check_preload(dict(builds))
            print("\n".join(preload), flush=True)
            warm = {v: start_wrk(b.port, args.warmup, args.connections) for v, b in builds.items()}
            for v, w in warm.items():
                finish_wrk(w, args.warmup)
                builds[v].check_alive()
            series = {v: Series(b.proc.pid) for v, b in builds.items() if b.proc is not None}
            cpu0 = {v: b.cpu_seconds() for v, b in builds.items()}
            t0 = time.monotonic()
            wrks = {v: start_wrk(b.port, seconds, args.connections) for v, b in builds.items()}
            for s in series.values():
                s.sample(0.0)
            n = 1
            while any(w.poll() is None for w in wrks.values()):
                # Bounded: wrk stops itself after `seconds`; this loop gives up 60 s later.
                if time.monotonic() - t0 > seconds + 60:
                    raise RuntimeError("wrk did not finish in time")
                next_at = t0 + n * args.interval
                time.sleep(max(0.0, min(next_at - time.monotonic(), 1.0)))
                if time.monotonic() >= next_at:
                    for v, s in series.items():
                        builds[v].check_alive()
                        s.sample(time.monotonic() - t0)
                    n += 1
            for v, s in series.items():
                s.sample(time.monotonic() - t0)
                cpu[v] = builds[v].cpu_seconds() - cpu0[v]
            results = {v: finish_wrk(w, seconds) for v, w in wrks.items()}
            preload += ["at the end: " + "; ".join(check_preload(dict(builds)))]
        except (StartError, RuntimeError) as e:
            print(f"!! {e}", file=sys.stderr)
            return 1
        finally:
            for w in wrks.values():
                if w.poll() is None:
                    w.kill()
                    w.wait(10)
            for t in reversed(started):
                t.stop()
    stamp = f"{when:%Y%m%d-%H%M}"
    csv_path = BENCH_DIR / "results" / f"allocator-soak-{stamp}.csv"
    lines = header("Allocator: 10-minute soak, side by side", when, argv, args.cmd, before)
    lines += [
        f"- both variants at once, each under its own wrk -t1 -c{args.connections} "
        f"-d{seconds}s -s bench/alloc_mix.lua after a {args.warmup} s warm-up of the same mix; "
        f"RSS (VmRSS) of the master and every worker every {args.interval:g} s "
        f"(samples: `{csv_path.name}`)",
        "- mix per 8 requests: 3 GET /small, 2 GET /64k, POST /small with 4 KiB and with "
        "64 KiB bodies, GET /64k with `Connection: close` (a new connection)",
        "- preload check (/proc/<pid>/maps): " + "; ".join(preload),
        "",
        "| variant | requests | rps | errors | CPU µs/req | p99 ms "
        "| workers RSS start / end / growth / peak MiB "
        "| master RSS start / end / growth / peak MiB |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for v in VARIANTS:
        r, s = results[v], series[v]
        wk = " / ".join(f"{k / 1024:.1f}" for k in s.summary("workers"))
        ms = " / ".join(f"{k / 1024:.1f}" for k in s.summary("master"))
        lines.append(
            f"| {v} | {r.requests} | {r.rps:.0f} | {r.error_total} {r.errors} "
            f"| {cpu[v] / max(1, r.requests) * 1e6:.1f} | {r.p99_us / 1000:.1f} | {wk} | {ms} |"
        )
    lines += ["", "Per worker (KiB): start, end, peak", ""]
    for v in VARIANTS:
        s = series[v]
        for pid in s.workers():
            vals = [x.get(pid) for _, x in s.samples]
            got = [k for k in vals if k is not None]
            lines.append(
                f"- {v} worker {pid}: {vals[0]}, {vals[-1]}, {max(got) if got else None}"
                f" ({len(got)} samples)"
            )
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["variant", "seconds", "pid", "role", "rss_kib"])
        for v in VARIANTS:
            s = series[v]
            for at, sample in s.samples:
                for pid, kib in sorted(sample.items()):
                    role = "master" if pid == s.master else "worker"
                    out.writerow([v, f"{at:.1f}", pid, role, kib])
    write(lines, BENCH_DIR / "results" / f"allocator-soak-{stamp}.md")
    return 0


def write(lines: list[str], out: Path) -> None:
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench.allocator", description=__doc__.split("\n")[0]
    )
    p.add_argument("mode", choices=("ab", "soak"))
    p.add_argument("--cmd", default=default_edgeproxy_cmd(), help="how the build is run")
    p.add_argument("--connections", type=int, default=None, help="wrk connections (64 ab, 16 soak)")
    p.add_argument("--pairs", type=int, default=6, help="ab: measured pairs (6)")
    p.add_argument("--duration", type=float, default=3.0, help="ab: seconds per wrk run (3)")
    p.add_argument("--minutes", type=float, default=10.0, help="soak: minutes of load (10)")
    p.add_argument("--warmup", type=int, default=20, help="soak: seconds of warm-up (20)")
    p.add_argument("--interval", type=float, default=10.0, help="soak: seconds between samples")
    args = p.parse_args(argv)
    if args.connections is None:
        args.connections = 64 if args.mode == "ab" else 16
    if not os.path.exists(JEMALLOC):
        p.error(f"{JEMALLOC} missing: apt-get install libjemalloc2")
    if not (1 <= args.pairs <= 30 and 1 <= args.duration <= 30 and 1 <= args.connections <= 512):
        p.error("1 <= --pairs <= 30, 1 <= --duration <= 30, 1 <= --connections <= 512")
    if not (0.1 <= args.minutes <= 30 and 1 <= args.warmup <= 120 and 1 <= args.interval <= 60):
        p.error("0.1 <= --minutes <= 30, 1 <= --warmup <= 120, 1 <= --interval <= 60")
    return run_ab(args, argv) if args.mode == "ab" else run_soak(args, argv)


if __name__ == "__main__":
    sys.exit(main())
