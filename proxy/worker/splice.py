"""Zero-copy relay of a response body from an upstream socket to a client socket.

Owns one pipe per worker and the splice(2) loop through it: socket -> pipe ->
socket, so a big Content-Length body never becomes a Python object and is
never copied through user space. The pipe is empty between calls (whatever
the client could not take is read back out and returned to the caller, who
writes it the ordinary way), so one pipe serves every connection of a worker.
It must not decide when splicing is allowed: proxy.worker.upstream does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

_F_SETPIPE_SZ: Final = 1031  # fcntl.F_SETPIPE_SZ (Linux)
_F_GETPIPE_SZ: Final = 1032
PIPE_SIZE: Final = 1 << 20  # bytes the pipe holds: one splice in moves up to this much
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def available() -> bool:
    """Whether this platform can splice (Linux, Python >= 3.10)."""
    return hasattr(os, "splice")


class Splicer:
    """One worker's pipe and the loop that moves bytes through it."""

    __slots__ = ("cap", "r", "w")

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.cap = fcntl.fcntl(self.w, _F_SETPIPE_SZ, size)
        except OSError:  # over /proc/sys/fs/pipe-max-size: keep the default
            self.cap = fcntl.fcntl(self.w, _F_GETPIPE_SZ)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def move(
        self, src: int, dst: int, want: int, head: Sequence[bytes | memoryview] = ()
    ) -> tuple[int, bytes]:
        """Move `head` (bytes the caller holds for `dst`), then up to `want` bytes from
        socket `src`, to socket `dst`, in order.

        The head goes through the pipe with the first bytes from `src`, so that `dst`
        sends them together (one transmit, one wake-up of the reader). It must fit in
        the pipe (`cap`); the caller checks.

        Returns (taken, stuck): `taken` bytes were taken from `src`; `stuck` is the tail
        of head + taken that `dst` would not take now (the caller must write it itself,
        in order, before anything else). It stops early when `src` has nothing more to
        give right now, hits EOF or fails: its transport sees that on its next read.
        """
        taken = 0
        inpipe = 0
        if head:
            total = 0
            for b in head:
                total += len(b)
            try:
                inpipe = os.writev(self.w, head)
            except OSError:
                inpipe = 0
            if inpipe < total:  # cannot happen when it fits: the pipe is empty between calls
                if inpipe:
                    self._drain(inpipe)
                return 0, b"".join(head)
        splice = os.splice
        cap = self.cap
        while True:
            if want > 0 and inpipe < cap:
                try:
                    n = splice(src, self.w, min(want, cap - inpipe), None, None, _FLAGS)
                except OSError:
                    n = 0  # nothing to read now (or a failure its transport will see)
                if n > 0:
                    want -= n
                    taken += n
                    inpipe += n
                else:
                    want = 0  # EOF, or nothing more now: push what the pipe holds
            if not inpipe:
                return taken, b""
            while inpipe:
                try:
                    inpipe -= splice(self.r, dst, inpipe, None, None, _FLAGS)
                except OSError:
                    # The client's socket is full (or broken): what it did not take comes
                    # back out of the pipe, for the transport to write or to fail on.
                    return taken, self._drain(inpipe)

    def _drain(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            b = os.read(self.r, n)
            if not b:
                break
            parts.append(b)
            n -= len(b)
        return b"".join(parts)
