"""The backhaul listener speaks HTTP/2 too: ALPN h2 (mutual TLS) or, `[backhaul]
insecure`, the prior-knowledge preface; its streams are a peer's requests with the
same trust and answers as over HTTP/1.1 (X-Edgeproxy-Instance honoured, the edge's
forwarding fields kept, the load reported, "full" rejected). Real proxies on 127.0.0.3
and 127.0.0.4, a real HTTP/2 client (the h2 library) as the peer node n2, from
127.0.0.2 with n2's certificate, and a real instance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backhaul_nodes import BackhaulNode, client_context, talk, wait_for
from fleet_certs import FleetCerts
from h2client import H2Client
from proxyctl import Proxy, Upstream, stop_proxies

pytestmark = [pytest.mark.timeout(120), pytest.mark.request_path]

PEER_FIELDS = [
    (b"x-edgeproxy-instance", b"hello-n3"),
    (b"x-forwarded-for", b"198.51.100.7"),
    (b"x-forwarded-proto", b"https"),
]
STREAMS = 'edgeproxy_http2_events_total{event="stream"}'


class LimitedNode(BackhaulNode):
    """A node whose app admits one request at a time (hard_limit 1)."""

    def render(self) -> str:
        app = '[[app]]\nname = "hello"\n'
        return super().render().replace(app, app + "soft_limit = 1\nhard_limit = 1\n", 1)


class H2cNode(BackhaulNode):
    """A node whose plaintext listener also takes HTTP/2 with prior knowledge."""

    def render(self) -> str:
        return super().render().replace("[listen]\n", "[listen]\nh2c = true\n", 1)


@dataclass
class Nodes:
    n3: Proxy
    n3_cfg: BackhaulNode
    n4: Proxy
    n4_cfg: BackhaulNode
    n2_cert: tuple[str, str]
    n2: Proxy  # an edge (h2c) with n2's certificate, n3 its peer


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Nodes]:
    """n3: mutual TLS backhaul; n4: plaintext ([backhaul] insecure); both run hello."""
    work: Path = tmp_path_factory.mktemp("h2bl")
    certs = FleetCerts(work)
    n2 = certs.backhaul_keys("n2")
    inst = [{"id": "hello-n3", "address": upstream.address}]
    started: list[Proxy] = []
    try:
        n3_cfg = LimitedNode("n3", "127.0.0.3", certs.backhaul_keys("n3"), instances=inst)
        started.append(Proxy(n3_cfg, work))  # type: ignore[arg-type]
        n4_cfg = BackhaulNode("n4", "127.0.0.4", {"insecure": True}, instances=inst)
        started.append(Proxy(n4_cfg, work))  # type: ignore[arg-type]
        n2_cfg = H2cNode(
            "n2",
            "127.0.0.2",
            n2,
            instances=[{"id": "hello-n3", "address": upstream.address, "node": "n3"}],
            peers=[{"id": "n3", "backhaul": n3_cfg.backhaul_address, "ping": "127.0.0.3:9"}],
            listen_backhaul=False,
        )
        started.append(Proxy(n2_cfg, work))  # type: ignore[arg-type]
        yield Nodes(started[0], n3_cfg, started[1], n4_cfg, (n2["cert"], n2["key"]), started[2])
    finally:
        stop_proxies(started)


def peer(nodes: Nodes) -> H2Client:
    """n2 as an HTTP/2 peer of n3: its certificate, from its own address, ALPN h2."""
    ctx = client_context(*nodes.n2_cert)
    return H2Client(nodes.n3_cfg.backhaul_port, ctx, sni=None, host="127.0.0.3", source="127.0.0.2")


def header(fields: list[list[str]], name: str) -> str | None:
    """The value of field `name` in what the instance echoed."""
    for k, v in fields:
        if k.lower() == name:
            return v
    return None


def test_a_peer_that_chooses_h2_is_served_as_a_backhaul(nodes: Nodes) -> None:
    """ALPN h2 on the mutual TLS listener: the stream names its instance, the edge's
    forwarding fields reach the instance as they came, X-Edgeproxy-Instance stops at n3,
    and the answer reports the instance's load (X-Edgeproxy-Load)."""
    before = nodes.n3.metric(STREAMS)
    with peer(nodes) as c:
        assert c.alpn == "h2"
        r = c.request("/echo?via=h2", headers=PEER_FIELDS)
    assert r.status == 200, r
    assert r.header(b"x-edgeproxy-load") == b"0"
    echo = json.loads(r.body)
    assert echo["target"] == "/echo?via=h2"
    assert header(echo["headers"], "x-forwarded-for") == "198.51.100.7"
    assert header(echo["headers"], "x-forwarded-proto") == "https"
    assert header(echo["headers"], "x-edgeproxy-instance") is None
    assert nodes.n3.wait_metric(STREAMS, before + 1) >= before + 1


def test_a_full_instance_rejects_an_h2_stream_as_it_would_http11(
    nodes: Nodes, upstream: Upstream
) -> None:
    """With its one slot taken, a second stream gets the "full" reject (503,
    X-Edgeproxy-Reject: full, the load, Retry-After) that an edge retries elsewhere; once
    the slot frees, the next stream is admitted."""
    with peer(nodes) as c:
        held = c.start("/hold?tag=h2bl", headers=PEER_FIELDS)
        wait_for("the held request", lambda: upstream.stats()["tags"].get("h2bl", {}).get("held"))
        r = c.request("/echo", headers=PEER_FIELDS)
        assert r.status == 503, r
        assert r.header(b"x-edgeproxy-reject") == b"full"
        assert r.header(b"x-edgeproxy-load") == b"1"
        assert r.header(b"retry-after") == b"1"
        upstream.release("h2bl")
        assert c.wait(held).status == 200
        assert c.request("/echo", headers=PEER_FIELDS).status == 200


def test_a_peer_offering_http11_is_still_served_http11(nodes: Nodes) -> None:
    """A peer whose ALPN offers only http/1.1 (or nothing: the existing backhaul tests)
    gets HTTP/1.1 from the same listener."""
    ctx = client_context(*nodes.n2_cert)
    ctx.set_alpn_protocols(["http/1.1"])
    req = (
        b"GET /echo HTTP/1.1\r\nHost: hello.test\r\nX-Edgeproxy-Instance: hello-n3\r\n"
        b"Connection: close\r\n\r\n"
    )
    got = talk("127.0.0.2", "127.0.0.3", nodes.n3_cfg.backhaul_port, ctx, req)
    assert got.data.startswith(b"HTTP/1.1 200"), got
    assert b"X-Edgeproxy-Load: " in got.data


def test_a_plaintext_backhaul_takes_h2_with_prior_knowledge(nodes: Nodes) -> None:
    """[backhaul] insecure: a connection opening with the HTTP/2 preface is served as a
    peer's HTTP/2 (its instance named), one opening with HTTP/1.1 as before."""
    port = nodes.n4_cfg.backhaul_port
    with H2Client(port, None, sni=None, host="127.0.0.4", source="127.0.0.2") as c:
        r = c.request("/echo", headers=PEER_FIELDS)
    assert r.status == 200, r
    assert header(json.loads(r.body)["headers"], "x-forwarded-for") == "198.51.100.7"
    req = b"GET /echo HTTP/1.1\r\nHost: hello.test\r\nX-Edgeproxy-Instance: hello-n3\r\n\r\n"
    got = talk("127.0.0.2", "127.0.0.4", port, None, req, timeout=2.0)
    assert got.data.startswith(b"HTTP/1.1 200"), got


def test_an_edge_crosses_to_its_peer_over_mutual_tls_h2(nodes: Nodes) -> None:
    """A stream to the edge n2 for n3's instance crosses n2 -> n3 as HTTP/2 over mutual
    TLS (ALPN h2: n3 counts the stream)."""
    before = nodes.n3.metric(STREAMS)
    with H2Client(nodes.n2.cfg.port, None) as c:  # type: ignore[attr-defined]
        r = c.request("/echo?via=mtls-h2")
    assert r.status == 200, r
    assert json.loads(r.body)["target"] == "/echo?via=mtls-h2"
    assert nodes.n3.wait_metric(STREAMS, before + 1) >= before + 1
