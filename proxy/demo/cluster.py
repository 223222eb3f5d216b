"""`edgeproxy demo`: a working single-node setup in one command.

Owns starting a few demo app instances, writing a config for them, running
the master in front of them and stopping everything on Ctrl-C. It must not
need root, a cluster store or any file outside a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

import posix_ipc

from proxy.demo.certs import write_demo_certs
from shm.inflight_codec import inflight_segment_name
from shm.layout import table_segment_name

DEMO_APP = "hello"
DEMO_HOST = "hello.test"


def _start(
    argv: list[str], ready_prefix: str, timeout: float = 20.0
) -> tuple[subprocess.Popen[str], str]:
    """Start a process and wait for its READY line; return it and that line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out: IO[str] | None = proc.stdout
    assert out is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            break
        if line.startswith(ready_prefix):
            return proc, line.strip()
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{' '.join(argv)} did not become ready")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(
    workdir: str,
    port: int,
    https_port: int,
    admin_port: int,
    instances: list[tuple[str, str]],
    certs_dir: str,
) -> str:
    ping_port = _free_udp_port()
    lines = [
        "# written by `edgeproxy demo`",
        "[node]",
        'id = "demo"',
        'region = "local"',
        "[listen]",
        f'http = ["127.0.0.1:{port}"]',
        f'https = ["127.0.0.1:{https_port}"]',
        f'admin = "127.0.0.1:{admin_port}"',
        f'control = "{workdir}/control.sock"',
        "[tls]",
        f'certs_dir = "{certs_dir}"',
        f'default_host = "{DEMO_HOST}"  # a client without SNI (curl https://127.0.0.1)',
        "[table]",
        f'name = "edgeproxy-demo-{os.getpid()}"',
        'writer = "pinger"  # the pinger daemon fills the table and publishes load',
        "[pinger]",
        f'listen = "127.0.0.1:{ping_port}"',
        "[[app]]",
        f'name = "{DEMO_APP}"',
        f'hosts = ["{DEMO_HOST}", "localhost", "127.0.0.1"]',
        'strategy = "closest"',
        "soft_limit = 20",
        "hard_limit = 25",
    ]
    for iid, addr in instances:
        lines += ["[[instance]]", f'app = "{DEMO_APP}"', f'id = "{iid}"', f'address = "{addr}"']
    path = os.path.join(workdir, "edgeproxy.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _remove_table() -> None:
    """The pinger leaves its table for readers; the demo's readers are gone with it."""
    base = f"edgeproxy-demo-{os.getpid()}"
    for name in (table_segment_name(base), inflight_segment_name(base)):
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(name)


def run_demo(port: int, https_port: int, admin_port: int, count: int, workers: int | None) -> int:
    procs: list[subprocess.Popen[str]] = []
    py = sys.executable

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="edgeproxy-demo-") as workdir:
        try:
            instances = []
            for i in range(1, count + 1):
                iid = f"{DEMO_APP}-{i}"
                p, line = _start([py, "-m", "proxy.demo.app", "--id", iid], "READY")
                procs.append(p)
                instances.append((iid, line.split()[1]))
            certs_dir, ca_file = write_demo_certs(workdir, (DEMO_HOST, "localhost"))
            path = _config(workdir, port, https_port, admin_port, instances, certs_dir)
            if workers:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(f"[workers]\ncount = {workers}\n")
            master, _ = _start([py, "-m", "proxy.cli", "run", "-c", path], "READY")
            procs.append(master)
            pinger, _ = _start([py, "-m", "proxy.cli", "pinger", "-c", path], "READY")
            procs.append(pinger)
            # The console script next to this interpreter is what a user has on PATH.
            script = os.path.join(os.path.dirname(py), "edgeproxy")
            cli = script if os.access(script, os.X_OK) else f"{py} -m proxy.cli"
            print(f"edgeproxy demo: {count} instances of app {DEMO_APP!r} behind the proxy.")
            print(f"  config:   {path}")
            print(f"  try:      curl -H 'Host: {DEMO_HOST}' http://127.0.0.1:{port}/")
            print(
                f"            curl --cacert {ca_file} --resolve {DEMO_HOST}:{https_port}:127.0.0.1"
                f" https://{DEMO_HOST}:{https_port}/"
            )
            print(f"            curl http://127.0.0.1:{port}/?sleep=200")
            print(f"            curl -o /dev/null http://127.0.0.1:{port}/?bytes=10000000")
            print(f"  status:   {cli} status -c {path}")
            print(f"  table:    {cli} table -c {path}")
            print(f"  metrics:  curl http://127.0.0.1:{admin_port}/metrics")
            print("Ctrl-C stops everything.", flush=True)
            master.wait()
            return 0
        except KeyboardInterrupt:
            return 0
        except RuntimeError as e:
            print(f"edgeproxy demo: {e}", file=sys.stderr)
            return 1
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            _remove_table()
