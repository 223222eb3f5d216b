"""HTTP/2 from clients, end to end: a real proxy (master, 2 workers) with an HTTPS
listener offering ALPN h2 (and a plaintext one with h2c), real HTTP/2 clients (the h2
library over ssl sockets, curl --http2), a real HTTP/1.1 upstream.

Certificates come from a throwaway CA (tests/support/certgen.py). What the client
sees and what the instance received are both checked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest
from certgen import CA
from ci_policy import needs
from h2client import H2Client
from proxyctl import Proxy, ProxyConfig, Upstream, free_port, stop_proxies
from tcpqueues import kernel_queued
from upstream import pattern_sha256

pytestmark = pytest.mark.request_path


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new()


@pytest.fixture(scope="module")
def h2_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, ca: CA
) -> Iterator[Proxy]:
    """A 2-worker proxy: HTTPS (h2 and http/1.1) for hello.test and other.test."""
    workdir = tmp_path_factory.mktemp("h2")
    certs = workdir / "certs"
    certs.mkdir()
    ca.issue(("hello.test",)).write(certs / "hello.pem")
    ca.issue(("other.test",)).write(certs / "other.pem")
    cfg = ProxyConfig(
        upstream=upstream.address,
        https_port=free_port(),
        tls={"certs_dir": str(certs), "default_host": "hello.test"},
        extra_apps=[{"name": "other", "hosts": ["other.test"]}],
        extra_instances=[{"app": "other", "id": "other-1", "address": upstream.address}],
    )
    p = Proxy(cfg, workdir)
    yield p
    stop_proxies([p])


def ctx_for(ca: CA) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.pem().decode())


def client(p: Proxy, ca: CA, sni: str = "hello.test") -> H2Client:
    assert p.cfg.https_port is not None
    return H2Client(p.cfg.https_port, ctx_for(ca), sni=sni)


def echo_of(body: bytes) -> dict[str, object]:
    return json.loads(body)  # type: ignore[no-any-return]


def fields_of(echo: dict[str, object]) -> dict[str, str]:
    return {k.lower(): v for k, v in echo["headers"]}  # type: ignore[attr-defined]


def test_alpn_h2_request_reaches_the_instance_as_http11(h2_proxy: Proxy, ca: CA) -> None:
    """ALPN picks h2; a GET stream reaches the instance as HTTP/1.1 with one Host (from
    :authority), X-Forwarded-Proto https, and the answer comes back as HTTP/2."""
    with client(h2_proxy, ca) as c:
        assert c.alpn == "h2"
        r = c.request("/echo?x=1", headers=[(b"user-agent", b"h2test")])
    assert r.status == 200 and r.ended
    echo = echo_of(r.body)
    assert echo["version"] == "HTTP/1.1"
    assert echo["target"] == "/echo?x=1"
    h = fields_of(echo)
    assert h["host"] == "hello.test"
    assert h["x-forwarded-proto"] == "https"
    assert h["user-agent"] == "h2test"
    assert [k for k, _ in echo["headers"] if k.lower() == "host"] == ["Host"]  # type: ignore[attr-defined]


def test_many_streams_on_one_connection(h2_proxy: Proxy, ca: CA) -> None:
    """Twenty concurrent streams on one connection are all answered, each its own."""
    with client(h2_proxy, ca) as c:
        sids = [c.start(f"/echo?n={i}") for i in range(20)]
        for i, sid in enumerate(sids):
            r = c.wait(sid)
            assert r.status == 200
            assert echo_of(r.body)["target"] == f"/echo?n={i}"


def test_request_body_without_length_goes_chunked(h2_proxy: Proxy, ca: CA) -> None:
    """A 300 KB body with no content-length (past the stream window, so flow control
    must give credit back as it goes upstream) reaches the instance whole, chunked."""
    body = b"x" * 300_000
    with client(h2_proxy, ca) as c:
        r = c.request("/echo", method="POST", body=body)
    echo = echo_of(r.body)
    assert r.status == 200
    assert echo["body_len"] == len(body)
    assert echo["framing"] == "chunked"


def test_request_body_with_length_goes_as_is(h2_proxy: Proxy, ca: CA) -> None:
    """A body with content-length reaches the instance with that Content-Length."""
    body = b"y" * 100_000
    with client(h2_proxy, ca) as c:
        r = c.request(
            "/echo",
            method="PUT",
            body=body,
            headers=[(b"content-length", str(len(body)).encode())],
        )
    echo = echo_of(r.body)
    assert echo["body_len"] == len(body)
    assert fields_of(echo)["content-length"] == str(len(body))


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_big_response_streams_within_the_window(h2_proxy: Proxy, ca: CA, chunked: str) -> None:
    """A 3 MB response (Content-Length or chunked upstream) arrives whole as DATA frames
    through 64 KiB windows, without hop-by-hop fields."""
    n = 3_000_000
    with client(h2_proxy, ca) as c:
        r = c.request(f"/big?bytes={n}&chunked={chunked}")
    assert r.status == 200 and r.ended
    assert len(r.body) == n
    import hashlib

    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(n)
    names = {k for k, _ in r.headers}
    assert b"transfer-encoding" not in names and b"connection" not in names


def test_hop_by_hop_response_fields_are_dropped(h2_proxy: Proxy, ca: CA) -> None:
    """Connection, what it names, Keep-Alive, Proxy-*, Upgrade never reach an h2 client."""
    with client(h2_proxy, ca) as c:
        r = c.request("/hop")
    assert r.status == 200 and r.body == b"hop body\n"
    names = {k for k, _ in r.headers}
    for bad in (b"connection", b"x-hop-resp", b"keep-alive", b"proxy-connection", b"upgrade"):
        assert bad not in names
    assert r.header(b"x-end") == b"kept"


def test_sni_host_mismatch_is_421(h2_proxy: Proxy, ca: CA) -> None:
    """A stream naming another app than the connection's SNI gets 421 (RFC 9110 15.5.20)."""
    with client(h2_proxy, ca, sni="hello.test") as c:
        r = c.request("/echo", authority="other.test")
    assert r.status == 421


def test_unknown_host_is_404_and_head_has_no_body(h2_proxy: Proxy, ca: CA) -> None:
    """The proxy's own answers go out as HTTP/2 too (404; HEAD without DATA)."""
    with client(h2_proxy, ca, sni="hello.test") as c:
        r = c.request("/", authority="hello.test", method="HEAD")
        assert r.status == 200 and r.body == b""
    assert h2_proxy.cfg.https_port is not None
    ctx = ctx_for(ca)
    ctx.check_hostname = False  # no SNI: the default certificate (hello.test)
    with H2Client(h2_proxy.cfg.https_port, ctx, sni=None) as c:
        r = c.request("/", authority="nobody.test")
    assert r.status == 404 and b"no app serves" in r.body


def test_http11_still_served_when_h2_not_offered(h2_proxy: Proxy, ca: CA) -> None:
    """A client offering only http/1.1 gets HTTP/1.1 on the same listener."""
    assert h2_proxy.cfg.https_port is not None
    ctx = ctx_for(ca)
    ctx.set_alpn_protocols(["http/1.1"])
    import socket

    raw = socket.create_connection(("127.0.0.1", h2_proxy.cfg.https_port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="hello.test") as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")


@needs(shutil.which("curl") is not None, "needs curl")
def test_curl_http2(h2_proxy: Proxy, ca: CA, tmp_path: object) -> None:
    """curl --http2 (nghttp2) gets its answer over HTTP/2."""
    import pathlib

    cafile = pathlib.Path(str(tmp_path)) / "ca.pem"
    cafile.write_bytes(ca.pem())
    port = h2_proxy.cfg.https_port
    out = subprocess.run(
        [
            "curl", "-sS", "--http2", "--cacert", str(cafile), "--max-time", "10",
            "--resolve", f"hello.test:{port}:127.0.0.1",
            "-w", "\\n%{http_version}", f"https://hello.test:{port}/echo",
        ],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    body, _, version = out.stdout.rpartition(b"\n")
    assert version == b"2"
    assert echo_of(body)["version"] == "HTTP/1.1"


def port_of(p: Proxy) -> int:
    assert p.cfg.https_port is not None
    return p.cfg.https_port


def test_a_client_that_opens_no_window_holds_the_upstream_back(
    h2_proxy: Proxy, ca: CA, upstream: Upstream
) -> None:
    """A client that takes 64 KiB and gives no credit back: the proxy stops reading the
    instance (bounded, far from the 20 MB it would send); credit given, all of it
    arrives intact."""
    total = 20_000_000
    with H2Client(port_of(h2_proxy), ctx_for(ca), timeout=60, auto_ack=False) as c:
        sid = c.start(f"/big?bytes={total}&tag=h2-slow")
        r = c.responses[sid]
        c.read_until(lambda: len(r.body) >= 65535)
        last = -1
        sent = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the instance's sending stops growing
            sent = int(upstream.stats()["tags"].get("h2-slow", {}).get("sent", 0))
            if sent == last:
                break
            last = sent
            time.sleep(0.5)
        # The instance's socket and the proxy's upstream socket may hold megabytes
        # (receive autotuning); what the proxy itself read is the rest, bounded by
        # [limits] response_buffer (256 KiB) + one stream window + a read.
        queued = kernel_queued(upstream.port)
        taken = sent - queued
        assert sent < total and taken < 2_000_000, (
            f"the proxy read {taken} of {sent} bytes sent to a stalled client"
            f" ({queued} in the kernel)"
        )
        c.auto_ack = True
        c.conn.acknowledge_received_data(len(r.body), sid)
        c.flush()
        c.wait(sid)
    assert len(r.body) == total
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(total)


def test_wrong_preface_after_alpn_h2_is_a_connection_error(h2_proxy: Proxy, ca: CA) -> None:
    """ALPN chose h2 but the client speaks HTTP/1.1: GOAWAY PROTOCOL_ERROR, then a close."""
    import socket

    ctx = ctx_for(ca)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port_of(h2_proxy)), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="hello.test") as s:
        assert s.selected_alpn_protocol() == "h2"
        s.sendall(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n" + b"x" * 64)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    # Our SETTINGS (type 4) first, then a GOAWAY (type 7) whose code is PROTOCOL_ERROR.
    at = data.find(b"\x00\x00\x08\x07\x00\x00\x00\x00\x00")
    assert at >= 0, data
    assert data[at + 13 : at + 17] == b"\x00\x00\x00\x01"


def test_rapid_reset_over_tls(h2_proxy: Proxy, ca: CA, upstream: Upstream) -> None:
    """Rapid reset over TLS (the default budget, 200 + 50/s): GOAWAY ENHANCE_YOUR_CALM
    before 1000 reset streams are through, and the instance saw almost none of them."""
    from h2raw import ENHANCE_YOUR_CALM, RawH2, request_fields

    with RawH2(port_of(h2_proxy), ctx_for(ca)) as c:
        sid = 1
        try:
            for _ in range(1000):
                fields = request_fields("/hold?tag=tls-reset&max=5")
                c.send(c.headers(sid, fields) + c.rst(sid))
                sid += 2
        except OSError:
            pass
        g = c.goaway()
    assert g is not None and g.error_code == ENHANCE_YOUR_CALM
    assert upstream.stats()["tags"].get("tls-reset", {}).get("held", 0) <= 2
