"""/metrics of a real proxy with more apps than [metrics] max_apps: the config's first
apps keep their own series, the requests of all the others are summed under
app="_other", and no app label outside those (plus "_none") appears anywhere."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from exposition import get, label_values, samples
from proxyctl import Proxy, Upstream

pytestmark = pytest.mark.request_path

EXTRA = [f"app{i}" for i in range(1, 6)]


@pytest.mark.timeout(60)
def test_apps_past_max_apps_share_other(
    proxy_factory: Callable[..., Proxy], upstream: Upstream
) -> None:
    """With six apps and max_apps = 2, requests to hello and app1 count under their names,
    those to app3 and app5 under _other (3 of them), in the request counts and the body
    histograms of both workers summed; an unknown host counts under _none."""
    p = proxy_factory(
        workers=2,
        metrics={"max_apps": 2},
        extra_apps=[
            {"name": a, "hosts": [f"{a}.test"], "soft_limit": 20, "hard_limit": 25} for a in EXTRA
        ],
        extra_instances=[{"app": a, "id": f"{a}-1", "address": upstream.address} for a in EXTRA],
    )
    for host in ("hello.test", "app1.test", "app3.test", "app3.test", "app5.test"):
        assert p.get("/", host=host).status == 200
    assert p.get("/", host="nobody.test").status == 404
    p.wait_metric('edgeproxy_requests_total{app="_other",class="2xx"}', 3)
    s = samples(p.metrics())
    for name in (
        "edgeproxy_requests_total",
        "edgeproxy_request_body_seconds_bucket",
        "edgeproxy_response_body_seconds_count",
    ):
        assert label_values(s, name, "app") == {"hello", "app1", "_other", "_none"}, name
    assert get(s, "edgeproxy_requests_total", app="hello", **{"class": "2xx"}) == 1
    assert get(s, "edgeproxy_requests_total", app="app1", **{"class": "2xx"}) == 1
    assert get(s, "edgeproxy_requests_total", app="_other", **{"class": "2xx"}) == 3
    assert get(s, "edgeproxy_requests_total", app="_none", **{"class": "4xx"}) == 1
    assert get(s, "edgeproxy_response_body_seconds_count", app="_other") == 3
    labels = {k for _, ls in s for k, _ in ls}
    assert not labels & {"instance", "path", "client", "host", "node"}, labels
