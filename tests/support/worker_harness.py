"""A real proxy.worker.Worker whose client protocol raises in data_received on a request
for /_raise: what is under test is the worker's own handling of that exception.

Run as `python tests/support/worker_harness.py` with the worker's JSON bootstrap on stdin (the
master's format). The wrapper is test code; the worker, its loop and sockets are real.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
import uvloop

from proxy.worker.worker import Worker


class Raising(asyncio.Protocol):
    """Delegates to the real ClientConnection; raises on a /_raise request."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if b" /_raise " in data:
            raise RuntimeError("raised on purpose in data_received")
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return bool(self.inner.eof_received())

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class HarnessWorker(Worker):
    def factory(self, backhaul: bool) -> Any:
        inner = super().factory(backhaul)
        return lambda: Raising(inner())


def main() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = HarnessWorker(orjson.loads(sys.stdin.buffer.read()))
    asyncio.set_event_loop(worker.loop)
    worker.run()


if __name__ == "__main__":
    main()
