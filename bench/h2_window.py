"""The adaptive HTTP/2 receive window across a 50 ms path: adaptive vs a fixed 64 KiB window.

    python -m bench.h2_window [--size-mb 20] [--rtt-ms 50] [--rounds 2] [--out FILE]

Where this proxy receives HTTP/2 today is the client-facing connection (the HTTP/2
backhaul is not built), so the transfer is an upload: an HTTP/2 client (the h2 library,
prior knowledge) POSTs SIZE MB to the proxy (h2c, one worker) through the userspace
latency relay (pinger.relay, a TCP route delaying each direction by RTT/2; no netem),
and the proxy streams it to a local instance (tests/support/upstream.py, /echo, which
returns the length it read). Both modes start from the same windows (stream and
connection 65535 bytes); `adaptive` lets them grow with the measured BDP up to
[http2] max_window (16 MiB), `fixed` keeps them ([http2] adaptive_window = false).

For each run: the throughput (body bytes / time from the request's HEADERS to the
response's end), the windows the client was granted in the end (SETTINGS initial
window; connection window, granted credit minus bytes sent), the largest connection
credit it held at once (what it could have had in flight: the bound on the request body
the proxy holds for this connection), and the worker's peak RSS growth (VmHWM after -
before; Python's allocator, so coarse).
Written to bench/results/h2-window-<UTC time>.md with the date, machine and command.
Every run is bounded by --timeout; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from bench import result_file
from bench.targets import BENCH_DIR
from bench.wrk_compare import cpu_model, uptime

sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))

from ports import free_port
from proxyctl import HOST, LineReader, Proxy, ProxyConfig, Upstream, env

MODES = ("adaptive", "fixed")
MAX_WINDOW = 16 * 1024 * 1024


@dataclass
class Run:
    mode: str
    seconds: float
    sent: int
    echoed: int
    stream_window: int  # the last SETTINGS_INITIAL_WINDOW_SIZE the proxy sent
    conn_window: int  # connection credit granted in all minus bytes sent, at the end
    peak_credit: int  # the most connection credit the client held at once
    hwm_growth_kib: int  # the worker's VmHWM after - before

    @property
    def mb_per_s(self) -> float:
        return self.sent / self.seconds / 1e6


def build() -> str:
    compiled = list((BENCH_DIR.parent / "proxy").rglob("*.so"))
    return "compiled (mypyc)" if compiled else "pure Python (no compiled module in the tree)"


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Relay:
    """`python -m pinger.relay` with one TCP route, RTT/2 each way."""

    def __init__(self, target_port: int, rtt_ms: float, target: str = HOST) -> None:
        self.port = free_port()
        half = rtt_ms / 2
        route = f"tcp,{HOST}:{self.port},{target}:{target_port},{half},{half}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pinger.relay", "--route", route],
            cwd=BENCH_DIR.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env(),
        )
        self.reader = LineReader(self.proc.stdout)
        if self.reader.wait_for("READY", 10) is None:
            self.stop()
            raise RuntimeError("the relay printed no READY")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def upload(port: int, size: int, timeout: float) -> tuple[float, int, int, int, int, int]:
    """POST `size` bytes over HTTP/2 to 127.0.0.1:`port`; (seconds, sent, echoed length,
    stream window, connection window, largest connection credit)."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"hello.test"),
        (b":path", b"/echo"),
        (b"content-length", str(size).encode()),
    ]
    sid = conn.get_next_available_stream_id()
    start = time.monotonic()
    deadline = start + timeout
    conn.send_headers(sid, fields)
    chunk = b"u" * 16384
    sent = 0
    granted = 65535  # connection credit from the proxy, in all
    peak = 0
    body = b""
    ended = False
    while not ended:
        if time.monotonic() > deadline:
            raise TimeoutError(f"upload not done in {timeout} s ({sent} bytes sent)")
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        n = min(window, size - sent)
        if n > 0:
            conn.send_data(sid, chunk[:n], end_stream=sent + n == size)
            sent += n
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        wait = 0.0 if n > 0 else 1.0
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            continue
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
                granted += ev.delta or 0
                peak = max(peak, granted - sent)
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data or b""
                conn.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise ConnectionError(f"the proxy ended the stream: {ev}")
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    seconds = time.monotonic() - start
    stream_window = conn.remote_settings.initial_window_size
    sock.close()
    echoed = int(json.loads(body)["body_len"])
    return seconds, sent, echoed, stream_window, granted - sent, peak


def one_run(mode: str, size: int, rtt_ms: float, timeout: float, workdir: Path) -> Run:
    up = Upstream()
    proxy = relay = None
    try:
        cfg = ProxyConfig(
            upstream=up.address,
            workers=1,
            listen_extra={"h2c": True},
            http2={
                "initial_window": 65535,
                "connection_window": 65535,
                "adaptive_window": mode == "adaptive",
                "max_window": MAX_WINDOW,
            },
            timeouts={"request": timeout + 30, "upstream_response": timeout + 30},
        )
        proxy = Proxy(cfg, workdir)
        pid = int(proxy.serving_pids()[0])
        relay = Relay(proxy.port, rtt_ms)
        before = vm_hwm_kib(pid)
        seconds, sent, echoed, sw, cw, peak = upload(relay.port, size, timeout)
        after = vm_hwm_kib(pid)
        return Run(mode, seconds, sent, echoed, sw, cw, peak, after - before)
    finally:
        if relay is not None:
            relay.stop()
        if proxy is not None:
            proxy.stop()
        up.stop()


def report(runs: list[Run], args: argparse.Namespace, cmd: str, load: tuple[str, str]) -> str:
    now = dt.datetime.now(dt.UTC)
    lines = [
        "# HTTP/2 receive window over a 50 ms path: adaptive vs fixed 64 KiB (bench/h2_window.py)",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}; nproc 2; CPU: {cpu_model()}; kernel {platform.release()}",
        f"- Python {platform.python_version()}; request path {build()}",
        f"- uptime before: `{load[0]}`; after: `{load[1]}` (a shared machine: other agents'"
        " tests ran meanwhile)",
        f"- command: `{cmd}`",
        f"- load: one HTTP/2 upload of {args.size_mb} MB (one stream, prior knowledge) through"
        f" pinger.relay (TCP, {args.rtt_ms / 2:g} ms each way = {args.rtt_ms:g} ms RTT) to the"
        " proxy (1 worker, h2c), on to a local instance (tests/support/upstream.py /echo);"
        " both modes start at 65535-byte stream and connection windows; max_window 16 MiB;"
        " rounds interleaved",
        "",
        "| mode | MB/s (median) | runs MB/s (sorted) | stream window at end | connection window"
        " at end | largest connection credit | worker VmHWM growth KiB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        rates = sorted(r.mb_per_s for r in rs)
        median = rates[len(rates) // 2]
        lines.append(
            f"| {mode} | {median:.2f} | {', '.join(f'{x:.2f}' for x in rates)} |"
            f" {', '.join(str(r.stream_window) for r in rs)} |"
            f" {', '.join(str(r.conn_window) for r in rs)} |"
            f" {', '.join(str(r.peak_credit) for r in rs)} |"
            f" {', '.join(str(r.hwm_growth_kib) for r in rs)} |"
        )
    lines += ["", "Per run:", ""]
    for r in runs:
        lines.append(
            f"- {r.mode}: {r.sent} bytes in {r.seconds:.2f} s = {r.mb_per_s:.2f} MB/s,"
            f" instance read {r.echoed}; windows stream {r.stream_window} connection"
            f" {r.conn_window}; largest credit {r.peak_credit}; VmHWM +{r.hwm_growth_kib} KiB"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=20)
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one upload may take")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cmd = "python -m bench.h2_window " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_before = uptime()
    runs: list[Run] = []
    size = args.size_mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="h2window-") as tmp:
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                r = one_run(mode, size, args.rtt_ms, args.timeout, Path(tmp))
                print(
                    f"round {rnd + 1} {mode}: {r.mb_per_s:.2f} MB/s ({r.seconds:.2f} s),"
                    f" windows {r.stream_window}/{r.conn_window}, largest credit"
                    f" {r.peak_credit}, VmHWM +{r.hwm_growth_kib} KiB",
                    flush=True,
                )
                if r.echoed != r.sent:
                    print(f"  the instance read {r.echoed} of {r.sent} bytes", flush=True)
                runs.append(r)
    text = report(runs, args, cmd, (load_before, uptime()))
    result_file.write(text, args.out or result_file.path_for("h2-window"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
