"""Routing cost against the number of instances: one pick through the real table and Routing.

    python bench/bench_routing_scale.py [--sizes 10,1000,10000,100000] [--builds ...]
                                        [--before REV] [--seconds 1.5]

For an app with N instances spread over 300 nodes (round robin; node n000, RTT 0, is
this worker's own node, so it holds its share of them as local instances), a real
TableWriter fills a real segment, a real InflightWriter holds the local instances'
counters, and a real proxy.worker.routing.Routing (attached to the table as a worker
is) answers `pick(app, request, now)`: the table read, the local in-flight counts,
the choice and the admission of a local instance, all included. Loads:

- `mostly under soft`: every load uniform in 0..24 (soft 20, hard 25): 80 % under soft;
- `90 % over soft`: each instance over soft (20..24) with probability 0.9, else 0..19;
- `nearest saturated`: the nearest nodes holding 90 % of the instances (this one
  first) all over soft, the farthest 10 % under it: the walk passes most of the fleet;
- `all over soft`: every load 20..24 (closest falls back to the least loaded).

Local loads are in-flight counts (another worker's cells), remote ones the table's.
Every case is also measured from an edge node (`edge`: a worker whose node runs none
of the app's instances, node n000 then one peer among the others), which shows what
the fleet's size costs apart from the worker's own node's instances.
Each pick is a fresh request; between picks the harness undoes what a pick leaves
behind (the local admission, the load feedback a remote pick records), and that
harness loop alone, measured the same way, is subtracted. Figure: thread CPU time per
pick (CLOCK_THREAD_CPUTIME_ID), garbage collector off, median of batches of at least
20 ms each, within --seconds per case.

Also per N: the table's size in memory (the segment), the writer filling the table
from empty in one batch (a full rewrite), one more instance added to a full table
(a topology change: what the writer rewrites then), a load update (`set_load`), and
the worker's re-read of the topology after that change (its first pick after it).

Builds: `before` is a `git archive` of --before (default: where this branch left
main) and `after` this tree; each compiled with mypyc (`setup.py build_ext
--inplace`) and pure (EDGEPROXY_PURE=1, no .so). Every case of a size runs in one
child process per build, builds alternating, so drift hits all alike. Output:
bench/results/routing-scale-<UTC time>.md with the date, machine, load and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
NODES = 300
SOFT, HARD = 20, 25
SCENARIOS = ("mostly under soft", "90 % over soft", "nearest saturated", "all over soft")
CASES = [("closest", s) for s in SCENARIOS] + [("leastload", s) for s in SCENARIOS[:2]]
BUILDS = ("before compiled", "after compiled", "before pure", "after pure")


# --- the child: one build, one size ------------------------------------------------------
class Req:
    """What Routing reads and writes on a request (proxy.worker.routing.Routed)."""

    __slots__ = ("force", "full", "prefer", "slot", "target", "tried", "tries")

    def __init__(self) -> None:
        self.target: Any = None
        self.tries = 0
        self.force = b""
        self.prefer = b""
        self.tried: set[str] | None = None
        self.full = 0
        self.slot = -1


def _config(name: str, n: int, local: int, node: str = "n000") -> str:
    return f"""
[node]
id = "{node}"
region = "r0"
[listen]
http = ["127.0.0.2:8080"]
backhaul = "127.0.0.2:9080"
[table]
name = "{name}"
writer = "pinger"
max_nodes = {NODES + 8}
max_apps = 4
max_instances = {n + 16}
max_workers = 4
max_local_instances = {max(local + 8, 16)}
[[app]]
name = "app"
hosts = ["app.test"]
soft_limit = {SOFT}
hard_limit = {HARD}
"""


def _loads(scenario: str, n: int, rtt_rank: list[int], rnd: random.Random) -> list[int]:
    """Load per instance index for `scenario` (instance i runs on node i % NODES)."""
    if scenario == "mostly under soft":
        return [rnd.randint(0, HARD - 1) for _ in range(n)]
    if scenario == "90 % over soft":
        return [
            rnd.randint(SOFT, HARD - 1) if rnd.random() < 0.9 else rnd.randint(0, SOFT - 1)
            for _ in range(n)
        ]
    if scenario == "nearest saturated":
        # rank of a node by RTT (0 = this node); the nearest 90 % of nodes are over soft
        cut = NODES * 9 // 10
        return [
            rnd.randint(SOFT, HARD - 1) if rtt_rank[i % NODES] < cut else rnd.randint(0, SOFT - 1)
            for i in range(n)
        ]
    return [rnd.randint(SOFT, HARD - 1) for _ in range(n)]


def _per_call(fn: Any, seconds: float, min_batch_s: float = 0.02) -> tuple[float, int]:
    """(median µs per call, calls) of `fn(k)` that runs k calls, thread CPU time."""
    k = 1
    while True:
        t0 = time.thread_time_ns()
        fn(k)
        dt_ns = time.thread_time_ns() - t0
        if dt_ns >= min_batch_s * 1e9 or k >= 1 << 20:
            break
        k = k * 4 if dt_ns < min_batch_s * 1e8 else k * 2
    samples = [dt_ns / k]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(samples) < 3:
        t0 = time.thread_time_ns()
        fn(k)
        samples.append((time.thread_time_ns() - t0) / k)
        if len(samples) >= 25:
            break
    return statistics.median(samples) / 1000, k * len(samples)


def child(n: int, seconds: float) -> dict[str, Any]:
    from proxy.config import loads
    from proxy.config_table import table_layout, table_name
    from proxy.worker.routing import Routing
    from shm import codec, segment
    from shm.inflight import InflightCells, InflightWriter
    from shm.writer import TableWriter

    gc.disable()
    rnd = random.Random(n)
    uid = f"epx-scale-{os.getpid()}"
    local_ids = [f"i{i}" for i in range(n) if i % NODES == 0]
    cfg = loads(_config(uid, n, len(local_ids)))
    layout = table_layout(cfg.table)
    out: dict[str, Any] = {"n": n, "local": len(local_ids), "segment_bytes": layout.total_size}
    import proxy.core.router as router_mod

    out["build"] = "compiled" if router_mod.__file__.endswith(".so") else "pure"

    rtts = [0] + [rnd.randint(1_000, 250_000) for _ in range(NODES - 1)]
    order = sorted(range(NODES), key=lambda k: rtts[k])
    rtt_rank = [0] * NODES
    for rank, k in enumerate(order):
        rtt_rank[k] = rank
    nodes = [f"n{k:03d}" for k in range(NODES)]
    w = TableWriter.open(layout, table_name(cfg.table))
    infl = InflightWriter.create(f"/{uid}-inflight", 4, cfg.table.max_local_instances)
    try:
        t0 = time.thread_time_ns()
        with w.batch():
            for k, nid in enumerate(nodes):
                w.put_node(
                    codec.NodeRow(nid, f"r{k % 10}", f"127.0.{k // 250}.{k % 250 + 2}:4280", 1)
                )
            w.put_app(codec.AppRow("app", ("app.test",), "closest", SOFT, HARD, 2))
            for i in range(n):
                nid = nodes[i % NODES]
                w.put_instance(codec.InstanceRow("app", f"i{i}", nid, "127.0.0.9:80", SOFT, HARD))
        out["writer_fill_ms"] = (time.thread_time_ns() - t0) / 1e6
        for k, nid in enumerate(nodes):
            w.set_rtt(nid, rtt_us=rtts[k], jitter_us=10, loss_permille=0, last_heard=1.0, up=True)
        w.heartbeat(time.time())
        infl.assign_instances(local_ids)
        mine = InflightCells(infl.segment, 0)
        other = InflightCells(infl.segment, 1)
        routing = Routing(cfg, mine, random.Random(1))
        assert routing.attach(), "table not attached"
        now = 2.0
        req = Req()
        t0 = time.thread_time_ns()
        routing.pick("app", req, now)
        out["first_pick_ms"] = (time.thread_time_ns() - t0) / 1e6
        routing.release(req)
        edge = Routing(loads(_config(uid, n, len(local_ids), "edge")), None, random.Random(1))
        assert edge.attach(), "table not attached"
        edge.pick("app", Req(), now)
        slots = {iid: mine.slot_of(iid) for iid in local_ids}

        def set_loads(loads_: list[int]) -> float:
            for slot in slots.values():  # local: another worker's in-flight count
                assert slot is not None
                while other.mine(slot) > 0:
                    other.dec(slot)
            t = time.thread_time_ns()
            for i, load in enumerate(loads_):
                w.set_load(f"i{i}", load, 1.0, 1)
            dt_ns = time.thread_time_ns() - t
            for iid, slot in slots.items():
                assert slot is not None
                for _ in range(loads_[int(iid[1:])]):
                    other.inc(slot)
            return dt_ns / max(1, n) / 1000

        def picks_of(rt: Any) -> Any:
            def picks(k: int) -> None:
                r = req
                pick = rt.pick
                release = rt.release
                fb = rt.marks._loads  # what a pick leaves: load counted on what it sent
                for _ in range(k):
                    r.target = None
                    r.tries = 0
                    r.tried = None
                    r.full = 0
                    r.slot = -1
                    got = pick("app", r, now)
                    r.target = got[0]
                    release(r)
                    fb.clear()

            return picks

        def harness(k: int) -> None:
            r = req
            release = routing.release
            fb = routing.marks._loads
            got = (None, 0, "")
            for _ in range(k):
                r.target = None
                r.tries = 0
                r.tried = None
                r.full = 0
                r.slot = -1
                r.target = got[0]
                release(r)
                fb.clear()

        loop_us, _ = _per_call(harness, 0.3)
        out["harness_us"] = loop_us
        results: dict[str, Any] = {}
        set_load_us: list[float] = []
        strategy = "closest"
        for scenario in SCENARIOS:
            set_load_us.append(set_loads(_loads(scenario, n, rtt_rank, rnd)))
            for strat in ("closest", "leastload"):
                if (strat, scenario) not in CASES:
                    continue
                if strat != strategy:
                    w.put_app(codec.AppRow("app", ("app.test",), strat, SOFT, HARD, 2))
                    strategy = strat
                for where, rt in (("", routing), (" / edge", edge)):
                    picks = picks_of(rt)
                    picks(1)  # the topology re-read after the strategy change
                    per, calls = _per_call(picks, seconds)
                    probe = Req()
                    got = rt.pick("app", probe, now)
                    probe.target = got[0]
                    rt.release(probe)  # undo its local admission, if it made one
                    results[f"{strat} / {scenario}{where}"] = {
                        "us": max(0.0, per - loop_us),
                        "calls": calls,
                        "status": got[1],
                    }
                if strategy != "closest":
                    w.put_app(codec.AppRow("app", ("app.test",), "closest", SOFT, HARD, 2))
                    strategy = "closest"
        out["cases"] = results
        out["set_load_us"] = statistics.median(set_load_us)
        # A topology change on a full table: one instance more (the writer's cost), then
        # the worker's first pick after it (its re-read of the topology).
        t0 = time.thread_time_ns()
        w.put_instance(codec.InstanceRow("app", "extra", nodes[7], "127.0.0.9:81", SOFT, HARD))
        out["writer_add_one_ms"] = (time.thread_time_ns() - t0) / 1e6
        req.target, req.tries, req.tried, req.full, req.slot = None, 0, None, 0, -1
        t0 = time.thread_time_ns()
        got = routing.pick("app", req, now)
        out["reread_after_change_ms"] = (time.thread_time_ns() - t0) / 1e6
        req.target = got[0]
        routing.release(req)
        for rt in (routing, edge):
            if rt.reader is not None:
                rt.reader.close()
    finally:
        w.close(unlink=True)
        infl.close(unlink=True)
        segment.unlink(f"/{uid}-inflight")
    return out


# --- the driver ------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed in {cwd}:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip()


def _tree(rev: str, workdir: Path, compiled: bool) -> Path:
    """A copy of `rev` (or this tree when rev is empty) to import from, built or pure."""
    dest = workdir / f"{rev or 'this'}-{'compiled' if compiled else 'pure'}"
    if not rev and dest.exists():  # this tree may have changed since: copy it again
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    if not dest.exists():
        dest.mkdir(parents=True)
        if rev:
            archive = subprocess.run(
                ["git", "archive", rev], cwd=ROOT, capture_output=True, check=True
            ).stdout
        else:  # this tree as it is (uncommitted changes too), without compiled modules
            paths = [
                "proxy",
                "shm",
                "pinger",
                "setup.py",
                "setup.cfg",
                "pyproject.toml",
                "README.md",
            ]
            files = _run(["git", "ls-files", "-co", "--exclude-standard", *paths], ROOT)
            archive = subprocess.run(
                ["tar", "-c", *files.split()], cwd=ROOT, capture_output=True, check=True
            ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        if compiled:
            _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], dest)
    return dest


def _child_run(tree: Path, pure: bool, n: int, seconds: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("EDGEPROXY_PURE", None)
    if pure:
        env["EDGEPROXY_PURE"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n)]
    cmd += ["--seconds", str(seconds)]
    got: dict[str, Any] = json.loads(_run(cmd, tree, env))
    want = "pure" if pure else "compiled"
    if got["build"] != want:
        raise RuntimeError(f"expected a {want} build in {tree}, ran {got['build']}")
    return got


def _uptime() -> str:
    return _run(["uptime"], ROOT)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _fmt(v: float) -> str:
    return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"


def report(results: dict[str, dict[int, dict[str, Any]]], sizes: list[int]) -> list[str]:
    builds = [b for b in BUILDS if b in results]
    lines: list[str] = []
    for where, title in (
        ("", "this worker's node runs its share of the instances (N/300, local)"),
        (" / edge", "an edge node: this worker's node runs none of them"),
    ):
        lines += [f"µs per pick, {title}:", ""]
        lines.append("| case | build | " + " | ".join(f"{n:,}" for n in sizes) + " |")
        lines.append("|---|---|" + "---:|" * len(sizes))
        for strat, scen in CASES:
            key = f"{strat} / {scen}{where}"
            for b in builds:
                cells = []
                for n in sizes:
                    c = results[b][n]["cases"][key]
                    status = "" if c["status"] == 0 else f" ({c['status']})"
                    cells.append(_fmt(c["us"]) + status)
                lines.append(f"| {strat} / {scen} | {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["The table and its writer, and the worker's re-read after a topology change:", ""]
    lines.append("| figure | build | " + " | ".join(f"{n:,}" for n in sizes) + " |")
    lines.append("|---|---|" + "---:|" * len(sizes))
    rows = [
        ("segment size, MB", "segment_bytes", 1e-6),
        ("writer: fill from empty, ms", "writer_fill_ms", 1.0),
        ("writer: add one instance, ms", "writer_add_one_ms", 1.0),
        ("writer: set_load, µs", "set_load_us", 1.0),
        ("worker: first pick after attach, ms", "first_pick_ms", 1.0),
        ("worker: pick after the change, ms", "reread_after_change_ms", 1.0),
        ("harness loop subtracted, µs", "harness_us", 1.0),
    ]
    for label, key, scale in rows:
        for b in builds:
            cells = [_fmt(results[b][n][key] * scale) for n in sizes]
            lines.append(f"| {label} | {b} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Local instances of the app on this worker's node: "
        + ", ".join(f"{results[builds[0]][n]['local']} of {n:,}" for n in sizes)
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10,1000,10000,100000")
    p.add_argument("--builds", default=",".join(BUILDS), help="a subset of: " + ", ".join(BUILDS))
    p.add_argument("--before", default="", help="git rev of `before` (default: merge-base main)")
    p.add_argument("--seconds", type=float, default=1.5, help="time per case (1.5)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "epx-scale")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if args.child is not None:
        json.dump(child(args.child, args.seconds), sys.stdout)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    builds = [b.strip() for b in args.builds.split(",")]
    if not all(b in BUILDS for b in builds) or not all(1 <= n <= 200_000 for n in sizes):
        p.error(f"--builds among {BUILDS}; sizes 1..200000")
    if not 0.1 <= args.seconds <= 10:
        p.error("0.1 <= --seconds <= 10")
    before = args.before or _run(["git", "merge-base", "HEAD", "main"], ROOT)
    when = dt.datetime.now(dt.UTC)
    out = args.output or BENCH_DIR / "results" / f"routing-scale-{when:%Y%m%d-%H%M}.md"
    up_before = _uptime()
    trees = {}
    for b in builds:
        rev = before if b.startswith("before") else ""
        trees[b] = _tree(rev, args.workdir, b.endswith("compiled"))
    results: dict[str, dict[int, dict[str, Any]]] = {b: {} for b in builds}
    for i, n in enumerate(sizes):
        for b in builds if i % 2 == 0 else builds[::-1]:
            r = _child_run(trees[b], b.endswith("pure"), n, args.seconds)
            results[b][n] = r
            cases = "  ".join(f"{k}: {v['us']:.2f}" for k, v in r["cases"].items())
            print(f"{n:>7} {b:16} {cases}", flush=True)
    head = _run(["git", "rev-parse", "--short", "HEAD"], ROOT)
    dirty = _run(["git", "status", "--porcelain", "--", "proxy", "shm"], ROOT)
    lines = [
        "# Routing cost against the number of instances (bench/bench_routing_scale.py)",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, {platform.machine()}, {_cpu_model()}, "
        f"nproc {len(os.sched_getaffinity(0))}; Python {platform.python_version()}; "
        "shared with other engineers' work (timings are noisy)",
        f"- uptime before: `{up_before}`; after: `{_uptime()}`",
        f"- command: `python bench/bench_routing_scale.py {shlex.join(argv or sys.argv[1:])}`",
        f"- before: `{before[:10]}` (git archive); after: this tree at {head}"
        + (" with uncommitted changes in proxy/ shm/" if dirty else ""),
        f"- an app of N instances on {NODES} nodes (round robin), soft {SOFT}, hard {HARD}, "
        "sample_k 2; node n000 (RTT 0) is the worker's own; other RTTs uniform 1-250 ms",
        f"- thread CPU time, median of batches (>= 20 ms each) within {args.seconds} s per "
        "case, minus the harness loop; a status other than 0 is shown in brackets; a pick "
        "includes the table read, the local in-flight counts, the choice and a local admission",
        "",
        *report(results, sizes),
    ]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
