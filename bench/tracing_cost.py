"""What tracing costs a request that is not traced: the fake-transport request path with
[tracing] on (ids made, the sampling decision taken, a traceparent sent to the instance;
the request neither slow, failed, retried nor sampled) against tracing off.

    python -m bench.tracing_cost [--batches 31] [--requests 2000]

The request path of bench.fake_transport (a real WorkerContext, ClientConnection and
pooled UpstreamConnection over recording transports, routing from the config), small
responses. Two request kinds: `plain` (what wrk sends) and `client traceparent` (the client
sends a valid traceparent and a tracestate: off, the proxy passes them on after checking
them; on, it continues the trace). The worlds run interleaved, batch by batch, in one
process (the machine's drift hits both alike); per world the fastest batch and the median,
thread CPU time, the garbage collector off. Run it on a compiled tree (`./dev build`, or a
copy built with `setup.py build_ext --inplace`): it says which build it measured.
Written to bench/results/tracing-cost-<UTC time>.md with the date, machine, load and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any

from bench.fake_transport import HEAD, SMALL_BODY, World, _batch_us
from bench.wrk_compare import cpu_model

BENCH_DIR = Path(__file__).resolve().parent
PLAIN = b"GET /small HTTP/1.1\r\nHost: bench.test\r\n\r\n"
WITH_TP = (
    b"GET /small HTTP/1.1\r\nHost: bench.test\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"tracestate: congo=t61rcWkgMzE\r\n\r\n"
)


def world(traced: bool) -> World:
    """A fake-transport world; `traced`: [tracing] on as a worker sets it up (no exporter
    thread: nothing is traced here), slow_ms far away, sample_rate 0."""
    from proxy.config_tracing import TracingConfig
    from proxy.core.traceparent import TraceContext
    from proxy.worker.tracing import Tracer

    w = World("static")
    if traced:
        cfg = TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", slow_ms=60000.0)
        w.ctx.tracer = Tracer(cfg, [0, 0, 0])
        w.ctx.trace = TraceContext(os.urandom, 0.0, random.Random().random)
    return w


def measure(batches: int, requests: int) -> dict[str, Any]:
    import proxy

    resp = HEAD % (len(SMALL_BODY), len(SMALL_BODY)) + SMALL_BODY
    out: dict[str, Any] = {"build": proxy.build()}
    for kind, req in (("plain", PLAIN), ("client traceparent", WITH_TP)):
        worlds = {"off": world(False), "on": world(True)}
        runs: dict[str, list[float]] = {k: [] for k in worlds}
        try:
            for name, w in worlds.items():
                w.run(req, resp, 1)  # warm-up, and the check that it went through
                if not w.client_t.last.endswith(SMALL_BODY):
                    raise RuntimeError(f"{kind} {name}: no response")
            for i in range(batches):
                order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
                for name in order:
                    w = worlds[name]
                    runs[name].append(_batch_us(functools.partial(w.run, req, resp), requests))
            on = worlds["on"]
            tracer = on.ctx.tracer
            assert tracer is not None
            if tracer.buffer or on.ctx.stats.requests[1] != 1 + batches * requests:
                raise RuntimeError(f"{kind}: a request was traced or not answered 2xx")
        finally:
            for w in worlds.values():
                w.close()
        for name, vals in runs.items():
            out[f"{kind} {name} min"] = min(vals)
            out[f"{kind} {name} median"] = statistics.median(vals)
        diffs = [b - a for a, b in zip(runs["off"], runs["on"], strict=True)]
        out[f"{kind} paired diff median"] = statistics.median(diffs)
    out.update(micro())
    return out


def micro() -> dict[str, float]:
    """The pieces alone (ns per call): begin() on a plain request and on one with a
    client traceparent, and the parser."""
    from proxy.core.request import Request
    from proxy.core.traceparent import TraceContext, parse_traceparent

    tc = TraceContext(os.urandom, 0.0, random.Random().random)
    plain = Request(100, 65536)
    with_tp = Request(100, 65536)
    with_tp.on_header(b"traceparent", WITH_TP.split(b"traceparent: ")[1].split(b"\r\n")[0])
    with_tp.on_header(b"tracestate", b"congo=t61rcWkgMzE")
    n = 200_000
    out = {}
    for name, fn in (
        ("begin plain ns", functools.partial(tc.begin, plain, False)),
        ("begin client traceparent ns", functools.partial(tc.begin, with_tp, False)),
        ("parse_traceparent ns", functools.partial(parse_traceparent, with_tp.traceparent)),
    ):
        out[name] = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9
    return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _git(*argv: str) -> str:
    done = subprocess.run(
        ["git", *argv], cwd=BENCH_DIR.parent, capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__)
    p.add_argument("--batches", type=int, default=31, help="interleaved batches per world (31)")
    p.add_argument("--requests", type=int, default=2000, help="requests per batch (2000)")
    p.add_argument("--output", type=Path)
    p.add_argument("--code", default="", help="what code this is, when not a git checkout")
    args = p.parse_args(argv)
    if not (1 <= args.batches <= 200 and 100 <= args.requests <= 10**5):
        p.error("1 <= --batches <= 200, 100 <= --requests <= 100000")
    when = dt.datetime.now(dt.UTC)
    out_path = args.output or BENCH_DIR / "results" / f"tracing-cost-{when:%Y%m%d-%H%M}.md"
    before = _uptime()
    r = measure(args.batches, args.requests)
    lines = [
        "# Tracing's cost to an untraced request (fake-transport request path)",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, {platform.machine()}, {cpu_model()}, "
        f"nproc {len(os.sched_getaffinity(0))}; Python {platform.python_version()}; "
        "shared with other engineers' work",
        f"- uptime before: `{before}`; after: `{_uptime()}`",
        f"- command: `python -m bench.tracing_cost {shlex.join(argv or sys.argv[1:])}`",
        f"- build: {r['build']}; code: {args.code or _git('rev-parse', '--short', 'HEAD')}",
        f"- {args.batches} batches of {args.requests} requests per world, off and on "
        "interleaved (order alternating); thread CPU µs per request including the "
        "harness's own callbacks (the same in both worlds)",
        "- off: no [tracing]; on: [tracing] with an endpoint, sample_rate 0, slow_ms 60000 "
        "(no request is traced; each gets ids, a sampling decision and a traceparent)",
        "",
        "| request | off min | on min | on - off (min) | off median | on median "
        "| paired diff median |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("plain", "client traceparent"):
        off, on = r[f"{kind} off min"], r[f"{kind} on min"]
        lines.append(
            f"| {kind} | {off:.2f} | {on:.2f} | {on - off:+.2f} | "
            f"{r[f'{kind} off median']:.2f} | {r[f'{kind} on median']:.2f} | "
            f"{r[f'{kind} paired diff median']:+.2f} |"
        )
    lines += ["", "The pieces alone (timeit, best of 5 x 200 000 calls):", ""]
    for k in ("begin plain ns", "begin client traceparent ns", "parse_traceparent ns"):
        lines.append(f"- {k.removesuffix(' ns')}: {r[k]:.0f} ns")
    text = "\n".join(lines) + "\n"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)
    print(f"written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
