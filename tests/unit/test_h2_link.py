"""A backhaul stream as an upstream connection's transport (proxy.worker.h2link): what a
real UpstreamConnection writes becomes HEADERS and DATA, and what the peer's frames carry
comes back to it as one HTTP/1.1 response. The connection is a recording owner (the
frames themselves are the h2 library's, tried end to end in tests/e2e/test_h2_backhaul.py)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

import pytest

from proxy.worker.h2link import StreamLink
from proxy.worker.upstream import (
    LOST_BEFORE_RESPONSE,
    LOST_UNPROCESSED,
    Exchange,
    Pool,
    UpstreamConnection,
)

Fields = list[tuple[bytes, bytes]]


class Owner:
    """Stands for the PeerConn: records what the stream asks of its connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.scheme = b"https"
        self.headers: list[tuple[Fields, bool]] = []
        self.data: list[bytes] = []
        self.fin = False
        self.acks: list[tuple[int, int]] = []
        self.resets: list[int] = []
        self.forgotten: list[StreamLink] = []

    def send_headers(self, link: StreamLink, fields: Fields, end: bool) -> None:
        link.sid = 1
        self.headers.append((fields, end))
        self.fin = self.fin or end

    def send_data(self, sid: int, pending: deque[bytes], fin: bool) -> tuple[int, bool]:
        n = 0
        while pending:
            d = pending.popleft()
            self.data.append(d)
            n += len(d)
        self.fin = self.fin or fin
        return n, fin

    def ack(self, sid: int, n: int) -> None:
        self.acks.append((sid, n))

    def reset(self, sid: int, code: int) -> None:
        self.resets.append(code)

    def forget(self, link: StreamLink) -> None:
        self.forgotten.append(link)


class Seen(Exchange):
    """Records what the upstream connection reports."""

    def __init__(self) -> None:
        self.status = 0
        self.fields = b""
        self.body = b""
        self.ended = False
        self.continued = False
        self.lost = ""
        self.trailers: Fields = []

    def upstream_head(self, up: UpstreamConnection, status: int, keep_alive: bool) -> None:
        self.status = status
        self.fields = up.fields

    def upstream_continue(self) -> None:
        self.continued = True

    def upstream_body(self, data: bytes | memoryview) -> None:
        self.body += bytes(data)

    def upstream_flush(self) -> None:
        pass

    def upstream_end(self, up: UpstreamConnection) -> None:
        self.ended = True

    def upstream_lost(self, up: UpstreamConnection, why: str) -> None:
        self.lost = why

    def upstream_trailers(self, fields: Fields) -> None:
        self.trailers = fields

    def upstream_pause(self, paused: bool) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def start(
    loop: asyncio.AbstractEventLoop, head: bytes, head_only: bool = False
) -> tuple[Owner, StreamLink, UpstreamConnection, Seen]:
    owner = Owner(loop)
    pool = Pool(loop, 4, 30.0, loop.time)
    up = UpstreamConnection(pool, "bh:n3")
    link = StreamLink(owner, 0, up)  # type: ignore[arg-type]
    up.connection_made(link)  # type: ignore[arg-type]
    seen = Seen()
    up.send(seen, head, head_only, loop.time() + 10)
    up.flush_out()  # what the worker's write batch does at the end of the iteration
    return owner, link, up, seen


def settle(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))


GET = (
    b"GET /x?y=1 HTTP/1.1\r\nHost: hello.test\r\nConnection: keep-alive\r\nTE: trailers\r\n"
    b"X-Forwarded-For: 192.0.2.7\r\nX-Edgeproxy-Instance: hello-n3\r\n\r\n"
)


def test_a_get_goes_as_one_headers_frame_with_end_stream(loop: asyncio.AbstractEventLoop) -> None:
    """No body: HEADERS with END_STREAM (the peer must not see a chunked GET); Host
    becomes :authority, hop-by-hop fields stay behind, TE: trailers and the backhaul's
    own fields go on."""
    owner, _, _, _ = start(loop, GET)
    fields, end = owner.headers[0]
    assert end
    assert fields[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"hello.test"),
        (b":path", b"/x?y=1"),
    ]
    names = [n for n, _ in fields[4:]]
    assert names == [b"te", b"x-forwarded-for", b"x-edgeproxy-instance"]


def test_a_chunked_body_goes_as_data_without_its_framing(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A body the exchange frames chunked reaches the peer as plain DATA, END_STREAM
    after its last chunk; the Transfer-Encoding field stays behind."""
    head = (
        b"POST /up HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    owner, _, up, _ = start(loop, head)
    fields, end = owner.headers[0]
    assert not end and (b"expect", b"100-continue") in fields
    assert all(n != b"transfer-encoding" for n, _ in fields)
    up.write(b"5\r\nhello\r\n")
    assert not owner.fin
    up.write(b"6\r\n world\r\n0\r\n\r\n")
    assert b"".join(owner.data) == b"hello world" and owner.fin


def test_a_response_without_length_comes_back_chunked(loop: asyncio.AbstractEventLoop) -> None:
    """HEADERS without content-length, then DATA: the exchange sees one response whose
    body is the DATA's bytes, ended by the END_STREAM; credit goes back as it is handed
    on; the stream ends without a reset."""
    owner, link, up, seen = start(loop, GET)
    link.on_response([(b":status", b"200"), (b"content-type", b"text/plain")], False)
    assert seen.status == 200 and b"content-type: text/plain" in seen.fields.lower()
    link.on_data(b"abc", 3, False)
    link.on_data(b"defg", 4, True)
    assert seen.body == b"abcdefg" and seen.ended
    assert owner.acks == [(1, 3), (1, 4)]
    up.release(True)  # the exchange is done: never pooled (Connection: close)
    settle(loop)
    assert owner.resets == [] and owner.forgotten == [link]


def test_trailers_reach_the_exchange(loop: asyncio.AbstractEventLoop) -> None:
    """A chunked response's trailer fields (asked for) come after its body."""
    owner = Owner(loop)
    pool = Pool(loop, 4, 30.0, loop.time)
    up = UpstreamConnection(pool, "bh:n3")
    link = StreamLink(owner, 0, up)  # type: ignore[arg-type]
    up.connection_made(link)  # type: ignore[arg-type]
    seen = Seen()
    up.send(seen, GET, False, loop.time() + 10, True)
    up.flush_out()
    link.on_response([(b":status", b"200")], False)
    link.on_data(b"body", 4, False)
    link.on_trailers([(b"grpc-status", b"0")])
    assert seen.body == b"body" and seen.ended
    assert [(n.lower(), v) for n, v in seen.trailers] == [(b"grpc-status", b"0")]


def test_a_head_answer_ends_with_its_headers(loop: asyncio.AbstractEventLoop) -> None:
    """HEAD: the answer's content-length describes no body; END_STREAM on HEADERS ends it."""
    head = b"HEAD / HTTP/1.1\r\nHost: hello.test\r\n\r\n"
    _, link, _, seen = start(loop, head, head_only=True)
    link.on_response([(b":status", b"200"), (b"content-length", b"1234")], True)
    assert seen.status == 200 and seen.ended and seen.body == b""


def test_100_continue_lets_the_body_go(loop: asyncio.AbstractEventLoop) -> None:
    """The peer's 100 (it admitted the request) reaches the exchange as 100 Continue."""
    head = (
        b"PUT /x HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    _, link, _, seen = start(loop, head)
    link.on_response([(b":status", b"100")], False)
    assert seen.continued and seen.status == 0


def test_paused_reading_holds_the_credit(loop: asyncio.AbstractEventLoop) -> None:
    """While the exchange pauses reading (a slow client), DATA handed on is not credited
    back; on resume it all is, at once."""
    owner, link, up, seen = start(loop, GET)
    link.on_response([(b":status", b"200"), (b"content-length", b"10")], False)
    up.pause_reading(True)
    link.on_data(b"12345", 5, False)
    assert owner.acks == []
    up.pause_reading(False)
    assert owner.acks == [(1, 5)]
    link.on_data(b"67890", 5, True)
    assert seen.body == b"1234567890" and seen.ended


def test_a_field_http11_cannot_carry_fails_the_stream(loop: asyncio.AbstractEventLoop) -> None:
    """A value with CR or LF (it would split the HTTP/1.1 head) is no response: reset,
    and the exchange hears a connection lost before any response."""
    owner, link, _, seen = start(loop, GET)
    link.on_response([(b":status", b"200"), (b"x-a", b"1\r\nx-b: 2")], False)
    settle(loop)
    assert seen.lost == LOST_BEFORE_RESPONSE and seen.status == 0
    assert owner.resets


def test_a_refused_stream_is_unprocessed(loop: asyncio.AbstractEventLoop) -> None:
    """A stream the peer refused: the exchange hears LOST_UNPROCESSED (retried as a
    refused connect, whatever the method)."""
    _, link, _, seen = start(loop, GET)
    link.lost(True)
    settle(loop)
    assert seen.lost == LOST_UNPROCESSED
