"""HTTPS at the edge, end to end: a real proxy (master, 2 workers) with an HTTPS listener,
real TLS clients (Python's ssl, and raw sockets sending hostile hellos), a real upstream.

Certificates come from a throwaway CA (tests/support/certgen.py) in the proxy's
`[tls] certs_dir`. What a client sees is checked (alerts, status, the certificate it
was served), and what the instance received (X-Forwarded-Proto).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certgen import CA
from ci_policy import needs
from hello_builder import SERVER_NAME, Spec, build, sni_body
from proxyctl import HOST, Client, Proxy, ProxyConfig, Upstream, free_port, stop_proxies
from reloadctl import Wrk
from upstream import pattern_sha256

pytestmark = pytest.mark.request_path

HANDSHAKE_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new()


@pytest.fixture(scope="module")
def tls_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, ca: CA
) -> Iterator[Proxy]:
    """A 2-worker proxy: HTTPS with certificates for hello.test and other.test (two apps),
    hello.test's for clients without SNI."""
    workdir = tmp_path_factory.mktemp("tls")
    certs = workdir / "certs"
    certs.mkdir()
    ca.issue(("hello.test",)).write(certs / "hello.pem")
    ca.issue(("other.test",)).write(certs / "other.pem")
    cfg = ProxyConfig(
        upstream=upstream.address,
        https_port=free_port(),
        tls={"certs_dir": str(certs), "default_host": "hello.test"},
        timeouts={"tls_handshake": HANDSHAKE_TIMEOUT},
        extra_apps=[{"name": "other", "hosts": ["other.test"]}],
        extra_instances=[{"app": "other", "id": "other-1", "address": upstream.address}],
    )
    p = Proxy(cfg, workdir)
    yield p
    stop_proxies([p])


def client_ctx(ca: CA, *, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.pem().decode())
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def https_port(p: Proxy) -> int:
    assert p.cfg.https_port is not None
    return p.cfg.https_port


def get(p: Proxy, ctx: ssl.SSLContext, sni: str | None, host: str) -> tuple[int, bytes]:
    with Client(https_port(p), tls=ctx, sni=sni) as c:
        c.send(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        r = c.response()
    return r.status, r.body


def raw_exchange(p: Proxy, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` raw to the HTTPS port; everything the proxy sent until it closed."""
    with socket.create_connection((HOST, https_port(p)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        else:
            raise AssertionError(f"the proxy did not close; sent back {out!r}")
    return out


def hello(sni: bytes | None = b"hello.test") -> bytes:
    return build(Spec(sni=sni))


def hello_with_names(*names: bytes) -> bytes:
    """A hello whose server_name extension lists every name given (RFC 6066: one)."""
    return build(Spec(sni=None, extras=[(SERVER_NAME, sni_body([(0, n) for n in names]))]))


def test_https_request_reaches_the_instance_with_forwarded_proto_https(
    tls_proxy: Proxy, ca: CA
) -> None:
    """A verified TLS 1.3 request is proxied; the instance sees X-Forwarded-Proto: https."""
    status, body = get(tls_proxy, client_ctx(ca), "hello.test", "hello.test")
    assert status == 200
    echo = json.loads(body)
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["host"] == "hello.test"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_are_served(tls_proxy: Proxy, ca: CA, version: ssl.TLSVersion) -> None:
    """Both TLS 1.2 and TLS 1.3 complete, with the certificate of the SNI's name."""
    ctx = client_ctx(ca, version=version)
    with Client(https_port(tls_proxy), tls=ctx, sni="other.test") as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
        c.send(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
        assert c.response().status == 200


def test_tls11_is_refused(tls_proxy: Proxy, ca: CA) -> None:
    """A client that speaks at most TLS 1.1 gets alert protocol_version (70) and no
    connection: from Python's ssl, and as raw hello bytes (counted as reason version)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.pem().decode())
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(tls_proxy, ctx, "hello.test", "hello.test")
    series = 'edgeproxy_tls_hellos_refused_total{reason="version"}'
    before = tls_proxy.metric(series)
    old = build(Spec(sni=b"hello.test", versions=None, legacy_version=0x0302))
    assert raw_exchange(tls_proxy, old) == bytes([21, 3, 3, 0, 2, 2, 70])
    tls_proxy.wait_metric(series, before + 1)


def test_host_of_another_app_than_the_sni_gets_421(tls_proxy: Proxy, ca: CA) -> None:
    """SNI hello.test, Host other.test: 421 Misdirected Request, nothing sent upstream."""
    status, body = get(tls_proxy, client_ctx(ca), "hello.test", "other.test")
    assert status == 421, body
    assert b"other.test" in body


def test_same_app_on_both_names_is_served(tls_proxy: Proxy, ca: CA) -> None:
    """The 421 rule compares apps, not names: Host in the SNI's app is served."""
    status, _ = get(tls_proxy, client_ctx(ca), "other.test", "OTHER.test")
    assert status == 200


def test_unknown_sni_gets_unrecognized_name(tls_proxy: Proxy, ca: CA) -> None:
    """An SNI no certificate covers: alert unrecognized_name (112), no handshake."""
    before = tls_proxy.metric('edgeproxy_tls_connections_total{outcome="no_certificate"}')
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        get(tls_proxy, client_ctx(ca), "nobody.test", "nobody.test")
    tls_proxy.wait_metric('edgeproxy_tls_connections_total{outcome="no_certificate"}', before + 1)


def test_no_sni_gets_the_default_hosts_certificate_and_any_app(tls_proxy: Proxy, ca: CA) -> None:
    """No SNI (or an address as SNI, as wrk sends): [tls] default_host's certificate, and
    without an SNI name there is no app to agree with: any app's Host is served."""
    ctx = client_ctx(ca)
    ctx.check_hostname = False
    with Client(https_port(tls_proxy), tls=ctx, sni=None) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        cert = c.sock.getpeercert()
        assert ("DNS", "hello.test") in cert["subjectAltName"]
        c.send(b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
        assert c.response().status == 200
    assert get(tls_proxy, ctx, "127.0.0.1", "hello.test")[0] == 200


def test_no_sni_without_default_host_gets_unrecognized_name(
    proxy_factory: Callable[..., Proxy], tmp_path: Path, ca: CA
) -> None:
    """No SNI and no [tls] default_host: alert unrecognized_name (112), counted."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.issue(("hello.test",)).write(certs / "hello.pem")
    p = proxy_factory(https_port=free_port(), tls={"certs_dir": str(certs)}, workers=1)
    assert raw_exchange(p, hello(None)) == bytes([21, 3, 3, 0, 2, 2, 112])
    p.wait_metric('edgeproxy_tls_connections_total{outcome="no_certificate"}', 1)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("http on the https port", b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n", "not_tls"),
        ("sni of 300 bytes", hello((b"a" * 59 + b".") * 5), "sni_name"),
        ("two host names", hello_with_names(b"hello.test", b"other.test"), "sni_count"),
        ("empty host name", hello(b""), "sni_name"),
        ("non-ascii host name", hello("héllo.test".encode()), "sni_name"),
    ],
)
def test_hostile_hellos_get_an_alert_and_a_close(
    tls_proxy: Proxy, ca: CA, name: str, data: bytes, reason: str
) -> None:
    """A hello our parser refuses: a fatal alert then a close, counted by reason; the
    workers stay up and serve the next client."""
    series = f'edgeproxy_tls_hellos_refused_total{{reason="{reason}"}}'
    before = tls_proxy.metric(series)
    pids = tls_proxy.serving_pids()
    got = raw_exchange(tls_proxy, data)
    assert got[:1] == b"\x15" and len(got) == 7, f"{name}: expected one alert, got {got!r}"
    tls_proxy.wait_metric(series, before + 1)
    assert get(tls_proxy, client_ctx(ca), "hello.test", "hello.test")[0] == 200
    assert tls_proxy.serving_pids() == pids


def test_record_length_past_the_data_waits_then_closes(tls_proxy: Proxy) -> None:
    """A record header announcing more than ever comes: closed at the handshake timeout."""
    data = hello()
    started = time.monotonic()
    got = raw_exchange(tls_proxy, data[:40], timeout=HANDSHAKE_TIMEOUT + 5)
    assert got == b""
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT * 0.9


def test_hello_split_byte_by_byte_completes(tls_proxy: Proxy, ca: CA) -> None:
    """A ClientHello sent one byte per write still ends in a handshake and a response."""
    ctx = client_ctx(ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="hello.test")
    with socket.create_connection((HOST, https_port(tls_proxy)), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        first = outgoing.read()
        for i in range(len(first)):
            s.sendall(first[i : i + 1])
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outgoing.read())
                data = s.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        s.sendall(outgoing.read())
        obj.write(b"GET / HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
        s.sendall(outgoing.read())
        plain = b""
        while b"\r\n" not in plain:
            try:
                plain += obj.read(65536)
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                assert data, "closed before a response"
                incoming.write(data)
        assert plain.startswith(b"HTTP/1.1 200 ")


def test_a_hello_that_never_completes_is_closed_at_the_timeout(tls_proxy: Proxy) -> None:
    """Half a hello, then silence: closed after [timeouts] tls_handshake, counted."""
    series = 'edgeproxy_tls_connections_total{outcome="hello_timeout"}'
    before = tls_proxy.metric(series)
    data = hello()
    started = time.monotonic()
    assert raw_exchange(tls_proxy, data[: len(data) // 2], timeout=HANDSHAKE_TIMEOUT + 5) == b""
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT * 0.9
    tls_proxy.wait_metric(series, before + 1)


def test_alpn_prefers_h2_and_refuses_what_is_not_served(tls_proxy: Proxy, ca: CA) -> None:
    """ALPN: h2 chosen from [h2, http/1.1], http/1.1 when only it is offered; a client
    offering only protocols not served here gets no_application_protocol."""
    ctx = client_ctx(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with Client(https_port(tls_proxy), tls=ctx, sni="hello.test") as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.selected_alpn_protocol() == "h2"
    h11 = client_ctx(ca)
    h11.set_alpn_protocols(["http/1.1"])
    assert get(tls_proxy, h11, "hello.test", "hello.test")[0] == 200
    only = client_ctx(ca)
    only.set_alpn_protocols(["spdy/3.1", "h3"])
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        get(tls_proxy, only, "hello.test", "hello.test")


def test_a_certificate_added_to_the_directory_is_served_without_reload(
    tls_proxy: Proxy, ca: CA
) -> None:
    """A new file in certs_dir is picked up live: its name is served, no reload."""
    certs = Path(tls_proxy.cfg.tls["certs_dir"])
    ctx = client_ctx(ca)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        get(tls_proxy, ctx, "late.hello.test", "hello.test")
    ca.issue(("late.hello.test",)).write(certs / "late.pem")
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _ = get(tls_proxy, ctx, "late.hello.test", "hello.test")
            break
        except ssl.SSLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # late.hello.test is not an app's host: its requests may name no app but its own.
    assert status == 421


def resumed_count(p: Proxy, ctx: ssl.SSLContext, n: int) -> tuple[int, int]:
    """(resumed, offered): n connections, each offering the session of the one before."""
    session = None
    resumed = offered = 0
    for _ in range(n):
        with Client(https_port(p), tls=ctx, sni="hello.test", session=session) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            c.send(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
            assert c.response().status == 200  # TLS 1.3 tickets arrive after the handshake
            offered += session is not None
            resumed += c.sock.session_reused
            session = c.sock.session
    return resumed, offered


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_resume_on_every_worker_and_across_a_reload(
    tls_proxy: Proxy, ca: CA, version: ssl.TLSVersion
) -> None:
    """Session tickets resume whichever worker issued them (SO_REUSEPORT spreads the 20
    connections over both) and after a reload (a new generation of workers)."""
    ctx = client_ctx(ca, version=version)
    resumed, offered = resumed_count(tls_proxy, ctx, 20)
    assert (resumed, offered) == (19, 19)
    # One session from before the reload, offered to the next generation.
    with Client(https_port(tls_proxy), tls=ctx, sni="hello.test") as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        c.send(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
        assert c.response().status == 200
        session = c.sock.session
    before = tls_proxy.serving_pids()
    r = tls_proxy.cli("reload", timeout=30)
    assert r.returncode == 0, r.stderr
    assert not set(tls_proxy.serving_pids()) & set(before)
    sock = socket.create_connection((HOST, https_port(tls_proxy)), timeout=5)
    with ctx.wrap_socket(sock, server_hostname="hello.test", session=session) as s:
        assert s.session_reused


def test_a_large_download_over_tls_arrives_intact(tls_proxy: Proxy, ca: CA) -> None:
    """8 MB through TLS arrive byte-exact: a large body is never spliced into the TLS
    socket (that would write plaintext under the encryption)."""
    size = 8_000_000
    with Client(https_port(tls_proxy), tls=client_ctx(ca), sni="hello.test", timeout=30) as c:
        c.send(f"GET /big?bytes={size} HTTP/1.1\r\nHost: hello.test\r\n\r\n".encode())
        r = c.response(timeout=30)
    assert r.status == 200
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(size)


@needs(shutil.which("sslscan") is not None, "sslscan is not installed (./dev test installs it)")
def test_sslscan_finds_no_old_protocol_and_no_weak_cipher(tls_proxy: Proxy) -> None:
    """An external checker (sslscan): SSLv2/3, TLS 1.0 and 1.1 disabled; TLS 1.2 and 1.3
    enabled; every accepted cipher is an ECDHE AEAD suite of 128 bits or more."""
    done = subprocess.run(
        ["sslscan", "--no-colour", "--sni-name=hello.test", f"{HOST}:{https_port(tls_proxy)}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # sslscan writes to connections the proxy already closed (after an alert for a
        # probe it refused): with SIGPIPE at its default, that would kill it.
        restore_signals=False,
    )
    out = done.stdout
    assert done.returncode == 0, (done.returncode, out, done.stderr)
    protocols = dict(re.findall(r"^(SSLv2|SSLv3|TLSv1\.[0-3])\s+(enabled|disabled)", out, re.M))
    assert protocols == {
        "SSLv2": "disabled",
        "SSLv3": "disabled",
        "TLSv1.0": "disabled",
        "TLSv1.1": "disabled",
        "TLSv1.2": "enabled",
        "TLSv1.3": "enabled",
    }, out
    accepted = re.findall(
        r"^(?:Preferred|Accepted)\s+(TLSv1\.[23])\s+(\d+) bits\s+(\S+)", out, re.M
    )
    assert accepted, out
    for version, bits, cipher in accepted:
        assert int(bits) >= 128, (version, bits, cipher)
        if version == "TLSv1.2":
            assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
        else:
            assert cipher.startswith("TLS_AES_") or cipher.startswith("TLS_CHACHA20_"), cipher


@needs(shutil.which("wrk") is not None, "wrk is not installed (./dev test installs it)")
@pytest.mark.parametrize("close", [False, True], ids=["keepalive", "handshake-per-request"])
def test_wrk_over_https_across_reloads_counts_no_errors(
    tls_proxy: Proxy, tmp_path: Path, close: bool
) -> None:
    """wrk on https (keep-alive, or a new connection and handshake per request) across
    three `edgeproxy reload`s: 0 errors of every kind, handshakes in flight included."""
    headers = ("Connection: close",) if close else ()
    wrk = Wrk(https_port(tls_proxy), tmp_path, duration=8, connections=16, scheme="https",
              headers=headers)  # fmt: skip
    try:
        for at in (2.0, 4.0, 6.0):
            wrk.sleep_until(at)
            r = tls_proxy.cli("reload", timeout=30)
            assert r.returncode == 0, r.stderr
        res = wrk.result()
    finally:
        wrk.kill()
    res.assert_clean(min_requests=500)
