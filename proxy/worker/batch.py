"""Writes held to the end of the event loop's iteration, then made together.

Owns the list of connections with output waiting and the one callback per loop
iteration that writes it. A worker handles every connection that became ready
in one epoll round before anything is written, so the app instances and the
clients are woken once for a burst of requests or responses instead of once
per write, and the worker is not preempted by each of those wakeups in the
middle of its round. It must not decide what is written or in which order for
one connection: the connections keep their own output and flush it first
whenever they write anything directly. A write that raises closes its own
connection only: the others' writes of the iteration still happen.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable


class Held(Protocol):
    """A connection that holds output for the batch: an upstream connection (a request
    head) or a client connection (response bytes)."""

    def flush_out(self) -> None:
        """Write what is held, now."""

    def abort(self) -> None:
        """Drop the connection (its write raised)."""


class WriteBatch:
    """One worker's connections with output held until the loop iteration ends."""

    __slots__ = ("armed", "clients", "failed", "loop", "upstreams")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        failed: Callable[[Exception], None] | None = None,
    ) -> None:
        self.loop = loop
        self.failed = failed  # told of a write that raised (the connection is then aborted)
        self.upstreams: list[Held] = []
        self.clients: list[Held] = []
        self.armed = False

    def add_upstream(self, up: Held) -> None:
        """`up` holds a request head: write it with the others of this iteration."""
        self.upstreams.append(up)
        if not self.armed:
            self._arm()

    def add_client(self, client: Held) -> None:
        """`client` holds response bytes: write them with the others of this iteration."""
        self.clients.append(client)
        if not self.armed:
            self._arm()

    def _arm(self) -> None:
        self.armed = True
        # Ready callbacks run after the I/O callbacks of this iteration, before the next
        # poll: everything that became ready in one epoll round is handled first.
        self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything held: requests to the instances first, then the responses."""
        self.armed = False
        ups = self.upstreams
        if ups:
            self.upstreams = []
            for up in ups:
                try:
                    up.flush_out()
                except Exception as e:
                    self._fail(e)
                    up.abort()
        clients = self.clients
        if clients:
            self.clients = []
            for c in clients:
                try:
                    c.flush_out()
                except Exception as e:
                    self._fail(e)
                    c.abort()

    def _fail(self, exc: Exception) -> None:
        if self.failed is not None:
            self.failed(exc)
