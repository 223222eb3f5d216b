"""Certificates from the cluster store (`<prefix>certs/<host>`) through the worker's cache.

etcd is a real etcd-server (tests/support/etcd_harness.py, one member). No Consul server
can be installed here: the Consul side runs against tests/support/consul_double.py, a test
double written to Consul's documented KV API (`GET /v1/kv/<key>?raw`, 404 when absent).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvloop
from certgen import CA, key_pem, new_key
from consul_double import ConsulDouble
from cryptography import x509
from etcd_harness import EtcdCluster

from proxy.core.certcheck import MAX_BUNDLE_BYTES
from proxy.worker.certs import CertCache

CA1 = CA.new()
NOW = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
PREFIX = "/ept/"


@dataclass
class Backend:
    kind: str
    endpoints: list[str]
    put: Callable[[str, bytes], None]
    delete: Callable[[str], None]
    stop: Callable[[], None]
    start: Callable[[], None]


def _etcd_backend(c: EtcdCluster) -> Backend:
    def post(path: str, body: dict[str, str]) -> None:
        req = urllib.request.Request(
            c.endpoints[0] + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    def put(host: str, value: bytes) -> None:
        post("/v3/kv/put", {"key": b64(f"{PREFIX}certs/{host}".encode()), "value": b64(value)})

    def delete(host: str) -> None:
        post("/v3/kv/deleterange", {"key": b64(f"{PREFIX}certs/{host}".encode())})

    return Backend("etcd", c.endpoints, put, delete, c.stop, c.start)


def _consul_backend(d: ConsulDouble) -> Backend:
    def call(method: str, host: str, body: bytes | None) -> None:
        key = quote(f"{PREFIX.lstrip('/')}certs/{host}", safe="/")
        req = urllib.request.Request(f"{d.url}/v1/kv/{key}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    return Backend(
        "consul",
        [d.url],
        lambda h, v: call("PUT", h, v),
        lambda h: call("DELETE", h, None),
        d.stop,
        d.start,
    )


@pytest.fixture(params=["etcd", "consul"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A real one-member etcd (the etcd1 fixture), or the Consul double."""
    if request.param == "etcd":
        yield _etcd_backend(request.getfixturevalue("etcd1"))
    else:
        d = ConsulDouble()
        d.start()
        yield _consul_backend(d)
        d.close()


@pytest.fixture
def cafile(tmp_path: Path) -> Path:
    p = tmp_path / "ca.pem"
    p.write_bytes(CA1.pem())
    return p


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(scenario(), 90))


def make(b: Backend, **kw: Any) -> CertCache:
    kw.setdefault("fetch_timeout", 5.0)
    kw.setdefault("store_timeout", 1.0)
    return CertCache(None, b.kind, b.endpoints, PREFIX, **kw)


async def until(cond: Callable[[], bool], poke: Callable[[], object], timeout: float = 10) -> None:
    """Poll `cond` (calling `poke` each round) until true, failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        poke()
        await asyncio.sleep(0.02)


async def served_serial(ctx: ssl.SSLContext, name: str, cafile: Path) -> int:
    """The leaf serial a verifying Python client sees in a real handshake for `name`."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        cctx = ssl.create_default_context(cafile=str(cafile))
        port = srv.sockets[0].getsockname()[1]
        _, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname=name), 10
        )
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        w.close()
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        srv.close()
        await srv.wait_closed()


def test_a_store_certificate_serves_its_name(backend: Backend, cafile: Path) -> None:
    """A value under <prefix>certs/<host> is fetched on the first get and serves a
    verifying client; a wildcard under <prefix>certs/*.<parent> serves one label below."""
    leaf = CA1.issue(("a.example.com",))
    wild = CA1.issue(("*.w.example.com",))
    backend.put("a.example.com", leaf.bundle_pem())
    backend.put("*.w.example.com", wild.bundle_pem())

    async def scenario() -> None:
        c = make(backend)
        ctx = await c.get("a.example.com")
        assert ctx is not None
        assert await served_serial(ctx, "a.example.com", cafile) == leaf.cert.serial_number
        wctx = await c.get("x.w.example.com")
        assert wctx is not None and await c.get("y.w.example.com") is wctx
        assert await served_serial(wctx, "y.w.example.com", cafile) == wild.cert.serial_number
        assert await c.get("nothing.example.com") is None
        await c.close()

    run(scenario)


def test_concurrent_gets_make_one_store_read(backend: Backend) -> None:
    """Thirty handshakes asking at once for one name not cached: one read of the store."""
    backend.put("a.example.com", CA1.issue(("a.example.com",)).bundle_pem())

    async def scenario() -> None:
        c = make(backend)
        got = await asyncio.gather(*(c.get("a.example.com") for _ in range(30)))
        assert got[0] is not None and all(g is got[0] for g in got)
        assert c.store is not None and c.store.reads == 1
        await c.close()

    run(scenario)


BAD_VALUES = {
    "name_mismatch": lambda: CA1.issue(("evil.example.com",)).bundle_pem(),
    "expired": lambda: CA1.issue(
        ("a.example.com",),
        not_before=NOW() - dt.timedelta(days=3),
        not_after=NOW() - dt.timedelta(days=1),
    ).bundle_pem(),
    "not_yet_valid": lambda: CA1.issue(
        ("a.example.com",),
        not_before=NOW() + dt.timedelta(days=1),
    ).bundle_pem(),
    "key_mismatch": lambda: CA1.issue(("a.example.com",)).chain_pem() + key_pem(new_key()),
    "pem_truncated": lambda: CA1.issue(("a.example.com",)).bundle_pem()[:500],
    "pem_garbage": lambda: b"\x00\x01 not a certificate",
    "too_large": lambda: b"x" * (MAX_BUNDLE_BYTES + 1),
}


@pytest.mark.parametrize("reason", sorted(BAD_VALUES))
def test_a_value_swapped_for_a_bad_one_never_replaces_the_good(
    backend: Backend, cafile: Path, reason: str
) -> None:
    """The store's value changes between two reads to a bad one (another name, expired,
    not yet valid, key mismatch, truncated, garbage, too large): what was checked stays
    cached and serving, the bad value is counted once; a later good value replaces it, and
    a deleted key drops it."""
    good = CA1.issue(("a.example.com",))
    backend.put("a.example.com", good.bundle_pem())

    async def scenario() -> None:
        c = make(backend, refresh=0.0)  # every lookup re-reads the store in the background
        ctx = await c.get("a.example.com")
        assert ctx is not None
        backend.put("a.example.com", BAD_VALUES[reason]())
        poke = lambda: c.lookup("a.example.com")  # noqa: E731
        await until(lambda: c.counters.rejected[reason] == 1, poke)
        reads = c.store.reads if c.store else 0
        await until(lambda: c.store is not None and c.store.reads >= reads + 3, poke)
        assert c.counters.rejected[reason] == 1  # read again and again, counted once
        assert sum(c.counters.rejected.values()) == 1
        assert c.lookup("a.example.com") is ctx
        assert await served_serial(ctx, "a.example.com", cafile) == good.cert.serial_number

        newer = CA1.issue(("a.example.com",))
        backend.put("a.example.com", newer.bundle_pem())
        await until(lambda: c.counters.replaced == 1, poke)
        ctx2 = c.lookup("a.example.com")
        assert ctx2 is not None and ctx2 is not ctx
        assert await served_serial(ctx2, "a.example.com", cafile) == newer.cert.serial_number

        backend.delete("a.example.com")
        await until(lambda: c.counters.removed == 1, poke)
        assert c.lookup("a.example.com") is None
        await c.close()

    run(scenario)


def test_a_bad_first_value_is_a_miss(backend: Backend) -> None:
    """A name whose only value is refused gets no certificate, and the miss is remembered."""
    backend.put("a.example.com", CA1.issue(("evil.example.com",)).bundle_pem())

    async def scenario() -> None:
        c = make(backend, miss_ttl=3600.0)
        assert await c.get("a.example.com") is None
        assert await c.get("a.example.com") is None
        assert c.counters.rejected["name_mismatch"] == 1
        assert c.store is not None and c.store.reads == 2  # the exact key and its wildcard
        await c.close()

    run(scenario)


def test_store_down_cached_names_keep_serving_new_names_fail_with_one_line(
    backend: Backend, cafile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store stops: a cached certificate keeps serving (its refreshes fail quietly),
    new names get none, and one warning says so; when it returns, new names work."""
    good = CA1.issue(("a.example.com",))
    backend.put("a.example.com", good.bundle_pem())
    backend.put("b.example.com", CA1.issue(("b.example.com",)).bundle_pem())

    async def scenario() -> None:
        c = make(backend, refresh=0.0, miss_ttl=0.0)
        ctx = await c.get("a.example.com")
        assert ctx is not None
        backend.stop()
        with caplog.at_level(logging.INFO, "edgeproxy.certs"):
            for name in ("b.example.com", "c.example.com", "d.example.com"):
                assert await c.get(name) is None
            poke = lambda: c.lookup("a.example.com")  # noqa: E731
            errors = c.counters.store_errors
            await until(lambda: c.counters.store_errors >= errors + 2, poke)
            assert c.lookup("a.example.com") is ctx
            assert await served_serial(ctx, "a.example.com", cafile) == good.cert.serial_number
            down = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(down) == 1 and down[0].levelno == logging.WARNING
            assert "cached certificates keep serving" in down[0].getMessage()
            backend.start()
            deadline = time.monotonic() + 20
            while await c.get("b.example.com") is None:
                assert time.monotonic() < deadline, "the store's return was not noticed"
                await asyncio.sleep(0.1)
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert c.lookup("a.example.com") is not None
        await c.close()

    run(scenario)


def test_an_oversized_response_is_not_read_whole(backend: Backend) -> None:
    """A value far past the bound (1 MiB) is refused as too_large without being kept."""
    backend.put("a.example.com", b"-" * (1 << 20))

    async def scenario() -> None:
        c = make(backend)
        assert await c.get("a.example.com") is None
        assert c.counters.rejected["too_large"] == 1
        await c.close()

    run(scenario)
