"""The cluster store seen by the pinger: records, the Store interface, the shared machinery.

Key layout under `cluster.prefix` (values are orjson records, each with the publisher's
boot epoch): `nodes/{id}`, `instances/{node}/{id}`, `load/{node}/{instance}`; every key is
held by the node's etcd lease or Consul session (Consul keys drop the leading "/").
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from proxy.config import ClusterConfig, Config

log = logging.getLogger("edgeproxy.store")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: str
    region: str
    ping: str
    backhaul: str
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    app: str
    id: str
    node: str
    address: str
    soft_limit: int
    hard_limit: int
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class LoadRecord:
    instance: str
    node: str
    load: int
    time: float
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    nodes: Mapping[str, NodeRecord]
    instances: Mapping[str, InstanceRecord]
    loads: Mapping[str, LoadRecord]


class Store(Protocol):
    healthy: bool

    async def start(self, me: NodeRecord, instances: Sequence[InstanceRecord]) -> None: ...
    async def publish_loads(self, loads: Mapping[str, int], now: float) -> None: ...
    def views(self) -> AsyncIterator[ClusterView]: ...
    async def close(self) -> None: ...


def open_store(config: Config) -> Store | None:
    """The configured backend (not started yet), or None for store = "none"."""
    kind = config.cluster.store
    if kind == "etcd":
        from pinger.etcd import EtcdStore

        return EtcdStore(config.cluster)
    if kind == "consul":
        from pinger.consul import ConsulStore

        return ConsulStore(config.cluster)
    return None


class StoreError(Exception):
    """The store could not be reached or refused a request (never escapes the daemon API)."""


class SessionLostError(StoreError):
    """Our lease / session is gone (expired or revoked): re-create it."""


# --- records -----------------------------------------------------------------------------

Record = NodeRecord | InstanceRecord | LoadRecord
_KINDS: dict[str, tuple[type[Any], int]] = {
    "nodes": (NodeRecord, 1),
    "instances": (InstanceRecord, 2),
    "load": (LoadRecord, 2),
}
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
}


def record_key(rec: Record) -> str:
    """The key of a record, relative to the prefix."""
    if isinstance(rec, NodeRecord):
        return f"nodes/{rec.id}"
    if isinstance(rec, InstanceRecord):
        return f"instances/{rec.node}/{rec.id}"
    return f"load/{rec.node}/{rec.instance}"


def encode(rec: Record) -> bytes:
    return orjson.dumps(rec)


def decode(rel_key: str, value: bytes) -> Record | None:
    """The record stored under `rel_key`, or None (logged) when it is not one of ours."""
    kind, _, rest = rel_key.partition("/")
    spec = _KINDS.get(kind)
    if spec is None or len(rest.split("/")) != spec[1]:
        return None
    cls, _ = spec
    try:
        data = orjson.loads(value)
        if not isinstance(data, dict) or set(data) != set(cls.__slots__):
            raise ValueError("wrong fields")
        for name, ftype in cls.__annotations__.items():
            v = data[name]
            if isinstance(v, bool) or not isinstance(v, _TYPES[ftype]):
                raise ValueError(f"{name}: {v!r}")
        rec: Record = cls(**data)
    except (orjson.JSONDecodeError, ValueError) as e:
        log.warning("store: ignoring malformed record %s: %s", rel_key, e)
        return None
    if record_key(rec) != rel_key:
        log.warning("store: ignoring record %s that names another key", rel_key)
        return None
    return rec


@dataclass(slots=True)
class Records:
    """The raw records under the prefix, as last listed and watched."""

    prefix: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    loads: dict[str, LoadRecord] = field(default_factory=dict)

    def clear(self) -> None:
        self.nodes.clear()
        self.instances.clear()
        self.loads.clear()

    def put(self, key: str, value: bytes) -> bool:
        if not key.startswith(self.prefix):
            return False
        rel = key[len(self.prefix) :]
        rec = decode(rel, value)
        if rec is None:
            return self.delete(key)
        if isinstance(rec, NodeRecord):
            self.nodes[rel] = rec
        elif isinstance(rec, InstanceRecord):
            self.instances[rel] = rec
        else:
            self.loads[rel] = rec
        return True

    def delete(self, key: str) -> bool:
        rel = key[len(self.prefix) :]
        found = False
        for d in (self.nodes, self.instances, self.loads):
            found = d.pop(rel, None) is not None or found
        return found

    def view(self) -> ClusterView:
        """Only each node's newest epoch, and only nodes that have a node record."""
        epoch = {n.id: n.boot_epoch for n in self.nodes.values()}
        others: list[InstanceRecord | LoadRecord] = [*self.instances.values(), *self.loads.values()]
        for r in others:
            if r.node in epoch and r.boot_epoch > epoch[r.node]:
                epoch[r.node] = r.boot_epoch
        nodes = {n.id: n for n in self.nodes.values() if n.boot_epoch == epoch[n.id]}
        inst = {
            i.id: i
            for _, i in sorted(self.instances.items())
            if i.node in nodes and i.boot_epoch == epoch[i.node]
        }
        loads = {
            x.instance: x
            for _, x in sorted(self.loads.items())
            if x.node in nodes and x.boot_epoch == epoch[x.node]
        }
        return ClusterView(nodes=nodes, instances=inst, loads=loads)


# --- backoff -----------------------------------------------------------------------------


@dataclass(slots=True)
class Backoff:
    """Exponential, bounded, with jitter (each delay is 50-100 % of the nominal one)."""

    base: float
    cap: float
    attempt: int = 0

    def next(self) -> float:
        nominal = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return float(nominal * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0


# --- a minimal HTTP/1.1 client over asyncio streams --------------------------------------


class HttpProtocolError(StoreError):
    pass


_UNAVAILABLE = frozenset((408, 500, 502, 503, 504))
_NET_ERRORS = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    HttpProtocolError,
)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(slots=True, eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class Http:
    """Requests to the first endpoint that answers, in turn; idle connections are reused."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self.targets: list[tuple[str, int, bool]] = []
        for url in endpoints:
            u = urlsplit(url)
            tls = u.scheme == "https"
            self.targets.append((u.hostname or "127.0.0.1", u.port or (443 if tls else 80), tls))
        if not self.targets:
            raise ValueError("no store endpoints")
        self.timeout = timeout
        self.current = 0
        self._idle: dict[int, list[_Conn]] = {}
        self._streams: set[_Conn] = set()
        self._busy: set[_Conn] = set()

    async def _connect(self, i: int) -> _Conn:
        host, port, tls = self.targets[i]
        ctx = ssl.create_default_context() if tls else None
        r, w = await asyncio.open_connection(host, port, ssl=ctx, limit=1 << 22)
        return _Conn(r, w)

    def _head(self, i: int, method: str, path: str, body: bytes | None) -> bytes:
        host, port, _ = self.targets[i]
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: application/json"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float | None = None
    ) -> Response:
        """One exchange; network failures move on to the next endpoint, then raise StoreError."""
        errors = []
        for step in range(len(self.targets)):
            i = (self.current + step) % len(self.targets)
            for reuse in (True, False):
                conn = self._take_idle(i) if reuse else None
                if reuse and conn is None:
                    continue
                try:
                    async with asyncio.timeout(timeout or self.timeout):
                        if conn is None:
                            conn = await self._connect(i)
                        self._busy.add(conn)
                        conn.writer.write(self._head(i, method, path, body))
                        status, headers = await _read_head(conn.reader)
                        data = await _read_body(conn.reader, headers)
                except _NET_ERRORS as e:
                    if conn is not None:
                        conn.close()
                    errors.append(f"{self.targets[i][0]}:{self.targets[i][1]}: {e!r}")
                    if reuse and not isinstance(e, TimeoutError):
                        continue  # a stale keep-alive connection: retry once on a new one
                    break  # a silent endpoint (timeout): the next one, not a second wait
                except BaseException:  # cancelled: the connection is in an unknown state
                    if conn is not None:
                        conn.close()
                    raise
                finally:
                    if conn is not None:
                        self._busy.discard(conn)
                if headers.get("connection", "").lower() == "close":
                    conn.close()
                else:
                    self._idle.setdefault(i, []).append(conn)
                if status in _UNAVAILABLE and step + 1 < len(self.targets):
                    # e.g. a member shutting down or without a leader: another may answer
                    errors.append(f"{self.targets[i][0]}:{self.targets[i][1]}: HTTP {status}")
                    break
                self.current = i
                return Response(status, headers, data)
        raise StoreError("no store endpoint answered: " + "; ".join(errors))

    def _take_idle(self, i: int) -> _Conn | None:
        pool = self._idle.get(i)
        while pool:
            conn = pool.pop()
            if not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def stream(
        self, path: str, body: bytes, on_line: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """POST and feed each newline-delimited line of the response body to `on_line`.

        Returns when the server ends the stream; raises StoreError when no endpoint answers.
        """
        errors = []
        for step in range(len(self.targets)):
            i = (self.current + step) % len(self.targets)
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await self._connect(i)
            except (OSError, TimeoutError) as e:
                errors.append(f"{self.targets[i][0]}:{self.targets[i][1]}: {e!r}")
                continue
            self.current = i
            self._streams.add(conn)
            try:
                conn.writer.write(self._head(i, "POST", path, body))
                async with asyncio.timeout(self.timeout):
                    status, headers = await _read_head(conn.reader)
                if status != 200:
                    raise StoreError(f"stream {path}: HTTP {status}")
                buf = b""
                async for chunk in _iter_body(conn.reader, headers):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            await on_line(line)
                return
            except _NET_ERRORS as e:
                raise StoreError(f"stream {path} lost: {e!r}") from None
            finally:
                self._streams.discard(conn)
                conn.close()
        raise StoreError("no store endpoint answered: " + "; ".join(errors))

    def close(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
        for conn in [*self._streams, *self._busy]:
            conn.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as e:
        raise HttpProtocolError("response head too long") from e
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    return b"".join([c async for c in _iter_body(reader, headers)])


async def _iter_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str]
) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HttpProtocolError("bad Content-Length") from None
        if length:
            yield await reader.readexactly(length)
    else:
        yield await reader.read()  # until the server closes


def json_body(resp: Response, what: str) -> Any:
    """The decoded JSON of a 2xx response, else StoreError naming `what`."""
    if not 200 <= resp.status < 300:
        raise StoreError(f"{what}: HTTP {resp.status}: {resp.body[:200]!r}")
    try:
        return orjson.loads(resp.body)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"{what}: bad JSON: {e}") from None


# --- the shared store machinery ----------------------------------------------------------


class BaseStore:
    """Session supervision, outage handling and the views() fan-out; backends fill the hooks."""

    def __init__(self, cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self.ttl = cluster.ttl
        self.healthy = False
        self.http = Http(cluster.endpoints, timeout=max(0.5, min(5.0, cluster.ttl / 3)))
        self.records = Records(self.key_prefix())
        self.me: NodeRecord | None = None
        self.instances: tuple[InstanceRecord, ...] = ()
        self.loads: dict[str, LoadRecord] = {}  # the last published loads, re-put on return
        self.backoff = Backoff(base=0.2, cap=max(0.5, min(10.0, cluster.ttl / 3)))
        self._version = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- hooks --
    def key_prefix(self) -> str:
        return self.cluster.prefix

    async def open_session(self) -> None:
        raise NotImplementedError

    async def register(self) -> None:
        """Put the node, its instances and the last loads under the current session."""
        raise NotImplementedError

    async def relist(self) -> None:
        """Replace `records` with a full listing of the prefix."""
        raise NotImplementedError

    async def run_session(self) -> None:
        """Keep the session alive and follow changes; returns only by raising StoreError."""
        raise NotImplementedError

    async def put_loads(self, recs: Sequence[LoadRecord]) -> None:
        raise NotImplementedError

    async def destroy_session(self) -> None:
        raise NotImplementedError

    def forget_session(self) -> None:
        """Drop the current session id (it is abandoned, not revoked)."""
        raise NotImplementedError

    # -- the interface --
    async def start(self, me: NodeRecord, instances: Sequence[InstanceRecord]) -> None:
        """Create a session and register; if the store is down, keep trying in the background."""
        await self._stop_task()  # a second start replaces the first supervisor
        self.me = me
        self.instances = tuple(instances)
        try:
            await self._establish()
        except StoreError as e:
            log.warning("store: unreachable at start (%s); retrying in the background", e)
        self._task = asyncio.create_task(self._supervise(), name="store-supervisor")

    async def publish_loads(self, loads: Mapping[str, int], now: float) -> None:
        """Put the loads under the session; during an outage they wait for the return."""
        if self.me is None:
            return
        recs = [
            LoadRecord(i, self.me.id, int(v), now, self.me.boot_epoch) for i, v in loads.items()
        ]
        for r in recs:
            self.loads[r.instance] = r
        if not self.healthy or not recs:
            return
        try:
            await self.put_loads(recs)
        except StoreError as e:
            log.info("store: load publish failed (%s)", e)

    async def views(self) -> AsyncIterator[ClusterView]:
        """The whole current view at first (if any), then after every change; ends on close."""
        seen = 0
        while not self._closed:
            if self._version == seen:
                await self._changed.wait()
                continue
            seen = self._version
            yield self.records.view()

    async def close(self) -> None:
        """Stop and revoke / destroy the session so the keys vanish at once."""
        if self._closed:
            return
        self._closed = True
        await self._stop_task()
        if self.healthy:
            try:
                await self.destroy_session()
            except StoreError as e:
                log.info("store: could not end the session (%s); it expires with its TTL", e)
        self.healthy = False
        self.http.close()
        self.notify()

    async def simulate_crash(self) -> None:
        """Test hook: stop renewing and watching without revoking, as a kill -9 would."""
        self._closed = True
        await self._stop_task()
        self.healthy = False
        self.http.close()
        self.notify()

    # -- internals --
    def notify(self) -> None:
        self._version += 1
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    @staticmethod
    async def run_until_failure(*coros: Coroutine[Any, Any, None]) -> None:
        """Run the loops together; the first one to raise cancels the others and re-raises."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
            raise StoreError("a session loop ended")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if (t := asyncio.current_task()) is not None and t.cancelling():
                    raise
            self._task = None

    async def _establish(self) -> None:
        await self.open_session()
        await self.register()
        await self.relist()
        self.healthy = True
        self.backoff.reset()
        log.info("store: session up, %d keys listed", self._count())
        self.notify()

    def _count(self) -> int:
        r = self.records
        return len(r.nodes) + len(r.instances) + len(r.loads)

    async def _supervise(self) -> None:
        while not self._closed:
            if self.healthy:
                try:
                    await self.run_session()
                except StoreError as e:
                    log.warning("store: lost (%s); keeping the last view", e)
                except Exception:
                    log.exception("store: session loop failed; reconnecting")
                self.healthy = False
                self.forget_session()
                self.http.close()
            await asyncio.sleep(self.backoff.next())
            try:
                await self._establish()
            except StoreError as e:
                log.info("store: still unreachable (%s)", e)
            except Exception:
                log.exception("store: reconnect failed")
