"""HTTP/2 streams through the same exchange as HTTP/1.1, end to end over h2c (a real
proxy, one worker, a real upstream): admission per stream against an app's hard limit,
one stream's failure leaving the others alone, a client's reset stopping the upstream
work, and the request deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from h2client import H2Client
from h2raw import RawH2, request_fields
from proxyctl import Proxy, ProxyConfig, Upstream, stop_proxies

pytestmark = pytest.mark.request_path


@pytest.fixture(scope="module")
def px(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """One worker (so in-flight counts are one process's), h2c, a 2 s request deadline,
    and an app "tiny" of two instances that each take one request at a time."""
    cfg = ProxyConfig(
        upstream=upstream.address,
        workers=1,
        listen_extra={"h2c": True},
        timeouts={"request": 2.0, "abandoned": 0.5},
        http2={"stall_timeout": 30.0},
        extra_apps=[{"name": "tiny", "hosts": ["tiny.test"], "soft_limit": 1, "hard_limit": 1}],
        extra_instances=[
            {"app": "tiny", "id": "tiny-1", "address": upstream.address},
            {"app": "tiny", "id": "tiny-2", "address": upstream.address},
        ],
    )
    p = Proxy(cfg, tmp_path_factory.mktemp("h2x"))
    yield p
    stop_proxies([p])


def held(upstream: Upstream, tag: str) -> int:
    return int(upstream.stats()["tags"].get(tag, {}).get("held", 0))


def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_admission_per_stream(px: Proxy, upstream: Upstream) -> None:
    """Two streams on one connection take tiny's two instances (the second goes to the
    instance that is not full); a third is answered 503 + Retry-After at once."""
    with H2Client(px.cfg.port, None) as c:
        a = c.start("/hold?tag=h2-adm&max=10", authority="tiny.test")
        b = c.start("/hold?tag=h2-adm&max=10", authority="tiny.test")
        wait_for(lambda: held(upstream, "h2-adm") == 2)
        r = c.request("/echo", authority="tiny.test")
        assert r.status == 503 and r.header(b"retry-after") == b"1"
        upstream.release("h2-adm")
        assert c.wait(a).status == 200 and c.wait(b).status == 200


def test_a_failed_stream_leaves_the_others_alone(px: Proxy) -> None:
    """An instance answering garbage fails its stream with 502; a stream beside it on
    the same connection is answered."""
    with H2Client(px.cfg.port, None) as c:
        bad = c.start("/garbage?hold=0")
        good = c.start("/echo?beside=1")
        assert c.wait(bad).status == 502
        r = c.wait(good)
        assert r.status == 200 and b"beside=1" in r.body


def test_client_reset_stops_the_upstream_work(px: Proxy, upstream: Upstream) -> None:
    """RST_STREAM from the client for a request the instance is working on: the proxy
    lets go of the instance's connection (after the short [timeouts] abandoned grace)."""
    with RawH2(px.cfg.port) as c:
        c.send(c.headers(1, request_fields("/hang?tag=h2-rst&hold=30")))
        wait_for(lambda: upstream.stats()["tags"].get("h2-rst", {}).get("hung") is True)
        c.send(c.rst(1))
        wait_for(lambda: upstream.stats()["tags"]["h2-rst"].get("closed") is True)
        c.send(c.headers(3, request_fields("/echo")))
        assert c.stream_end(3)[0] == 200


def test_request_deadline_is_504_on_the_stream(px: Proxy) -> None:
    """[timeouts] request passes with no answer: that stream gets 504, the connection lives."""
    with H2Client(px.cfg.port, None) as c:
        r = c.request("/hang?hold=10")
        assert r.status == 504
        assert c.request("/echo").status == 200
