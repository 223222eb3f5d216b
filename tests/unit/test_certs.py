"""The worker's certificate cache over a real directory, and its contexts in real handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from certgen import CA, key_pem, new_key
from cryptography import x509

from proxy.core.certcheck import load_bundle
from proxy.worker.certs import TLS12_CIPHERS, CertCache, server_context

CA1 = CA.new()
LOOPS = pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])


def run(scenario: Callable[[], Awaitable[Any]], loop_kind: str = "uvloop") -> Any:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(scenario(), 60))


class Clock:
    """An injected wall clock: tests move time instead of waiting for it."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def cache(d: Path, **kw: Any) -> CertCache:
    kw.setdefault("scan_interval", 3600.0)  # scans are driven by rescan() unless a test says
    return CertCache(str(d), None, **kw)


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


async def handshake(
    ctx: ssl.SSLContext,
    name: str,
    cafile: Path,
    client: Callable[[ssl.SSLContext], None] | None = None,
    verify: bool = True,
) -> tuple[int, str, str, str | None]:
    """A real TLS handshake on 127.0.0.1 with a verifying Python client for `name`:
    (leaf serial, version, cipher, ALPN) as the client saw them."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.read(1)
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]
    try:
        cctx = ssl.create_default_context(cafile=str(cafile))
        cctx.set_alpn_protocols(["h2", "http/1.1"])
        if not verify:  # the served certificate is judged by a moved clock, not the client's
            cctx.check_hostname = False
            cctx.verify_mode = ssl.CERT_NONE
        if client is not None:
            client(cctx)
        _, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname=name), 10
        )
        obj = w.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True)
        out = (serial_of(der), obj.version(), obj.cipher()[0], obj.selected_alpn_protocol())
        w.close()
        return out
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    d.mkdir()
    return d


@pytest.fixture
def cafile(tmp_path: Path) -> Path:
    p = tmp_path / "ca.pem"
    p.write_bytes(CA1.pem())
    return p


# -- contexts ------------------------------------------------------------------------------


@LOOPS
def test_a_cached_context_serves_a_verifying_client(
    certs: Path, cafile: Path, loop_kind: str
) -> None:
    """get() builds a context that completes a real handshake: the client verifies the
    chain against the test CA and the name, TLS 1.3, ALPN http/1.1."""
    leaf = CA1.issue(("a.example.com",)).write(certs / "a.pem")
    want = x509.load_pem_x509_certificate(leaf.read_bytes()).serial_number

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        ctx = await c.get("a.example.com")
        assert ctx is not None
        serial, version, _, alpn = await handshake(ctx, "a.example.com", cafile)
        assert (serial, version, alpn) == (want, "TLSv1.3", "http/1.1")
        with pytest.raises(ssl.SSLCertVerificationError):  # the client checks the name
            await handshake(ctx, "b.example.com", cafile)
        await c.close()

    run(scenario, loop_kind)


def test_tls12_uses_only_ecdhe_aead_suites(cafile: Path) -> None:
    """A TLS 1.2 client gets an ECDHE AEAD suite; a client offering only CBC or older
    protocols is refused."""
    ctx = server_context(load_bundle(CA1.issue(("a.example.com",)).bundle_pem()), ("http/1.1",))

    def tls12(c: ssl.SSLContext) -> None:
        c.maximum_version = ssl.TLSVersion.TLSv1_2

    def cbc_only(c: ssl.SSLContext) -> None:
        tls12(c)
        c.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")

    def tls11(c: ssl.SSLContext) -> None:
        c.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            c.minimum_version = ssl.TLSVersion.TLSv1_1
            c.maximum_version = ssl.TLSVersion.TLSv1_1

    async def scenario() -> None:
        _, version, cipher, _ = await handshake(ctx, "a.example.com", cafile, tls12)
        assert version == "TLSv1.2"
        assert cipher in TLS12_CIPHERS.split(":") and cipher.startswith("ECDHE-ECDSA-")
        for bad in (cbc_only, tls11):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(ctx, "a.example.com", cafile, bad)

    run(scenario)


def test_context_options_and_configure_hook() -> None:
    """No compression, no renegotiation, TLS 1.2..1.3, and the hook sees every context."""
    seen: list[ssl.SSLContext] = []
    ctx = server_context(
        load_bundle(CA1.issue(("a.example.com",)).bundle_pem()), ("http/1.1",), seen.append
    )
    assert seen == [ctx]
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    suites = ctx.get_ciphers()
    assert {c["protocol"] for c in suites} == {"TLSv1.2", "TLSv1.3"}
    assert all(c["aead"] for c in suites)  # no CBC, no RC4, no NULL
    assert {c["kea"] for c in suites} == {"kx-ecdhe", "kx-any"}  # no RSA or DHE key exchange


def test_building_leaves_no_file_descriptor_and_no_file() -> None:
    """The key goes through a memfd that is closed before server_context returns."""
    bundle = load_bundle(CA1.issue(("a.example.com",)).bundle_pem())
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        server_context(bundle)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_openssl_refusal_is_a_cert_error() -> None:
    """A chain OpenSSL will not load at its security level (an issuer with an RSA-1024
    key, which certcheck does not look at) is refused as tls_refused, not a crash."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa

    from proxy.core.certcheck import CertError, check

    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    t = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "weak CA")])
    weak_ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(weak_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - dt.timedelta(minutes=5))
        .not_valid_after(t + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(weak_key, hashes.SHA256())
    )
    leaf = CA(weak_key, weak_ca).issue(("weak.example.com",))  # type: ignore[arg-type]  # an RSA CA
    bundle = load_bundle(leaf.bundle_pem())
    check(bundle, "weak.example.com", time.time())  # certcheck is satisfied
    with pytest.raises(CertError) as e:
        server_context(bundle)
    assert e.value.reason == "tls_refused"


# -- the directory --------------------------------------------------------------------------


def test_files_added_renamed_removed_are_picked_up(certs: Path) -> None:
    """A new file serves after a scan; a rename keeps serving the same context; a removal
    stops it; the file name does not matter, the certificate's names do."""

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        assert await c.get("a.example.com") is None
        CA1.issue(("a.example.com",)).write(certs / "whatever.pem")
        await c.rescan()
        ctx = await c.get("a.example.com")
        assert ctx is not None
        os.rename(certs / "whatever.pem", certs / "renamed.pem")
        await c.rescan()
        assert c.lookup("a.example.com") is ctx
        os.remove(certs / "renamed.pem")
        await c.rescan()
        assert c.lookup("a.example.com") is None and c.counters.removed == 1
        assert await c.get("a.example.com") is None
        await c.close()

    run(scenario)


def test_the_periodic_scan_picks_up_a_new_file(certs: Path) -> None:
    """With no rescan() call, a file added is served within a few scan intervals."""

    async def scenario() -> None:
        c = cache(certs, scan_interval=0.05, miss_ttl=3600.0)
        await c.start()
        assert await c.get("a.example.com") is None  # now remembered as a miss
        CA1.issue(("a.example.com",)).write(certs / "a.pem")
        deadline = time.monotonic() + 10
        while (ctx := await c.get("a.example.com")) is None:
            assert time.monotonic() < deadline, "the scan never picked the file up"
            await asyncio.sleep(0.02)
        assert ctx is not None
        await c.close()

    run(scenario)


def test_a_miss_scans_for_a_file_added_since_the_last_scan(certs: Path) -> None:
    """A name not cached and not indexed makes get() look at the directory again."""

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        CA1.issue(("a.example.com",)).write(certs / "a.pem")
        assert await c.get("a.example.com") is not None
        await c.close()

    run(scenario)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda: b"\x00garbage\xff", "pem_garbage"),
        (lambda: CA1.issue(("a.example.com",)).bundle_pem()[:700], "pem_truncated"),
        (lambda: CA1.issue(("a.example.com",)).chain_pem() + key_pem(new_key()), "key_mismatch"),
        (
            lambda: CA1.issue(
                ("a.example.com",),
                not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
                not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
            ).bundle_pem(),
            "expired",
        ),
    ],
)
def test_a_file_replaced_by_a_bad_one_keeps_serving_the_last_good(
    certs: Path, cafile: Path, caplog: pytest.LogCaptureFixture, content: Any, reason: str
) -> None:
    """Garbage, a truncated PEM, a key mismatch, an expired certificate written over a
    good file: the good certificate keeps serving (even to a new cache entry), the file is
    named in an error, the reason is counted once."""
    good = CA1.issue(("a.example.com",))
    good.write(certs / "a.pem")

    async def scenario() -> None:
        c = cache(certs, cache_size=1)
        await c.start()
        ctx = await c.get("a.example.com")
        assert ctx is not None
        (certs / "a.pem").write_bytes(content())
        with caplog.at_level(logging.ERROR, "edgeproxy.certs"):
            await c.rescan()
            await c.rescan()  # unchanged since: not logged or counted again
        assert c.lookup("a.example.com") is ctx
        assert c.counters.rejected[reason] == 1
        assert sum(c.counters.rejected.values()) == 1
        assert any(str(certs / "a.pem") in r.getMessage() for r in caplog.records)
        # the entry evicted (cache_size=1), the name fetched again: still the last good one
        CA1.issue(("other.example.com",)).write(certs / "other.pem")
        await c.rescan()
        assert await c.get("other.example.com") is not None
        assert c.lookup("a.example.com") is None
        ctx2 = await c.get("a.example.com")
        assert ctx2 is not None
        serial, *_ = await handshake(ctx2, "a.example.com", cafile)
        assert serial == good.cert.serial_number
        await c.close()

    run(scenario)


def test_a_file_for_another_name_never_serves_this_one(certs: Path) -> None:
    """a.example.com.pem holding a certificate for evil.example.com is indexed under
    evil.example.com: the file name gives no name."""
    CA1.issue(("evil.example.com",)).write(certs / "a.example.com.pem")

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        assert await c.get("a.example.com") is None
        assert await c.get("evil.example.com") is not None
        await c.close()

    run(scenario)


def test_a_newer_valid_file_replaces_the_old(certs: Path, cafile: Path) -> None:
    """Content replaced by a newer valid certificate: the next handshake gets it."""
    old = CA1.issue(("a.example.com",))
    old.write(certs / "a.pem")

    async def scenario() -> None:
        seen: list[ssl.SSLContext] = []
        c = cache(certs, configure=seen.append)
        await c.start()
        ctx = await c.get("a.example.com")
        assert ctx is not None and seen == [ctx]
        new = CA1.issue(("a.example.com",))
        new.write(certs / "a.pem")
        await c.rescan()
        ctx2 = c.lookup("a.example.com")
        assert ctx2 is not None and ctx2 is not ctx and seen == [ctx, ctx2]
        assert c.counters.replaced == 1
        serial, *_ = await handshake(ctx2, "a.example.com", cafile)
        assert serial == new.cert.serial_number
        await c.close()

    run(scenario)


def test_of_two_files_the_valid_one_with_the_latest_not_after_wins(
    certs: Path, cafile: Path
) -> None:
    """Two files cover one name: the later notAfter serves; an expired one never does,
    however late its notAfter would be, and the other takes over when one is removed."""
    t = dt.datetime.now(dt.UTC)
    short = CA1.issue(("a.example.com",), not_after=t + dt.timedelta(days=2))
    long = CA1.issue(("a.example.com",), not_after=t + dt.timedelta(days=20))
    short.write(certs / "1.pem")

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        ctx = await c.get("a.example.com")
        assert ctx is not None
        assert (await handshake(ctx, "a.example.com", cafile))[0] == short.cert.serial_number
        long.write(certs / "2.pem")
        await c.rescan()
        ctx = c.lookup("a.example.com")
        assert ctx is not None
        assert (await handshake(ctx, "a.example.com", cafile))[0] == long.cert.serial_number
        os.remove(certs / "2.pem")
        await c.rescan()
        ctx = c.lookup("a.example.com")
        assert ctx is not None
        assert (await handshake(ctx, "a.example.com", cafile))[0] == short.cert.serial_number
        await c.close()

    run(scenario)


def test_a_file_not_yet_valid_is_promoted_when_its_time_comes(certs: Path, cafile: Path) -> None:
    """A renewal staged in a second file (notBefore tomorrow) takes over once valid."""
    t = dt.datetime.now(dt.UTC)
    cur = CA1.issue(("a.example.com",), not_after=t + dt.timedelta(days=3))
    nxt = CA1.issue(
        ("a.example.com",), not_before=t + dt.timedelta(days=1), not_after=t + dt.timedelta(days=25)
    )
    cur.write(certs / "cur.pem")
    nxt.write(certs / "next.pem")
    clock = Clock()

    async def scenario() -> None:
        c = cache(certs, clock=clock)
        await c.start()
        assert c.counters.rejected["not_yet_valid"] == 1
        ctx = await c.get("a.example.com")
        assert ctx is not None
        assert (await handshake(ctx, "a.example.com", cafile))[0] == cur.cert.serial_number
        clock.t += 2 * 86400
        await c.rescan()
        ctx = c.lookup("a.example.com")
        assert ctx is not None
        served = await handshake(ctx, "a.example.com", cafile, verify=False)
        assert served[0] == nxt.cert.serial_number
        await c.close()

    run(scenario)


def test_wildcards_serve_one_label_below(certs: Path, cafile: Path) -> None:
    """A *.w.example.com file serves x.w.example.com and y.w.example.com from one entry,
    never w.example.com nor a.x.w.example.com; an exact file wins over the wildcard."""
    CA1.issue(("*.w.example.com",)).write(certs / "wild.pem")
    exact = CA1.issue(("x.w.example.com",))

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        ctx = await c.get("x.w.example.com")
        assert ctx is not None and await c.get("y.w.example.com") is ctx and len(c) == 1
        assert await c.get("w.example.com") is None
        assert await c.get("a.x.w.example.com") is None
        await handshake(ctx, "y.w.example.com", cafile)
        exact.write(certs / "exact.pem")
        await c.rescan()
        ctx2 = await c.get("x.w.example.com")
        assert ctx2 is not None and ctx2 is not ctx
        assert (await handshake(ctx2, "x.w.example.com", cafile))[0] == exact.cert.serial_number
        assert c.lookup("y.w.example.com") is ctx
        await c.close()

    run(scenario)


# -- the cache -------------------------------------------------------------------------------


def test_concurrent_gets_for_one_name_share_one_fetch(certs: Path) -> None:
    """Fifty handshakes asking for one uncached name at once: one resolution, one context."""
    CA1.issue(("a.example.com",)).write(certs / "a.pem")

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        got = await asyncio.gather(*(c.get("a.example.com") for _ in range(50)))
        assert got[0] is not None and all(g is got[0] for g in got)
        assert c.counters.fetches == 1 and c.counters.loaded == 1
        await c.close()

    run(scenario)


def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(certs: Path) -> None:
    """One waiting handshake is cancelled (its client left); the other still gets the context."""
    CA1.issue(("a.example.com",)).write(certs / "a.pem")

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        first = asyncio.create_task(c.get("a.example.com"))
        second = asyncio.create_task(c.get("a.example.com"))
        await asyncio.sleep(0)
        first.cancel()
        assert await second is not None and c.counters.fetches == 1
        await c.close()

    run(scenario)


def test_the_cache_is_a_bounded_lru(certs: Path) -> None:
    """cache_size=3 with five names: three stay, the least recently used go first."""
    for i in range(5):
        CA1.issue((f"n{i}.example.com",)).write(certs / f"{i}.pem")

    async def scenario() -> None:
        c = cache(certs, cache_size=3)
        await c.start()
        for i in range(3):
            assert await c.get(f"n{i}.example.com") is not None
        assert c.lookup("n0.example.com") is not None  # n0 used: n1 is now the oldest
        for i in (3, 4):
            assert await c.get(f"n{i}.example.com") is not None
        assert len(c) == 3 and c.counters.evicted_lru == 2
        assert c.lookup("n1.example.com") is None and c.lookup("n2.example.com") is None
        assert c.lookup("n0.example.com") is not None
        assert await c.get("n1.example.com") is not None  # evicted, fetched again
        await c.close()

    run(scenario)


def test_misses_are_remembered_briefly_and_boundedly(certs: Path) -> None:
    """An unknown name is resolved once per miss_ttl; the miss memory holds max_misses."""

    async def scenario() -> None:
        c = cache(certs, miss_ttl=3600.0, max_misses=4)
        await c.start()
        for _ in range(3):
            assert await c.get("nope.example.com") is None
        assert c.counters.fetches == 1 and c.counters.misses == 3
        for i in range(10):
            await c.get(f"n{i}.example.com")
        assert len(c._misses) == 4
        assert await c.get("nope.example.com") is None  # forgotten: resolved again
        assert c.counters.fetches == 12
        short = cache(certs, miss_ttl=0.0)
        await short.start()
        await short.get("nope.example.com")
        await short.get("nope.example.com")
        assert short.counters.fetches == 2
        await c.close()
        await short.close()

    run(scenario)


def test_an_expired_entry_is_evicted_on_lookup(certs: Path) -> None:
    """Once the clock passes the certificate's notAfter, lookup evicts and get finds none."""
    t = dt.datetime.now(dt.UTC)
    leaf = CA1.issue(("a.example.com",), not_after=t + dt.timedelta(hours=1))
    leaf.write(certs / "a.pem")
    clock = Clock()

    async def scenario() -> None:
        c = cache(certs, clock=clock)
        await c.start()
        assert await c.get("a.example.com") is not None
        clock.t = leaf.cert.not_valid_after_utc.timestamp() + 1
        assert c.lookup("a.example.com") is None
        assert c.counters.evicted_expired == 1 and len(c) == 0
        assert await c.get("a.example.com") is None  # the file is expired too
        await c.close()

    run(scenario)


def test_names_are_normalised_and_bad_names_never_fetch(certs: Path) -> None:
    """A.Example.COM. finds a.example.com; a name that is no host name is a miss at once."""
    CA1.issue(("a.example.com",)).write(certs / "a.pem")

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        assert await c.get("A.Example.COM.") is not None
        for bad in ("", "*.example.com", "a..b", "1.2.3.4", "x" * 300):
            assert await c.get(bad) is None
        assert c.counters.fetches == 1
        await c.close()

    run(scenario)


def test_a_resolution_runs_off_the_event_loop(certs: Path) -> None:
    """Parsing, checking and building run on the certificate thread: while one resolution
    is under way, the loop keeps running callbacks (it is never blocked by it)."""
    for i in range(20):
        CA1.issue((f"n{i}.example.com",)).write(certs / f"{i}.pem")

    async def scenario() -> None:
        c = cache(certs)
        await c.start()
        threads: set[int] = set()
        from proxy.worker import certs as certs_mod

        real = certs_mod.server_context

        def spy(*a: Any, **kw: Any) -> ssl.SSLContext:
            threads.add(threading.get_ident())
            return real(*a, **kw)

        certs_mod.server_context = spy  # type: ignore[assignment]
        try:
            await asyncio.gather(*(c.get(f"n{i}.example.com") for i in range(20)))
        finally:
            certs_mod.server_context = real
        assert threads and threading.get_ident() not in threads
        await c.close()

    run(scenario)


def test_store_timeout_bounds_a_fetch(certs: Path) -> None:
    """A store that accepts and never answers: get() gives up within fetch_timeout and
    the miss is remembered; the directory's names keep serving."""
    CA1.issue(("a.example.com",)).write(certs / "a.pem")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"

    async def scenario() -> None:
        c = CertCache(
            str(certs),
            "etcd",
            [url],
            scan_interval=3600.0,
            fetch_timeout=0.3,
            store_timeout=5.0,
        )
        await c.start()
        assert await c.get("b.example.com") is None
        assert c.counters.timeouts == 1  # fetch_timeout ended it, not the 5 s store timeout
        assert c.counters.store_errors == 0
        assert await c.get("a.example.com") is not None
        await c.close()

    try:
        run(scenario)
    finally:
        silent.close()
