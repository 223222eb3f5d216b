"""The HTTP/2 backhaul, end to end: real proxies as nodes (plaintext backhaul, `[backhaul]
insecure`; the edge n2 takes h2c), a real instance behind each far node (the same
upstream process), real HTTP/2 and HTTP/1.1 clients. A stream for a remote instance
crosses as a stream of a multiplexed HTTP/2 connection (the far node counts HTTP/2
streams), an HTTP/1.1 request as HTTP/1.1; "full" is retried elsewhere; a peer killed
with streams open fails what reached its instance and retries the rest as the rules say.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backhaul_nodes import BackhaulNode, wait_for
from h2client import H2Client
from proxyctl import Proxy, Upstream, _proc_net_tcp, stop_proxies

pytestmark = [pytest.mark.timeout(120), pytest.mark.request_path]

STREAMS = 'edgeproxy_http2_events_total{event="stream"}'
OK = 'edgeproxy_requests_total{app="hello",class="2xx"}'


class H2cNode(BackhaulNode):
    """A node whose plaintext listener also takes HTTP/2 with prior knowledge."""

    def render(self) -> str:
        return super().render().replace("[listen]\n", "[listen]\nh2c = true\n", 1)


class LimitedNode(BackhaulNode):
    """A node whose app admits two requests at a time (hard_limit 2)."""

    def render(self) -> str:
        app = '[[app]]\nname = "hello"\n'
        return super().render().replace(app, app + "soft_limit = 2\nhard_limit = 2\n", 1)


@dataclass
class Fleet:
    edge: Proxy
    near: Proxy  # RTT 5 ms: chosen first
    near_cfg: BackhaulNode
    far: Proxy  # RTT 40 ms: where retries go
    far_cfg: BackhaulNode


def start_fleet(work: Path, upstream: Upstream, near_cls: type[BackhaulNode]) -> Fleet:
    started: list[Proxy] = []
    try:
        near_cfg = near_cls(
            "n3",
            "127.0.0.3",
            {"insecure": True},
            instances=[{"id": "hello-n3", "address": upstream.address}],
        )
        started.append(Proxy(near_cfg, work))  # type: ignore[arg-type]
        far_cfg = BackhaulNode(
            "n4",
            "127.0.0.4",
            {"insecure": True},
            instances=[{"id": "hello-n4", "address": upstream.address}],
        )
        started.append(Proxy(far_cfg, work))  # type: ignore[arg-type]
        edge_cfg = H2cNode(
            "n2",
            "127.0.0.2",
            {"insecure": True},
            instances=[
                {"id": "hello-n3", "address": upstream.address, "node": "n3"},
                {"id": "hello-n4", "address": upstream.address, "node": "n4"},
            ],
            peers=[
                {
                    "id": "n3",
                    "backhaul": near_cfg.backhaul_address,
                    "ping": "127.0.0.3:9",
                    "rtt_ms": 5,
                },
                {
                    "id": "n4",
                    "backhaul": far_cfg.backhaul_address,
                    "ping": "127.0.0.4:9",
                    "rtt_ms": 40,
                },
            ],
            listen_backhaul=False,
        )
        started.append(Proxy(edge_cfg, work))  # type: ignore[arg-type]
    except BaseException:
        stop_proxies(started)
        raise
    return Fleet(started[2], started[0], near_cfg, started[1], far_cfg)


def stop_fleet(f: Fleet) -> None:
    stop_proxies([f.edge, f.near, f.far])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Fleet]:
    """n2 (edge, h2c) reaches hello on n3 (near, hard_limit 2) and n4 (far)."""
    f = start_fleet(tmp_path_factory.mktemp("h2bh"), upstream, LimitedNode)
    yield f
    stop_fleet(f)


def client(f: Fleet) -> H2Client:
    return H2Client(f.edge.cfg.port, None)  # type: ignore[attr-defined]


def connections_to(cfg: BackhaulNode) -> int:
    """Established TCP connections to `cfg`'s backhaul (counted at the connecting end)."""
    return sum(
        1 for _, remote, st, _ in _proc_net_tcp() if remote == cfg.backhaul_address and st == "01"
    )


def test_streams_cross_as_http2(fleet: Fleet) -> None:
    """A GET and a 200 KB POST without content-length, as streams to n2, reach the
    instance through n3 as HTTP/2 streams (n3 counts them), bodies whole, the forwarding
    fields as the edge set them, the backhaul's own field stopped at n3."""
    before = fleet.near.metric(STREAMS)
    body = b"b" * 200_000
    with client(fleet) as c:
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
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-edgeproxy-instance" not in headers
    assert "x-edgeproxy-load" not in {k.decode() for k, _ in g.headers}  # stops at n2
    assert fleet.near.wait_metric(STREAMS, before + 2) == before + 2


def test_an_http11_request_still_crosses_as_http11(fleet: Fleet) -> None:
    """An HTTP/1.1 request to n2 for the same app crosses to n3 as HTTP/1.1: answered,
    and no HTTP/2 stream at either far node."""
    s3, s4 = fleet.near.metric(STREAMS), fleet.far.metric(STREAMS)
    ok = fleet.near.metric(OK) + fleet.far.metric(OK)
    r = fleet.edge.get("/echo?via=h1")
    assert r.status == 200 and json.loads(r.body)["version"] == "HTTP/1.1"
    wait_for("the far node's count", lambda: fleet.near.metric(OK) + fleet.far.metric(OK) > ok)
    assert (fleet.near.metric(STREAMS), fleet.far.metric(STREAMS)) == (s3, s4)


def test_many_concurrent_streams_share_one_connection(fleet: Fleet) -> None:
    """Twenty concurrent streams for n3's and n4's instances (n3 takes two at a time and
    rejects the rest, which go to n4) open at most one connection to each node (the
    HTTP/1.1 backhaul would open one per request in flight)."""
    before = (connections_to(fleet.near_cfg), connections_to(fleet.far_cfg))
    with client(fleet) as c:
        sids = [c.start(f"/echo?n={i}&delay=0.2") for i in range(20)]
        got = [c.wait(sid) for sid in sids]
    assert [r.status for r in got] == [200] * 20
    assert [json.loads(r.body)["target"] for r in got] == [
        f"/echo?n={i}&delay=0.2" for i in range(20)
    ]
    after = (connections_to(fleet.near_cfg), connections_to(fleet.far_cfg))
    # The edge's end of each (the far end's remote is the edge's ephemeral port).
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1, (before, after)


def test_a_full_instance_sends_the_stream_elsewhere(fleet: Fleet, upstream: Upstream) -> None:
    """n3's instance holds two requests (its hard limit): the next stream gets n3's
    "full" reject over HTTP/2 and is retried on n4, answered there."""
    rejected = 'edgeproxy_retries_total{reason="reject"}'
    r0, s4 = fleet.edge.metric(rejected), fleet.far.metric(STREAMS)
    with client(fleet) as c:
        held = [c.start(f"/hold?tag=full{i}") for i in range(2)]
        wait_for(
            "both held on n3",
            lambda: all(upstream.stats()["tags"].get(f"full{i}", {}).get("held") for i in range(2)),
        )
        r = c.request("/echo?third=1")
        assert r.status == 200, r
        for i in range(2):
            upstream.release(f"full{i}")
        assert [c.wait(s).status for s in held] == [200, 200]
    assert fleet.far.wait_metric(STREAMS, s4 + 1) >= s4 + 1
    assert fleet.edge.wait_metric(rejected, r0 + 1) >= r0 + 1


@pytest.fixture
def doomed(tmp_path: Path, upstream: Upstream) -> Iterator[Fleet]:
    """A fleet of its own whose near node n3 is killed by the test."""
    f = start_fleet(tmp_path, upstream, BackhaulNode)
    yield f
    stop_fleet(f)


def test_a_peer_killed_with_streams_open(doomed: Fleet, upstream: Upstream) -> None:
    """n3 is killed (SIGKILL, its whole process group) while two streams wait at its
    instance: the POST, which reached the instance and is not idempotent, fails (502),
    and is not sent again; the GET is retried on n4 (a connection lost before any response
    byte, an idempotent request) and answered there."""
    s4 = doomed.far.metric(STREAMS)
    with client(doomed) as c:
        post = c.start("/hold?tag=kpost", method="POST", body=b"p" * 1000)
        get = c.start("/hold?tag=kget")
        wait_for(
            "both held via n3",
            lambda: all(upstream.stats()["tags"].get(t, {}).get("held") for t in ("kpost", "kget")),
        )
        os.killpg(doomed.near.proc.pid, signal.SIGKILL)
        p = c.wait(post)
        assert p.status == 502 or p.reset is not None, p
        wait_for("the GET again, via n4", lambda: upstream.stats()["tags"]["kget"].get("held") == 2)
        upstream.release("kget")
        g = c.wait(get)
        assert g.status == 200, g
    upstream.release("kpost")
    assert upstream.stats()["tags"]["kpost"]["held"] == 1
    assert doomed.far.wait_metric(STREAMS, s4 + 1) >= s4 + 1


def test_a_stream_refused_by_a_draining_peer_is_sent_elsewhere(
    doomed: Fleet, upstream: Upstream
) -> None:
    """n3 reloads while a stream holds its old worker (and so the edge's HTTP/2
    connection to it): a POST the old worker refuses unprocessed (REFUSED_STREAM, RFC
    9113 8.7) is sent again, though not idempotent, and answered with its body whole;
    the held stream ends normally, answered by the old worker (the edge keeps reading
    its connection after the drain's GOAWAYs), not sent again."""
    with client(doomed) as c:
        held = c.start("/hold?tag=drain")
        wait_for("held via n3", lambda: upstream.stats()["tags"].get("drain", {}).get("held"))
        r = doomed.near.cli("reload")
        assert r.returncode == 0, r.stderr
        post = c.request("/echo?after=reload", method="POST", body=b"q" * 5000)
        assert post.status == 200, post
        assert json.loads(post.body)["body_len"] == 5000
        upstream.release("drain")
        assert c.wait(held).status == 200
    # Served where it was held, through both GOAWAYs of n3's drain: not sent again.
    assert upstream.stats()["tags"]["drain"]["held"] == 1
