"""Certificates in the cluster store: `<prefix>certs/<host>` in etcd or Consul.

Owns the key layout (the host as asked; a wildcard certificate under `*.example.com`) and
one bounded read of one key: etcd through its v3 JSON gateway (`POST /v3/kv/range`, as
pinger.store.etcd), Consul through `GET /v1/kv/<key>?raw` (as pinger.store.consul). A
small HTTP/1.1 client of its own, parsed by httptools: pinger.store.http reads whatever
length a server announces, and a value here is hostile until checked, so every read is
bounded in bytes and time. It never parses certificates: proxy.worker.certs does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from collections.abc import Sequence
from typing import Final
from urllib.parse import quote, urlsplit

import httptools
import orjson

from proxy.core.certcheck import MAX_BUNDLE_BYTES, CertError

log = logging.getLogger("edgeproxy.certs")

KINDS: Final = ("etcd", "consul")
HEAD_LIMIT: Final = 16 * 1024  # a response head past this is not from a store we know
# etcd sends the value base64-encoded inside JSON: 4/3 of it, plus the header and key
ETCD_BODY_LIMIT: Final = MAX_BUNDLE_BYTES * 4 // 3 + 4096
MAX_INFLIGHT: Final = 8  # store reads at once per worker: a burst of new names waits here


class StoreUnavailableError(Exception):
    """No endpoint answered (refused, timed out, 5xx, a broken response): not the value's fault."""


class _Response:
    """httptools callbacks: status, body (bounded), completion."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = bytearray()
        self.over = False
        self.complete = False

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.limit:
            self.over = True
        else:
            self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


class StoreSource:
    """Reads certificate values from etcd or Consul; endpoints are tried in turn."""

    def __init__(
        self,
        kind: str,
        endpoints: Sequence[str],
        prefix: str,
        *,
        timeout: float = 2.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"certificate store kind {kind!r} (etcd or consul)")
        self.kind = kind
        self.targets: list[tuple[str, int, bool]] = []
        for url in endpoints:
            u = urlsplit(url)
            tls = u.scheme == "https"
            self.targets.append((u.hostname or "127.0.0.1", u.port or (443 if tls else 80), tls))
        if not self.targets:
            raise ValueError("no certificate store endpoints")
        # Consul keys have no leading slash (pinger.store.consul does the same)
        self.prefix = prefix.lstrip("/") if kind == "consul" else prefix
        self.timeout = timeout
        self.current = 0
        self.down: str | None = None  # why the store is unreachable, while it is
        self.reads = 0  # values read (or tried): a counter for /metrics and the tests
        self._sem = asyncio.Semaphore(MAX_INFLIGHT)

    def key(self, name: str) -> str:
        return f"{self.prefix}certs/{name}"

    def source(self, name: str) -> str:
        return f"{self.kind} key {self.key(name)}"

    async def fetch(self, name: str) -> bytes | None:
        """The value under `name`'s key, None when there is no such key.

        Raises StoreUnavailableError when no endpoint answers, CertError("too_large") when the
        value is past the bound (the value's fault: counted as a refused certificate).
        """
        async with self._sem:
            self.reads += 1
            try:
                value = await self._fetch(name)
            except StoreUnavailableError as e:
                if self.down is None:
                    log.warning(
                        "certificate store (%s) unreachable: %s; cached certificates keep "
                        "serving, names not cached yet get no certificate until it answers",
                        self.kind,
                        e,
                    )
                self.down = str(e)
                raise
        if self.down is not None:
            log.warning("certificate store (%s) answers again", self.kind)
            self.down = None
        return value

    async def _fetch(self, name: str) -> bytes | None:
        key = self.key(name)
        if self.kind == "etcd":
            body = orjson.dumps({"key": base64.b64encode(key.encode()).decode()})
            status, data = await self._request("POST", "/v3/kv/range", body, ETCD_BODY_LIMIT)
            return _etcd_value(status, data, key)
        path = "/v1/kv/" + quote(key, safe="/") + "?raw"
        status, data = await self._request("GET", path, None, MAX_BUNDLE_BYTES)
        if status == 404:
            return None
        if status != 200:
            raise StoreUnavailableError(f"consul GET {key}: HTTP {status}")
        return data

    async def _request(
        self, method: str, path: str, body: bytes | None, limit: int
    ) -> tuple[int, bytes]:
        errors: list[str] = []
        n = len(self.targets)
        for step in range(n):
            i = (self.current + step) % n
            host, port, _ = self.targets[i]
            try:
                async with asyncio.timeout(self.timeout):
                    status, data = await self._exchange(i, method, path, body, limit)
            except (OSError, TimeoutError, StoreUnavailableError) as e:
                errors.append(f"{host}:{port}: {e!r}")
                continue
            if status >= 500 and step + 1 < n:  # a member without a leader: another may do
                errors.append(f"{host}:{port}: HTTP {status}")
                continue
            self.current = i
            return status, data
        raise StoreUnavailableError("; ".join(errors))

    async def _exchange(
        self, i: int, method: str, path: str, body: bytes | None, limit: int
    ) -> tuple[int, bytes]:
        host, port, tls = self.targets[i]
        ctx = ssl.create_default_context() if tls else None
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            if body is not None:
                head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
            resp = _Response(limit)
            parser = httptools.HttpResponseParser(resp)
            budget = HEAD_LIMIT + limit + 1024  # head, body, chunk framing
            while not resp.complete:
                data = await reader.read(65536)
                if not data:
                    raise StoreUnavailableError("connection closed before the whole response")
                budget -= len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as e:
                    raise StoreUnavailableError(f"bad HTTP response: {e}") from None
                if resp.over:
                    raise CertError("too_large", f"value past {limit} bytes")
                if budget < 0:
                    raise StoreUnavailableError("response past its size bound")
            return parser.get_status_code(), bytes(resp.body)
        finally:
            writer.close()


def _etcd_value(status: int, data: bytes, key: str) -> bytes | None:
    if status != 200:
        raise StoreUnavailableError(f"etcd range {key}: HTTP {status}: {data[:200]!r}")
    try:
        doc = orjson.loads(data)
        kvs = doc.get("kvs") if isinstance(doc, dict) else None
        if not kvs:
            return None
        if not isinstance(kvs, list) or len(kvs) != 1 or not isinstance(kvs[0], dict):
            raise StoreUnavailableError(f"etcd range {key}: unexpected answer {data[:200]!r}")
        value = kvs[0].get("value", "")
        if not isinstance(value, str):
            raise StoreUnavailableError(f"etcd range {key}: value is not a string")
        return base64.b64decode(value, validate=True)
    except (orjson.JSONDecodeError, binascii.Error) as e:
        raise StoreUnavailableError(f"etcd range {key}: bad answer: {e}") from None
