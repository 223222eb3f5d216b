"""Paired A/B: two edgeproxy builds and HAProxy, started once, measured in alternation.

    python -m bench.ab --a "CMD-A" --b "CMD-B" [--pairs 8] [--duration 3] [--label-a base]

The machine's speed drifts (2x between days, and within an hour), so two
builds are compared in one run, run against run: for each pair, every size is
measured on A, B and HAProxy back to back (the order alternates between pairs)
in front of the same nginx upstream (bench/targets.py, as bench.wrk_compare).
Reported per size: the median of the per-pair rps ratios (A/HAProxy, B/HAProxy,
B/A) and the median CPU µs per request of each proxy's process tree. Written
to bench/results/ab-<UTC time>.md with the date, the machine and the command.

A command is how an edgeproxy build is run, e.g. a checkout of another commit:
`env PYTHONPATH=/path/to/checkout .venv/bin/python -m proxy.cli` (its workers
inherit PYTHONPATH, so they run that checkout too; compile it in place first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import result_file
from bench.procs import StartError
from bench.targets import HOST, EdgeProxy, HAProxy, Target, Upstream
from bench.wrk_compare import SIZES, cpu_model, run_wrk


class Build(EdgeProxy):
    """An edgeproxy target whose node id (and so its shared-memory names) is its own."""

    def __init__(self, root: Path, upstream_port: int, cmd: str, node: str) -> None:
        super().__init__(root, upstream_port, cmd)
        self.node = node

    def config_text(self) -> str:
        return super().config_text().replace('id = "bench"', f'id = "{self.node}"', 1)


def _uptime() -> str:
    done = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip()


def version_of(cmd: str) -> str:
    done = subprocess.run(
        [*shlex.split(cmd), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def measure(target: Target, path: str, args: argparse.Namespace) -> tuple[float, float, int]:
    """(rps, proxy CPU µs per request, wrk errors) of one wrk run."""
    target.check_alive()
    cpu0 = target.cpu_seconds()
    result = run_wrk(target.port, path, args.duration, args.connections)
    cpu1 = target.cpu_seconds()
    if result.error_total:
        print(f"!! {target.name}: wrk errors {result.errors}", file=sys.stderr)
    return result.rps, (cpu1 - cpu0) / max(1, result.requests) * 1e6, result.error_total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="command that runs build A (the baseline)")
    p.add_argument("--b", required=True, help="command that runs build B")
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    p.add_argument("--pairs", type=int, default=8, help="measured pairs (8)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (3)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if args.pairs < 1 or not 1 <= args.duration <= 30:
        p.error("--pairs >= 1 and 1 <= --duration <= 30")
    when = dt.datetime.now(dt.UTC)
    out = args.output or result_file.path_for("ab", when)
    rows: dict[str, dict[str, list[float]]] = {s: {} for s in SIZES}
    errors = {s: 0 for s in SIZES}  # wrk errors (a non-2xx answer counts): the pair is void
    uptime_before = _uptime()
    with tempfile.TemporaryDirectory(prefix="edgeproxy-ab-") as tmp:
        root = Path(tmp)
        # nginx workers run as `nobody` when started by root: they must reach www/64k
        # (a 0700 directory answers every /64k with 403, and every figure is void).
        root.chmod(0o755)
        started: list[Target] = []
        try:
            upstream = Upstream(root)
            started.append(upstream)
            upstream.start()
            (root / "a").mkdir()
            (root / "b").mkdir()
            a = Build(root / "a", upstream.port, args.a, "bench-a")
            b = Build(root / "b", upstream.port, args.b, "bench-b")
            h = HAProxy(root, upstream.port)
            for t in (a, b, h):
                started.append(t)
                t.start()
            names = {id(a): args.label_a, id(b): args.label_b, id(h): "haproxy"}
            for t in (a, b, h):
                for path in SIZES.values():
                    run_wrk(t.port, path, 1.0, args.connections)  # warm-up
            for i in range(args.pairs):
                order = (a, b, h) if i % 2 == 0 else (b, a, h)
                for size, path in SIZES.items():
                    got = {}
                    for t in order:
                        got[names[id(t)]] = measure(t, path, args)
                    r = rows[size]
                    ha = got["haproxy"][0]
                    for label in (args.label_a, args.label_b):
                        r.setdefault(f"{label}/haproxy", []).append(got[label][0] / ha)
                        r.setdefault(f"cpu {label}", []).append(got[label][1])
                    r.setdefault(f"{args.label_b}/{args.label_a}", []).append(
                        got[args.label_b][0] / got[args.label_a][0]
                    )
                    r.setdefault("cpu haproxy", []).append(got["haproxy"][1])
                    errors[size] += sum(v[2] for v in got.values())
                    print(
                        f"pair {i + 1} {size:5} "
                        + "  ".join(f"{k} {v[0]:.0f} rps {v[1]:.1f} us" for k, v in got.items()),
                        flush=True,
                    )
        except StartError as e:
            print(f"!! did not start: {e}", file=sys.stderr)
            return 1
        finally:
            for t in reversed(started):
                t.stop()
    lines = [
        f"# Paired A/B: {args.label_a} vs {args.label_b} (and HAProxy)",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, {platform.machine()}, {cpu_model()}",
        f"- uptime before: `{uptime_before}`; after: `{_uptime()}`",
        f"- command: python -m bench.ab {shlex.join(argv if argv is not None else sys.argv[1:])}",
        f"- {args.label_a}: `{args.a}` ({version_of(args.a)})",
        f"- {args.label_b}: `{args.b}` ({version_of(args.b)})",
        f"- {args.pairs} pairs x {args.duration:g} s wrk runs, -t1 -c{args.connections}, "
        f"upstream nginx on {HOST}",
        "",
        "Medians over pairs (ratios are per pair, run against run). wrk errors (non-2xx "
        "answers included), all runs of a size: "
        + ", ".join(f"{size} {n}" for size, n in errors.items())
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
    text = "\n".join(lines) + "\n"
    result_file.write(text, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
