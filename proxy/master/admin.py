"""The master's admin listener: `GET /healthz` and `GET /metrics` over HTTP/1.1.

Owns the admin HTTP shell (parse with httptools, keep-alive, header timeout, 400 on
garbage). It only calls the two callables it is given; it must not compute metrics
or health itself, and it must never run inside a worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import httptools

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
LINGER = 2.0  # seconds an errored connection drains input before closing
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

MetricsText = Callable[[], str]
Health = Callable[[], tuple[int, str]]


class _AdminProtocol(asyncio.Protocol):
    """One admin connection; requests are answered in order as soon as they end."""

    def __init__(self, metrics_text: MetricsText, health: Health, header_timeout: float) -> None:
        self._metrics_text = metrics_text
        self._health = health
        self._header_timeout = header_timeout
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._head_bytes = 0
        self._body_bytes = 0
        self._in_head = False
        self._started = False
        self._keep_alive = True
        self._closing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._in_head or not self._started:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close_after_write()  # answered already; no upgrades here
        except httptools.HttpParserError as e:
            self._fail(413 if isinstance(e.__context__, _TooLargeError) else 400)
            return
        if not self._closing and self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._fail(431)

    def eof_received(self) -> bool:
        return False

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._started = True
        self._in_head = True
        self._url = b""
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _TooLargeError

    def on_message_complete(self) -> None:
        if self._closing:
            return
        method = self._parser.get_method()
        path = self._url.partition(b"?")[0]
        head = method == b"HEAD"
        if path in (b"/healthz", b"/metrics"):
            if method not in (b"GET", b"HEAD"):
                self._respond(405, b"method not allowed\n", head=False, extra=b"Allow: GET\r\n")
            elif path == b"/healthz":
                self._answer_health(head)
            else:
                self._answer_metrics(head)
        else:
            self._respond(404, b"not found\n", head=head)
        if not self._keep_alive:
            self._close_after_write()
        else:
            self._started = False
            self._arm_timer()

    # answers

    def _answer_health(self, head: bool) -> None:
        try:
            status, reason = self._health()
        except Exception:
            log.exception("admin: health callable failed")
            status, reason = 500, "health check failed"
        body = b"ok\n" if status == 200 else reason.rstrip("\n").encode() + b"\n"
        self._respond(status, body, head=head)

    def _answer_metrics(self, head: bool) -> None:
        try:
            text = self._metrics_text()
        except Exception:
            log.exception("admin: metrics callable failed")
            self._respond(500, b"metrics failed\n", head=head)
            return
        self._respond(200, text.encode(), head=head, content_type=METRICS_CONTENT_TYPE)

    def _respond(
        self,
        status: int,
        body: bytes,
        *,
        head: bool,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: bytes = b"",
    ) -> None:
        if self._transport is None:
            return
        close = b"Connection: close\r\n" if not self._keep_alive else b""
        self._transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
            % (status, _REASONS.get(status, b"Unknown"), content_type, len(body), close, extra)
        )
        if not head:
            self._transport.write(body)

    def _fail(self, status: int) -> None:
        """A client error: answer `status` with Connection: close, then linger and close.

        Closing with unread input would reset the connection and could destroy the
        answer in flight, so half-close and discard input until EOF or a short linger.
        """
        self._keep_alive = False
        self._respond(status, b"%d %s\n" % (status, _REASONS[status].lower()), head=False)
        t = self._transport
        if t is None or not t.can_write_eof():
            self._close_after_write()
            return
        self._closing = True
        t.write_eof()
        self._cancel_timer()
        self._timer = self._loop.call_later(min(LINGER, self._header_timeout), t.close)

    def _close_after_write(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()  # flushes the write buffer first

    # header timeout

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(self._header_timeout, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._started:
            self._fail(408)  # a request began but its head never completed
        else:
            self._close_after_write()  # idle keep-alive: close quietly


class _TooLargeError(Exception):
    """Raised from a parser callback to stop parsing an oversized body."""


async def start_admin(
    host: str,
    port: int,
    metrics_text: MetricsText,
    health: Health,
    *,
    header_timeout: float = 10.0,
) -> asyncio.Server:
    """Listen on host:port; `health()` returns (200, "") or (503, reason).

    `header_timeout` bounds keep-alive idleness and a whole request's arrival (a
    slow client gets 408 and is closed).
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _AdminProtocol(metrics_text, health, header_timeout),
        host,
        port,
        reuse_address=True,
        reuse_port=True,  # a taking-over master binds it before the old one lets go
    )
