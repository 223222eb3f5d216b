"""A worker's TLS server contexts, one per name, from checked certificates.

Owns `server_context` (a bundle to an `ssl.SSLContext`, keys never written to disk) and
`CertCache`: a bounded LRU of ready contexts keyed by name, filled from the certificate
directory and the cluster store. A certificate enters under a name only after passing every
check for that name now (proxy.core.certcheck), so a bad fetch can never replace a good
entry. Reading, parsing and building run on one certificate thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from proxy.core.certcheck import REASONS, Bundle, CertError, check, load_bundle, normalise
from proxy.worker.certdir import DirSource, ScanResult
from proxy.worker.certstore import StoreSource, StoreUnavailableError

log = logging.getLogger("edgeproxy.certs")

T = TypeVar("T")
Configure = Callable[[ssl.SSLContext], None]

# Mozilla "intermediate" (v5.7) for TLS 1.2 without its DHE suites: ECDHE key exchange,
# AEAD only. TLS 1.3 keeps OpenSSL's suites (all AEAD).
TLS12_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
MISS_BOUND_MIN: Final = 1024  # misses remembered at once: max(this, cache_size)
LOGGED_BOUND: Final = 1024  # refused (source, value) pairs remembered so each logs once
MISS_SCAN_GAP: Final = 0.2  # seconds between directory scans caused by misses


def server_context(
    bundle: Bundle, alpn: Sequence[str] = (), configure: Configure | None = None
) -> ssl.SSLContext:
    """A server context serving `bundle`: TLS 1.2-1.3, the ciphers above, no compression,
    no renegotiation, `alpn` offered. The key reaches OpenSSL through an anonymous memory
    file (memfd) closed before this returns: it never touches a disk. Raises CertError
    ("tls_refused") if OpenSSL will not load what certcheck accepted."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla: every suite is strong
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    fd = os.memfd_create("edgeproxy-cert", os.MFD_CLOEXEC)
    try:
        view = memoryview(bundle.pem)
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as e:
        raise CertError("tls_refused", f"OpenSSL: {e.reason or e}") from None
    finally:
        os.close(fd)
    if configure is not None:
        configure(ctx)
    return ctx


@dataclass(slots=True)
class CertCounters:
    """Plain counters for /metrics; `rejected` has one entry per certcheck reason."""

    hits: int = 0  # lookups answered from the cache
    misses: int = 0  # get() calls that ended without a certificate
    fetches: int = 0  # resolutions run (concurrent callers for one name share one)
    loaded: int = 0  # contexts built and cached
    replaced: int = 0  # entries replaced by a newer valid certificate
    removed: int = 0  # entries dropped because their source no longer has the certificate
    evicted_lru: int = 0
    evicted_expired: int = 0
    store_errors: int = 0  # store reads that failed (unreachable, bad answer)
    timeouts: int = 0  # resolutions past fetch_timeout
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


@dataclass(slots=True, eq=False)
class _Entry:
    ctx: ssl.SSLContext
    digest: str
    not_after: float
    source: str  # "file PATH" or "etcd key KEY": what an operator looks at
    from_store: bool
    checked: float  # monotonic time of the last store read (refresh)


@dataclass(slots=True, eq=False)
class _Built:
    entry: _Entry | None = None
    rejected: CertError | None = None
    source: str = ""
    value_digest: str = ""


class CertCache:
    """Per-worker SSLContexts by name; `lookup` (sync) on the handshake path, `get` on a miss.

    Names are asked normalised (lower-case, no trailing dot), as the ClientHello parser
    gives them. An entry is the exact name, or `*.parent` for a wildcard certificate.
    """

    def __init__(
        self,
        certs_dir: str | None,
        store: str | None,
        endpoints: Sequence[str] = (),
        prefix: str = "/edgeproxy/",
        *,
        cache_size: int = 1000,
        miss_ttl: float = 5.0,
        alpn: tuple[str, ...] = ("http/1.1",),
        configure: Configure | None = None,
        fetch_timeout: float = 5.0,
        store_timeout: float = 2.0,
        scan_interval: float = 1.0,
        refresh: float = 300.0,
        max_misses: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.dir = DirSource(certs_dir) if certs_dir else None
        self.store = StoreSource(store, endpoints, prefix, timeout=store_timeout) if store else None
        self.cache_size = cache_size
        self.miss_ttl = miss_ttl
        self.alpn = alpn
        self.configure = configure
        self.fetch_timeout = fetch_timeout
        self.scan_interval = scan_interval
        self.refresh = refresh
        self.clock = clock
        self.counters = CertCounters()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._misses: OrderedDict[str, float] = OrderedDict()  # name -> monotonic expiry
        self._miss_bound = max_misses or max(MISS_BOUND_MIN, cache_size)
        self._flights: dict[str, asyncio.Task[ssl.SSLContext | None]] = {}
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="certs")
        self._tasks: set[asyncio.Task[None]] = set()
        self._scanner: asyncio.Task[None] | None = None
        self._last_miss_scan = -1e9

    # -- lifetime --
    async def start(self) -> None:
        """Scan the directory once (its names are known before the first handshake), then
        keep scanning every scan_interval in the background."""
        if self.dir is not None:
            await self._scan()
            self._scanner = asyncio.create_task(self._scan_loop(), name="certs-scan")

    async def rescan(self) -> None:
        """Scan the certificate directory now, as the periodic scan does (a no-op without one)."""
        if self.dir is not None:
            await self._scan()

    async def close(self) -> None:
        tasks = [t for t in (self._scanner, *self._tasks, *self._flights.values()) if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the handshake path --
    def lookup(self, name: str) -> ssl.SSLContext | None:
        """The cached context for `name` (exact, then `*.` + parent), or None. Never waits."""
        e = self._entries.get(name)
        key = name
        if e is None:
            key = "*." + name.partition(".")[2]
            e = self._entries.get(key)
            if e is None:
                return None
        if self.clock() > e.not_after:
            del self._entries[key]
            self.counters.evicted_expired += 1
            log.info("certificate for %s (%s) expired: evicted", key, e.source)
            return self.lookup(name) if key == name else None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        if e.from_store and time.monotonic() - e.checked > self.refresh:
            e.checked = time.monotonic()  # one refresh at a time; a failed one retries later
            self._spawn(self._refresh(key))
        return e.ctx

    async def get(self, name: str) -> ssl.SSLContext | None:
        """The context for `name`, fetched on a miss; None if no source has a valid one.

        Concurrent callers for one name share one resolution; a miss is remembered for
        miss_ttl. A caller that is cancelled does not cancel the others' resolution.
        """
        ctx = self.lookup(name)
        if ctx is not None:
            return ctx
        asked = normalise(name)
        if asked is None or asked.startswith("*."):
            self.counters.misses += 1
            return None
        if asked != name and (ctx := self.lookup(asked)) is not None:
            return ctx
        expiry = self._misses.get(asked)
        if expiry is not None:
            if time.monotonic() < expiry:
                self.counters.misses += 1
                return None
            del self._misses[asked]
        task = self._flights.get(asked)
        if task is None:
            task = asyncio.create_task(self._resolve(asked), name=f"certs-fetch {asked}")
            self._flights[asked] = task
            task.add_done_callback(functools.partial(self._landed, asked))
        ctx = await asyncio.shield(task)
        if ctx is None:
            self.counters.misses += 1
        return ctx

    def _landed(self, name: str, _task: object) -> None:
        self._flights.pop(name, None)

    def contexts(self) -> list[ssl.SSLContext]:
        """Every cached context (for a module that must update them all, e.g. ticket keys)."""
        return [e.ctx for e in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    # -- resolution --
    async def _resolve(self, name: str) -> ssl.SSLContext | None:
        """Exact name first, then its wildcard; in each, the directory before the store."""
        self.counters.fetches += 1
        keys = [name]
        parent = name.partition(".")[2]
        if normalise("*." + parent) is not None:
            keys.append("*." + parent)
        try:
            async with asyncio.timeout(self.fetch_timeout):
                for key in keys:
                    e = self._entries.get(key)
                    if e is not None and self.clock() <= e.not_after:
                        return e.ctx  # filled meanwhile (a scan, another name's wildcard)
                    entry = await self._from_dir(key)
                    if entry is None and self.store is not None:
                        entry = await self._from_store(key)
                    if entry is not None:
                        return self._insert(key, entry)
        except TimeoutError:
            self.counters.timeouts += 1
            log.warning("certificate for %s: no answer in %gs", name, self.fetch_timeout)
        except Exception:  # a bug (or the configure hook) fails this name, not the worker
            log.exception("certificate for %s: resolution failed", name)
        self._remember_miss(name)
        return None

    async def _from_dir(self, key: str) -> _Entry | None:
        if self.dir is None:
            return None
        built = await self._in_thread(self._build_from_dir, key, self.clock(), "")
        fresh = time.monotonic() - self._last_miss_scan > MISS_SCAN_GAP
        if built.entry is None and built.rejected is None and fresh:
            self._last_miss_scan = time.monotonic()
            await self._scan()  # a file added since the last scan
            built = await self._in_thread(self._build_from_dir, key, self.clock(), "")
        if built.rejected is not None:
            self._rejected(built.source, built.value_digest, built.rejected)
        return built.entry

    async def _from_store(self, key: str) -> _Entry | None:
        """None when the store has no such key, is unreachable, or holds a refused value."""
        assert self.store is not None
        source = self.store.source(key)
        try:
            value = await self.store.fetch(key)
        except StoreUnavailableError as e:
            self.counters.store_errors += 1
            log.debug("certificate for %s: store unreachable (%s)", key, e)
            return None
        except CertError as e:
            self._rejected(source, e.detail, e)
            return None
        if value is None:
            return None
        built = await self._in_thread(self._build_value, key, value, source, self.clock())
        if built.rejected is not None:
            self._rejected(source, built.value_digest, built.rejected)
        return built.entry

    # -- on the certificate thread --
    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _build_from_dir(self, key: str, now: float, current: str) -> _Built:
        """The directory's best bundle for `key`, built unless its digest is `current`."""
        assert self.dir is not None
        best = self.dir.best(key, now)
        if best is None:
            return _Built()
        path, bundle = best
        source = self.dir.source(path)
        if bundle.digest == current:
            return _Built(source=source, value_digest=current)
        try:
            ctx = server_context(bundle, self.alpn)
        except CertError as e:
            return _Built(rejected=e, source=source, value_digest=bundle.digest)
        entry = _Entry(ctx, bundle.digest, bundle.not_after, source, False, time.monotonic())
        return _Built(entry=entry, source=source)

    def _build_value(self, key: str, value: bytes, source: str, now: float) -> _Built:
        """Parse, check for `key` at `now` and build: the bytes read are the bytes served."""
        vdigest = hashlib.sha256(value).hexdigest()
        try:
            bundle = load_bundle(value)
            check(bundle, key, now)
            ctx = server_context(bundle, self.alpn)
        except CertError as e:
            return _Built(rejected=e, source=source, value_digest=vdigest)
        entry = _Entry(ctx, bundle.digest, bundle.not_after, source, True, time.monotonic())
        return _Built(entry=entry, source=source, value_digest=vdigest)

    # -- keeping entries current --
    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scan_interval)
            try:
                await self._scan()
            except Exception:  # a bug must not stop the scanning of later changes
                log.exception("certificate directory scan failed")

    async def _scan(self) -> None:
        """Scan the directory; re-choose every cached name whose files changed."""
        assert self.dir is not None
        result: ScanResult = await self._in_thread(self.dir.scan, self.clock())
        for text in result.errors:
            log.error("certificate directory: %s", text)
        for path, err in result.rejected:  # a scan reports a file once per change
            self._rejected(self.dir.source(path), None, err)
        if not result.changed:
            return
        self._misses.clear()  # a new file may cover any name that missed
        for key in sorted(result.changed):
            e = self._entries.get(key)
            if e is None:
                if not key.startswith("*.") and "*." + key.partition(".")[2] in self._entries:
                    await self._shadow(key)
                continue
            built = await self._in_thread(self._build_from_dir, key, self.clock(), e.digest)
            if self._entries.get(key) is not e:
                continue  # replaced or evicted while building
            if built.rejected is not None:
                self._rejected(built.source, built.value_digest, built.rejected)
            elif built.entry is not None:
                self._replace(key, e, built.entry)
            elif not built.source and not e.from_store:
                del self._entries[key]  # no file has it any more: removed, not refused
                self.counters.removed += 1
                log.info("certificate for %s: %s no longer has it", key, e.source)

    async def _shadow(self, key: str) -> None:
        """A file for `key` appeared while its wildcard is cached, which lookup would find
        first: load the exact certificate now, so the more specific one serves."""
        built = await self._in_thread(self._build_from_dir, key, self.clock(), "")
        if built.rejected is not None:
            self._rejected(built.source, built.value_digest, built.rejected)
        elif built.entry is not None and key not in self._entries:
            self._insert(key, built.entry)

    async def _refresh(self, key: str) -> None:
        """Read a store entry again: a valid new value replaces it, a deleted key drops it,
        a refused value or an unreachable store leaves it serving."""
        assert self.store is not None
        source = self.store.source(key)
        try:
            async with asyncio.timeout(self.fetch_timeout):
                value = await self.store.fetch(key)
                built = None
                if value is not None:
                    built = await self._in_thread(
                        self._build_value, key, value, source, self.clock()
                    )
        except (StoreUnavailableError, TimeoutError):
            self.counters.store_errors += 1
            return
        except CertError as err:
            self._rejected(source, err.detail, err)
            return
        e = self._entries.get(key)
        if e is None or not e.from_store:
            return  # evicted, or the directory took the name meanwhile
        if built is None:
            del self._entries[key]
            self.counters.removed += 1
            log.info("certificate for %s: %s was deleted", key, e.source)
        elif built.rejected is not None:
            self._rejected(source, built.value_digest, built.rejected)
        elif built.entry is not None:
            self._replace(key, e, built.entry)

    def _replace(self, key: str, old: _Entry, new: _Entry) -> None:
        if new.digest == old.digest:
            old.checked = new.checked
            return
        new.ctx = self._configured(new.ctx)
        self._entries[key] = new
        self.counters.replaced += 1
        log.info("certificate for %s replaced by a newer valid one (%s)", key, new.source)

    # -- bookkeeping --
    def _configured(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        if self.configure is not None:
            self.configure(ctx)  # on the loop: the hook may read the worker's state
        return ctx

    def _insert(self, key: str, entry: _Entry) -> ssl.SSLContext:
        entry.ctx = self._configured(entry.ctx)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self.counters.loaded += 1
        while len(self._entries) > self.cache_size:
            self._entries.popitem(last=False)
            self.counters.evicted_lru += 1
        return entry.ctx

    def _remember_miss(self, name: str) -> None:
        self._misses[name] = time.monotonic() + self.miss_ttl
        self._misses.move_to_end(name)
        while len(self._misses) > self._miss_bound:
            self._misses.popitem(last=False)

    def _rejected(self, source: str, mark: str | None, err: CertError) -> None:
        """Log and count a refused certificate, once per (source, value) when `mark` names
        the value (a store value read again and again); every time when None."""
        if mark is not None:
            if (source, mark) in self._logged:
                return
            self._logged[(source, mark)] = None
            while len(self._logged) > LOGGED_BOUND:
                self._logged.popitem(last=False)
        self.counters.rejected[err.reason] += 1
        log.error("certificate refused: %s: %s", source, err)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
