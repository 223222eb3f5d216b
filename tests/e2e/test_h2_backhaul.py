"""HTTP/2 streams for an instance on another node: the stream goes through the same
exchange, which crosses the existing HTTP/1.1 backhaul (plaintext here, `[backhaul]
insecure`), the body held until the far node admits the request (100 Continue), as an
HTTP/1.1 request's would. Two real proxies on 127.0.0.2 and 127.0.0.3, a real instance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from backhaul_nodes import BackhaulNode
from h2client import H2Client
from proxyctl import Proxy, Upstream, stop_proxies

pytestmark = pytest.mark.request_path


class H2cNode(BackhaulNode):
    """A node whose plaintext listener also takes HTTP/2 with prior knowledge."""

    def render(self) -> str:
        return super().render().replace("[listen]\n", "[listen]\nh2c = true\n", 1)


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[tuple[Proxy, Proxy]]:
    """n3 runs the instance; n2 (h2c) only knows it as n3's."""
    work: Path = tmp_path_factory.mktemp("h2bh")
    started: list[Proxy] = []
    try:
        n3_cfg = BackhaulNode(
            "n3",
            "127.0.0.3",
            {"insecure": True},
            instances=[{"id": "hello-n3", "address": upstream.address}],
        )
        n3 = Proxy(n3_cfg, work)  # type: ignore[arg-type]
        started.append(n3)
        n2_cfg = H2cNode(
            "n2",
            "127.0.0.2",
            {"insecure": True},
            instances=[{"id": "hello-n3", "address": upstream.address, "node": "n3"}],
            peers=[{"id": "n3", "backhaul": n3_cfg.backhaul_address, "ping": "127.0.0.3:9"}],
            listen_backhaul=False,
        )
        n2 = Proxy(n2_cfg, work)  # type: ignore[arg-type]
        started.append(n2)
        yield n2, n3
    finally:
        stop_proxies(started)


def test_streams_cross_the_http11_backhaul(edge: tuple[Proxy, Proxy]) -> None:
    """A GET and a 200 KB POST without content-length, as streams on one connection to
    n2, reach the instance through n3 (which counts them), bodies whole."""
    n2, n3 = edge
    ok = 'edgeproxy_requests_total{app="hello",class="2xx"}'
    before = n3.metric(ok)
    body = b"b" * 200_000
    with H2Client(n2.cfg.port, None) as c:  # type: ignore[attr-defined]
        get = c.start("/echo?via=backhaul")
        post = c.start("/echo", method="POST", body=body)
        g = c.wait(get)
        p = c.wait(post)
    assert g.status == 200 and json.loads(g.body)["target"] == "/echo?via=backhaul"
    assert p.status == 200
    echo = json.loads(p.body)
    assert echo["body_len"] == len(body)
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["x-forwarded-proto"] == "http"
    assert "x-edgeproxy-instance" not in headers  # the backhaul's own field stops at n3
    assert n3.wait_metric(ok, before + 2) >= before + 2
