"""Python time per proxied request: the real request path over recording fake transports.

    python -m bench.fake_transport [--rounds 5] [--batches 15] [--requests 2000] [--no-pure]

No sockets, no kernel, no other process: what is left is the time the worker's
Python (compiled or not) spends on one request. A keep-alive client connection
(proxy.worker.client.ClientConnection of a real proxy.worker.context.WorkerContext on a uvloop
loop) sends `GET /small` or `GET /64k`; the head goes out on a pooled
proxy.worker.upstream.UpstreamConnection at the end of the loop iteration (proxy.worker.batch),
the response is fed to that connection as uvloop does (get_buffer, buffer_updated,
in the sizes it asks for), and the client's transport receives it at the end of
the next iteration. With no socket there is no splice: a 64 KiB body goes through
the transports, as it does in the worker when splice is not possible.

Two routings: `static` (no shared memory: the worker routes from the config) and
`table` (the harness creates the table and the in-flight counters as the master
does, so routing reads the table and admission counts in the shared cells).

Two builds, measured in alternating subprocesses so that the machine's drift hits
both alike: `compiled` (this tree, its mypyc .so files) and `pure` (a `git archive
HEAD` copy of this tree, without .so files, run with EDGEPROXY_PURE=1).

Figure: thread CPU time per request (CLOCK_THREAD_CPUTIME_ID, so other load on the
machine is not counted; on this VM the hypervisor's steal still is, hence many short
batches), the garbage collector off, the fastest of `--batches` batches, minus the harness's
own cost (its three callbacks per request, measured the same way with nothing to do).
Written to bench/results/fake-transport-<UTC time>.md with the date, the machine,
the load average and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.wrk_compare import cpu_model

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SMALL_BODY = b"hello world!\n"
LARGE_BODY = bytes(i % 251 for i in range(65536))
SIZES = {"small": SMALL_BODY, "64k": LARGE_BODY}
ROUTINGS = ("static", "table")
# The response heads the bench's nginx upstream sends (bench/upstream.nginx.conf.tmpl).
HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 23:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
    b"Last-Modified: Thu, 03 Dec 2026 22:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6747a0a0-%x"\r\nAccept-Ranges: bytes\r\n\r\n'
)
# What wrk sends (`wrk -H 'Host: bench.test'`).
REQUEST = b"GET %s HTTP/1.1\r\nHost: bench.test\r\n\r\n"

CONFIG = """
[node]
id = "ft"
[table]
name = "{table}"
[[app]]
name = "bench"
hosts = ["bench.test"]
soft_limit = 1000
hard_limit = 1000
[[instance]]
app = "bench"
id = "bench-1"
address = "127.0.0.1:9"
"""


class Recorder:
    """A transport that counts what is written to it and keeps the last write."""

    def __init__(self) -> None:
        self.written = 0
        self.last = b""
        self.closing = False

    def write(self, data: bytes | memoryview) -> None:
        self.written += len(data)
        self.last = data if isinstance(data, bytes) else bytes(data)

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def get_extra_info(self, key: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if key == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class World:
    """One worker's context, one pooled upstream connection, one client connection."""

    def __init__(self, routing: str) -> None:
        import uvloop

        from proxy.config import loads
        from proxy.telemetry.metrics import WorkerStats
        from proxy.worker.client import ClientConnection
        from proxy.worker.context import WorkerContext
        from proxy.worker.upstream import UpstreamConnection

        self.loop = uvloop.new_event_loop()
        self.config = loads(CONFIG.format(table=f"ft-bench-{os.getpid()}-{routing}"))
        self.shared: Any = None
        cells = None
        if routing == "table":
            from proxy.master.static_table import SharedState
            from shm.inflight import InflightCells

            self.shared = SharedState(self.config)
            cells = InflightCells(self.shared.inflight.segment, self.shared.take_cell())
        self.ctx = WorkerContext(self.loop, self.config, WorkerStats(["bench"], 0, 1, 1), cells)
        if (self.ctx.routing.reader is not None) != (routing == "table"):
            raise RuntimeError(f"{routing}: the worker does not route as asked")
        self.up = UpstreamConnection(self.ctx.pool, "127.0.0.1:9")
        self.up_t = Recorder()
        self.up.connection_made(self.up_t)  # type: ignore[arg-type]
        self.ctx.pool.put(self.up)
        self.client = ClientConnection(self.ctx, False)
        self.client_t = Recorder()
        self.client.connection_made(self.client_t)

    def close(self) -> None:
        self.loop.close()
        if self.shared is not None:
            self.shared.close(unlink=True)

    def feed(self, response: bytes) -> None:
        """`response` read by the upstream connection as uvloop reads a socket into it."""
        up = self.up
        at, n = 0, len(response)
        while at < n:
            buf = up.get_buffer(-1)
            k = min(len(buf), n - at)
            buf[:k] = response[at : at + k]
            up.buffer_updated(k)
            at += k

    def run(self, req: bytes, response: bytes, n: int) -> None:
        """`n` requests one after the other on the client connection, in the running loop.

        Each takes three callbacks: the request arrives (the batch then holds its head),
        the response arrives (after the batch's flush wrote the head), the next request
        (after the flush wrote the response). Callbacks run in the order they were
        scheduled, so every flush runs where it runs in a worker: at the end of the
        iteration that held the bytes."""
        loop = self.loop
        left = n

        def request() -> None:
            self.client.data_received(req)
            loop.call_soon(response_in)

        def response_in() -> None:
            self.feed(response)
            loop.call_soon(next_request)

        def next_request() -> None:
            nonlocal left
            left -= 1
            if left:
                request()
            else:
                loop.stop()

        loop.call_soon(request)
        loop.run_forever()

    def run_idle(self, n: int) -> None:
        """The same chain of callbacks with nothing to do: the harness's own cost."""
        loop = self.loop
        left = n

        def first() -> None:
            loop.call_soon(second)

        def second() -> None:
            loop.call_soon(third)

        def third() -> None:
            nonlocal left
            left -= 1
            if left:
                first()
            else:
                loop.stop()

        loop.call_soon(first)
        loop.run_forever()


def _batch_us(fn: Any, n: int) -> float:
    """Thread CPU µs per request of `fn(n)`, the garbage collector off (as timeit)."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.thread_time_ns()
        fn(n)
        return (time.thread_time_ns() - t0) / n / 1000
    finally:
        gc.enable()


def measure(batches: int, requests: int) -> dict[str, Any]:
    """This process's build: µs per request for every routing and size."""
    import proxy
    import proxy.worker.client

    out: dict[str, Any] = {"build": proxy.build(), "client": proxy.worker.client.__file__}
    idle = World("static")
    try:
        idle_us = min(_batch_us(idle.run_idle, requests) for _ in range(batches))
    finally:
        idle.close()
    out["loop_us"] = idle_us
    for routing in ROUTINGS:
        for size, body in SIZES.items():
            w = World(routing)
            try:
                req = REQUEST % f"/{size}".encode()
                resp = HEAD % (len(body), len(body)) + body
                before = w.client_t.written
                w.run(req, resp, 1)  # warm-up, and the check that it went through
                got = w.client_t.written - before
                if not w.client_t.last.endswith(body[-64:]) or got < len(body):
                    raise RuntimeError(f"{routing} {size}: the client got {got} bytes")
                n = requests if size == "small" else max(1, requests // 4)
                runs = [_batch_us(functools.partial(w.run, req, resp), n) for _ in range(batches)]
                if w.ctx.stats.requests[1] != 1 + batches * n:  # 2xx of app 0
                    raise RuntimeError(f"{routing} {size}: not every request was answered 2xx")
                if w.client_t.written - before < (1 + batches * n) * len(body):
                    raise RuntimeError(f"{routing} {size}: the client missed bytes")
            finally:
                w.close()
            out[f"{routing} {size}"] = min(runs) - idle_us
    return out


# --------------------------------------------------------------------------- orchestration


def _child(cwd: Path, pure: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    if pure:
        env["EDGEPROXY_PURE"] = "1"
    argv = [sys.executable, "-m", "bench.fake_transport", "--child"]
    argv += ["--batches", str(args.batches), "--requests", str(args.requests)]
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{'pure' if pure else 'compiled'} run failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    want = "pure Python" if pure else "compiled (mypyc)"
    if want not in result["build"]:
        raise RuntimeError(f"expected a {want} build, ran {result['build']} ({result['client']})")
    return result


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fake_transport", description=__doc__)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per build (5)")
    p.add_argument("--batches", type=int, default=15, help="batches per case; the fastest (15)")
    p.add_argument("--requests", type=int, default=2000, help="small requests per batch (2000)")
    p.add_argument("--no-pure", action="store_true", help="measure the compiled build only")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if args.child:
        json.dump(measure(args.batches, args.requests), sys.stdout)
        return 0
    if not (1 <= args.rounds <= 20 and 1 <= args.batches <= 50 and 100 <= args.requests <= 10**6):
        p.error("1 <= --rounds <= 20, 1 <= --batches <= 50, 100 <= --requests <= 1000000")
    when = dt.datetime.now(dt.UTC)
    out = args.output or BENCH_DIR / "results" / f"fake-transport-{when:%Y%m%d-%H%M}.md"
    up_before = _uptime()
    builds = ["compiled"] if args.no_pure else ["compiled", "pure"]
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in builds}
    with tempfile.TemporaryDirectory(prefix="edgeproxy-pure-") as tmp:
        pure_tree = Path(tmp)
        if not args.no_pure:
            archive = subprocess.run(
                ["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for rnd in range(args.rounds):
            order = builds if rnd % 2 == 0 else builds[::-1]
            for build in order:
                r = _child(pure_tree if build == "pure" else ROOT, build == "pure", args)
                results[build].append(r)
                cases = "  ".join(f"{k} {r[k]:.2f}" for k in _cases())
                print(f"round {rnd + 1} {build:8} µs/request: {cases}", flush=True)
    dirty = _git("status", "--porcelain", "--", "proxy", "shm")
    lines = [
        "# Fake-transport harness: Python time per proxied request",
        "",
        f"- date: {when:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}, {platform.machine()}, {cpu_model()}, "
        f"nproc {len(os.sched_getaffinity(0))}; Python {platform.python_version()}",
        f"- uptime before: `{up_before}`; after: `{_uptime()}`",
        f"- command: `python -m bench.fake_transport {shlex.join(argv or sys.argv[1:])}`",
        f"- code: {_git('rev-parse', '--short', 'HEAD')}"
        + (f" with uncommitted changes in proxy/ shm/: {dirty!r}" if dirty else "")
        + "; compiled: this tree's .so files; pure: `git archive HEAD`, EDGEPROXY_PURE=1",
        f"- {args.rounds} rounds, builds alternating; per round and case the fastest of "
        f"{args.batches} batches of {args.requests} requests (64k: {args.requests // 4}); "
        "thread CPU time, minus the harness's own callbacks (the same chain empty: "
        f"{_med(results['compiled'], 'loop_us'):.2f} µs per request)",
        "- static: routing from the config; table: from the shared-memory table, admission "
        "by the in-flight cells; small: 13-byte body; 64k: 65536-byte body through the "
        "transports (no socket, so no splice)",
        "",
        "µs per request, median over the rounds (per-round values in brackets):",
        "",
        "| case | " + " | ".join(builds) + (" | pure / compiled |" if len(builds) > 1 else ""),
        "|---|" + "---:|" * (len(builds) + (1 if len(builds) > 1 else 0)),
    ]
    for case in _cases():
        cells = []
        for b in builds:
            vals = [r[case] for r in results[b]]
            cells.append(f"{statistics.median(vals):.2f} [{', '.join(f'{v:.2f}' for v in vals)}]")
        if len(builds) > 1:
            pairs = zip(results["compiled"], results["pure"], strict=True)
            ratios = [p[case] / c[case] for c, p in pairs]
            cells.append(f"{statistics.median(ratios):.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


def _cases() -> list[str]:
    return [f"{r} {s}" for r in ROUTINGS for s in SIZES]


def _med(rs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in rs))


if __name__ == "__main__":
    sys.exit(main())
