"""The worker's error and warning lines as JSON ([log] format = "json").

Owns a text stream that stands in for the worker's sys.stderr: what the worker's
reporters write (proxy.worker.faults, the loop watchdog, the exporters, print) is
gathered per thread up to a line end, then written as one JSON object per report:
the first line is `msg`, any further lines (a traceback, a stack) are `detail`. One
os.write per report, so reports of threads and workers never mix. It never raises
into the code that reports: a failed write is dropped, as with text stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import Any

import orjson

PREFIX = "edgeproxy worker: "


class JsonLines:
    """A write-only text stream that turns reports into JSON lines on `fd`."""

    def __init__(self, fd: int, node: str, slot: int, clock: Any = time.time) -> None:
        self.fd = fd
        self.node = node
        self.slot = slot
        self.pid = os.getpid()
        self.clock = clock
        self.lock = threading.Lock()
        self.pending: dict[int, str] = {}  # thread id -> text not yet ended by a newline

    def write(self, text: str) -> int:
        tid = threading.get_ident()
        with self.lock:
            buf = self.pending.pop(tid, "") + text
            # A report ends where a write ends with a newline (a traceback is one write).
            if not buf.endswith("\n") and len(buf) < 1 << 20:
                self.pending[tid] = buf
                return len(text)
        self.emit(buf)
        return len(text)

    def emit(self, text: str) -> None:
        first, _, rest = text.rstrip("\n").partition("\n")
        msg = first.removeprefix(PREFIX)
        rec: dict[str, Any] = {
            "ts": _iso(self.clock()),
            "level": _level(msg),
            "node": self.node,
            "worker": self.slot,
            "pid": self.pid,
            "msg": msg,
        }
        if rest:
            rec["detail"] = rest
        with contextlib.suppress(OSError):  # stderr gone: as with text, the report is lost
            os.write(self.fd, orjson.dumps(rec) + b"\n")

    def flush(self) -> None:
        """Nothing is held past a line end; a partial line waits for its end."""

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return False


def install(node: str, slot: int) -> JsonLines:
    """Make this process's sys.stderr a JsonLines on fd 2, and its uncaught-exception
    hooks write a traceback as one report (the default hooks write it line by line)."""
    out = JsonLines(2, node, slot)
    sys.stderr = out

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        out.write("".join(traceback.format_exception(kind, exc, tb)))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            name = args.thread.name if args.thread is not None else "?"
            text = "".join(traceback.format_exception(args.exc_value))
            out.write(f"{PREFIX}internal error in thread {name}\n{text}")

    sys.excepthook = hook
    threading.excepthook = thread_hook
    return out


def _level(msg: str) -> str:
    if msg.startswith(("internal error", "Traceback")):
        return "error"
    return "warning"


def _iso(when: float) -> str:
    ms = int(when * 1000.0) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{ms:03d}Z"
