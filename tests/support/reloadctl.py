"""Helpers for the reload tests: wrk runs, a proxy run from any source tree, sd_notify.

Owns running wrk (bounded by -d and a subprocess timeout) and reading every
error counter it reports, strictly; starting `python -m proxy.cli run` from a
copy of the source tree (for upgrade tests) or with extra environment (for
NOTIFY_SOCKET); and a unix datagram socket standing in for systemd's notify
socket. Everything is on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxyctl import (
    HOST,
    REPO,
    Proxy,
    ProxyConfig,
)

_UCRED = struct.Struct("3i")  # pid, uid, gid
WRK = shutil.which("wrk") or "/usr/bin/wrk"

# A done() hook: wrk's own counters, machine-readable, next to its text report.
_WRK_LUA = """
local threads = {}
setup = function(thread) table.insert(threads, thread) end
statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RELOADREPORT requests=%d connect=%d read=%d write=%d status=%d timeout=%d\\n",
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
  local all = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do all[code] = (all[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(all) do table.insert(parts, string.format("%d=%d", code, n)) end
  table.sort(parts)
  io.write("RELOADSTATUSES " .. table.concat(parts, " ") .. "\\n")
end
"""

_REQ_RE = re.compile(r"^\s*(\d+) requests in [\d.]+\w+, [\d.]+\w+ read\s*$", re.M)
_SOCK_RE = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$", re.M
)
_NON2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)\s*$", re.M)
_REPORT_RE = re.compile(
    r"^RELOADREPORT requests=(\d+) connect=(\d+) read=(\d+) write=(\d+) "
    r"status=(\d+) timeout=(\d+)$",
    re.M,
)


@dataclass
class WrkResult:
    requests: int
    connect: int
    read: int
    write: int
    timeout: int
    non2xx: int
    statuses: dict[int, int]  # every response status wrk read, counted by the Lua hook
    text: str

    def summary(self) -> str:
        return f"requests {self.requests}, errors {self.errors()}, statuses {self.statuses}"

    def errors(self) -> dict[str, int]:
        return {
            "connect": self.connect,
            "read": self.read,
            "write": self.write,
            "timeout": self.timeout,
            "non2xx": self.non2xx,
        }

    def assert_clean(self, min_requests: int = 1000) -> None:
        """0 errors of every kind wrk counts, and enough requests to mean something."""
        assert self.errors() == dict.fromkeys(self.errors(), 0), (
            f"wrk counted errors {self.errors()}:\n{self.text}"
        )
        assert self.requests >= min_requests, (
            f"wrk made only {self.requests} requests:\n{self.text}"
        )


def parse_wrk(text: str) -> WrkResult:
    """Read wrk's report strictly: the text lines and the done() counters must agree."""
    m = _REQ_RE.search(text)
    assert m is not None, f"no 'N requests in' line in wrk output:\n{text}"
    requests = int(m.group(1))
    connect = read = write = timeout = 0
    s = _SOCK_RE.search(text)
    if s is not None:
        connect, read, write, timeout = (int(x) for x in s.groups())
    elif "Socket errors" in text:
        raise AssertionError(f"unparsable 'Socket errors' line in wrk output:\n{text}")
    n = _NON2XX_RE.search(text)
    if n is None and "Non-2xx" in text:
        raise AssertionError(f"unparsable 'Non-2xx' line in wrk output:\n{text}")
    non2xx = int(n.group(1)) if n is not None else 0
    r = _REPORT_RE.search(text)
    assert r is not None, f"no done() report in wrk output:\n{text}"
    rep = [int(x) for x in r.groups()]
    assert rep == [requests, connect, read, write, non2xx, timeout], (
        f"wrk's text report and its done() counters disagree {rep}:\n{text}"
    )
    st = re.search(r"^RELOADSTATUSES ?(.*)$", text, re.M)
    assert st is not None, f"no status report in wrk output:\n{text}"
    statuses = {int(k): int(v) for k, v in (x.split("=") for x in st.group(1).split())}
    return WrkResult(requests, connect, read, write, timeout, non2xx, statuses, text)


class Wrk:
    """One wrk run in the background against the proxy on 127.0.0.1."""

    def __init__(
        self,
        port: int,
        workdir: Path,
        duration: float = 10.0,
        connections: int = 64,
        threads: int = 1,
        path: str = "/",
        host: str = "hello.test",
        scheme: str = "http",
        headers: tuple[str, ...] = (),
    ) -> None:
        self.duration = duration
        script = workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
        script.write_text(_WRK_LUA)
        self.argv = [
            WRK,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "2s",
            "-s",
            str(script),
            "-H",
            f"Host: {host}",
            *(a for h in headers for a in ("-H", h)),
            f"{scheme}://{HOST}:{port}{path}",
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sleep_until(self, t: float) -> None:
        """Sleep until `t` seconds after wrk started."""
        left = t - self.elapsed()
        if left > 0:
            time.sleep(left)

    def result(self) -> WrkResult:
        try:
            out, _ = self.proc.communicate(timeout=self.duration + 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5)
            raise AssertionError(f"wrk ran past its -d by 20 s:\n{out}") from None
        assert self.proc.returncode == 0, f"wrk exited {self.proc.returncode}:\n{out}"
        return parse_wrk(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=5)


# -- a proxy from any source tree, with any extra environment ------------------


def copy_tree(dst: Path) -> Path:
    """Copy the installed code (proxy/, shm/, pinger/ with the compiled request path
    when there is one, setup.cfg) to `dst`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("proxy", "shm", "pinger"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=ignore)
    shutil.copy2(REPO / "setup.cfg", dst / "setup.cfg")
    return dst


CAPACITY = 10000  # the app's soft and hard limit: wrk's 64 connections must never hit them


def render(cfg: ProxyConfig) -> str:
    """The config of `cfg`, with the app's limits far above any load these tests make."""
    text = cfg.render()
    limits = "soft_limit = 20\nhard_limit = 25\n"
    assert limits in text, text
    return text.replace(limits, f"soft_limit = {CAPACITY}\nhard_limit = {CAPACITY}\n")


class TreeProxy(Proxy):
    """`python -m proxy.cli run -c FILE` from `root` (PYTHONPATH=root, cwd=root)."""

    def __init__(
        self,
        cfg: ProxyConfig,
        workdir: Path,
        root: Path = REPO,
        extra_env: dict[str, str] | None = None,
        takeover: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.root = root
        self.port = cfg.port
        self.admin_port = cfg.admin_port
        self.path = path or workdir / f"edgeproxy-{cfg.uid}.toml"
        if not self.path.exists():
            self.path.write_text(render(cfg))
        tag = uuid.uuid4().hex[:6]
        self.stderr_path = workdir / f"proxy-{cfg.uid}-{tag}.stderr"
        self.env = self.base_env()
        self.env.update(extra_env or {})
        argv = [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.path)]
        if takeover is not None:
            argv += ["--takeover", takeover]
        self._spawn(argv, root, self.env)

    def base_env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PYTHONPATH")}
        e["PYTHONPATH"] = str(self.root)
        e["PYTHONUNBUFFERED"] = "1"
        e["PYTHONDONTWRITEBYTECODE"] = "1"
        return e

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "-c", str(self.path)],
            cwd=self.root,
            env=self.base_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# -- processes ------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Is `pid` a live process (not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_generation(p: Proxy, want: int, timeout: float = 15.0) -> dict[str, Any]:
    """Poll `status --json` until the master's generation is `want`; the last status."""
    deadline = time.monotonic() + timeout
    st = p.status()
    while st["master"]["generation"] < want and time.monotonic() < deadline:
        time.sleep(0.05)
        st = p.status()
    return st


def hup(p: Proxy) -> None:
    os.kill(p.proc.pid, signal.SIGHUP)


# -- systemd's notify socket ------------------------------------------------------


class NotifySocket:
    """A unix datagram socket the test owns, standing in for NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.path = f"/tmp/edgeproxy-notify-{uuid.uuid4().hex[:10]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.messages: list[bytes] = []
        self.senders: list[int] = []  # the pid that sent each message (SCM_CREDENTIALS)

    def next(self, timeout: float) -> bytes | None:
        """The next datagram, or None at the deadline; its sender's pid goes to `senders`."""
        self.sock.settimeout(timeout)
        try:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(raw[: _UCRED.size])[0]
        self.messages.append(data)
        self.senders.append(pid)
        return data

    def wait_for(self, key: bytes, timeout: float) -> tuple[bytes | None, list[bytes]]:
        """(the first datagram holding the line `key`, everything read on the way)."""
        deadline = time.monotonic() + timeout
        seen: list[bytes] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, seen
            m = self.next(left)
            if m is None:
                return None, seen
            seen.append(m)
            if key in m.split(b"\n"):
                return m, seen

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def fields(msg: bytes) -> dict[str, str]:
    """sd_notify's `KEY=VALUE` lines as a dict."""
    out = {}
    for line in msg.decode().split("\n"):
        if line:
            k, _, v = line.partition("=")
            out[k] = v
    return out
