"""The access log of a real proxy: JSON lines of finished requests with app, instance,
node, status, bytes both ways, duration, retries, protocol and client; written by each
worker's thread to a file (reopened after logrotate moves it) or to stderr; sampled; a
full buffer drops lines and counts them in /metrics."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from h2client import H2Client
from ports import free_port
from proxyctl import Client, Proxy, request_bytes, wait_until

pytestmark = pytest.mark.request_path

WRITTEN = 'edgeproxy_access_log_lines_total{outcome="written"}'
FULL = 'edgeproxy_access_log_lines_total{outcome="buffer_full"}'


def lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` (none if it does not exist)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return [orjson.loads(ln) for ln in raw.split(b"\n") if ln]


def wait_lines(path: Path, n: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(lines(path)) >= n, timeout=10.0)
    return lines(path)


@pytest.mark.timeout(60)
def test_lines_carry_the_request(proxy_factory: Callable[..., Proxy], tmp_path: Path) -> None:
    """Four requests (a GET, a POST with a body, one retried after a refused connect, one
    for no app) give four lines whose fields match what happened on the wire."""
    log = tmp_path / "access.log"
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: a connect is refused
    p = proxy_factory(
        workers=1,
        log={"access": str(log), "flush_ms": 50},
        extra_instances=[{"app": "hello", "id": "hello-dead", "address": dead}],
    )
    with Client(p.port) as c:
        live = [("X-Edgeproxy-Prefer-Instance", "hello-1")]  # not the dead one, by chance
        c.send(request_bytes("GET", "/?x=1", host="hello.test", headers=live))
        got = c.response()
        assert got.status == 200
        c.send(request_bytes("POST", "/up", host="hello.test", headers=live, body=b"0123456789"))
        assert c.response().status == 200
        c.send(
            request_bytes(
                "GET",
                "/",
                host="hello.test",
                headers=[("X-Edgeproxy-Prefer-Instance", "hello-dead")],
            )
        )
        assert c.response().status == 200
        c.send(request_bytes("GET", "/", host="nobody.test", close=True))
        assert c.response().status == 404
    got_lines = wait_lines(log, 4)
    assert len(got_lines) == 4, got_lines
    get, post, retried, none = got_lines
    node = f"t{p.cfg.uid}"
    for rec in got_lines:
        assert rec["node"] == node and rec["client"] == "127.0.0.1"
        assert rec["protocol"] == "HTTP/1.1" and rec["scheme"] == "http"
        assert rec["from_peer"] is False and rec["duration_ms"] >= 0
        assert rec["ts"].endswith("Z") and rec["bytes_in"] > 0 and rec["bytes_out"] > 0
    assert get["app"] == "hello" and get["instance"] == "hello-1" and get["status"] == 200
    assert get["instance_node"] == node and get["backhaul"] is False and get["retries"] == 0
    assert get["method"] == "GET" and get["bytes_out"] >= len(got.body) + 20
    assert post["method"] == "POST" and post["bytes_in"] >= get["bytes_in"] + 10
    assert retried["retries"] == 1 and retried["instance"] == "hello-1"
    assert none["app"] is None and none["instance"] is None and none["status"] == 404
    assert "path" not in get and "x=1" not in str(got_lines)
    assert p.wait_metric(WRITTEN, 4) == 4
    assert p.metric(FULL) == 0


@pytest.mark.timeout(60)
def test_reopens_after_logrotate_moves_the_file(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Once the file is renamed away (logrotate without copytruncate), the next lines go
    to a new file at the configured path, and the moved one keeps the earlier lines."""
    log = tmp_path / "access.log"
    p = proxy_factory(workers=1, log={"access": str(log), "flush_ms": 50})
    assert p.get("/").status == 200
    assert len(wait_lines(log, 1)) == 1
    moved = tmp_path / "access.log.1"
    log.rename(moved)
    n = 0
    # Each round adds a request; the writer notices the move within a second.
    while n < 40 and not log.exists():
        assert p.get("/").status == 200
        n += 1
        wait_until(log.exists, timeout=0.1)
    assert log.exists()
    assert p.wait_metric(WRITTEN, n + 1) == n + 1
    wait_until(lambda: len(lines(moved)) + len(lines(log)) == n + 1, timeout=5.0)
    assert len(lines(moved)) + len(lines(log)) == n + 1
    assert len(lines(log)) >= 1


@pytest.mark.timeout(60)
def test_stderr_and_sampling(proxy_factory: Callable[..., Proxy]) -> None:
    """To stderr, with sample_rate 0.5: of 100 requests some, not all, get a line (the
    chance of either extreme is 2^-99), each a whole JSON object on its own line, and the
    written count matches them."""
    p = proxy_factory(workers=1, log={"access": "stderr", "flush_ms": 50, "sample_rate": 0.5})
    for _ in range(100):
        assert p.get("/").status == 200
    written = p.wait_metric(WRITTEN, 1)
    wait_until(lambda: written == p.metric(WRITTEN), timeout=2.0)
    recs = [orjson.loads(ln) for ln in p.stderr().splitlines() if ln.startswith('{"ts"')]
    assert 0 < len(recs) < 100
    assert len(recs) == p.metric(WRITTEN)
    assert all(r["app"] == "hello" and r["status"] == 200 for r in recs)


@pytest.mark.timeout(60)
def test_full_buffer_drops_and_counts(proxy_factory: Callable[..., Proxy], tmp_path: Path) -> None:
    """With a buffer of 2 and a writer that waits 10 s, 5 requests keep 2 lines and count
    3 dropped (the loop never waits for the writer); a graceful stop writes the 2."""
    log = tmp_path / "access.log"
    p = proxy_factory(workers=1, log={"access": str(log), "buffer": 2, "flush_ms": 10000})
    for _ in range(5):
        assert p.get("/").status == 200
    assert p.wait_metric(FULL, 3) == 3
    assert p.metric(WRITTEN) == 0
    assert lines(log) == []
    p.stop(signal.SIGTERM)
    assert len(wait_lines(log, 2)) == 2


@pytest.mark.timeout(60)
def test_bytes_out_of_a_big_body(proxy_factory: Callable[..., Proxy], tmp_path: Path) -> None:
    """A 3 MB response (its body spliced socket to socket where Linux allows, read
    through the loop where the client is slow) is counted once: bytes_out is the body
    plus a head, no byte twice, none missed."""
    log = tmp_path / "access.log"
    p = proxy_factory(workers=1, log={"access": str(log), "flush_ms": 50})
    size = 3_000_000
    with Client(p.port) as c:
        c.send(request_bytes("GET", f"/big?bytes={size}", host="hello.test", close=True))
        got = c.response()
    assert got.status == 200 and len(got.body) == size
    (rec,) = wait_lines(log, 1)
    assert size < rec["bytes_out"] < size + 1024, rec


@pytest.mark.timeout(60)
def test_error_lines_as_json(proxy_factory: Callable[..., Proxy]) -> None:
    """With [log] format = "json", a worker's warning (here: a trace export refused, its
    endpoint closed) reaches stderr as one JSON object naming the node and worker, and so
    does the master's warning about a worker that died (killed here)."""
    closed = f"http://127.0.0.1:{free_port()}/v1/traces"
    p = proxy_factory(
        workers=1,
        log={"format": "json"},
        tracing={"endpoint": closed, "retries": 0, "interval_ms": 100},
    )
    assert p.get("/status/500").status == 500
    assert p.wait_metric('edgeproxy_trace_spans_total{outcome="export_failed"}', 1) == 1

    def reports() -> list[dict[str, Any]]:
        return [orjson.loads(ln) for ln in p.stderr().splitlines() if ln.startswith("{")]

    wait_until(lambda: any("trace export" in r["msg"] for r in reports()), timeout=5.0)
    (rec,) = [r for r in reports() if "trace export" in r["msg"]]
    assert rec["level"] == "warning" and rec["node"] == f"t{p.cfg.uid}" and rec["worker"] == 0
    assert "1 spans dropped" in rec["msg"] and not rec["msg"].startswith("edgeproxy worker")
    (pid,) = p.serving_pids()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any("respawning" in r["msg"] for r in reports()), timeout=10.0)
    (died,) = [r for r in reports() if "respawning" in r["msg"]]
    assert died["level"] == "warning" and died["node"] == f"t{p.cfg.uid}"
    assert f"worker {pid} " in died["msg"] and died["pid"] == p.proc.pid
    text = [ln for ln in p.stderr().splitlines() if ln and not ln.startswith("{")]
    assert text == [], text  # every line of master and workers is JSON


@pytest.mark.timeout(60)
def test_an_http2_stream_is_logged_as_http2(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """A request on an HTTP/2 connection (h2c prior knowledge) and one on HTTP/1.1 beside it
    on the same listener: the lines say HTTP/2 and HTTP/1.1, and the stream's bytes_out
    counts at least its body."""
    log = tmp_path / "access.log"
    p = proxy_factory(
        workers=1, listen_extra={"h2c": True}, log={"access": str(log), "flush_ms": 50}
    )
    with H2Client(p.port, None) as c:
        got = c.request("/")
        assert got.status == 200
    with Client(p.port) as c1:
        c1.send(request_bytes("GET", "/", host="hello.test", close=True))
        assert c1.response().status == 200
    h2_line, h1_line = wait_lines(log, 2)
    assert h2_line["protocol"] == "HTTP/2", h2_line
    assert h2_line["bytes_out"] >= len(got.body) > 0, h2_line
    assert h1_line["protocol"] == "HTTP/1.1", h1_line
