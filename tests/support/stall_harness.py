"""A real proxy.worker.Worker whose event loop can be slowed on purpose: a request for
`/_stall?ms=N` makes the loop hold itself for N ms in every iteration (a callback that
blocks, then re-queues itself) until `/_stall?ms=0`, answered at once with 200 and never
routed (so shedding cannot refuse them). What is under test is the worker's loop watch:
lag, blocked-callback reports and shedding.

Run as `python tests/support/stall_harness.py` with the worker's JSON bootstrap on stdin
(the master's format). The wrapper is test code; the worker, its loop and sockets are real.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import Any

import orjson
import uvloop

from proxy.worker.worker import Worker

_STALL = re.compile(rb"^GET /_stall\?ms=(\d+) ")
_LIMIT = 600  # iterations at most: a stall ends by itself after a while


class Stall:
    """Holds the loop for `ms` in each iteration while on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ms = 0
        self.left = 0

    def set(self, ms: int) -> None:
        started = self.ms == 0 and ms > 0
        self.ms = ms
        self.left = _LIMIT
        if started:
            self.loop.call_soon(self.hold_the_loop)

    def hold_the_loop(self) -> None:
        if self.ms <= 0 or self.left <= 0:
            self.ms = 0
            return
        self.left -= 1
        time.sleep(self.ms / 1000.0)  # blocking on purpose: this is the slow callback
        self.loop.call_soon(self.hold_the_loop)


class Stalling(asyncio.Protocol):
    """Delegates to the real ClientConnection; answers /_stall requests itself."""

    def __init__(self, inner: Any, stall: Stall) -> None:
        self.inner = inner
        self.stall = stall
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        m = _STALL.match(data)
        if m is None:
            self.inner.data_received(data)
            return
        self.stall.set(int(m.group(1)))
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()

    def eof_received(self) -> bool | None:
        return bool(self.inner.eof_received())

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class HarnessWorker(Worker):
    def __init__(self, boot: dict[str, Any]) -> None:
        super().__init__(boot)
        self.stall = Stall(self.loop)

    def factory(self, backhaul: bool, sni_app: str | None = None, tls: bool = False) -> Any:
        inner = super().factory(backhaul, sni_app, tls)
        return lambda: Stalling(inner(), self.stall)


def main() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = HarnessWorker(orjson.loads(sys.stdin.buffer.read()))
    asyncio.set_event_loop(worker.loop)
    worker.run()


if __name__ == "__main__":
    main()
