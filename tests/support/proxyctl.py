"""Process and socket helpers for the end-to-end HTTP tests.

Owns starting and stopping `python -m proxy.cli run` and the upstream
subprocess, writing their configs, and a raw-socket HTTP/1.1 client that
reads responses exactly as framed (1xx, Content-Length, chunked, close).
Everything is on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ports import free_port

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
READY_TIMEOUT = 15.0
HOST = "127.0.0.1"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


# -- line reader for a child's stdout ------------------------------------------


class LineReader:
    """Drains a pipe on a thread so a child never blocks on a full stdout."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.all: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for raw in self.pipe:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.all.append(line)
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str | None:
        """The first line starting with `prefix`, or None at EOF or deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(prefix):
                return line

    def close(self) -> None:
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.pipe.close()


# -- the upstream subprocess ---------------------------------------------------


class Upstream:
    """tests/support/upstream.py running in a subprocess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "upstream.py"), "--listen", f"{HOST}:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env(),
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        line = self.reader.wait_for("READY", 10)
        if line is None:
            self.stop()
            raise RuntimeError("upstream did not print READY")
        self.address = line.split()[1]
        self.port = int(self.address.rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        """Counters of the upstream itself (asked directly, not through the proxy)."""
        with Client(self.port) as c:
            c.send(b"GET /_stats HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n")
            r = c.response()
        return json.loads(r.body)

    def release(self, tag: str) -> None:
        """Let the requests it holds for `tag` (/hold, /big?hold_at=) go on."""
        head = f"GET /_release?tag={tag} HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n"
        with Client(self.port) as c:
            c.send(head.encode())
            assert c.response().status == 200

    def wait_open(self, want: int, timeout: float = 5.0) -> int:
        """Poll until the upstream has `want` connections open; return the last count."""
        deadline = time.monotonic() + timeout
        n = self.stats()["open"]
        while n != want and time.monotonic() < deadline:
            time.sleep(0.05)
            n = self.stats()["open"]
        return int(n)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.reader.close()


# -- config --------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _section(name: str, values: dict[str, Any]) -> str:
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    return f"[{name}]\n{body}\n"


@dataclass
class ProxyConfig:
    """What a test may vary; `render` makes the TOML."""

    upstream: str  # host:port of the hello-1 instance
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    workers: int = 2
    timeouts: dict[str, float] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)
    workers_extra: dict[str, Any] = field(default_factory=dict)
    extra_instances: list[dict[str, str]] = field(default_factory=list)
    extra_apps: list[dict[str, Any]] = field(default_factory=list)
    table_extra: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)
    https_port: int | None = None  # an HTTPS listener too (then `tls` names the certificates)
    tls: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)  # [cluster] (the store), if any
    overload: dict[str, Any] = field(default_factory=dict)  # [overload], if any
    tracing: dict[str, Any] = field(default_factory=dict)  # [tracing], if any
    metrics: dict[str, Any] = field(default_factory=dict)  # [metrics], if any
    log: dict[str, Any] = field(default_factory=dict)  # [log], if any
    listen_extra: dict[str, Any] = field(default_factory=dict)  # more [listen] keys (h2c)
    http2: dict[str, Any] = field(default_factory=dict)  # [http2], if any
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def control(self) -> str:
        return f"/tmp/edgeproxy-test-{self.uid}.sock"

    def render(self) -> str:
        out = _section("node", {"id": f"t{self.uid}"})
        listen: dict[str, Any] = {
            "http": [f"{HOST}:{self.port}"],
            "admin": f"{HOST}:{self.admin_port}",
            "control": self.control,
        }
        if self.https_port is not None:
            listen["https"] = [f"{HOST}:{self.https_port}"]
        out += _section("listen", {**listen, **self.listen_extra})
        out += _section("workers", {"count": self.workers, **self.workers_extra})
        if self.timeouts:
            out += _section("timeouts", self.timeouts)
        if self.limits:
            out += _section("limits", self.limits)
        if self.pool:
            out += _section("pool", self.pool)
        if self.trust:
            out += _section("trust", self.trust)
        if self.tls:
            out += _section("tls", self.tls)
        if self.cluster:
            out += _section("cluster", self.cluster)
        if self.overload:
            out += _section("overload", self.overload)
        if self.tracing:
            out += _section("tracing", self.tracing)
        if self.metrics:
            out += _section("metrics", self.metrics)
        if self.log:
            out += _section("log", self.log)
        if self.http2:
            out += _section("http2", self.http2)
        out += _section("pinger", {"listen": f"{HOST}:{free_port(HOST, socket.SOCK_DGRAM)}"})
        out += _section("table", {"name": f"edgeproxy-test-{self.uid}", **self.table_extra})
        apps = [{"name": "hello", "hosts": ["hello.test"], "soft_limit": 20, "hard_limit": 25}]
        for app in apps + self.extra_apps:
            out += "[[app]]\n" + _section("", app).split("\n", 1)[1]
        insts = [{"app": "hello", "id": "hello-1", "address": self.upstream}]
        for inst in insts + self.extra_instances:
            out += "[[instance]]\n" + _section("", inst).split("\n", 1)[1]
        return out


# -- the proxy -----------------------------------------------------------------


class ProxyStartError(Exception):
    pass


class Proxy:
    """`python -m proxy.cli run -c FILE`, started and stopped by a test."""

    def __init__(self, cfg: ProxyConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.port = cfg.port
        self.admin_port = cfg.admin_port
        self.path = workdir / f"edgeproxy-{cfg.uid}.toml"
        self.path.write_text(cfg.render())
        self.stderr_path = workdir / f"proxy-{cfg.uid}.stderr"
        self._spawn([sys.executable, "-m", "proxy.cli", "run", "-c", str(self.path)], REPO, env())

    def _spawn(self, argv: list[str], cwd: Path, environ: dict[str, str]) -> None:
        """Start the master in its own session and wait for its READY line."""
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=environ,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.ready_line = self.reader.wait_for("READY", READY_TIMEOUT)
        if self.ready_line is None:
            rc = self.proc.poll()
            self.stop()
            raise ProxyStartError(
                f"proxy printed no READY within {READY_TIMEOUT}s (exit {rc});\n"
                f"stdout: {self.reader.all!r}\nstderr:\n{self.stderr()}"
            )

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "-c", str(self.path)],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "--json")
        assert r.returncode == 0, f"status failed ({r.returncode}): {r.stderr}"
        return json.loads(r.stdout)

    def workers(self) -> list[dict[str, Any]]:
        return list(self.status()["workers"])

    def serving_pids(self) -> list[int]:
        return sorted(w["pid"] for w in self.workers() if w.get("state") == "serving")

    def metrics(self) -> str:
        with Client(self.admin_port) as c:
            c.send(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            r = c.response()
        assert r.status == 200, r
        return r.body.decode()

    def metric(self, series: str) -> float:
        """The value of one series of /metrics, named exactly as printed
        (`name{label="v",...}`); 0 when the series is absent."""
        return metric_value(self.metrics(), series)

    def wait_metric(self, series: str, at_least: float, timeout: float = 5.0) -> float:
        """Poll /metrics (workers publish their counters about once a second) until
        `series` reaches `at_least`; its last value either way."""
        deadline = time.monotonic() + timeout
        got = self.metric(series)
        while got < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.metric(series)
        return got

    def request(self, raw: bytes, method: str = "GET", timeout: float = 5.0) -> Response:
        """Send `raw` on a fresh connection and read one response."""
        with Client(self.port, timeout=timeout) as c:
            c.send(raw)
            return c.response(method=method)

    def get(self, path: str = "/", host: str = "hello.test") -> Response:
        return self.request(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )

    def proxy_side_connections(self) -> list[tuple[str, str]]:
        """(remote address, TCP state) of sockets on the proxy's port held by a process."""
        return [
            (remote, st)
            for local, remote, st, inode in _proc_net_tcp()
            if local == self.port and st != "0A" and inode != "0"
        ]

    def wait_no_client_connections(self, timeout: float = 5.0) -> list[tuple[str, str]]:
        """Poll until the proxy holds no client connection; return what is left."""
        deadline = time.monotonic() + timeout
        left = self.proxy_side_connections()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.proxy_side_connections()
        return left

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the master, wait, then kill its whole session if it lingers."""
        rc = stop_session(self.proc, sig, timeout)
        self.reader.close()
        self._stderr.close()
        return rc


def stop_session(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int | None:
    """Signal `proc`, wait up to `timeout`, then SIGKILL its whole session (children such as
    workers may outlive it; the session is the test's alone). Its exit status, or None."""
    rc = proc.poll()
    if rc is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=5)
    return rc


def stop_proxies(proxies: list[Proxy]) -> None:
    """Stop every proxy, remove the shared memory it may have left (a killed master, a test's
    own table writer) and print the tail of its stderr for the report."""
    for p in proxies:
        rc = p.stop()
        for seg in Path("/dev/shm").glob(f"edgeproxy-test-{p.cfg.uid}*"):
            seg.unlink(missing_ok=True)
        err = p.stderr()
        print(f"--- proxy {p.cfg.uid} pid {p.proc.pid} exit {rc}; stderr ({len(err)} chars):")
        print(err[-20000:])


def _proc_net_tcp() -> list[tuple[int, str, str, str]]:
    """(local port, remote ip:port, state hex, inode) for every IPv4 TCP socket."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, st, inode = parts[1], parts[2], parts[3], parts[9]
            rip, rport = remote.split(":")
            ip = ".".join(str(b) for b in reversed(bytes.fromhex(rip)))
            out.append((int(local.split(":")[1], 16), f"{ip}:{int(rport, 16)}", st, inode))
    return out


# -- raw HTTP/1.1 client -------------------------------------------------------


class PeerReset(AssertionError):
    """The proxy reset the connection where a clean close was required."""


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes
    interim: list[tuple[int, bytes]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        vals = self.all(name)
        return vals[0] if vals else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.all(name) for t in v.split(",") if t.strip()}

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return f"<Response {self.raw_head!r} body={body!r}>"


class Client:
    """One raw TCP connection to the proxy with a read buffer kept across responses."""

    def __init__(
        self,
        port: int,
        timeout: float = 5.0,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
        host: str = HOST,
        tls: ssl.SSLContext | None = None,
        sni: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        try:
            self.sock.connect((host, port))
            if tls is not None:  # the handshake, bounded by the same timeout
                self.sock = tls.wrap_socket(self.sock, server_hostname=sni, session=session)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.recv_size = 1 << 20
        self.read_delay = 0.0  # seconds to sleep before each read: a slow reader

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete response before the deadline; have {self.buf[:500]!r}")
        if self.read_delay:
            time.sleep(self.read_delay)
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = self.sock.recv(self.recv_size)
        except ConnectionResetError as e:
            raise PeerReset(f"connection reset by the proxy; had read {self.buf[:500]!r}") from e
        except TimeoutError:
            raise TimeoutError(
                f"no complete response before the deadline; have {self.buf[:500]!r}"
            ) from None
        self.buf += data
        return data

    def _line(self, deadline: float) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill(deadline):
                raise EOFError(f"connection closed mid-line; have {self.buf[:500]!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int, deadline: float) -> bytes:
        if len(self.buf) >= n:
            out, self.buf = self.buf[:n], self.buf[n:]
            return out
        acc = bytearray(self.buf)  # linear, not quadratic, for big bodies
        self.buf = b""
        while len(acc) < n:
            data = self._fill(deadline)
            self.buf = b""
            if not data:
                raise EOFError(f"connection closed with {len(acc)} of {n} body bytes")
            acc += data
        self.buf = bytes(acc[n:])
        return bytes(acc[:n])

    def read_head(self, timeout: float | None = None) -> tuple[int, str, str, list, bytes]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                raise EOFError(f"connection closed before a full response head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        version, status, *reason = lines[0].decode("latin-1").split(" ", 2)
        assert version.startswith("HTTP/1."), f"not an HTTP/1 status line: {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep, f"bad header line in response: {line!r}"
            headers.append((name, value.strip()))
        return int(status), version, reason[0] if reason else "", headers, head

    def response(
        self, method: str = "GET", timeout: float | None = None, skip_interim: bool = True
    ) -> Response:
        """Read one response, framed per RFC 9112 section 6."""
        deadline = time.monotonic() + (timeout or self.timeout)
        interim = []
        while True:
            status, version, reason, headers, head = self.read_head(deadline - time.monotonic())
            if 100 <= status < 200 and status != 101 and skip_interim:
                interim.append((status, head))
                continue
            break
        r = Response(status, reason, version, headers, b"", head, interim)
        if method == "HEAD" or status in (101, 204, 304) or 100 <= status < 200:
            return r
        te = r.tokens("transfer-encoding")
        if te:
            assert "chunked" in te, f"unframed transfer-encoding {te}"
            body = bytearray()
            while True:
                size_line = self._line(deadline)
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:
                        line = self._line(deadline)
                        if not line:
                            break
                        n, _, v = line.decode("latin-1").partition(":")
                        r.trailers.append((n, v.strip()))
                    break
                body += self._exact(size, deadline)
                assert self._exact(2, deadline) == b"\r\n", "bad chunk terminator"
            r.body = bytes(body)
        elif r.header("content-length") is not None:
            r.body = self._exact(int(r.header("content-length") or 0), deadline)
        else:
            acc = bytearray(self.buf)
            self.buf = b""
            while data := self._fill(deadline):
                acc += data
                self.buf = b""
            r.body = bytes(acc)
        return r

    def expect_clean_close(self, timeout: float = 5.0) -> None:
        """The proxy closes with a FIN (recv returns b""), sends nothing more, no RST."""
        deadline = time.monotonic() + timeout
        extra = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"proxy did not close within {timeout}s (hang)")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError as e:
                raise PeerReset(f"RST instead of a clean close; extra bytes {extra!r}") from e
            except TimeoutError:
                raise AssertionError(f"proxy did not close within {timeout}s (hang)") from None
            if not data:
                break
            extra += data
        assert self.buf + extra == b"", f"bytes after the response: {(self.buf + extra)[:300]!r}"

    def closed_within(self, timeout: float) -> tuple[bool, bytes]:
        """(closed cleanly?, bytes received) waiting up to `timeout` for EOF."""
        deadline = time.monotonic() + timeout
        got = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, got
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError as e:
                raise PeerReset(f"RST instead of a clean close; got {got!r}") from e
            except TimeoutError:
                return False, got
            if not data:
                return True, got
            got += data


def request_bytes(
    method: str = "GET",
    path: str = "/",
    host: str | None = "hello.test",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    close: bool = False,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    for n, v in headers or []:
        lines.append(f"{n}: {v}")
    if body and not any(
        n.lower() in ("content-length", "transfer-encoding") for n, _ in headers or []
    ):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def metric_value(text: str, series: str) -> float:
    """The value of `series` (its exact name and labels) in Prometheus text; 0 if absent."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until true or the deadline; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
