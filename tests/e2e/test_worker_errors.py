"""A worker whose protocol callback raises (tests/support/worker_harness.py), over real sockets:
the exception is counted and logged once, that connection is closed, and the worker's
other connections and timeouts go on."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness_worker import harness_worker
from proxyctl import Client, ProxyConfig, Upstream, request_bytes

from proxy.telemetry.metrics import WHERE_CALLBACK, decode_snapshot


@pytest.mark.timeout(30)
def test_callback_exception_is_counted_logged_once_and_the_worker_goes_on(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Three requests that raise in data_received: three counted, one traceback logged,
    each of those connections closed; a normal request is still served and a slow
    request head still gets its 408 from the deadline sweep."""
    cfg = ProxyConfig(upstream=upstream.address, workers=1, timeouts={"client_header": 0.5})
    with harness_worker("worker_harness.py", cfg, tmp_path) as (port, final):
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
    assert final, "the worker published no final stats"
    snap = decode_snapshot(final[0])
    assert snap.internal_errors[WHERE_CALLBACK] == 3, snap.internal_errors
    log = (tmp_path / "worker.stderr").read_text()
    assert log.count("RuntimeError: raised on purpose in data_received") == 1, log
    assert log.count("internal error in callback") == 1, log
