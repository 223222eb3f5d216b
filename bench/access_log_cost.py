"""What the access log costs a request on the loop: off, on but not sampled, on for all.

    python -m bench.access_log_cost [--batches 30] [--requests 2000] [--tree DIR]

The fake-transport harness of bench.fake_transport (a real WorkerContext, client and
upstream connection over recording transports, no sockets): small keep-alive requests,
thread CPU time per request, the garbage collector off, the fastest of `--batches`
batches per mode, the three modes interleaved batch by batch so that drift hits them
alike. "off": no [log] access; "unsampled": access log on, sample_rate 0 (the loop
samples and keeps nothing); "all": sample_rate 1, the loop keeps every request's tuple
(the buffer is emptied between batches, as the writer thread would; building and
writing the lines is that thread's work and is not counted here). `--tree DIR` runs
the harness from another tree (a compiled copy); the build is named in the result.
Written to bench/results/access-log-cost-<UTC time>-<build>.md with date, machine,
load and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
MODES = ("off", "unsampled", "all")


def child(batches: int, requests: int) -> dict[str, Any]:
    import random

    import proxy
    from bench.fake_transport import HEAD, REQUEST, SMALL_BODY, World, _batch_us
    from proxy.config_log import LogConfig
    from proxy.worker.accesslog import AccessLog

    w = World("static")
    counts = [0, 0, 0]
    rng = random.Random(1).random
    logs = {
        "off": None,
        "unsampled": AccessLog(
            LogConfig(access="stderr", sample_rate=0.0), counts, rng, w.loop.time
        ),
        "all": AccessLog(
            LogConfig(access="stderr", sample_rate=1.0, buffer=requests + 1),
            counts,
            rng,
            w.loop.time,
        ),
    }
    req = REQUEST % b"/small"
    resp = HEAD % (len(SMALL_BODY), len(SMALL_BODY)) + SMALL_BODY
    best = {m: float("inf") for m in MODES}
    try:
        w.run(req, resp, 10)
        for _ in range(batches):
            for mode in MODES:
                al = logs[mode]
                w.ctx.access_log = al
                us = _batch_us(lambda n: w.run(req, resp, n), requests)
                best[mode] = min(best[mode], us)
                if al is not None:
                    kept = len(al.buffer)
                    if mode == "all" and kept != requests:
                        raise RuntimeError(f"all: {kept} of {requests} requests kept")
                    if mode == "unsampled" and kept:
                        raise RuntimeError("unsampled: a request was kept")
                    al.buffer.clear()
        if counts != [0, 0, 0]:
            raise RuntimeError(f"a line was dropped: {counts}")
    finally:
        w.close()
    return {"build": proxy.build(), "us": best}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.access_log_cost", description=__doc__)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--tree", type=Path, help="run the harness from this tree")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (1 <= args.batches <= 100 and 100 <= args.requests <= 100_000):
        p.error("1 <= --batches <= 100, 100 <= --requests <= 100000")
    if args.child:
        json.dump(child(args.batches, args.requests), sys.stdout)
        return 0
    tree = (args.tree or BENCH_DIR.parent).resolve()
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "bench.access_log_cost", "--child"]
    cmd += ["--batches", str(args.batches), "--requests", str(args.requests)]
    before = _uptime()
    done = subprocess.run(
        cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode:
        print(done.stderr, file=sys.stderr)
        return 1
    r = json.loads(done.stdout)
    after = _uptime()
    us = r["us"]
    when = dt.datetime.now(dt.UTC)
    kind = "compiled" if "compiled" in r["build"] else "pure"
    lines = [
        f"# Access log cost per request on the loop, {when:%Y-%m-%d %H:%M} UTC ({kind})",
        "",
        f"- command: `python -m bench.access_log_cost {' '.join(argv or sys.argv[1:])}`",
        f"- build: {r['build']}; tree {tree}",
        f"- machine: {platform.node()}, {platform.machine()}, nproc "
        f"{len(os.sched_getaffinity(0))}; Python {platform.python_version()}",
        f"- load before: {before}",
        f"- load after: {after} (a shared machine: thread CPU time, fastest batch)",
        f"- {args.batches} batches of {args.requests} small keep-alive requests per mode,"
        " modes interleaved",
        "",
        "| mode | µs per request (fastest batch) | vs off |",
        "|---|---:|---:|",
    ]
    for m in MODES:
        lines.append(f"| {m} | {us[m]:.3f} | {us[m] - us['off']:+.3f} |")
    lines.append("")
    text = "\n".join(lines)
    path = BENCH_DIR / "results" / f"access-log-cost-{when:%Y%m%d-%H%M}-{kind}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
