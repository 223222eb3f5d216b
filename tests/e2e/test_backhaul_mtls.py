"""The backhaul's mutual TLS over real sockets: what is refused at the handshake, both ways.

Node n3 (127.0.0.3) runs an instance behind a TLS backhaul listener; node n2 (an edge,
no listener) reaches n3 and five pretenders (a certificate of another node, of another
CA, an expired one, a plaintext server, one that never answers). Hostile clients speak
to n3's backhaul from their own 127.0.0.x source, so each one's log line is its own.
Nothing reaches an instance in any refused case, and both proxies keep serving.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backhaul_nodes import (
    NODE_URI,
    BackhaulNode,
    FakePeer,
    client_context,
    connect_from,
    fleet_signer,
    talk,
    wait_for,
    write_leaf,
)
from certgen import CA
from cryptography import x509
from fleet_certs import FleetCerts
from proxyctl import Client, Proxy, stop_proxies
from routing_fleet import Instance

pytestmark = [pytest.mark.timeout(120), pytest.mark.request_path]

REQUEST = (
    b"GET /whoami HTTP/1.1\r\nHost: hello.test\r\nX-Edgeproxy-Instance: hello-n3\r\n"
    b"Connection: close\r\n\r\n"
)


@dataclass
class Fleet:
    work: Path
    certs: FleetCerts
    instance: Instance
    n3: Proxy
    n3_cfg: BackhaulNode
    n2: Proxy
    fakes: dict[str, FakePeer]
    creds: dict[str, tuple[str, str]]  # hostile clients' certificate and key files

    def requests_at_n3(self) -> int:
        return int(self.instance.stats()["requests"])

    def n3_talk(self, src: str, cred: str | None, send: bytes = REQUEST, **kw: object) -> object:
        ctx = (
            None
            if cred == "plaintext"
            else client_context(*self.creds[cred] if cred else (None, None))
        )
        return talk(src, "127.0.0.3", self.n3_cfg.backhaul_port, ctx, send, **kw)  # type: ignore[arg-type]


def _refused(p: Proxy, side: str, reason: str) -> str:
    return f'edgeproxy_backhaul_tls_refused_total{{side="{side}",reason="{reason}"}}'


def _handshakes(p: Proxy, side: str, kind: str) -> float:
    return p.metric(f'edgeproxy_backhaul_tls_handshakes_total{{side="{side}",kind="{kind}"}}')


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("mtls")
    certs = FleetCerts(work)
    signer = fleet_signer(certs.ca_dir)
    now = dt.datetime.now(dt.UTC)
    creds: dict[str, tuple[str, str]] = {
        "n2": (certs.backhaul_keys("n2")["cert"], certs.backhaul_keys("n2")["key"]),
    }
    other = CA.new("another fleet's CA")
    creds["other_ca"] = write_leaf(
        other.issue(uris=(NODE_URI + "n2",), client=True), work, "other-ca-n2"
    )
    creds["expired"] = write_leaf(
        signer.issue(
            uris=(NODE_URI + "n2",),
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
            client=True,
        ),
        work,
        "expired-n2",
    )
    creds["no_node"] = write_leaf(
        signer.issue(dns=("n2.example.test",), client=True), work, "no-node"
    )
    fakes = {
        "pwrong": FakePeer("127.0.0.5", "tls", *_pair(certs.backhaul_keys("n4"))),
        "pca": FakePeer(
            "127.0.0.6",
            "tls",
            *write_leaf(other.issue(uris=(NODE_URI + "pca",), server=True), work, "pca"),
        ),
        "pexp": FakePeer(
            "127.0.0.7",
            "tls",
            *write_leaf(
                signer.issue(
                    uris=(NODE_URI + "pexp",),
                    not_before=now - dt.timedelta(days=30),
                    not_after=now - dt.timedelta(days=1),
                    server=True,
                ),
                work,
                "pexp",
            ),
        ),
        "pplain": FakePeer("127.0.0.8", "plain"),
        "pstall": FakePeer("127.0.0.9", "stall"),
    }
    instance = Instance(3)
    started: list[Proxy] = []
    try:
        n3_cfg = BackhaulNode(
            "n3",
            "127.0.0.3",
            {**certs.backhaul_keys("n3"), "handshake_timeout": 1.0},
            instances=[{"id": "hello-n3", "address": instance.address}],
        )
        n3 = Proxy(n3_cfg, work)  # type: ignore[arg-type]
        started.append(n3)
        peers = [{"id": "n3", "backhaul": n3_cfg.backhaul_address, "ping": "127.0.0.3:9"}]
        remote = [{"id": "hello-n3", "address": "127.0.0.3:9", "node": "n3"}]
        for name, f in fakes.items():
            peers.append({"id": name, "backhaul": f.address, "ping": f"{f.ip}:9"})
            remote.append({"id": f"hello-{name}", "address": f"{f.ip}:9", "node": name})
        n2_cfg = BackhaulNode(
            "n2",
            "127.0.0.2",
            certs.backhaul_keys("n2"),
            instances=remote,
            peers=peers,
            listen_backhaul=False,
            extra={"timeouts": {"backhaul_connect": 1.0}, "pool": {"idle_timeout": 1.0}},
        )
        n2 = Proxy(n2_cfg, work)  # type: ignore[arg-type]
        started.append(n2)
        yield Fleet(work, certs, instance, n3, n3_cfg, n2, fakes, creds)
    finally:
        stop_proxies(started)
        instance.stop()
        for f in fakes.values():
            f.close()


def _pair(keys: dict[str, str]) -> tuple[str, str]:
    return keys["cert"], keys["key"]


# -- the listener (accept side) ------------------------------------------------------


def test_an_authenticated_peer_reaches_the_instance(fleet: Fleet) -> None:
    """Baseline for every refusal below: n2's certificate and X-Edgeproxy-Instance reach it."""
    before = fleet.requests_at_n3()
    got = fleet.n3_talk("127.0.0.2", "n2")
    assert not got.handshake_error, got  # type: ignore[attr-defined]
    assert got.data.startswith(b"HTTP/1.1 200"), got  # type: ignore[attr-defined]
    assert f"instance {fleet.instance.id}".encode() in got.data  # type: ignore[attr-defined]
    assert fleet.requests_at_n3() == before + 1


@pytest.mark.parametrize(
    ("src", "cred", "reason"),
    [
        ("127.0.0.20", "plaintext", "plaintext"),
        ("127.0.0.21", None, "no_certificate"),
        ("127.0.0.22", "other_ca", "unknown_ca"),
        ("127.0.0.23", "expired", "expired"),
        ("127.0.0.24", "no_node", "not_a_node"),
    ],
)
def test_the_listener_refuses_at_the_handshake(
    fleet: Fleet, src: str, cred: str | None, reason: str
) -> None:
    """A plaintext request, no client certificate, one of another CA, an expired one, one that
    names no node: no HTTP byte comes back, the instance sees nothing, the refusal is counted
    by its reason and logged once for that peer; the listener keeps serving."""
    n3 = fleet.n3
    series = _refused(n3, "accept", reason)
    before, seen = n3.metric(series), fleet.requests_at_n3()
    got = fleet.n3_talk(src, cred)
    assert b"HTTP/" not in got.data, got  # type: ignore[attr-defined]
    assert n3.wait_metric(series, before + 1) == before + 1
    assert fleet.requests_at_n3() == seen
    line = f"refused a connection from {src}: {reason}"
    assert n3.stderr().count(line) == 1, n3.stderr()[-2000:]
    test_an_authenticated_peer_reaches_the_instance(fleet)


def test_refusals_of_one_peer_are_logged_once_a_minute(fleet: Fleet) -> None:
    """Three plaintext attempts from one address: all counted, one log line."""
    n3 = fleet.n3
    series = _refused(n3, "accept", "plaintext")
    before = n3.metric(series)
    for _ in range(3):
        fleet.n3_talk("127.0.0.30", "plaintext")
    assert n3.wait_metric(series, before + 3) == before + 3
    assert n3.stderr().count("refused a connection from 127.0.0.30:") == 1


def test_a_stalled_handshake_is_closed_at_its_timeout(fleet: Fleet) -> None:
    """A client that connects and sends half a ClientHello is closed once [backhaul]
    handshake_timeout (1 s here) passes, counted as a timeout."""
    n3 = fleet.n3
    series = _refused(n3, "accept", "timeout")
    before = n3.metric(series)
    # A TLS record header announcing 512 bytes, then 5 of them: the hello never completes.
    got = talk("127.0.0.31", "127.0.0.3", fleet.n3_cfg.backhaul_port, None,
               b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03", timeout=10)  # fmt: skip
    assert got.ended_by in ("eof", "reset"), got
    assert got.data == b""
    assert n3.wait_metric(series, before + 1) == before + 1
    test_an_authenticated_peer_reaches_the_instance(fleet)


def test_garbage_after_the_handshake_is_a_bad_request(fleet: Fleet) -> None:
    """An authenticated peer that sends garbage gets a 400 and a close, like any client:
    the instance sees nothing, the worker stays."""
    pids = fleet.n3.serving_pids()
    seen = fleet.requests_at_n3()
    got = fleet.n3_talk("127.0.0.2", "n2", send=b"\x00\x01garbage \xff\r\n\r\n")
    assert got.data.startswith(b"HTTP/1.1 400"), got  # type: ignore[attr-defined]
    assert fleet.requests_at_n3() == seen
    assert fleet.n3.serving_pids() == pids
    test_an_authenticated_peer_reaches_the_instance(fleet)


def test_the_client_listener_does_not_honour_internal_headers(fleet: Fleet) -> None:
    """X-Edgeproxy-Instance on n3's client listener names nothing: the app is routed by Host
    and the field does not reach the instance."""
    with Client(fleet.n3.port) as c:
        c.send(REQUEST.replace(b"/whoami", b"/headers"))
        r = c.response()
    assert r.status == 200
    assert b"x-edgeproxy" not in r.body.lower()


# -- connecting to peers (the edge side) ---------------------------------------------


def _via_n2(fleet: Fleet, instance: str) -> int:
    raw = (
        f"GET /whoami HTTP/1.1\r\nHost: hello.test\r\nX-Edgeproxy-Force-Instance: {instance}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with Client(fleet.n2.port, timeout=10) as c:
        c.send(raw)
        return c.response().status


def test_the_edge_reaches_the_node_it_means(fleet: Fleet) -> None:
    """Through n2, the instance on n3 answers over mutual TLS (baseline of the next test):
    with n2's pool empty first, so the request opens a connection and its handshake is
    counted (a pooled one, still open from a request under 1 s ago, would need none)."""
    wait_for(
        "n2's pooled connections closed",
        lambda: fleet.n2.metric('edgeproxy_upstream_idle_connections{worker="0"}') == 0 or None,
    )
    before = _handshakes(fleet.n2, "connect", "full") + _handshakes(fleet.n2, "connect", "resumed")
    assert _via_n2(fleet, "hello-n3") == 200
    wait_for(
        "n2's handshake counted",
        lambda: (
            _handshakes(fleet.n2, "connect", "full") + _handshakes(fleet.n2, "connect", "resumed")
            >= before + 1
            or None
        ),
    )


@pytest.mark.parametrize(
    ("peer", "reason", "status"),
    [
        ("pwrong", "wrong_node", 502),  # a valid fleet certificate, of node n4
        ("pca", "unknown_ca", 502),
        ("pexp", "expired", 502),
        ("pplain", "plaintext", 502),
        ("pstall", "timeout", 504),
    ],
)
def test_the_edge_refuses_a_pretender(fleet: Fleet, peer: str, reason: str, status: int) -> None:
    """A peer that is not the node meant (another node's certificate, another CA's, an
    expired one, no TLS, no answer): refused at the handshake, no request byte sent, the
    client told 502/504, counted and logged for that node; n2 keeps serving."""
    n2 = fleet.n2
    series = _refused(n2, "connect", reason)
    before = n2.metric(series)
    assert _via_n2(fleet, f"hello-{peer}") == status
    assert n2.wait_metric(series, before + 1) >= before + 1
    fake = fleet.fakes[peer]
    assert fake.connections >= 1
    if fake.mode == "tls":
        assert fake.received == b"", fake.received[:200]  # not one byte after the handshake
    assert b"GET" not in fake.received and b"Edgeproxy" not in fake.received
    assert f"refused peer node {peer}: {reason}" in n2.stderr()
    test_the_edge_reaches_the_node_it_means(fleet)


# -- pooling, resumption, rotation ---------------------------------------------------


def test_pooled_connections_resume_and_rotate(fleet: Fleet) -> None:
    """Keep-alive requests through n2 reuse its pooled TLS connection (no handshake per
    request); after the pool closes it (idle_timeout 1 s) the next connection resumes the
    TLS session; after n3's certificate is re-issued and n3 reloaded (n2 untouched), n3
    presents the new certificate and n2 still routes to it."""
    n2, n3 = fleet.n2, fleet.n3

    def total() -> float:
        return _handshakes(n2, "connect", "full") + _handshakes(n2, "connect", "resumed")

    def pool_empty() -> bool | None:
        return n2.metric('edgeproxy_upstream_idle_connections{worker="0"}') == 0 or None

    assert _via_n2(fleet, "hello-n3") == 200  # a session to resume
    wait_for("n2's pooled connection closed", pool_empty)
    wait_for("n2's counters published", lambda: total() >= 1 or None)
    before, resumed = total(), _handshakes(n2, "connect", "resumed")
    with Client(n2.port, timeout=10) as c:
        for _ in range(20):
            c.send(
                b"GET /whoami HTTP/1.1\r\nHost: hello.test\r\n"
                b"X-Edgeproxy-Force-Instance: hello-n3\r\n\r\n"
            )
            assert c.response().status == 200
    wait_for("the handshake counted", lambda: total() >= before + 1 or None)
    assert total() == before + 1  # one handshake for 20 requests: the connection was pooled
    assert _handshakes(n2, "connect", "resumed") == resumed + 1  # the earlier session resumed

    # Rotation: a new certificate for n3 (same CA), n3 reloaded; n2 keeps running.
    old_serial = _serial(fleet, "n3")
    fleet.certs.issued.pop("n3")
    fleet.certs.backhaul_keys("n3")
    r = n3.cli("reload")
    assert r.returncode == 0, r.stderr
    assert _serial(fleet, "n3") != old_serial
    statuses = [_via_n2(fleet, "hello-n3") for _ in range(5)]
    assert statuses == [200] * 5, statuses


def _serial(fleet: Fleet, node: str) -> int:
    """The serial of the certificate n3's listener presents now."""
    ctx = client_context(*fleet.creds["n2"])
    with ctx.wrap_socket(connect_from("127.0.0.2", "127.0.0.3", fleet.n3_cfg.backhaul_port)) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_workers_survived(fleet: Fleet) -> None:
    """After all of the above, each node still has its one worker serving (none crashed)."""
    for p in (fleet.n2, fleet.n3):
        assert len(p.serving_pids()) == 1
        assert p.proc.poll() is None
