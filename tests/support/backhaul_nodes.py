"""Nodes with a backhaul for the mutual TLS tests: their configs, fake peers, raw TLS clients.

Owns a node's TOML (duck-types proxyctl.ProxyConfig for proxyctl.Proxy: http and admin
on 127.0.0.1, the backhaul on the node's own 127.0.0.x), peers that pretend (a TLS
server with some certificate, a plaintext server, one that never answers) recording
every application byte they get, and clients that speak to a backhaul port from a
chosen 127.0.0.x source with any certificate or none. Everything stays on 127/8 and
every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certgen import CA, Leaf, key_pem
from ports import free_port
from proxyctl import toml_value

from proxy.fleetca import load_ca

NODE_URI = "spiffe://edgeproxy/node/"


def section(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"


@dataclass
class BackhaulNode:
    """One node's config; `backhaul` is its [backhaul] table (files, or insecure)."""

    node_id: str
    ip: str
    backhaul: dict[str, Any]
    instances: list[dict[str, str]] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    listen_backhaul: bool = True
    workers: int = 1
    hosts: tuple[str, ...] = ("hello.test",)  # of the one app, "hello"
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    backhaul_port: int = 0

    def __post_init__(self) -> None:
        self.backhaul_port = free_port(self.ip)

    @property
    def backhaul_address(self) -> str:
        return f"{self.ip}:{self.backhaul_port}"

    @property
    def control(self) -> str:
        return f"/tmp/edgeproxy-bh-{self.uid}.sock"

    def render(self) -> str:
        listen: dict[str, Any] = {
            "http": [f"127.0.0.1:{self.port}"],
            "admin": f"127.0.0.1:{self.admin_port}",
            "control": self.control,
        }
        if self.listen_backhaul:
            listen["backhaul"] = self.backhaul_address
        out = section("node", {"id": self.node_id, "region": self.node_id})
        out += section("listen", listen)
        out += section("workers", {"count": self.workers, "drain_timeout": 5, "quiet_period": 1})
        out += section(
            "pinger", {"listen": f"127.0.0.1:{free_port('127.0.0.1', socket.SOCK_DGRAM)}"}
        )
        out += section("table", {"name": f"edgeproxy-bh-{self.uid}", "writer": "master"})
        out += section("backhaul", self.backhaul)
        for name, values in self.extra.items():
            out += section(name, values)
        app = {"name": "hello", "hosts": list(self.hosts)}
        out += "[[app]]\n" + section("", app).split("\n", 1)[1]
        for p in self.peers:
            out += "[[peer]]\n" + section("", p).split("\n", 1)[1]
        for i in self.instances:
            out += "[[instance]]\n" + section("", {"app": "hello", **i}).split("\n", 1)[1]
        return out


def fleet_signer(ca_dir: Path) -> CA:
    """The fleet CA of `ca_dir` as a certgen CA, to sign leaves `ca issue` would not make."""
    cert, key = load_ca(str(ca_dir))
    return CA(key, cert)


def write_leaf(leaf: Leaf, where: Path, name: str) -> tuple[str, str]:
    """(certificate path, key path) of `leaf`, written under `where`."""
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    cert.write_bytes(leaf.chain_pem())
    key.write_bytes(key_pem(leaf.key))
    return str(cert), str(key)


def client_context(cert: str | None, key: str | None) -> ssl.SSLContext:
    """A TLS 1.3 client that does not check the server (a hostile client does not care)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def connect_from(src: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to host:port from the loopback address `src`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect((host, port))
    except OSError:
        s.close()
        raise
    return s


@dataclass
class Exchange:
    """What a client got: the handshake's error (if any) and the bytes read until the end."""

    handshake_error: str = ""
    data: bytes = b""
    ended_by: str = ""  # "eof", "reset", "timeout", or the TLS error that ended reading
    session: ssl.SSLSession | None = None  # the TLS session at the end (tickets included)
    resumed: bool = False


def talk(
    src: str,
    host: str,
    port: int,
    ctx: ssl.SSLContext | None,
    send: bytes,
    timeout: float = 5.0,
    then: bytes = b"",
    session: ssl.SSLSession | None = None,
) -> Exchange:
    """Connect from `src`, do TLS with `ctx` (None: plaintext; offering `session` to
    resume), send `send` (and `then`), and read until the server closes, fails or
    `timeout` passes."""
    out = Exchange()
    sock: socket.socket = connect_from(src, host, port, timeout)
    try:
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, session=session)
            except (ssl.SSLError, OSError) as e:
                out.handshake_error = f"{type(e).__name__}: {e}"
                return out
            tls = sock
            assert isinstance(tls, ssl.SSLSocket)
            out.resumed = tls.session_reused
        try:
            if send:
                sock.sendall(send)
            if then:
                sock.sendall(then)
        except (ssl.SSLError, OSError) as e:
            out.ended_by = f"send: {type(e).__name__}: {e}"
            return out
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                out.ended_by = "timeout"
                return out
            except ssl.SSLError as e:
                out.ended_by = f"tls: {e.reason or e}"
                return out
            except ConnectionResetError:
                out.ended_by = "reset"
                return out
            if not chunk:
                out.ended_by = "eof"
                return out
            out.data += chunk
    finally:
        if isinstance(sock, ssl.SSLSocket):
            out.session = sock.session
        with contextlib.suppress(OSError):
            sock.close()


class FakePeer:
    """A server at ip:port that pretends to be a node. mode "tls": a TLS 1.3 server with
    `cert`/`key`; "plain": answers
    anything with a plaintext HTTP 200; "stall": accepts and never sends a byte.
    `received` holds every application byte it was sent (after a TLS handshake)."""

    def __init__(self, ip: str, mode: str, cert: str | None = None, key: str | None = None):
        self.ip = ip
        self.mode = mode
        self.port = free_port(ip)
        self.received = b""
        self.handshakes = 0
        self.connections = 0
        self.ctx: ssl.SSLContext | None = None
        if mode == "tls":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(cert, key)  # type: ignore[arg-type]
            self.ctx = ctx  # asks for no client certificate: the edge's checks are under test
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, self.port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        if self.mode == "stall":
            with self.lock:
                self.held.append(conn)
            return
        try:
            if self.mode == "tls":
                assert self.ctx is not None
                conn = self.ctx.wrap_socket(conn, server_side=True)
                with self.lock:
                    self.handshakes += 1
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                with self.lock:
                    self.received += data
                if self.mode == "plain":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (OSError, ssl.SSLError):
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.stopping = True
        self.sock.close()
        with self.lock:
            for c in self.held:
                c.close()
        self.thread.join(timeout=5)


def wait_for(what: str, cond: Any, timeout: float = 10.0, step: float = 0.05) -> Any:
    """Poll `cond` until it is truthy; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
