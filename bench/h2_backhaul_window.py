"""A 20 MB download across the HTTP/2 backhaul at 50 ms RTT: adaptive vs a fixed 64 KiB window.

    python -m bench.h2_backhaul_window [--size-mb 20] [--rtt-ms 50] [--rounds 3] [--out FILE]

Two nodes on loopback (tests/support/backhaul_nodes.py configs, `[backhaul] insecure`):
the edge n2 (h2c, one worker) knows the instance only as n3's, and reaches n3's backhaul
listener through the userspace latency relay (pinger.relay, a TCP route delaying each
direction by RTT/2; no netem). An HTTP/2 client on the edge's own listener (no delay
there, windows of 16 MiB) GETs SIZE MB (tests/support/upstream.py /big), which crosses
n3 -> n2 as one stream of the HTTP/2 backhaul; the edge's receive windows on that
connection start at 65535 bytes (stream and connection) and either grow with the
measured BDP up to 16 MiB (`adaptive`) or stay (`fixed`, [http2] adaptive_window = false).

For each run: the throughput (body bytes / time from the request to the last byte) and
the edge worker's peak RSS growth (VmHWM after - before: what the connection held, with
Python's allocator, coarse). The bound on what the edge holds per backhaul connection is
its receive window (at most max_window). Written to
bench/results/h2-backhaul-window-<UTC time>.md with the date, machine and command.
Every run is bounded by --timeout; traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import select
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings

from bench import result_file
from bench.h2_window import MAX_WINDOW, MODES, Relay, build, vm_hwm_kib
from bench.targets import BENCH_DIR
from bench.wrk_compare import cpu_model, uptime

sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))

from backhaul_nodes import BackhaulNode
from proxyctl import HOST, Proxy, Upstream, stop_proxies

CLIENT_WINDOW = 16 * 1024 * 1024


class EdgeNode(BackhaulNode):
    """The edge: h2c on its plaintext listener."""

    def render(self) -> str:
        return super().render().replace("[listen]\n", "[listen]\nh2c = true\n", 1)


@dataclass
class Run:
    mode: str
    seconds: float
    got: int
    hwm_growth_kib: int

    @property
    def mb_per_s(self) -> float:
        return self.got / self.seconds / 1e6


def download(port: int, size: int, timeout: float) -> tuple[float, int]:
    """GET `size` bytes over HTTP/2 from 127.0.0.1:`port`; (seconds, bytes received)."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()  # the preface first, then the larger window
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: CLIENT_WINDOW})
    conn.increment_flow_control_window(CLIENT_WINDOW)
    sock.sendall(conn.data_to_send())
    fields = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"hello.test"),
        (b":path", b"/big?bytes=%d&step=262144" % size),
    ]
    start = time.monotonic()
    deadline = start + timeout
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, fields, end_stream=True)
    sock.sendall(conn.data_to_send())
    got = 0
    status = b""
    ended = False
    while not ended:
        if time.monotonic() > deadline:
            raise TimeoutError(f"download not done in {timeout} s ({got} bytes)")
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            continue
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the edge closed the connection")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.DataReceived):
                got += len(ev.data or b"")
                conn.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise ConnectionError(f"the edge ended the stream: {ev}")
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    seconds = time.monotonic() - start
    sock.close()
    if status != b"200":
        raise ConnectionError(f"status {status!r}")
    return seconds, got


def one_run(mode: str, size: int, rtt_ms: float, timeout: float, work: Path) -> Run:
    up = Upstream()
    started: list[Proxy] = []
    relay = None
    try:
        inst = {"id": "hello-n3", "address": up.address}
        n3_cfg = BackhaulNode("n3", "127.0.0.3", {"insecure": True}, instances=[inst])
        started.append(Proxy(n3_cfg, work))  # type: ignore[arg-type]
        relay = Relay(n3_cfg.backhaul_port, rtt_ms, "127.0.0.3")
        http2 = {
            "initial_window": 65535,
            "connection_window": 65535,
            "adaptive_window": mode == "adaptive",
            "max_window": MAX_WINDOW,
        }
        timeouts = {"request": timeout + 30, "upstream_response": timeout + 30}
        n2_cfg = EdgeNode(
            "n2",
            "127.0.0.2",
            {"insecure": True},
            instances=[{**inst, "node": "n3"}],
            peers=[{"id": "n3", "backhaul": f"{HOST}:{relay.port}", "ping": "127.0.0.3:9"}],
            listen_backhaul=False,
            extra={"http2": http2, "timeouts": timeouts},
        )
        edge = Proxy(n2_cfg, work)  # type: ignore[arg-type]
        started.append(edge)
        pid = int(edge.serving_pids()[0])
        before = vm_hwm_kib(pid)
        seconds, got = download(n2_cfg.port, size, timeout)
        after = vm_hwm_kib(pid)
        return Run(mode, seconds, got, after - before)
    finally:
        if relay is not None:
            relay.stop()
        stop_proxies(started)
        up.stop()


def report(runs: list[Run], args: argparse.Namespace, cmd: str, load: tuple[str, str]) -> str:
    now = dt.datetime.now(dt.UTC)
    lines = [
        "# A download across the HTTP/2 backhaul at 50 ms RTT: adaptive vs fixed 64 KiB"
        " window (bench/h2_backhaul_window.py)",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()}; nproc 2; CPU: {cpu_model()}; kernel {platform.release()}",
        f"- Python {platform.python_version()}; request path {build()}",
        f"- uptime before: `{load[0]}`; after: `{load[1]}` (a shared machine: other agents'"
        " tests ran meanwhile)",
        f"- command: `{cmd}`",
        f"- load: one HTTP/2 GET of {args.size_mb} MB from the edge n2 (h2c, 1 worker), whose"
        f" instance is on n3 (1 worker) behind pinger.relay ({args.rtt_ms / 2:g} ms each way"
        f" = {args.rtt_ms:g} ms RTT) on the HTTP/2 backhaul (insecure, prior knowledge); the"
        " edge's backhaul receive windows start at 65535 bytes; max_window 16 MiB; rounds"
        " interleaved",
        "",
        "| mode | MB/s (median) | runs MB/s (sorted) | edge worker VmHWM growth KiB |",
        "|---|---:|---|---:|",
    ]
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        rates = sorted(r.mb_per_s for r in rs)
        lines.append(
            f"| {mode} | {rates[len(rates) // 2]:.2f} | {', '.join(f'{x:.2f}' for x in rates)} |"
            f" {', '.join(str(r.hwm_growth_kib) for r in rs)} |"
        )
    lines += ["", "Per run:", ""]
    for r in runs:
        lines.append(
            f"- {r.mode}: {r.got} bytes in {r.seconds:.2f} s = {r.mb_per_s:.2f} MB/s;"
            f" VmHWM +{r.hwm_growth_kib} KiB"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=20)
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one download may take")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cmd = "python -m bench.h2_backhaul_window " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    load_before = uptime()
    runs: list[Run] = []
    size = args.size_mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="h2bhwin-") as tmp:
        for rnd in range(args.rounds):
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                r = one_run(mode, size, args.rtt_ms, args.timeout, Path(tmp))
                print(
                    f"round {rnd + 1} {mode}: {r.mb_per_s:.2f} MB/s ({r.seconds:.2f} s),"
                    f" VmHWM +{r.hwm_growth_kib} KiB",
                    flush=True,
                )
                if r.got != size:
                    print(f"  got {r.got} of {size} bytes", flush=True)
                runs.append(r)
    text = report(runs, args, cmd, (load_before, uptime()))
    result_file.write(text, args.out or result_file.path_for("h2-backhaul-window"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
