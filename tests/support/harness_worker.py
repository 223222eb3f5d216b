"""One worker process started the way the master starts it, on a listener of the test's,
for the harness scripts (tests/support/worker_harness.py, stall_harness.py) that wrap the
real worker with a fault of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from proxyctl import HOST, REPO, TESTS, ProxyConfig, env

from proxy.telemetry.statsblock import StatsBlock


@contextmanager
def harness_worker(
    script: str, cfg: ProxyConfig, tmp_path: Path
) -> Iterator[tuple[int, list[bytes]]]:
    """`script` (in tests/support) as one worker of `cfg`; yields its port and, once the
    block is over (the worker stopped fast, which publishes its last stats), a list holding
    its final snapshot. Its stderr is tmp_path/worker.stderr."""
    listener = socket.create_server((HOST, 0))
    block = StatsBlock.create()
    r, w = os.pipe()
    boot = {
        "config_text": cfg.render(),
        "config_path": str(tmp_path / "harness.toml"),
        "slot": 0,
        "generation": 1,
        "master_pid": os.getpid(),
        "listeners": [{"kind": "http", "address": "", "fd": listener.fileno()}],
        "notify_fd": w,
        "stats_fd": block.fd,
        "cell": 0,
        "inflight": "/edgeproxy-harness-none",  # absent: the worker runs without cells
        "ticket_secret": os.urandom(32).hex(),
    }
    stderr = open(tmp_path / "worker.stderr", "wb")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / script)],
        stdin=subprocess.PIPE,
        stderr=stderr,
        pass_fds=[listener.fileno(), w, block.fd],
        cwd=REPO,
        env=env(),
    )
    os.close(w)
    assert proc.stdin is not None
    proc.stdin.write(orjson.dumps(boot))
    proc.stdin.close()
    final: list[bytes] = []
    try:
        assert os.read(r, 64).startswith(b"READY"), "the harness worker did not start"
        yield listener.getsockname()[1], final
    finally:
        proc.send_signal(signal.SIGINT)  # fast stop: publishes its last snapshot
        proc.wait(timeout=10)
        stderr.close()
        os.close(r)
        listener.close()
        data = block.read()
        block.close()
        if data is not None:
            final.append(data)
