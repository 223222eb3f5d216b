"""Request and response body durations, first to last byte, per app in /metrics (a real
proxy, a real upstream): only requests with a body count in the request-body histogram,
every relayed response in the response-body one, under its own app."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from proxyctl import Client, Proxy, metric_value

pytestmark = pytest.mark.request_path

SHOP = {"name": "shop", "hosts": ["shop.test"], "soft_limit": 5, "hard_limit": 10}


@pytest.mark.timeout(60)
def test_body_durations_per_app(proxy_factory: Callable[..., Proxy]) -> None:
    """A body whose second half the client holds back 0.3 s, and a response the instance
    trickles over 0.4 s: both histograms count them under app "hello" with at least the
    time the peer caused (a lower bound, not a timing of the proxy); a bodiless GET adds
    a response only; the other app's series stay at zero."""
    p = proxy_factory(workers=1, extra_apps=[SHOP])
    with Client(p.port) as c:
        c.send(b"POST /up HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 10\r\n\r\nfirst")
        time.sleep(0.3)  # the stimulus: the body's last byte comes 0.3 s after its first
        c.send(b"-last")
        assert c.response().status == 200
        c.send(b"GET /trickle?interval=0.1&count=4 HTTP/1.1\r\nHost: hello.test\r\n\r\n")
        trickled = c.response()
        assert trickled.status == 200 and trickled.body.count(b"tick") == 4
        c.send(b"GET / HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
        assert c.response().status == 200
    resp = 'edgeproxy_response_body_seconds_count{app="hello"}'
    assert p.wait_metric(resp, 3) == 3
    text = p.metrics()

    def v(series: str) -> float:
        return metric_value(text, series)

    assert v('edgeproxy_request_body_seconds_count{app="hello"}') == 1
    # At least what the client caused, less the loop clock's rounding (uvloop: 1 ms ticks).
    assert v('edgeproxy_request_body_seconds_sum{app="hello"}') >= 0.25
    assert v('edgeproxy_request_body_seconds_bucket{app="hello",le="0.1"}') == 0
    assert v('edgeproxy_response_body_seconds_sum{app="hello"}') >= 0.35
    assert v('edgeproxy_response_body_seconds_bucket{app="hello",le="+Inf"}') == 3
    assert 'edgeproxy_request_body_seconds_count{app="shop"} 0' in text
    assert 'edgeproxy_response_body_seconds_count{app="shop"} 0' in text
