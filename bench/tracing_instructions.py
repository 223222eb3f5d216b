"""Instructions per request, counted by valgrind (callgrind), of the fake-transport request
path: tracing off and on in this tree, and off in other trees (main), so that a cost of a
tenth of a µs can be told apart on a machine whose timings move by more than that.

    python -m bench.tracing_instructions --tree branch=/tmp/copy --tree main=/tmp/main-copy

Each tree is a compiled copy (`git archive`, then `setup.py build_ext --inplace`). Per tree
and world, one process runs 500 plain requests (`--size small`, or 64k), another 2500
(after the same warm-up); the difference of callgrind's instruction totals over 2000 is
the figure, so start-up, imports and the warm-up cancel out. PYTHONHASHSEED is fixed. A
run takes about half a minute per process under valgrind. Instructions are not time
(cache misses and branch mispredictions are not in them), but they do not move with the
machine's load.
Written to bench/results/tracing-instructions-<UTC time>.md with date, machine, command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
COUNTS = (500, 2500)


def child(world: str, n: int, size: str) -> None:
    """Run in the tree under test: warm up, then `n` requests for a `size` response."""
    from bench.fake_transport import HEAD, SIZES, World

    body = SIZES[size]
    req = b"GET /%s HTTP/1.1\r\nHost: bench.test\r\n\r\n" % size.encode()
    resp = HEAD % (len(body), len(body)) + body
    w = World("static")
    if world == "on":
        import random

        from proxy.config_tracing import TracingConfig
        from proxy.core.traceparent import TraceContext
        from proxy.worker.tracing import Tracer

        cfg = TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", slow_ms=60000.0)
        w.ctx.tracer = Tracer(cfg, [0, 0, 0])
        w.ctx.trace = TraceContext(os.urandom, 0.0, random.Random(1).random)
    w.run(req, resp, 200)
    w.run(req, resp, n)
    if w.ctx.stats.requests[1] != 200 + n or not w.client_t.last.endswith(body[-64:]):
        raise RuntimeError("not every request was answered")
    w.close()


def instructions(tree: Path, world: str, n: int, size: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),  # this file; `bench` and `proxy` come from the tree
        "--child",
        world,
        str(n),
        size,
    ]
    done = subprocess.run(
        argv, cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    m = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"{tree} {world} {n}: {done.stderr[-2000:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_instructions", description=__doc__)
    p.add_argument("--tree", action="append", default=[], help="label=path of a compiled copy")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--size", choices=("small", "64k"), default="small", help="response size")
    p.add_argument("--no-tracing", action="store_true", help="tracing off only")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    trees = [(label, Path(path)) for label, _, path in (t.partition("=") for t in args.tree)]
    if not trees:
        p.error("name at least one --tree label=path")
    when = dt.datetime.now(dt.UTC)
    out = args.output or BENCH_DIR / "results" / f"tracing-instructions-{when:%Y%m%d-%H%M}.md"
    rows = []
    for label, tree in trees:
        has_trace = (tree / "proxy" / "core" / "traceparent.py").exists()
        for world in ("off", "on") if has_trace and not args.no_tracing else ("off",):
            lo, hi = (instructions(tree, world, n, args.size) for n in COUNTS)
            per = (hi - lo) / (COUNTS[1] - COUNTS[0])
            rows.append((label, world, per))
            print(f"{label} {world}: {per:.0f} instructions per request", flush=True)
    lines = [
        "# Instructions per request (callgrind), fake-transport request path,"
        f" {args.size} responses",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, {platform.machine()}, nproc "
        f"{len(os.sched_getaffinity(0))}; Python {platform.python_version()}; valgrind's "
        "count, so the machine's load (shared) does not enter it",
        f"- command: `python -m bench.tracing_instructions {shlex.join(argv or sys.argv[1:])}`",
        f"- per tree and world: (instructions of {COUNTS[1]} requests - of {COUNTS[0]}) / "
        f"{COUNTS[1] - COUNTS[0]}, each after 200 warm-up requests, routing from the config",
        "- off: no [tracing]; on: [tracing] with an endpoint, sample_rate 0, slow_ms 60000 "
        "(no request traced; ids, sampling decision and traceparent made for each)",
        "",
        "| tree | tracing | instructions per request |",
        "|---|---|---:|",
    ]
    lines += [f"| {label} | {world} | {per:.0f} |" for label, world, per in rows]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
