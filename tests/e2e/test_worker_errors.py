"""A worker whose protocol callback raises (tests/support/worker_harness.py), over real sockets:
the exception is counted and logged once, that connection is closed, and the worker's
other connections and timeouts go on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from proxyctl import HOST, REPO, TESTS, Client, ProxyConfig, Upstream, env, request_bytes

from proxy.telemetry.metrics import WHERE_CALLBACK, decode_snapshot
from proxy.telemetry.statsblock import StatsBlock


@pytest.mark.timeout(30)
def test_callback_exception_is_counted_logged_once_and_the_worker_goes_on(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Three requests that raise in data_received: three counted, one traceback logged,
    each of those connections closed; a normal request is still served and a slow
    request head still gets its 408 from the deadline sweep."""
    cfg = ProxyConfig(upstream=upstream.address, workers=1, timeouts={"client_header": 0.5})
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
    }
    stderr = open(tmp_path / "worker.stderr", "wb")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "worker_harness.py")],
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
    port = listener.getsockname()[1]
    try:
        assert os.read(r, 64).startswith(b"READY"), "the harness worker did not start"
        for _ in range(3):
            with Client(port) as c:
                c.send(request_bytes(path="/_raise"))
                closed, got = c.closed_within(5.0)
                assert closed and got == b"", got
        with Client(port) as c:
            c.send(request_bytes(path="/fine"))
            assert c.response().status == 200
        with Client(port) as c:
            c.send(b"GET /slow HTTP/1.1\r\nHost: hello.test\r\n")  # the head never ends
            assert c.response(timeout=5.0).status == 408
    finally:
        proc.send_signal(signal.SIGINT)  # fast stop: publishes its last snapshot
        proc.wait(timeout=10)
        stderr.close()
        os.close(r)
        listener.close()
    data = block.read()
    block.close()
    assert data is not None
    snap = decode_snapshot(data)
    assert snap.internal_errors[WHERE_CALLBACK] == 3, snap.internal_errors
    log = (tmp_path / "worker.stderr").read_text()
    assert log.count("RuntimeError: raised on purpose in data_received") == 1, log
    assert log.count("internal error in callback") == 1, log
