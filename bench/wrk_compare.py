"""Whole-proxy benchmark: wrk against HAProxy, nginx, edgeproxy and the bare upstream.

    python -m bench.wrk_compare [--duration 10] [--connections 64] [--rounds 3]
        [--targets haproxy,nginx,edgeproxy,direct] [--edgeproxy-cmd CMD] [--reloads N]

One nginx upstream serves /small (13 bytes) and /64k (65536 bytes); every proxy
sits in front of that same upstream. Rounds are interleaved (round 1 runs every
target and size, then round 2, ...). For each run: wrk's requests/s, p50/p99,
errors by kind, and the CPU time of the proxy's whole process tree per request.
The table (medians over rounds) is printed and written to bench/results/.

With `--reloads N`, each proxy instead gets N reloads spread evenly over a wrk
run, and the table reports wrk's errors per proxy.

Every process started is stopped on exit, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench.procs import StartError, process_tree
from bench.targets import (
    BENCH_DIR,
    EDGEPROXY_HOSTNAME,
    HOST,
    Direct,
    EdgeProxy,
    HAProxy,
    NginxProxy,
    Target,
    Upstream,
    default_edgeproxy_cmd,
)

ALL_TARGETS = ("haproxy", "nginx", "edgeproxy", "direct")
SIZES = {"small": "/small", "64k": "/64k"}
ERROR_KINDS = ("connect", "read", "write", "timeout", "status")
_REPORT_RE = re.compile(r"^REPORT (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class WrkResult:
    """What bench/report.lua printed for one wrk run."""

    requests: int
    duration_us: int
    bytes: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @classmethod
    def parse(cls, stdout: str) -> WrkResult:
        m = _REPORT_RE.search(stdout)
        if m is None:
            raise RuntimeError(f"no REPORT line in wrk output:\n{stdout}")
        kv = dict(item.split("=", 1) for item in m.group(1).split())
        return cls(
            requests=int(kv["requests"]),
            duration_us=int(kv["duration_us"]),
            bytes=int(kv["bytes"]),
            p50_us=int(kv["p50_us"]),
            p90_us=int(kv["p90_us"]),
            p99_us=int(kv["p99_us"]),
            max_us=int(kv["max_us"]),
            errors={k: int(kv[k]) for k in ERROR_KINDS},
        )


@dataclass
class Run:
    """One measured wrk run against one target."""

    target: str
    size: str
    round: int
    wrk: WrkResult
    proxy_cpu_s: float | None
    proxy_user_s: float | None  # the user and system parts of proxy_cpu_s
    proxy_sys_s: float | None
    upstream_cpu_s: float
    upstream_conns: int | None  # connections the upstream accepted during the run

    def cpu_us_per_req(self, seconds: float | None) -> float | None:
        if seconds is None or not self.wrk.requests:
            return None
        return seconds / self.wrk.requests * 1e6


@dataclass
class Outcome:
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def wrk_argv(
    port: int,
    path: str,
    duration: float,
    connections: int,
    scheme: str = "http",
    headers: tuple[str, ...] = (),
) -> list[str]:
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    return [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "2s",
        "--latency",
        "-s",
        str(BENCH_DIR / "report.lua"),
        "-H",
        f"Host: {EDGEPROXY_HOSTNAME}",
        *(arg for h in headers for arg in ("-H", h)),
        f"{scheme}://{HOST}:{port}{path}",
    ]


def run_wrk(port: int, path: str, duration: float, connections: int) -> WrkResult:
    """One bounded wrk run; its REPORT line parsed."""
    argv = wrk_argv(port, path, duration, connections)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return WrkResult.parse(done.stdout)


# --------------------------------------------------------------------------- lifecycle


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def running(args: argparse.Namespace, root: Path, outcome: Outcome) -> Iterator[list[Target]]:
    """The upstream and every requested target, started; all stopped on exit."""
    started: list[Target] = []
    try:
        upstream = Upstream(root)
        started.append(upstream)
        upstream.start()
        print(f"upstream nginx on {HOST}:{upstream.port}")
        targets: list[Target] = []
        for name in args.targets:
            target = make_target(name, root, upstream.port, args.edgeproxy_cmd)
            started.append(target)
            try:
                target.start()
            except StartError as exc:
                target.stop()
                print(f"!! {name} did not start, skipped: {exc}", file=sys.stderr)
                tail = target.log_tail()
                if tail:
                    print(f"   last lines of its log:\n{tail}", file=sys.stderr)
                # The log lives in a temporary directory: keep its end in the report.
                last = " | ".join(tail.splitlines()[-3:])
                outcome.skipped[name] = f"{exc}" + (f"; log ends: {last}" if last else "")
                continue
            pid = f" (pid {target.proc.pid})" if target.proc else ""
            print(f"{name} on {HOST}:{target.port}{pid}")
            targets.append(target)
        yield [upstream, *targets]
    finally:
        for target in reversed(started):
            try:
                target.stop()
            except Exception as exc:  # keep stopping the others
                print(f"!! stopping {target.name}: {exc}", file=sys.stderr)


def make_target(name: str, root: Path, upstream_port: int, edgeproxy_cmd: str) -> Target:
    if name == "haproxy":
        return HAProxy(root, upstream_port)
    if name == "nginx":
        return NginxProxy(root, upstream_port)
    if name == "edgeproxy":
        return EdgeProxy(root, upstream_port, edgeproxy_cmd)
    if name == "direct":
        return Direct(root, upstream_port)
    raise ValueError(name)


# --------------------------------------------------------------------------- throughput


def measure(target: Target, upstream: Target, size: str, rnd: int, args: argparse.Namespace) -> Run:
    assert isinstance(upstream, Upstream)
    target.check_alive()
    acc0 = upstream.accepted()
    (user0, sys0), up0 = target.cpu_split(), upstream.cpu_seconds()
    result = run_wrk(target.port, SIZES[size], args.duration, args.connections)
    (user1, sys1), up1 = target.cpu_split(), upstream.cpu_seconds()
    acc1 = upstream.accepted()
    measured = target.measured
    return Run(
        target=target.name,
        size=size,
        round=rnd,
        wrk=result,
        proxy_cpu_s=(user1 - user0) + (sys1 - sys0) if measured else None,
        proxy_user_s=(user1 - user0) if measured else None,
        proxy_sys_s=(sys1 - sys0) if measured else None,
        upstream_cpu_s=up1 - up0,
        upstream_conns=None if acc0 is None or acc1 is None else acc1 - acc0,
    )


def throughput(args: argparse.Namespace, root: Path) -> Outcome:
    outcome = Outcome()
    with running(args, root, outcome) as (upstream, *targets):
        if args.warmup > 0:
            for target in targets:
                for path in SIZES.values():
                    run_wrk(target.port, path, args.warmup, args.connections)
        for rnd in range(1, args.rounds + 1):
            for size in SIZES:
                for target in targets:
                    run = measure(target, upstream, size, rnd, args)
                    outcome.runs.append(run)
                    cpu = run.cpu_us_per_req(run.proxy_cpu_s)
                    user = run.cpu_us_per_req(run.proxy_user_s)
                    system = run.cpu_us_per_req(run.proxy_sys_s)
                    print(
                        f"round {rnd} {target.name:9} {size:5} {run.wrk.rps:10.0f} rps"
                        f"  p50 {fmt_us(run.wrk.p50_us):>8}  p99 {fmt_us(run.wrk.p99_us):>8}"
                        f"  errors {fmt_errors(run.wrk.errors)}"
                        f"  cpu {fmt_num(cpu)} us/req (user {fmt_num(user)}, sys {fmt_num(system)})"
                        f"  upstream conns {run.upstream_conns}",
                        flush=True,
                    )
    return outcome


# --------------------------------------------------------------------------- reloads


@dataclass
class ReloadRun:
    target: str
    round: int
    reloads_sent: int
    wrk: WrkResult
    alive_after: bool
    new_pids: int  # processes in the tree after the run that were not there before


def reload_schedule(duration: float, n: int) -> list[float]:
    """Offsets (seconds from the start of the run) of n evenly spaced reloads."""
    return [duration * (i + 1) / (n + 1) for i in range(n)]


def run_with_reloads(target: Target, args: argparse.Namespace, rnd: int) -> ReloadRun:
    target.check_alive()
    before = set(process_tree(target.proc.pid)) if target.proc else set()
    sent = 0
    stop = threading.Event()

    def reloader() -> None:
        nonlocal sent
        start = time.monotonic()
        for offset in reload_schedule(args.duration, args.reloads):
            if stop.wait(max(0.0, start + offset - time.monotonic())):
                return
            target.reload()
            sent += 1

    thread = threading.Thread(target=reloader, daemon=True)
    thread.start()
    try:
        result = run_wrk(target.port, SIZES["small"], args.duration, args.connections)
    finally:
        stop.set()
        thread.join(5.0)
    time.sleep(0.5)
    alive = target.proc is None or target.proc.alive()
    after = set(process_tree(target.proc.pid)) if target.proc and alive else set()
    return ReloadRun(target.name, rnd, sent, result, alive, len(after - before))


def reloads(args: argparse.Namespace, root: Path) -> tuple[list[ReloadRun], dict[str, str]]:
    outcome = Outcome()
    runs: list[ReloadRun] = []
    with running(args, root, outcome) as (_upstream, *targets):
        usable: list[Target] = []
        for target in targets:
            if isinstance(target, Direct):
                continue
            if isinstance(target, EdgeProxy):
                why = target.probe_reload()
                if why is not None:
                    msg = f"reload does not work yet ({why}); skipped"
                    outcome.skipped[target.name] = msg
                    print(f"!! edgeproxy: {msg}", file=sys.stderr)
                    target.stop()
                    continue
            usable.append(target)
        for rnd in range(1, args.rounds + 1):
            for target in usable:
                run = run_with_reloads(target, args, rnd)
                runs.append(run)
                print(
                    f"round {rnd} {target.name:9} {run.reloads_sent} reloads"
                    f"  {run.wrk.requests} requests  errors {fmt_errors(run.wrk.errors)}"
                    f"  {'alive' if run.alive_after else 'DEAD'} after"
                    f"  ({run.new_pids} new processes)",
                    flush=True,
                )
    return runs, outcome.skipped


# --------------------------------------------------------------------------- report


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_errors(errors: dict[str, int]) -> str:
    parts = [f"{k} {v}" for k, v in errors.items() if v]
    return ", ".join(parts) if parts else "0"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _sum_errors(results: Sequence[WrkResult]) -> dict[str, int]:
    return {k: sum(r.errors[k] for r in results) for k in ERROR_KINDS}


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (done.stdout + done.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def uptime() -> str:
    """`uptime`'s line (the load averages over 1, 5 and 15 minutes)."""
    return _version(["uptime"])


def environment(args: argparse.Namespace) -> list[str]:
    nproc = len(os.sched_getaffinity(0))
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- machine: {platform.node()}; nproc: {nproc}; CPU: {cpu_model()}; "
        f"kernel {platform.release()}",
        f"- uptime before the run: `{args.uptime_before}`; at the end: `{uptime()}` "
        "(other load on the machine makes rps noisy)",
        f"- {_version(['haproxy', '-v'])}; {_version(['nginx', '-v'])}; "
        f"{_version(['wrk', '-v'])}; Python {platform.python_version()}",
        f"- edgeproxy build: {_version([*shlex.split(args.edgeproxy_cmd), '--version'])}, "
        f"run as `{args.edgeproxy_cmd}`",
        f"- wrk -t1 -c{args.connections} -d{max(1, round(args.duration))}s --latency, "
        f"{args.rounds} rounds interleaved, Host: {EDGEPROXY_HOSTNAME}",
        f"- command: `python -m bench.wrk_compare {shlex.join(args.argv)}`",
    ]


def throughput_table(outcome: Outcome, args: argparse.Namespace) -> str:
    lines = [
        "# wrk comparison",
        "",
        *environment(args),
        "",
        "rps: median of the rounds; p50/p99: median of the rounds' wrk percentiles; errors: sum "
        "over the rounds; CPU: the proxy's whole process tree (utime+stime from /proc), median "
        "µs per request, and its user (utime) and system (stime) parts, each the median over "
        "the rounds (so they need not add up to the total); upstream CPU likewise for the "
        "nginx upstream; upstream conns: connections the upstream accepted during a run "
        "(median; a proxy that reuses its pool opens few).",
        "",
        "| target | size | rps | p50 | p99 | errors | proxy CPU µs/req | proxy user µs/req "
        "| proxy sys µs/req | upstream CPU µs/req | upstream conns | rps vs HAProxy |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = [t for t in args.targets if t not in outcome.skipped]
    raw: list[str] = []
    for size in SIZES:
        base = _median(
            [r.wrk.rps for r in outcome.runs if r.target == "haproxy" and r.size == size]
        )
        for name in names:
            runs = [r for r in outcome.runs if r.target == name and r.size == size]
            if not runs:
                continue
            rps = _median([r.wrk.rps for r in runs])
            ratio = f"{rps / base:.2f}" if rps is not None and base else "-"
            lines.append(
                f"| {name} | {size} | {fmt_num(rps, 0)} "
                f"| {fmt_us(_median([r.wrk.p50_us for r in runs]))} "
                f"| {fmt_us(_median([r.wrk.p99_us for r in runs]))} "
                f"| {fmt_errors(_sum_errors([r.wrk for r in runs]))} "
                f"| {fmt_num(_median([r.cpu_us_per_req(r.proxy_cpu_s) for r in runs]))} "
                f"| {fmt_num(_median([r.cpu_us_per_req(r.proxy_user_s) for r in runs]))} "
                f"| {fmt_num(_median([r.cpu_us_per_req(r.proxy_sys_s) for r in runs]))} "
                f"| {fmt_num(_median([r.cpu_us_per_req(r.upstream_cpu_s) for r in runs]))} "
                f"| {fmt_num(_median([r.upstream_conns for r in runs]), 0)} "
                f"| {ratio} |"
            )
            raw.append(f"- {name} {size}: " + ", ".join(_round_text(r) for r in runs))
    lines += ["", "Requests/s per round (proxy user / sys CPU µs per request):", "", *raw]
    lines += _skipped(outcome.skipped)
    return "\n".join(lines) + "\n"


def _round_text(r: Run) -> str:
    if r.proxy_cpu_s is None:
        return f"{r.wrk.rps:.0f}"
    user, system = r.cpu_us_per_req(r.proxy_user_s), r.cpu_us_per_req(r.proxy_sys_s)
    return f"{r.wrk.rps:.0f} ({fmt_num(user)} / {fmt_num(system)})"


def reload_table(runs: list[ReloadRun], skipped: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        "# wrk under reloads",
        "",
        *environment(args),
        f"- {args.reloads} reloads per run, evenly spaced; /small; new pids: processes of the "
        "proxy's tree after the run that were not there before it (> 0: the reloads "
        "really replaced workers)",
        "",
        "| target | round | reloads | requests | rps | p99 | max | "
        + " | ".join(ERROR_KINDS)
        + " | alive after | new pids |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(ERROR_KINDS) + "---|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.target} | {run.round} | {run.reloads_sent} | {run.wrk.requests} "
            f"| {run.wrk.rps:.0f} | {fmt_us(run.wrk.p99_us)} | {fmt_us(run.wrk.max_us)} | "
            + " | ".join(str(run.wrk.errors[k]) for k in ERROR_KINDS)
            + f" | {'yes' if run.alive_after else 'NO'} | {run.new_pids} |"
        )
    totals: dict[str, list[ReloadRun]] = {}
    for run in runs:
        totals.setdefault(run.target, []).append(run)
    lines += ["", "Totals:", ""]
    for name, rs in totals.items():
        errors = _sum_errors([r.wrk for r in rs])
        lines.append(
            f"- {name}: {sum(r.reloads_sent for r in rs)} reloads, "
            f"{sum(r.wrk.requests for r in rs)} requests, errors: {fmt_errors(errors)}"
        )
    lines += _skipped(skipped)
    return "\n".join(lines) + "\n"


def _skipped(skipped: dict[str, str]) -> list[str]:
    if not skipped:
        return []
    return ["", "Skipped:", "", *(f"- {name}: {why}" for name, why in skipped.items())]


# --------------------------------------------------------------------------- cli


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.wrk_compare",
        description="wrk against HAProxy, nginx, edgeproxy and the bare upstream.",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per target (1)")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (all)",
    )
    p.add_argument(
        "--edgeproxy-cmd",
        default=default_edgeproxy_cmd(),
        help="command that runs edgeproxy (default: the edgeproxy script next to sys.executable)",
    )
    p.add_argument(
        "--reloads", type=int, default=0, help="reload mode: N reloads during each wrk run"
    )
    p.add_argument("--output", type=Path, help="markdown file (default: bench/results/...)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(names) - set(ALL_TARGETS))
    if unknown or not names:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.targets = list(dict.fromkeys(names))
    if args.duration < 1 or args.connections < 1 or args.rounds < 1 or args.reloads < 0:
        p.error("--duration >= 1, --connections >= 1, --rounds >= 1, --reloads >= 0")
    if args.output is None:
        name = "reload-latest.md" if args.reloads else "latest.md"
        args.output = BENCH_DIR / "results" / name
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.uptime_before = uptime()
    for tool in ("wrk", "nginx") + (("haproxy",) if "haproxy" in args.targets else ()):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"{tool} not found (apt-get install wrk nginx-light haproxy)", file=sys.stderr)
            return 2
    previous: Callable[[int, FrameType | None], object] | int | None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeproxy-bench-") as tmp:
            root = Path(tmp)
            root.chmod(0o755)
            if args.reloads:
                runs, skipped = reloads(args, root)
                report = reload_table(runs, skipped, args)
            else:
                report = throughput_table(throughput(args, root), args)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(report, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
