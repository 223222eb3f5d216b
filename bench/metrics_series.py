"""How many series /metrics has, against the number of configured apps.

    python -m bench.metrics_series [--apps 10,5000]

For each app count, one real proxy (2 workers, no traffic needed: every configured or
capped row renders, zeros included) is started twice: with the default [metrics]
max_apps (100) and with max_apps = the app count (no cap). /metrics is scraped once
after the workers have published, and its sample lines counted, in total and per metric
family, with the body size and the snapshot a worker writes. Written to
bench/results/metrics-series-<UTC time>.md with the date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.targets import BENCH_DIR
from bench.wrk_compare import cpu_model, uptime

sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))

from proxyctl import Proxy, ProxyConfig

from proxy.telemetry.metrics import app_labels, block_size_for


def scrape(n_apps: int, max_apps: int, work: Path) -> dict[str, object]:
    """Start a proxy with `n_apps` apps (hello and n_apps - 1 more) and count its series."""
    extra = [
        {"name": f"app{i:05d}", "hosts": [f"app{i:05d}.test"], "soft_limit": 5, "hard_limit": 9}
        for i in range(1, n_apps)
    ]
    cfg = ProxyConfig(upstream="127.0.0.1:9", workers=2, extra_apps=extra)
    cfg.table_extra = {"max_apps": max(1024, n_apps)}  # the table holds them all
    cfg.metrics = {"max_apps": max_apps}
    p = Proxy(cfg, work)
    try:
        deadline = time.monotonic() + 30.0
        text = p.metrics()
        while "edgeproxy_loop_lag_current_seconds{" not in text and time.monotonic() < deadline:
            time.sleep(0.2)  # polling a condition: both workers' first stats publish
            text = p.metrics()
        t0 = time.perf_counter()
        text = p.metrics()
        scrape_ms = (time.perf_counter() - t0) * 1000.0
    finally:
        p.stop()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    by_family: Counter[str] = Counter()
    for ln in lines:
        name = ln.split("{", 1)[0].split(" ", 1)[0]
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        by_family[name] += 1
    names = ["hello", *(e["name"] for e in extra)]
    labels = app_labels(names, max_apps)
    return {
        "series": len(lines),
        "bytes": len(text.encode()),
        "scrape_ms": scrape_ms,
        "block": block_size_for(len(labels)),
        "top": by_family.most_common(4),
    }


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    ap = argparse.ArgumentParser(prog="python -m bench.metrics_series", description=doc)
    ap.add_argument("--apps", default="10,5000", help="app counts, comma separated")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.apps.split(",")]
    if not all(1 <= n <= 10_000 for n in counts) or len(counts) > 4:
        ap.error("at most 4 app counts, each between 1 and 10000")
    before = uptime()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-series-"))
    rows = []
    for n in counts:
        for cap in (100, n):
            if cap == n and n <= 100:
                continue  # under the default cap: the same proxy
            r = scrape(n, cap, work)
            rows.append((n, cap, r))
            print(f"{n} apps, max_apps {cap}: {r['series']} series", flush=True)
    when = dt.datetime.now(dt.UTC)
    out = [
        f"# /metrics series against configured apps, {when:%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python -m bench.metrics_series {' '.join(argv or sys.argv[1:])}`",
        f"- machine: {platform.node()}, {platform.machine()}, {cpu_model()}, "
        f"nproc {len(os.sched_getaffinity(0))}; Python {platform.python_version()}; "
        f"load before: {before} (shared machine: the scrape time is noisy)",
        "- proxy: 2 workers, no traffic (every row renders at zero); edgeproxy build "
        f"{'pure' if os.environ.get('EDGEPROXY_PURE') == '1' else 'as installed'}",
        "",
        "| apps | max_apps | series | /metrics bytes | scrape ms | stats block | biggest |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, cap, r in rows:
        top = ", ".join(f"{name} {k}" for name, k in r["top"])  # type: ignore[attr-defined]
        out.append(
            f"| {n:,} | {cap:,} | {r['series']:,} | {r['bytes']:,} | {r['scrape_ms']:.1f} "
            f"| {r['block']:,} | {top} |"
        )
    out.append("")
    text = "\n".join(out)
    path = BENCH_DIR / "results" / f"metrics-series-{when:%Y%m%d-%H%M}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
