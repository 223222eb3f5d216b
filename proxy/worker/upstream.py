"""Connections to app instances (local or a peer's backhaul) and their pool.

Owns the upstream side of one exchange: writing the request, parsing the
response with httptools, relaying it to the client connection (a big sized
body spliced socket to socket when the client can take it), and keeping
healthy keep-alive connections per target. It must not route or decide
retries: it reports what happened and the client connection decides.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import httptools
from mypy_extensions import mypyc_attr

from proxy.core.headers import ResponseHead
from proxy.worker import splice
from proxy.worker.batch import WriteBatch

if TYPE_CHECKING:
    from collections.abc import Callable


@mypyc_attr(allow_interpreted_subclasses=True)
class Exchange:
    """What an upstream connection reports to (the client side of an exchange).

    A base class rather than a typing.Protocol: compiled, a call through it is a
    direct call, not a method lookup (see setup.py). Interpreted subclasses are allowed
    (a test's recording exchange); compiled ones still dispatch through the vtable."""

    __slots__ = ()

    def upstream_head(self, up: UpstreamConnection, status: int, keep_alive: bool) -> None:
        raise NotImplementedError

    def upstream_interim(self, head: bytes) -> None:
        raise NotImplementedError

    def upstream_continue(self) -> None:
        raise NotImplementedError

    def upstream_body(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def upstream_flush(self) -> None:
        raise NotImplementedError

    def upstream_end(self, up: UpstreamConnection) -> None:
        raise NotImplementedError

    def upstream_tunnel(self, up: UpstreamConnection, early: bytes) -> None:
        raise NotImplementedError

    def upstream_tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def upstream_lost(self, up: UpstreamConnection, why: str) -> None:
        raise NotImplementedError

    def upstream_pause(self, paused: bool) -> None:
        raise NotImplementedError

    def upstream_timed_out(self) -> None:
        raise NotImplementedError

    def upstream_sink(self, held_max: int) -> int:
        raise NotImplementedError

    def upstream_held(self) -> list[bytes | memoryview]:
        raise NotImplementedError

    def upstream_spliced(self, n: int) -> None:
        """`n` response bytes went to the client by splice, past this process."""
        raise NotImplementedError

    def upstream_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The trailer fields after a chunked body (only when send() asked for them)."""
        raise NotImplementedError


_SPLIT_MIN = 2048  # a body shorter than this goes through the parser with its head
_MAX_HEAD = 65536  # a response head larger than this is refused (502)
# A response's first read takes the head and a small or mid-size body whole (one read).
# On a connection whose last body was big it takes little more than the head, so that
# most of the body is still in the socket once the head is parsed, and is spliced: it
# does not pass through this process. Later reads (chunked, tunnels) take up to READ_SIZE.
HEAD_READ = 16384
HEAD_READ_BIG = 2048
READ_SIZE = 262144
SPLICE_MIN = 16384  # body bytes left after a read worth a splice (else: an ordinary read)


class _StrayResponseError(Exception):
    """Bytes that parse as a second response where only one was asked for."""


# Why an upstream connection failed (the client side maps these to a status).
LOST_BEFORE_RESPONSE = "reset_before_response"
LOST_MID_RESPONSE = "lost_mid_response"
BAD_RESPONSE = "bad_response"
# The peer said the request was not processed (an HTTP/2 backhaul stream refused, or past
# a GOAWAY's last stream id: RFC 9113 8.7): retried as a refused connect would be.
LOST_UNPROCESSED = "unprocessed"


class UpstreamConnection(ResponseHead):
    """One TCP connection to a target; at most one exchange at a time.

    An asyncio buffered protocol by its methods (get_buffer, buffer_updated), not by
    inheritance: compiled, a native class cannot derive from asyncio's classes."""

    __slots__ = (
        "big",
        "body_seen",
        "cur_head",
        "deadline",
        "exchange",
        "fd",
        "got_bytes",
        "head_acc",
        "head_done",
        "head_only",
        "keep_alive",
        "key",
        "msg_done",
        "parser",
        "pending",
        "pool",
        "raw_left",
        "reused",
        "trailers_wanted",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: Pool, key: str) -> None:
        ResponseHead.__init__(self)
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket's descriptor, for splice
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.deadline = 0.0
        self.got_bytes = False
        self.body_seen = -1  # body bytes the parser gave us (-1: not a sized body)
        self.raw_left = 0  # body bytes still to relay without the parser
        self.head_acc = b""  # a response head arriving in pieces
        self.cur_head = b""  # the whole head of the response being parsed
        self.head_done = False
        self.head_only = False
        self.keep_alive = False
        self.reused = False
        self.tunnel = False
        self.big = False  # the last response's body was worth splicing
        self.msg_done = False  # the parser completed a response: ended once the feed returns
        self.pending = b""  # a request head held until the loop iteration ends (batch)
        self.trailers_wanted = False  # the parser reports trailer fields (_TrailerReader)

    # asyncio.BufferedProtocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        # Under TLS the socket carries ciphertext: nothing may be spliced out of it.
        if (
            sock is not None
            and self.pool.splicer is not None
            and transport.get_extra_info("sslcontext") is None
        ):
            self.fd = sock.fileno()
        self.pool.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.open.discard(self)
        self.pool.forget(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            if self.head_done and self.content_length < 0 and not self.chunked:
                self.keep_alive = False
                ex.upstream_end(self)  # a body delimited by the close: complete now
                return
            ex.upstream_lost(self, LOST_MID_RESPONSE if self.got_bytes else LOST_BEFORE_RESPONSE)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_pause(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_pause(False)

    def get_buffer(self, sizehint: int) -> memoryview:
        pool = self.pool
        if self.head_done or self.tunnel:
            return pool.read_all
        return pool.read_head_big if self.big else pool.read_head

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.pool.read_all[:nbytes]))

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes on an idle connection: it can no longer be trusted.
            self.close()
            return
        if self.raw_left:
            self._relay_raw(ex, data)
            return
        if self.tunnel:
            ex.upstream_tunnel_data(data)
            return
        self.got_bytes = True
        rest: memoryview | None = None
        if not self.head_done:
            # Cut the read at the end of the head: the head's bytes are filtered whole
            # (ResponseHead.take), not field by field through parser callbacks.
            acc = self.head_acc
            buf = acc + data if acc else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._bad(ex)
                    return
                self.head_acc = buf
            else:
                self.head_acc = b""
                self.cur_head = buf[: end + 4]
                cut = end + 4 - len(acc)
                if cut < len(data):
                    rest = memoryview(data)[cut:]
                    data = data[:cut]
        if not self._feed(ex, data, rest):
            return
        if rest is not None:
            if self.exchange is not ex:
                self.keep_alive = False  # bytes after a complete response: done with it
            elif not self.head_done:
                self.data_received(bytes(rest))  # a final head after an interim (1xx) one
                return
            elif self.body_seen >= 0 and len(rest) > _SPLIT_MIN:
                self.raw_left = self.content_length  # a big sized body: past the parser
                self._relay_raw(ex, rest)
                return
            elif not self._feed(ex, bytes(rest), None):
                return
        seen = self.body_seen
        if seen >= 0 and self.exchange is ex and self.content_length > seen:
            # Head parsed, body unfinished: the rest of it goes past the parser.
            self.raw_left = self.content_length - seen
        if self.raw_left < SPLICE_MIN or self.exchange is not ex or not self._splice(ex):
            ex.upstream_flush()

    def _feed(self, ex: Exchange, data: bytes, rest: memoryview | None) -> bool:
        """Parse `data`; False when the exchange went elsewhere (tunnel, bad response).

        A response is ended only once the parser has returned: bytes after it in the same
        read (a second response, garbage) then make this connection unusable, and can
        never reach the exchange that follows, this client's or another's."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.tunnel:
                early = data[e.args[0] :]
                ex.upstream_tunnel(self, early + rest if rest is not None else early)
            return False
        except httptools.HttpParserError:
            if not self.msg_done:
                self._bad(ex)
                return False
            self.keep_alive = False  # the response stands; what followed it does not
        if self.msg_done:
            self.msg_done = False
            self._finish()
        return True

    def _bad(self, ex: Exchange) -> None:
        self.exchange = None
        self.close()
        ex.upstream_lost(self, BAD_RESPONSE)

    def _relay_raw(self, ex: Exchange, data: bytes | memoryview) -> None:
        """The rest of a Content-Length body: relayed as it came, no parser, no copy."""
        left = self.raw_left
        n = len(data)
        if n < left:
            self.raw_left = left - n
            ex.upstream_body(data)
            if left - n < SPLICE_MIN or not self._splice(ex):
                ex.upstream_flush()
            return
        if n > left:
            self.keep_alive = False  # bytes past the body: this connection is done
            data = data[:left]
        ex.upstream_body(data)
        ex.upstream_flush()
        self._raw_end()

    def _splice(self, ex: Exchange) -> bool:
        """Move what the socket holds of the body straight into the client's socket,
        after what is held for the client (the head, the first body bytes): they leave
        together. False when the body cannot go that way now (nothing was taken)."""
        sp = self.pool.splicer
        if sp is None or self.fd < 0:
            return False
        dst = ex.upstream_sink(sp.cap >> 1)
        if dst < 0:
            return False
        taken, stuck = sp.move(self.fd, dst, self.raw_left, ex.upstream_held())
        ex.upstream_spliced(taken - len(stuck))  # what is stuck is counted as a body write
        left = self.raw_left - taken
        self.raw_left = left
        if stuck:
            ex.upstream_body(stuck)  # the client's socket is full: the transport buffers
            ex.upstream_flush()
        if left == 0 and self.exchange is ex:
            self._raw_end()
        return True

    def _raw_end(self) -> None:
        self.raw_left = 0
        self.big = self.content_length >= SPLICE_MIN
        self.parser = httptools.HttpResponseParser(self)  # it never saw the body's bytes
        self.trailers_wanted = False
        self._finish()

    # the exchange ----------------------------------------------------------
    def send(
        self,
        exchange: Exchange,
        head: bytes,
        head_only: bool,
        deadline: float,
        trailers: bool = False,
    ) -> None:
        """Start an exchange: write the request head; the body follows via write().
        `trailers`: the response's trailer fields are wanted (exchange.upstream_trailers)."""
        if trailers or self.trailers_wanted:
            # Only then does the parser call back per field (a cost the head, filtered
            # whole by ResponseHead.take, does not need).
            self.parser = httptools.HttpResponseParser(_TrailerReader(self) if trailers else self)
            self.trailers_wanted = trailers
        self.exchange = exchange
        self.head_only = head_only
        self.got_bytes = False
        self.head_done = False
        self.body_seen = -1
        self.raw_left = 0
        self.head_acc = b""
        self.deadline = deadline
        if self.pending:
            self.pending += head
        else:
            self.pending = head
            self.pool.batch.add_upstream(self)

    def flush_out(self) -> None:
        """Write the held request head now (the batch, or a write that must follow it)."""
        head = self.pending
        if head:
            self.pending = b""
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(head)

    def write(self, data: bytes) -> None:
        if self.pending:
            self.flush_out()
        assert self.transport is not None
        self.transport.write(data)

    def write_eof(self) -> None:
        """Half-close towards the instance (a tunnel whose client half-closed)."""
        self.flush_out()
        t = self.transport
        if t is not None and t.can_write_eof():
            t.write_eof()

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def abandon(self, exchange: Exchange, deadline: float) -> None:
        """Hand the running exchange to `exchange` (its client left), due by `deadline`."""
        self.exchange = exchange
        if not self.deadline or deadline < self.deadline:
            self.deadline = deadline
        self.pause_reading(False)

    def abort(self) -> None:
        """Drop the connection at once (the exchange is already accounted for)."""
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, paused: bool) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            if paused:
                t.pause_reading()
            else:
                t.resume_reading()

    # httptools callbacks (only those it needs: httptools skips a missing one) ------
    def on_headers_complete(self) -> None:
        if self.msg_done:
            raise _StrayResponseError  # a second response in the read that ended the first
        p = self.parser
        status = p.get_status_code()
        self.take(self.cur_head)
        self.body_seen = -1
        ex = self.exchange
        assert ex is not None
        if status < 200 and status != 101:
            if status == 100:  # the proxy's own business: go on with the body
                ex.upstream_continue()
            else:
                head, _, _ = self.build(status, True, True, False)
                ex.upstream_interim(head)
            return
        self.keep_alive = p.should_keep_alive()
        self.deadline = 0.0
        self.head_done = status != 101
        if status == 101:
            self.tunnel = True
        ex.upstream_head(self, status, self.keep_alive)
        if self.content_length > 0 and not self.head_only and status not in (101, 204, 304):
            self.body_seen = 0  # counted by on_body: data_received may take the rest raw
        if self.head_only and status >= 200:
            # httptools cannot be told that a HEAD response has no body.
            self.parser = httptools.HttpResponseParser(self)
            self.trailers_wanted = False
            self.msg_done = True

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            self.body_seen += len(body)
            ex.upstream_body(body)

    def on_message_complete(self) -> None:
        if self.exchange is None or self.parser.get_status_code() < 200:
            return
        self.big = False
        self.msg_done = True

    def _finish(self) -> None:
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.upstream_end(self)

    def release(self, reusable: bool) -> None:
        """Called by the client side once the exchange is over."""
        if reusable and self.keep_alive and not self.tunnel:
            # A slow client may have paused our reading: a pooled connection must read
            # (an idle connection's EOF or stray bytes are how it is found dead).
            self.pause_reading(False)
            self.pool.put(self)
        else:
            self.close()


class _TrailerReader:
    """The parser's callbacks for a response whose trailer fields are wanted: those of
    the head are passed over (the head is filtered whole), the fields after a chunked
    body are collected (bounded like a head) and reported before the response ends."""

    __slots__ = ("after", "fields", "size", "up")

    def __init__(self, up: UpstreamConnection) -> None:
        self.up = up
        self.after = False  # past this message's head: fields are trailer fields
        self.fields: list[tuple[bytes, bytes]] = []
        self.size = 0

    def on_message_begin(self) -> None:
        self.after = False
        self.fields = []
        self.size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.after:
            self.size += len(name) + len(value) + 4
            if self.size > _MAX_HEAD:
                raise _StrayResponseError  # trailers past a head's bound: a bad response
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.after = True
        self.up.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.up.on_body(body)

    def on_message_complete(self) -> None:
        ex = self.up.exchange
        if self.fields and ex is not None and self.up.parser.get_status_code() >= 200:
            ex.upstream_trailers(self.fields)
        self.fields = []
        self.up.on_message_complete()


class Pool:
    """Keep-alive connections per target key, bounded and aged (one per worker)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_idle: int,
        idle_timeout: float,
        clock: Callable[[], float],
        batch: WriteBatch | None = None,
    ) -> None:
        self.loop = loop
        self.batch = batch if batch is not None else WriteBatch(loop)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.idle: dict[str, list[UpstreamConnection]] = {}
        self.open: set[UpstreamConnection] = set()
        self.idle_count = 0
        # One read buffer for every connection of the worker: a read is copied out of it
        # before the next one (uvloop reads into it only for the length of a callback).
        buf = memoryview(bytearray(READ_SIZE))
        self.read_all = buf
        self.read_head = buf[:HEAD_READ]
        self.read_head_big = buf[:HEAD_READ_BIG]
        self.splicer = splice.Splicer() if splice.available() else None

    def get(self, key: str) -> UpstreamConnection | None:
        conns = self.idle.get(key)
        while conns:
            up = conns.pop()
            self.idle_count -= 1
            t = up.transport
            if t is not None and not t.is_closing():
                up.reused = True
                return up
        return None

    def put(self, up: UpstreamConnection) -> None:
        conns = self.idle.get(up.key)
        if conns is None:
            conns = self.idle[up.key] = []
        if len(conns) >= self.max_idle:
            up.close()
            return
        up.deadline = self.clock() + self.idle_timeout
        conns.append(up)
        self.idle_count += 1

    def forget(self, up: UpstreamConnection) -> None:
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)
            self.idle_count -= 1

    async def connect(self, key: str, host: str, port: int, timeout: float) -> UpstreamConnection:
        """A fresh connection; raises OSError or TimeoutError."""
        up = UpstreamConnection(self, key)
        async with asyncio.timeout(timeout):
            await self.loop.create_connection(_factory(up), host, port)
        return up

    def sweep(self, now: float) -> list[UpstreamConnection]:
        """Close idle connections past their age; return busy ones past their deadline."""
        late: list[UpstreamConnection] = []
        for up in list(self.open):
            d = up.deadline
            if d and now >= d:
                if up.exchange is None:
                    up.close()
                else:
                    late.append(up)
        return late

    def close_all(self) -> None:
        for up in list(self.open):
            up.close()


def _factory(proto: object) -> Callable[[], Any]:
    """A protocol factory for loop.create_connection/create_server: our protocols are
    asyncio protocols by their methods (uvloop and asyncio call them by name), which
    asyncio's type hints cannot see."""
    return lambda: proto
