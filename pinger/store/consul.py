"""Consul backend, written to Consul's documented HTTP API (the agents in cluster.endpoints).

A session per start (TTL, Behavior=delete, LockDelay 0s so a restarted node re-acquires its
keys at once), renewed every TTL/2 (or half the longer TTL Consul may answer), destroyed on a
clean stop; keys are put with ?acquire=<session>. The prefix is followed with rate-limited
blocking queries by the documented rules for X-Consul-Index. Keys drop the prefix's leading /.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import orjson

from pinger.store.base import BaseStore
from pinger.store.errors import SessionLostError, StoreError
from pinger.store.http import Response, json_body
from pinger.store.records import LoadRecord, NodeRecord, Record, decode, encode, record_key

log = logging.getLogger("edgeproxy.store.consul")

BLOCK_WAIT = 60.0  # seconds a blocking query may hang (Consul adds up to wait/16)
MIN_QUERY_INTERVAL = 0.05  # rate limit of the blocking-query loop
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration ("10s", "1m30s", "1.5s") in seconds; ValueError if it is not one."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def next_index(previous: int, returned: int) -> int:
    """The index of the next blocking query, by Consul's documented rules.

    An index that is not greater than zero is taken as 1 (or the query would never block);
    one that went backwards resets to 0, a fresh non-blocking read.
    """
    if returned <= 0:
        return 1
    if returned < previous:
        return 0
    return returned


class ConsulStore(BaseStore):
    """The Consul backend (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session = ""
        self.renew_every = self.ttl / 2
        self.index = 0
        self.min_query_interval = MIN_QUERY_INTERVAL
        self.block_wait = BLOCK_WAIT
        self._listed: dict[str, bytes] = {}

    def key_prefix(self) -> str:
        return self.cluster.prefix.lstrip("/")

    def _kv(self, key: str) -> str:
        return "/v1/kv/" + quote(key, safe="/")

    async def _put(self, method: str, path: str, body: Any = None) -> Any:
        raw = None if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
        return json_body(await self.http.request(method, path, raw), f"{method} {path}")

    # -- BaseStore hooks --
    async def open_session(self) -> None:
        assert self.me is not None
        body = {
            "Name": f"edgeproxy-{self.me.id}",
            "TTL": f"{self.ttl:g}s",
            "Behavior": "delete",
            "LockDelay": "0s",
        }
        data = await self._put("PUT", "/v1/session/create", body)
        if not isinstance(data, dict) or not isinstance(data.get("ID"), str):
            raise StoreError(f"session create: unexpected answer {data!r}")
        self.session = data["ID"]
        self.renew_every = self.ttl / 2

    async def register(self) -> None:
        me = self.me
        assert me is not None
        resp = await self.http.request("GET", self._kv(self.key_prefix() + record_key(me)))
        for e in self._entries(resp):
            old = decode(record_key(me), _value(e))
            holder = e.get("Session")
            if isinstance(old, NodeRecord) and old.boot_epoch > me.boot_epoch:
                log.error(
                    "consul: node %s is registered with a newer epoch %d", me.id, old.boot_epoch
                )
            elif holder and holder != self.session:
                # a previous life (or our last session) holds our keys: end it, so they go now
                log.info(
                    "consul: node %s: session %s (a previous life, or our last session) "
                    "holds our keys, destroying it",
                    me.id,
                    holder,
                )
                await self._put("PUT", f"/v1/session/destroy/{holder}")
        recs: Sequence[Record] = [me, *self.instances, *self.loads.values()]
        await self._acquire_all(recs)

    async def _acquire_all(self, recs: Sequence[Record]) -> None:
        for rec in recs:
            key = self.key_prefix() + record_key(rec)
            ok = await self._put("PUT", f"{self._kv(key)}?acquire={self.session}", encode(rec))
            if ok is not True:
                raise StoreError(f"acquire {key}: refused (held by another session?)")

    async def relist(self) -> None:
        resp = await self.http.request("GET", self._kv(self.key_prefix()) + "?recurse")
        self._apply(resp, force=True)

    async def run_session(self) -> None:
        await self.run_until_failure(self._renew(), self._watch())

    async def put_loads(self, recs: Sequence[LoadRecord]) -> None:
        await self._acquire_all(recs)

    async def destroy_session(self) -> None:
        if self.session:
            await self._put("PUT", f"/v1/session/destroy/{self.session}")
            self.session = ""

    def forget_session(self) -> None:
        self.session = ""

    # -- loops --
    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            resp = await self.http.request("PUT", f"/v1/session/renew/{self.session}")
            if resp.status == 404:
                raise SessionLostError(f"session {self.session} is gone")
            data = json_body(resp, "session renew")
            try:
                ttl = parse_duration(data[0]["TTL"])
            except (LookupError, TypeError, ValueError):
                continue
            if ttl / 2 > self.renew_every:  # the server asks us to renew less often
                log.info("consul: server raised the session TTL to %gs", ttl)
                self.renew_every = ttl / 2

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            pause = last + self.min_query_interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            last = loop.time()
            q = f"?recurse&index={self.index}&wait={self.block_wait:g}s"
            timeout = self.block_wait * 17 / 16 + self.http.timeout
            resp = await self.http.request("GET", self._kv(self.key_prefix()) + q, timeout=timeout)
            self._apply(resp)

    # -- listing --
    def _entries(self, resp: Response) -> list[dict[str, Any]]:
        if resp.status == 404:
            return []
        data = json_body(resp, "kv read")
        if not isinstance(data, list):
            raise StoreError(f"kv read: unexpected answer {resp.body[:200]!r}")
        return [e for e in data if isinstance(e, dict) and isinstance(e.get("Key"), str)]

    def _apply(self, resp: Response, force: bool = False) -> None:
        entries = self._entries(resp)
        try:
            returned = int(resp.headers.get("x-consul-index", "0"))
        except ValueError:
            returned = 0
        self.index = next_index(0 if force else self.index, returned)
        listed = {e["Key"]: _value(e) for e in entries}
        if listed == self._listed and not force:
            return
        self._listed = listed
        self.records.clear()
        for key, value in listed.items():
            self.records.put(key, value)
        self.notify()


def _value(entry: dict[str, Any]) -> bytes:
    v = entry.get("Value")
    return base64.b64decode(v) if isinstance(v, str) else b""
