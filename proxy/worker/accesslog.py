"""The access log: one JSON line per sampled finished request, written off the loop.

Owns the worker's line buffer and its writer thread. On the loop, `AccessLog.offer` (from
WorkerContext.done, where a request is finished) samples, and for a kept request appends
one tuple of plain values to a bounded deque; a full deque drops it and counts. The
writer thread wakes every [log] flush_ms, builds the lines with orjson and writes them
in one call per batch: to stderr (batches cut at line ends under PIPE_BUF, so lines of
several workers never mix) or appended to a file. The file is reopened when its path no
longer names the open file (checked once a second: logrotate's move-and-create needs no
signal) and by every reload (a new generation opens it anew). The loop never waits on it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson

from proxy.core.request_head import FWD_KEEP
from proxy.worker.faults import ThrottledLine

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.config import LogConfig
    from proxy.core.request import Request

# The access_log_lines_total family (proxy.telemetry.families): [written, buffer_full,
# write_failed]
WRITTEN, BUFFER_FULL, WRITE_FAILED = range(3)
PATH_CHECK = 1.0  # seconds between two checks that the path still names the open file
CHUNK: Final = 4096  # PIPE_BUF: a write to a pipe up to this size is never interleaved

# What the loop keeps of a logged request (a line is built on the writer's thread):
# wall time at the end, app, instance, its node, backhauled to it, status, method,
# HTTP/1.0, client ip, scheme, from a peer node, bytes in, bytes out, seconds, tries.
Raw = tuple[float, str, str, str, bool, int, bytes, str, bytes, bytes, bool, int, int, float, int]


class AccessLog:
    """The loop's side: which finished requests get a line, and the bounded buffer."""

    __slots__ = ("buffer", "cap", "clock", "counts", "rate", "rng")

    def __init__(
        self,
        cfg: LogConfig,
        counts: list[int],
        rng: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self.rate = cfg.sample_rate
        self.rng = rng  # random.Random().random
        self.clock = clock  # the loop's time (Request.started is in it)
        self.cap = cfg.buffer
        self.counts = counts
        self.buffer: deque[Raw] = deque()

    def offer(self, r: Request, status: int) -> None:
        """`r` finished with `status`: keep what its line needs, if it is sampled."""
        if self.rate < 1.0 and self.rng() >= self.rate:
            return
        if len(self.buffer) >= self.cap:
            self.counts[BUFFER_FULL] += 1
            return
        t = r.target
        f = r.front
        elapsed = self.clock() - r.started if r.started else 0.0
        self.buffer.append(
            (
                time.time(),
                r.app_name,
                t.instance if t is not None else "",
                t.node if t is not None else "",
                t is not None and not t.local,
                status,
                r.method,
                "HTTP/2" if r.h2 else "HTTP/1.0" if r.http10 else "HTTP/1.1",
                f.ip if f is not None else b"",
                f.proto if f is not None else b"",
                f is not None and f.mode == FWD_KEEP,  # a peer's connection: a backhaul
                r.size + r.body_size,
                r.resp_bytes,
                elapsed,
                r.tries,
            )
        )


def line(raw: Raw, node: str) -> bytes:
    """The JSON line of one logged request (on the writer's thread)."""
    (when, app, inst, inst_node, remote, status, method, protocol, ip, scheme, peer,
     bytes_in, bytes_out, elapsed, tries) = raw  # fmt: skip
    rec: dict[str, Any] = {
        "ts": _iso(when),
        "node": node,
        "app": app or None,
        "instance": inst or None,
        "instance_node": inst_node or None,
        "backhaul": remote,
        "status": status,
        "method": method.decode("latin-1"),
        "protocol": protocol,
        "scheme": scheme.decode("latin-1"),
        "client": ip.decode("latin-1"),
        "from_peer": peer,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(elapsed * 1000.0, 3),
        "retries": max(0, tries - 1),
    }
    return orjson.dumps(rec) + b"\n"


def _iso(when: float) -> str:
    """RFC 3339 in UTC with milliseconds."""
    ms = int(when * 1000.0) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{ms:03d}Z"


class Writer:
    """The thread that writes the buffer's lines, off the loop."""

    def __init__(self, cfg: LogConfig, node: str, log: AccessLog, out: TextIO = sys.stderr) -> None:
        self.path = cfg.access
        self.to_stderr = cfg.access == "stderr"
        self.interval = cfg.flush_ms / 1000.0
        self.node = node
        self.log = log
        self.counts = log.counts
        self.out = out
        self.fd = -1
        self.checked = 0.0
        self.complaints = ThrottledLine(out)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="access-log", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Write what is left, then end the thread (bounded: one pass over the buffer)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5.0)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.flush()
        self.flush()
        if self.fd >= 0 and not self.to_stderr:
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        buf = self.log.buffer
        while buf:
            lines: list[bytes] = []
            size = 0
            while buf and size < 65536:
                ln = line(buf.popleft(), self.node)
                lines.append(ln)
                size += len(ln)
            self.write(lines)

    def write(self, lines: list[bytes]) -> None:
        fd = 2 if self.to_stderr else self.open()
        if fd < 0:
            self.failed(len(lines), f"cannot open {self.path}")
            return
        for batch in _batches(lines, CHUNK if self.to_stderr else 65536):
            n = len(batch)
            try:
                _write_all(fd, b"".join(batch))
            except OSError as e:
                self.failed(n, f"writing {self.path}: {e}")
                if not self.to_stderr:
                    self.reopen_next()
                continue
            self.counts[WRITTEN] += n

    def open(self) -> int:
        """The file's fd, reopened when the path names another file (or none) now."""
        now = time.monotonic()
        if self.fd >= 0 and now - self.checked < PATH_CHECK:
            return self.fd
        self.checked = now
        if self.fd >= 0:
            try:
                st = os.stat(self.path)
                mine = os.fstat(self.fd)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return self.fd
            except OSError:
                pass  # moved away and not created again yet: create it
            self.reopen_next()
        try:
            self.fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        except OSError:
            self.fd = -1
        return self.fd

    def reopen_next(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.checked = 0.0

    def failed(self, n: int, why: str) -> None:
        self.counts[WRITE_FAILED] += n
        self.complaints.say(f"access log: {why}; {n} lines dropped")


def _batches(lines: list[bytes], limit: int) -> list[list[bytes]]:
    """`lines` cut into runs of at most `limit` bytes (a longer line alone)."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for ln in lines:
        if cur and size + len(ln) > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(ln)
        size += len(ln)
    if cur:
        out.append(cur)
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
