"""A fleet of N nodes on this machine: real etcd, a few real pingers, the rest simulated.

    python -m bench.fleet_sim --nodes 300 --real 2 --etcd 1
    python -m bench.fleet_sim --nodes 300 --real 2 --etcd 3
    python -m bench.fleet_sim --nodes 300 1000 3000 --real 1 --etcd 1 --window 20

Each size is one scenario (bench/fleetsim/run.py): simulated nodes register (their own
lease each) and answer pings, the real pingers start and must learn everyone, a steady
window measures store writes, watch events, ping bytes and CPU, then one node joins and
one is killed (and with 2+ real nodes a real pinger gets SIGKILL), timed on the real
nodes' tables. Bounded: each scenario has --max-seconds, the whole command ten minutes.
The report goes to stdout and bench/results/fleet-sim-YYYYMMDD-HHMM.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))

from bench.fleetsim.report import markdown  # noqa: E402
from bench.fleetsim.run import Options, scenario  # noqa: E402

TOTAL_BUDGET = 600.0  # seconds for the whole command


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_one(opts: Options, members: int) -> dict[str, Any]:
    """One scenario on a fresh etcd of `members` members."""
    from etcd_harness import EtcdCluster, require_etcd

    require_etcd()
    cluster = EtcdCluster(members)
    try:
        cluster.start()
        pids = [m.proc.pid for m in cluster.members if m.proc is not None]
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(scenario(opts, cluster.endpoints, pids))
        out["etcd_members"] = members
        return out
    finally:
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[300], help="fleet size(s)")
    ap.add_argument("--real", type=int, default=2, help="real pingers (measured)")
    ap.add_argument("--etcd", type=int, default=1, choices=(1, 3), help="etcd members")
    ap.add_argument("--ttl", type=float, default=10.0, help="lease TTL, seconds")
    ap.add_argument("--interval", type=float, default=1.0, help="ping interval, seconds")
    ap.add_argument("--window", type=float, default=30.0, help="steady window, seconds")
    ap.add_argument("--no-watch", action="store_true", help="simulated nodes hold no watch")
    ap.add_argument(
        "--flat-rtt", action="store_true", help="simulated nodes answer at once (loopback RTT)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    load0 = _loadavg()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    runs = []
    for i, n in enumerate(args.nodes):
        left = TOTAL_BUDGET - (time.monotonic() - t0) - 20
        per = left / (len(args.nodes) - i)
        if per < 60:
            print(f"skipping {n} nodes: {left:.0f} s left of the budget", file=sys.stderr)
            break
        opts = Options(
            nodes=n,
            real=args.real,
            ttl=args.ttl,
            interval=args.interval,
            window=args.window,
            max_seconds=per,
            watch=not args.no_watch,
            distance=not args.flat_rtt,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
        print(f"--- {n} nodes, {args.real} real, etcd x{args.etcd}", file=sys.stderr)
        runs.append(run_one(opts, args.etcd))
    cmd = "python -m bench.fleet_sim " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(runs, cmd, date, (load0, _loadavg()))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fleet-sim-{stamp}.md"
    path.write_text(text)
    print(f"stored in {path}", file=sys.stderr)
    return 0 if runs and all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
