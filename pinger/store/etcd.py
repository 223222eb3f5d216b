"""etcd v3 backend through etcd's JSON gRPC gateway (HTTP/1.1 on asyncio streams).

One lease per session (granted with the cluster TTL, kept alive every TTL/3, revoked on a
clean stop); every key is put with it in a txn. The prefix is listed with a range and
followed by a streaming watch from the listed revision + 1; a compaction, a cancel or a
lost stream means a full re-list and a new watch, on whichever endpoint answers. A watch
whose member froze (the connection stays up, nothing comes) is noticed: a revision under
the prefix that existed a whole TTL ago and never came through the stream means stalled,
and the watch is re-listed and re-opened elsewhere. The revisions owed are our own writes
(free: the txn answers with its revision) and, when we wrote nothing for a TTL, one probe
of the newest mod revision under the prefix (a range that etcd sorts: once per TTL).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import orjson

from pinger.store.base import BaseStore
from pinger.store.errors import SessionLostError, StoreError
from pinger.store.http import json_body
from pinger.store.records import LoadRecord, NodeRecord, Record, decode, encode, record_key

log = logging.getLogger("edgeproxy.store.etcd")

MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with `prefix`."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


class _RelistError(Exception):
    """The watch can not go on from our revision: list the prefix again."""


class EtcdStore(BaseStore):
    """The etcd v3 backend (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease = 0
        self.revision = 0
        self._owed: tuple[int, float] | None = None  # a revision the watch must deliver, since
        raw = self.key_prefix().encode()
        self._range = {"key": _b64(raw), "range_end": _b64(prefix_end(raw))}

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.http.request("POST", path, orjson.dumps(body))
        data = json_body(resp, path) if resp.body.count(b"\n") <= 1 else None
        if data is None:  # a one-message stream (lease keepalive): the first line
            data = orjson.loads(resp.body.split(b"\n", 1)[0])
        if not isinstance(data, dict):
            raise StoreError(f"{path}: unexpected answer {resp.body[:200]!r}")
        if "error" in data:
            raise StoreError(f"{path}: {data.get('message') or data['error']}")
        return data

    def _put(self, rec: Record) -> dict[str, Any]:
        key = (self.key_prefix() + record_key(rec)).encode()
        return {
            "request_put": {"key": _b64(key), "value": _b64(encode(rec)), "lease": str(self.lease)}
        }

    async def _txn(self, recs: Sequence[Record]) -> None:
        for i in range(0, len(recs), MAX_TXN_OPS):
            ops = [self._put(r) for r in recs[i : i + MAX_TXN_OPS]]
            data = await self._post("/v3/kv/txn", {"success": ops})
            self._owe(int(data.get("header", {}).get("revision", 0)))

    def _owe(self, revision: int) -> None:
        """The watch must bring `revision` (ours, or one seen on the prefix) from now on."""
        if revision > self.revision and self._owed is None:
            self._owed = (revision, time.monotonic())

    # -- BaseStore hooks --
    async def open_session(self) -> None:
        data = await self._post("/v3/lease/grant", {"TTL": max(1, math.ceil(self.ttl))})
        self.lease = int(data["ID"])

    async def register(self) -> None:
        me = self.me
        assert me is not None
        node_key = (self.key_prefix() + record_key(me)).encode()
        found = await self._post("/v3/kv/range", {"key": _b64(node_key)})
        stale_lease = 0
        for kv in found.get("kvs", []):
            old = decode(record_key(me), _unb64(kv.get("value", "")))
            lease = int(kv.get("lease", 0))
            if isinstance(old, NodeRecord) and old.boot_epoch > me.boot_epoch:
                log.error(
                    "etcd: node %s is registered with a newer epoch %d", me.id, old.boot_epoch
                )
            elif lease and lease != self.lease:
                stale_lease = lease  # a previous life's (or our last session's) lease
        await self._txn([me, *self.instances, *self.loads.values()])
        if stale_lease:  # its keys are ours now; revoking removes what the new life lacks
            log.info(
                "etcd: node %s: took over the keys of lease %x (a previous life, or our "
                "last session), revoking it",
                me.id,
                stale_lease,
            )
            try:
                await self._post("/v3/lease/revoke", {"ID": str(stale_lease)})
            except StoreError as e:
                log.debug("etcd: old lease %x: %s", stale_lease, e)

    async def relist(self) -> None:
        data = await self._post("/v3/kv/range", self._range)
        self.records.clear()
        for kv in data.get("kvs", []):
            self.records.put(
                _unb64(kv["key"]).decode("utf-8", "replace"), _unb64(kv.get("value", ""))
            )
        self.revision = int(data["header"]["revision"])

    async def run_session(self) -> None:
        await self.run_until_failure(self._keepalive(), self._watch())

    async def put_loads(self, recs: Sequence[LoadRecord]) -> None:
        await self._txn(recs)

    async def destroy_session(self) -> None:
        if self.lease:
            await self._post("/v3/lease/revoke", {"ID": str(self.lease)})
            self.lease = 0

    def forget_session(self) -> None:
        self.lease = 0

    # -- loops --
    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            data = await self._post("/v3/lease/keepalive", {"ID": str(self.lease)})
            if int(data.get("result", {}).get("TTL", 0)) <= 0:
                raise SessionLostError(f"lease {self.lease:x} expired")

    async def _watch(self) -> None:
        while True:
            req = {"create_request": {**self._range, "start_revision": str(self.revision + 1)}}
            stream = asyncio.ensure_future(
                self.http.stream("/v3/watch", orjson.dumps(req), self._on_watch)
            )
            try:
                why = await self._until_stalled(stream)
            except (_RelistError, StoreError) as e:
                why = str(e)
            finally:
                if not stream.done():
                    stream.cancel()
                    await asyncio.gather(stream, return_exceptions=True)
            log.info("etcd: watch %s; re-listing", why)
            await asyncio.sleep(0.05)  # a stream that keeps failing must not spin
            await self.relist()
            self.notify()

    async def _until_stalled(self, stream: asyncio.Future[None]) -> str:
        """Wait for the stream to end (its error raised), or say why it is deemed stalled:
        a revision owed for a whole TTL has still not come through it."""
        self._owed = None
        probed = time.monotonic()
        while True:
            done, _ = await asyncio.wait({stream}, timeout=self.ttl / 3)
            if done:
                stream.result()
                return "stream ended"
            now = time.monotonic()
            owed = self._owed
            if owed is not None and self.revision >= owed[0]:
                self._owed = owed = None
            if owed is not None:
                if now - owed[1] >= self.ttl:
                    return f"stalled (revision {owed[0]} not seen for {now - owed[1]:.1f} s)"
                continue
            if now - probed < self.ttl:
                continue
            probed = now
            with contextlib.suppress(StoreError):  # none answers: the keepalive deals with it
                self._owe(await self._newest_revision())

    async def _newest_revision(self) -> int:
        """The highest mod revision of any key under the prefix, as an endpoint sees it."""
        probe = {
            **self._range,
            "limit": 1,
            "sort_order": "DESCEND",
            "sort_target": "MOD",
            "keys_only": True,
        }
        data = await self._post("/v3/kv/range", probe)
        kvs = data.get("kvs") or ()
        return int(kvs[0].get("mod_revision", 0)) if kvs else 0

    async def _on_watch(self, line: bytes) -> None:
        msg = orjson.loads(line)
        if "error" in msg:
            raise _RelistError(f"error {msg['error']}")
        res = msg.get("result") or {}
        if int(res.get("compact_revision", 0)) > 0:
            raise _RelistError(f"compacted at {res['compact_revision']}")
        if res.get("canceled"):
            raise _RelistError(f"canceled: {res.get('cancel_reason', '')}")
        changed = False
        for ev in res.get("events", ()):
            kv = ev["kv"]
            key = _unb64(kv["key"]).decode("utf-8", "replace")
            if ev.get("type") == "DELETE":
                changed = self.records.delete(key) or changed
            else:
                changed = self.records.put(key, _unb64(kv.get("value", ""))) or changed
            self.revision = max(self.revision, int(kv.get("mod_revision", 0)))
        if changed:
            self.notify()
