"""HTTP/2 across reloads: a draining worker's two-step GOAWAY (RFC 9113 6.8). The
first GOAWAY names stream 2^31-1 and comes with a PING; a stream opened before the
PING's ACK is served; the final GOAWAY names the last stream served; a later stream
is refused (REFUSED_STREAM: safe to retry); open streams finish; then the close. And
h2load across three SIGHUPs fails no stream.

Real processes on 127.0.0.1: the proxy (h2c on its plaintext listener), the upstream
of tests/support/upstream.py, hand-built frames (tests/support/h2raw.py), h2load
(every run bounded by -D and a subprocess timeout).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certgen import CA
from ci_policy import needs
from h2raw import REFUSED_STREAM, RawH2, request_fields
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame
from proxyctl import Proxy, ProxyConfig, Upstream, free_port, stop_proxies, wait_until
from reloadctl import hup, wait_generation

from proxy.core.h2_drain import PING_DATA

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(120)]

MAX_ID = 2**31 - 1
PIECE = 30_000  # request body bytes sent before, then after, the reload (< one window)


@pytest.fixture
def make_proxy(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def make(workers: int = 1, drain_timeout: float = 300) -> Proxy:
        cfg = ProxyConfig(
            upstream=upstream.address,
            workers=workers,
            listen_extra={"h2c": True},
            workers_extra={"drain_timeout": drain_timeout},
        )
        p = Proxy(cfg, tmp_path)
        started.append(p)
        return p

    yield make
    stop_proxies(started)


def generation(p: Proxy) -> int:
    return int(p.status()["master"]["generation"])


def goaways(c: RawH2) -> list[GoAwayFrame]:
    return [f for f in c.frames if isinstance(f, GoAwayFrame)]


def our_ping(c: RawH2) -> PingFrame | None:
    """The drain's PING (not the adaptive window's, which also goes out while a body is
    received: proxy.worker.h2window)."""
    for f in c.frames:
        if isinstance(f, PingFrame) and "ACK" not in f.flags and f.opaque_data == PING_DATA:
            return f
    return None


def body_of(c: RawH2, sid: int) -> bytes:
    return b"".join(f.data for f in c.frames if isinstance(f, DataFrame) and f.stream_id == sid)


def data_frames(c: RawH2, sid: int, payload: bytes, end_stream: bool = False) -> bytes:
    """`payload` as DATA frames of at most 16384 bytes (SETTINGS_MAX_FRAME_SIZE)."""
    n = len(payload)
    out = [c.data(sid, payload[i : i + 16384]) for i in range(0, n - 16384, 16384)]
    return b"".join(out) + c.data(sid, payload[len(out) * 16384 :], end_stream=end_stream)


def ack(ping: PingFrame) -> bytes:
    f = PingFrame(0)
    f.flags.add("ACK")
    f.opaque_data = ping.opaque_data
    return f.serialize()


def test_two_step_goaway_serves_streams_until_the_ack_and_finishes_open_ones(
    make_proxy: Callable[..., Proxy],
) -> None:
    """A request body half sent when SIGHUP comes: GOAWAY(2^31-1) and a PING first; a
    stream opened then is served; after our ACK the final GOAWAY names that stream; a
    stream opened after it is refused; the first stream's body ends and arrives whole;
    then the old worker closes the connection."""
    p = make_proxy(1)
    gen0 = generation(p)
    body = hashlib.sha256(b"seed").digest() * (2 * PIECE // 32)
    with RawH2(p.cfg.port, timeout=20) as c:
        c.send(c.headers(1, request_fields("/echo", method="POST"), end_stream=False))
        c.send(data_frames(c, 1, body[:PIECE]))
        c.send(c.headers(3, request_fields("/echo")))
        assert c.stream_end(3) == (200, None), c.frames  # the connection works; 1 is open

        hup(p)
        c.read_until(lambda: bool(goaways(c)) and our_ping(c) is not None, timeout=30)
        first = goaways(c)[0]
        assert (first.last_stream_id, first.error_code) == (MAX_ID, 0)
        ping = our_ping(c)
        assert ping is not None
        assert c.frames.index(first) < c.frames.index(ping)  # GOAWAY, then the PING

        c.send(c.headers(5, request_fields("/echo")))  # between the two GOAWAYs: served
        assert c.stream_end(5) == (200, None)
        c.send(ack(ping))
        c.read_until(lambda: len(goaways(c)) >= 2)
        final = goaways(c)[1]
        assert (final.last_stream_id, final.error_code) == (5, 0)

        c.send(c.headers(7, request_fields("/echo")))  # after the final GOAWAY: refused
        assert c.stream_end(7) == (None, REFUSED_STREAM)

        c.send(data_frames(c, 1, body[PIECE:], end_stream=True))
        status, code = c.stream_end(1)
        assert (status, code) == (200, None)
        got = json.loads(body_of(c, 1))
        assert got["body_len"] == len(body)
        assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
        c.read_until(lambda: c.closed, timeout=10)
        assert c.closed  # the old worker ended the connection once its streams were done
        assert len(goaways(c)) == 2  # no third GOAWAY (and none that raised the id)
    assert generation(p) == gen0 + 1


def test_a_client_that_never_acks_still_gets_the_final_goaway(
    make_proxy: Callable[..., Proxy],
) -> None:
    """No ACK for the drain's PING: the final GOAWAY comes anyway (after a bounded
    wait), naming the last stream the client had opened; the idle connection closes."""
    p = make_proxy(1)
    with RawH2(p.cfg.port, timeout=20) as c:
        c.send(c.headers(1, request_fields("/echo")))
        assert c.stream_end(1)[0] == 200
        hup(p)
        c.read_until(lambda: len(goaways(c)) >= 2 or c.closed, timeout=30)
        ids = [g.last_stream_id for g in goaways(c)]
        assert ids == [MAX_ID, 1]
        c.read_until(lambda: c.closed, timeout=10)
        assert c.closed


def test_over_tls_the_same_two_goaways(tmp_path: Path, upstream: Upstream) -> None:
    """HTTP/2 over TLS (ALPN h2) drains the same way: GOAWAY(2^31-1) and the PING, our
    ACK, the final GOAWAY naming the last stream, then the close."""
    ca = CA.new()
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.issue(("hello.test",)).write(certs / "hello.pem")
    cfg = ProxyConfig(
        upstream=upstream.address,
        workers=1,
        https_port=free_port(),
        tls={"certs_dir": str(certs), "default_host": "hello.test"},
    )
    p = Proxy(cfg, tmp_path)
    try:
        assert cfg.https_port is not None
        tls = ssl.create_default_context(cadata=ca.pem().decode())
        with RawH2(cfg.https_port, ctx=tls, timeout=20) as c:
            c.send(c.headers(1, request_fields("/echo")))
            assert c.stream_end(1)[0] == 200
            hup(p)
            c.read_until(lambda: our_ping(c) is not None, timeout=30)
            ping = our_ping(c)
            assert ping is not None
            c.send(ack(ping))
            c.read_until(lambda: c.closed, timeout=10)
            assert [(g.last_stream_id, g.error_code) for g in goaways(c)] == [(MAX_ID, 0), (1, 0)]
    finally:
        stop_proxies([p])


def test_a_stream_still_open_at_drain_timeout_gets_goaway_and_the_close(
    make_proxy: Callable[..., Proxy], upstream: Upstream
) -> None:
    """A response that never comes (the instance holds it) past drain_timeout (2 s): after
    the two GOAWAYs (no ACK sent: the final one after the bounded wait), one more GOAWAY
    (NO_ERROR, the same last stream), then the connection closes."""
    p = make_proxy(1, drain_timeout=2)
    tag = f"drain-timeout-{time.monotonic_ns()}"  # a released tag stays released
    try:
        with RawH2(p.cfg.port, timeout=20) as c:
            c.send(c.headers(1, request_fields(f"/hold?tag={tag}")))
            assert wait_until(lambda: upstream.stats()["tags"].get(tag, {}).get("held"), 10)
            hup(p)
            c.read_until(lambda: c.closed, timeout=30)
            assert [(g.last_stream_id, g.error_code) for g in goaways(c)] == [
                (MAX_ID, 0),
                (1, 0),
                (1, 0),
            ]
            assert c.find(DataFrame, 1) is None  # the stream was cut, not answered
    finally:
        upstream.release(tag)


_H2LOAD = shutil.which("h2load")
_REQ_RE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
    r" (\d+) errored, (\d+) timeout"
)
_STATUS_RE = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
CLIENTS, STREAMS, RUN_N, TOTAL_S = 4, 4, 2000, 10.0
RELOADS_AT = (2.5, 5.0, 7.5)


def h2load_run(port: int) -> tuple[int, int, int, int, int]:
    """One h2load run of RUN_N requests (h2c; bounded by a subprocess timeout): (started,
    succeeded, failed, timeouts, non-2xx)."""
    argv = [
        str(_H2LOAD), "-c", str(CLIENTS), "-m", str(STREAMS), "-n", str(RUN_N),
        "-H", ":authority: hello.test", f"http://127.0.0.1:{port}/echo",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    out = done.stdout
    m = _REQ_RE.search(out)
    s = _STATUS_RE.search(out)
    assert m is not None and s is not None, out
    _total, started, _done, ok, failed, _errored, timeouts = map(int, m.groups())
    non2xx = sum(map(int, s.groups()[1:]))
    return started, ok, failed, timeouts, non2xx


@pytest.mark.slow
@needs(_H2LOAD is not None, "h2load (Debian's nghttp2-client) is not installed")
def test_h2load_across_three_sighup_reloads_fails_no_stream_that_reached_the_proxy(
    make_proxy: Callable[..., Proxy],
) -> None:
    """Back-to-back h2load runs (-n 2000 -c 4 -m 4, h2c) for 10 s across three SIGHUPs,
    each reload meeting live connections: every stream that reached the proxy succeeded
    with a 2xx (h2load's successes = the proxy's streams = its 2xx answers), none timed
    out. h2load counts as failed what it did not send after our first GOAWAY (RFC 9113
    6.8: no new stream after a GOAWAY; nghttp2 refuses them, h2load 1.52 does not
    reconnect over HTTP/2): none of those reached the proxy."""
    p = make_proxy(2)
    gen0 = generation(p)
    streams = 'edgeproxy_http2_events_total{event="stream"}'
    drains = 'edgeproxy_http2_events_total{event="drain_goaway"}'
    answered = 'edgeproxy_requests_total{app="hello",class="2xx"}'
    seen0, drained0, answered0 = p.metric(streams), p.metric(drains), p.metric(answered)
    reloaded: list[int] = []
    errors: list[BaseException] = []

    def reload_thrice() -> None:
        try:
            for i, at in enumerate(RELOADS_AT, 1):
                time.sleep(max(0.0, start + at - time.monotonic()))
                hup(p)
                reloaded.append(wait_generation(p, gen0 + i, timeout=15)["master"]["generation"])
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    start = time.monotonic()
    t = threading.Thread(target=reload_thrice, daemon=True)
    t.start()
    runs = []
    while time.monotonic() - start < TOTAL_S:
        runs.append(h2load_run(p.cfg.port))
    t.join(timeout=30)
    assert not errors and reloaded == [gen0 + 1, gen0 + 2, gen0 + 3], (errors, reloaded)
    started, ok, failed, timeouts, non2xx = (sum(r[i] for r in runs) for i in range(5))
    print(f"{len(runs)} h2load runs: {started} started, {ok} succeeded, {failed} not sent")
    assert timeouts == 0 and non2xx == 0, runs
    assert ok >= 1000, runs
    assert p.wait_metric(streams, seen0 + ok) - seen0 == ok, runs  # all it got succeeded
    assert p.metric(answered) - answered0 == ok, runs
    for refused in ("drain_refused", "refused_stream"):  # none turned away either
        assert p.metric(f'edgeproxy_http2_events_total{{event="{refused}"}}') == 0
    assert p.metric(drains) - drained0 >= len(RELOADS_AT), "reloads met no live connection"
