"""At the hard limit, "full" is always 503: wrk against one instance with hard_limit 8.

    python -m bench.hard_limit [--runs 5] [--duration 6]

One demo instance (python -m proxy.demo.app, every request held 200 ms), one
proxy with 2 workers (the test harness's tests/support/proxyctl.py, as built in place),
32 keep-alive wrk connections: about 4 times what the instance may hold, so most
answers are the proxy's own 503s, and the two workers race for the last slot.
Each run prints the statuses wrk saw and the proxy's retry, no-pick and
admission counters; a 502 here means a capacity refusal was mislabelled as an
instance failure. Written to bench/results/hard-limit-<UTC time>.txt with the
date, machine and command. Traffic stays on 127.0.0.1; every run is bounded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.targets import BENCH_DIR
from bench.wrk_compare import cpu_model

sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))

from proxyctl import Proxy, ProxyConfig, Upstream
from test_table_proxy import Instance

LUA = """
counts = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do io.write(string.format("STATUS %d %d\\n", k, v)) end
  end
end
"""
SERIES = (
    "edgeproxy_retries_total",
    "edgeproxy_upstream_errors_total",
    "edgeproxy_no_pick_total",
    "edgeproxy_admissions_refused_total",
)


def series(text: str, name: str) -> dict[str, float]:
    pat = "^" + re.escape(name) + r"\{([^}]*)\} (\S+)$"
    return {m.group(1): float(m.group(2)) for m in re.finditer(pat, text, re.M)}


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.hard_limit", description=doc)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--duration", type=int, default=6, help="seconds per wrk run (6)")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20 or not 1 <= args.duration <= 30:
        p.error("1 <= --runs <= 20, 1 <= --duration <= 30")
    when = dt.datetime.now(dt.UTC)
    out = [
        "# Hard limit: 503, never 502",
        f"date: {when:%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.node()}, {platform.machine()}, {cpu_model()}",
        "command: python -m bench.hard_limit "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        f"load: wrk -t1 -c32 -d{args.duration}s /?sleep=200, hard_limit 8, 2 workers",
        "",
    ]
    inst = Instance("limited-1")
    up = Upstream()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-hard-"))
    lua = work / "count.lua"
    lua.write_text(LUA)
    cfg = ProxyConfig(
        upstream=up.address,
        workers=2,
        extra_apps=[
            {"name": "limited", "hosts": ["limited.test"], "soft_limit": 8, "hard_limit": 8}
        ],
        extra_instances=[{"app": "limited", "id": "limited-1", "address": inst.address}],
    )
    proxy = Proxy(cfg, work)
    bad = 0
    try:
        for i in range(args.runs):
            wrk = subprocess.run(
                ["wrk", "-t1", "-c32", f"-d{args.duration}s", "-s", str(lua),
                 "-H", "Host: limited.test", f"http://127.0.0.1:{proxy.port}/?sleep=200"],
                capture_output=True, text=True, timeout=args.duration + 30, check=True,
            ).stdout  # fmt: skip
            st = {int(a): int(b) for a, b in re.findall(r"STATUS (\d+) (\d+)", wrk)}
            bad += st.get(502, 0)
            other = {k: v for k, v in st.items() if k not in (200, 502, 503)}
            out.append(
                f"run {i + 1}: 200={st.get(200, 0)} 503={st.get(503, 0)} 502={st.get(502, 0)}"
                f" other={other}"
            )
            m = proxy.metrics()
            for name in SERIES:
                out.append(f"    {name} (cumulative) {series(m, name)}")
            print("\n".join(out[-1 - len(SERIES) :]), flush=True)
    finally:
        proxy.stop()
        for seg in Path("/dev/shm").glob(f"edgeproxy-test-{cfg.uid}*"):
            seg.unlink(missing_ok=True)
        inst.stop()
        up.stop()
    out.append("")
    out.append(f"502 in all runs: {bad}")
    path = BENCH_DIR / "results" / f"hard-limit-{when:%Y%m%d-%H%M}.txt"
    path.write_text("\n".join(out) + "\n")
    print(f"502 in all runs: {bad}; written to {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
