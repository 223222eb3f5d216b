"""A test double of Consul's HTTP API: no Consul server can be installed here.

It follows Consul's documentation for what edgeproxy uses: sessions (create with TTL,
Behavior, LockDelay; renew; destroy; info; TTL expiry, a TTL only as a lower bound),
KV (get, recurse, raw, put, ?acquire / ?release, delete) and blocking queries (X-Consul-Index,
index/wait with a wait/16 jitter). A real HTTP/1.1 server on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(text)
    return sum(float(n) * _UNIT[u] for n, u in parts)


@dataclass
class Session:
    id: str
    name: str
    ttl: float
    behavior: str
    lock_delay: float
    create_index: int
    expires: float
    held: set[str] = field(default_factory=set)

    def entry(self, ttl: float) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": "double",
            "LockDelay": int(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": f"{ttl:g}s",
            "NodeChecks": [],
            "ServiceChecks": None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        }


class ConsulState:
    """The server side: a raft index, the KV store, sessions; thread-safe."""

    def __init__(self, session_ttl_min: float, ttl_multiplier: float) -> None:
        self.cond = threading.Condition()
        self.index = 1
        self.kv: dict[str, dict[str, Any]] = {}
        self.tombstones: dict[str, int] = {}  # key -> index of its delete
        self.sessions: dict[str, Session] = {}
        self.lock_delays: dict[str, float] = {}
        self.session_ttl_min = session_ttl_min
        self.ttl_multiplier = ttl_multiplier  # Consul may invalidate later than the TTL
        self.renew_ttl: float | None = None  # a test sets it to answer renewals with a longer TTL
        self.invalidated: list[tuple[str, float]] = []  # (session id, monotonic time)

    def bump(self) -> int:
        self.index += 1
        self.cond.notify_all()
        return self.index

    def expire(self) -> None:
        with self.cond:
            now = time.monotonic()
            for s in [s for s in self.sessions.values() if s.expires <= now]:
                self.invalidate(s.id)

    def invalidate(self, sid: str) -> bool:
        s = self.sessions.pop(sid, None)
        if s is None:
            return False
        idx = self.bump()
        for key in sorted(s.held):
            e = self.kv.get(key)
            if e is None or e.get("Session") != sid:
                continue
            if s.lock_delay > 0:
                self.lock_delays[key] = time.monotonic() + s.lock_delay
            if s.behavior == "delete":
                del self.kv[key]
                self.tombstones[key] = idx
            else:
                e.pop("Session")
                e["ModifyIndex"] = idx
        self.invalidated.append((sid, time.monotonic()))
        return True

    def prefix_index(self, prefix: str, recurse: bool) -> int:
        """The index a read of `prefix` reports: its newest entry or tombstone, else the table's."""

        def match(k: str) -> bool:
            return k.startswith(prefix) if recurse else k == prefix

        best = max([e["ModifyIndex"] for k, e in self.kv.items() if match(k)], default=0)
        best = max([best, *[i for k, i in self.tombstones.items() if match(k)]])
        return best or self.index


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.double.conns.add(self.connection)

    def finish(self) -> None:
        self.server.double.conns.discard(self.connection)
        super().finish()

    def _send(self, status: int, body: Any, index: int | None = None) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, text: str) -> None:
        raw = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        u = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
        body = self._body()
        st = self.server.double.state
        path = u.path
        if path.startswith("/v1/kv/"):
            self._kv(st, method, unquote(path[len("/v1/kv/") :]), q, body)
        elif path == "/v1/session/create" and method == "PUT":
            self._session_create(st, body)
        elif path.startswith("/v1/session/renew/") and method == "PUT":
            self._session_renew(st, path.rsplit("/", 1)[1])
        elif path.startswith("/v1/session/destroy/") and method == "PUT":
            with st.cond:
                st.invalidate(path.rsplit("/", 1)[1])
            self._send(200, True)
        elif path.startswith("/v1/session/info/") and method == "GET":
            with st.cond:
                s = st.sessions.get(path.rsplit("/", 1)[1])
                self._send(200, [s.entry(s.ttl)] if s else [], st.index)
        else:
            self._error(404, "not found")

    def _session_create(self, st: ConsulState, body: bytes) -> None:
        try:
            req = json.loads(body or b"{}")
            ttl = parse_duration(req["TTL"]) if req.get("TTL") else 0.0
            delay = req.get("LockDelay", "15s")
            lock_delay = parse_duration(delay) if isinstance(delay, str) else delay / 1e9
        except (ValueError, KeyError, TypeError) as e:
            self._error(400, f"Request decode failed: {e}")
            return
        behavior = req.get("Behavior", "release")
        if behavior not in ("release", "delete"):
            self._error(400, f"Invalid Behavior setting '{behavior}'")
            return
        if ttl and not st.session_ttl_min <= ttl <= 86400:
            self._error(
                400, f"Invalid Session TTL '{ttl}', must be between [{st.session_ttl_min}s=24h0m0s]"
            )
            return
        with st.cond:
            idx = st.bump()
            sid = str(uuid.uuid4())
            expires = time.monotonic() + ttl * st.ttl_multiplier if ttl else float("inf")
            st.sessions[sid] = Session(
                sid, req.get("Name", ""), ttl, behavior, lock_delay, idx, expires
            )
        self._send(200, {"ID": sid})

    def _session_renew(self, st: ConsulState, sid: str) -> None:
        with st.cond:
            s = st.sessions.get(sid)
            if s is None:
                self._error(404, f"Session id '{sid}' not found")
                return
            if st.renew_ttl is not None and st.renew_ttl > s.ttl:
                s.ttl = st.renew_ttl
            s.expires = time.monotonic() + s.ttl * st.ttl_multiplier
            self._send(200, [s.entry(s.ttl)], st.index)

    def _kv(self, st: ConsulState, method: str, key: str, q: dict[str, str], body: bytes) -> None:
        if method == "GET":
            self._kv_get(st, key, q)
            return
        with st.cond:
            if method == "DELETE":
                keys = [k for k in st.kv if k.startswith(key)] if "recurse" in q else [key]
                idx = st.bump()
                for k in keys:
                    if st.kv.pop(k, None) is not None:
                        st.tombstones[k] = idx
                self._send(200, True)
                return
            if "acquire" in q or "release" in q:
                sid = q.get("acquire") or q.get("release") or ""
                s = st.sessions.get(sid)
                if s is None:
                    self._error(500, f'invalid session "{sid}"')
                    return
                cur = st.kv.get(key)
                if "acquire" in q:
                    if cur is not None and cur.get("Session") not in (None, sid):
                        self._send(200, False)
                        return
                    if st.lock_delays.get(key, 0) > time.monotonic():
                        self._send(200, False)
                        return
                    self._write(
                        st, key, body, cur, sid, new_lock=cur is None or cur.get("Session") != sid
                    )
                    s.held.add(key)
                else:
                    if cur is None or cur.get("Session") != sid:
                        self._send(200, False)
                        return
                    self._write(st, key, body, cur, None, new_lock=False)
                    s.held.discard(key)
                self._send(200, True)
                return
            self._write(st, key, body, st.kv.get(key), "keep", new_lock=False)
            self._send(200, True)

    @staticmethod
    def _write(
        st: ConsulState,
        key: str,
        body: bytes,
        cur: dict[str, Any] | None,
        sid: str | None,
        new_lock: bool,
    ) -> None:
        idx = st.bump()
        e = cur or {"Key": key, "Flags": 0, "LockIndex": 0, "CreateIndex": idx}
        e["Value"] = base64.b64encode(body).decode() if body else None
        e["ModifyIndex"] = idx
        if new_lock:
            e["LockIndex"] += 1
        if sid is None:
            e.pop("Session", None)
        elif sid != "keep":
            e["Session"] = sid
        st.kv[key] = e
        st.tombstones.pop(key, None)

    def _kv_get(self, st: ConsulState, key: str, q: dict[str, str]) -> None:
        recurse = "recurse" in q
        try:
            min_index = int(q.get("index", "0") or 0)
            wait = min(parse_duration(q["wait"]) if "wait" in q else 300.0, 600.0)
        except ValueError:
            self._error(400, "Invalid index or wait")
            return
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        double = self.server.double
        with st.cond:
            while (
                min_index > 0 and st.prefix_index(key, recurse) <= min_index and not double.stopping
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                st.cond.wait(min(left, 0.2))
            if double.stopping:
                return
            idx = st.prefix_index(key, recurse) - double.index_offset
            rows = sorted(
                (k, e) for k, e in st.kv.items() if (k.startswith(key) if recurse else k == key)
            )
            entries = [dict(e) for _, e in rows]
        if not entries:
            self._send(404, None, idx)
        elif "raw" in q and not recurse:  # the value alone, undecoded (Consul's ?raw)
            self._send_raw(base64.b64decode(entries[0].get("Value") or ""), idx)
        else:
            self._send(200, entries, idx)

    def _send_raw(self, raw: bytes, index: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("X-Consul-Index", str(index))
        self.end_headers()
        self.wfile.write(raw)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    double: ConsulDouble

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer (a cancelled blocking query)


class ConsulDouble:
    """Start with `start()`; `stop()` takes the HTTP API down (state kept, TTLs still run)."""

    def __init__(
        self, session_ttl_min: float = 10.0, ttl_multiplier: float = 1.0, port: int = 0
    ) -> None:
        self.state = ConsulState(session_ttl_min, ttl_multiplier)
        self.port = port
        self.conns: set[socket.socket] = set()
        self.stopping = False
        self.index_offset = 0  # a test makes X-Consul-Index go backwards with it
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="consul-double-ttl")
        self._reaper.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _reap(self) -> None:
        while not self._reaper_stop.wait(0.02):
            self.state.expire()

    def start(self) -> None:
        self.stopping = False
        srv = _Server(("127.0.0.1", self.port), _Handler)
        srv.double = self
        self.port = srv.server_address[1]
        self._server = srv
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        self._threads = [t]

    def stop(self) -> None:
        """The agent goes away: the listener closes and open connections are cut."""
        if self._server is None:
            return
        self.stopping = True
        with self.state.cond:
            self.state.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for c in list(self.conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        self._server = None

    def close(self) -> None:
        self.stop()
        self._reaper_stop.set()
        self._reaper.join(5)

    def key_names(self) -> list[str]:
        with self.state.cond:
            return sorted(self.state.kv)
