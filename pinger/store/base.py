"""The store interface the pinger uses, and the machinery every backend shares.

Owns the `Store` protocol (the daemon's only view of a backend) and `BaseStore`:
session supervision, outage handling and the views() fan-out; backends fill the
hooks. It must not pick a backend (pinger.store does) nor speak a backend's API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from pinger.store.backoff import Backoff
from pinger.store.errors import StoreError
from pinger.store.http import Http
from pinger.store.records import ClusterView, InstanceRecord, LoadRecord, NodeRecord, Records
from proxy.config import ClusterConfig

log = logging.getLogger("edgeproxy.store")


class Store(Protocol):
    healthy: bool

    async def start(self, me: NodeRecord, instances: Sequence[InstanceRecord]) -> None: ...
    async def publish_loads(self, loads: Mapping[str, int], now: float) -> None: ...
    def views(self) -> AsyncIterator[ClusterView]: ...
    async def close(self) -> None: ...


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
