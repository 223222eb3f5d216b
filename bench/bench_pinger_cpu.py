"""Pinger CPU with many peers: one responder process answers for N node ids on loopback.

Runs `python -m pinger` with N static peers (all pinged through one responder
socket, each probe answered as its target id) at one probe per peer per second,
and reports the pinger's CPU (utime + stime from /proc) as a share of one core.
Usage: python bench/bench_pinger_cpu.py [--peers 300] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pinger.ping_codec import PROBE, PingDecodeError, decode, encode, reply_to  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.9"


def responder(port_out: int) -> None:
    """Answer every probe as its target (the child process's whole job)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    os.write(port_out, f"{s.getsockname()[1]}\n".encode())
    os.close(port_out)
    while True:
        data, addr = s.recvfrom(65536)
        try:
            p = decode(data)
        except PingDecodeError:
            continue
        if p.kind == PROBE:
            s.sendto(encode(reply_to(p, p.target, 1, None)), addr)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def write_config(path: Path, peers: int, responder_port: int, uid: str) -> None:
    ping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ping.bind((HOST, 0))
    port = ping.getsockname()[1]
    ping.close()
    out = [
        '[node]\nid = "bench"\nregion = "nrt"\n',
        f'[listen]\ncontrol = "/tmp/edgeproxy-bench-{uid}.sock"\n',
        f'[pinger]\nlisten = "{HOST}:{port}"\ninterval = 1.0\n',
        f'[table]\nname = "edgeproxy-bench-{uid}"\nwriter = "pinger"\n',
        '[[app]]\nname = "hello"\nhosts = ["hello.test"]\n',
        '[[instance]]\napp = "hello"\nid = "hello-bench"\naddress = "127.0.0.1:9"\n',
    ]
    for i in range(peers):
        out.append(
            f'[[peer]]\nid = "peer{i:04d}"\nregion = "r{i % 10}"\n'
            f'backhaul = "{HOST}:4280"\nping = "{HOST}:{responder_port}"\n'
        )
    path.write_text("\n".join(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peers", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args()
    uid = f"{os.getpid()}"
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            responder(w)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as rf:
        rport = int(rf.readline())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "bench.toml"
        write_config(cfg, args.peers, rport, uid)
        p = subprocess.Popen(
            [sys.executable, "-m", "pinger", "-c", str(cfg)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                print(f"pinger did not start: {line!r}", file=sys.stderr)
                return 1
            time.sleep(args.warmup)  # measurement window, not synchronisation
            c0, t0 = cpu_seconds(p.pid), time.monotonic()
            time.sleep(args.seconds)
            c1, t1 = cpu_seconds(p.pid), time.monotonic()
            table = subprocess.run(
                [sys.executable, "-m", "proxy.cli", "table", "--json", "-c", str(cfg)],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            for f in Path("/dev/shm").glob(f"edgeproxy-bench-{uid}*"):
                f.unlink()
    share = (c1 - c0) / (t1 - t0)
    import json

    nodes = json.loads(table.stdout)["nodes"] if table.returncode == 0 else []
    measured = sum(1 for n in nodes if n["rtt_ms"] is not None and n["id"] != "bench")
    up = sum(1 for n in nodes if n["up"] and n["id"] != "bench")
    print(
        f"pinger CPU with {args.peers} peers at 1 probe/peer/s: {share:.2%} of a core "
        f"over {t1 - t0:.1f} s ({measured} peers measured, {up} up)"
    )
    print(p.stderr.read()[-2000:] if p.stderr else "", file=sys.stderr)
    return 0 if share <= 0.02 else 3


if __name__ == "__main__":
    sys.exit(main())
