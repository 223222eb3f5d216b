"""HTTP/2 bad input and faults, end to end over h2c: a real proxy in front of an
instance that records the exact bytes it receives (tests/support/raw_instance.py) and
answers as scripted. What the instance reads for an HTTP/2 request is one clean HTTP/1.1
message; an instance dying mid-response resets that stream only; frames the RFC forbids
end in its errors.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
from h2raw import PROTOCOL_ERROR, RawH2, request_fields
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame
from proxyctl import Proxy
from raw_instance import RawInstance, Seen

pytestmark = pytest.mark.request_path

INTERNAL_ERROR = 2
FLOW_CONTROL_ERROR = 3
STREAM_CLOSED = 5
FRAME_SIZE_ERROR = 6


def frame_bytes(kind: int, sid: int, payload: bytes, flags: int = 0) -> bytes:
    """A frame as raw bytes (RFC 9113 4.1), for what hyperframe refuses to build."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def die_mid_body(s: socket.socket, seen: Seen) -> bool:
    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"p" * 5000)
    return False  # the connection closes 5000 bytes into a 100000-byte body


TRAILED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
    b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nContent-Type: text/x\r\nX-Sum: abc\r\n\r\n"
)


@pytest.fixture
def inst() -> Iterator[RawInstance]:
    r = RawInstance(handlers={"/die": die_mid_body}, responses={"/trailers": TRAILED}).start()
    yield r
    r.stop()


@pytest.fixture
def px(proxy_factory: Callable[..., Proxy], inst: RawInstance) -> Proxy:
    return proxy_factory(upstream=inst.address, workers=1, listen_extra={"h2c": True})


def test_the_instance_reads_one_clean_http11_message(px: Proxy, inst: RawInstance) -> None:
    """A POST stream without content-length, with cookie crumbs and TE: trailers, reaches
    the instance as one HTTP/1.1 request: one Host, chunked framing made by the proxy, the
    cookies joined, TE: trailers said by the proxy, the body whole."""
    with RawH2(px.cfg.port) as c:
        fields = [
            *request_fields("/up?x=1", method="POST"),
            (b"cookie", b"a=1"),
            (b"te", b"trailers"),
            (b"cookie", b"b=2"),
        ]
        c.send(c.headers(1, fields, end_stream=False))
        c.send(c.data(1, b"hello ") + c.data(1, b"world", end_stream=True))
        assert c.stream_end(1)[0] == 200
    seen = inst.wait_requests(1)[0]
    assert seen.line == b"POST /up?x=1 HTTP/1.1"
    assert seen.fields("host") == [b"hello.test"]
    assert seen.fields("cookie") == [b"a=1; b=2"]
    assert seen.fields("te") == [b"trailers"]  # said by the proxy itself, with Connection: TE
    assert seen.fields("transfer-encoding") == [b"chunked"]
    assert seen.fields("content-length") == []
    assert seen.body == b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"


def test_instance_dying_mid_response_resets_that_stream_only(px: Proxy) -> None:
    """Part of a response is out when the instance dies: that stream gets RST_STREAM
    INTERNAL_ERROR (the client sees a cut, not a short body); a stream beside it is
    answered."""
    with RawH2(px.cfg.port) as c:
        c.send(c.headers(1, request_fields("/die")) + c.headers(3, request_fields("/ok")))
        status, code = c.stream_end(1)
        assert status == 200 and code == INTERNAL_ERROR
        got = sum(len(f.data) for f in c.frames if isinstance(f, DataFrame) and f.stream_id == 1)
        assert got < 100000
        assert c.stream_end(3)[0] == 200


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (RawH2.window_update(0, 0), PROTOCOL_ERROR),  # RFC 9113 6.9: an increment of 0
        (RawH2.window_update(0, 2**31 - 1), FLOW_CONTROL_ERROR),  # past 2^31-1 (6.9.1)
        (frame_bytes(0, 0, b"x"), PROTOCOL_ERROR),  # DATA on stream 0 (6.1)
        (frame_bytes(6, 0, b"1234567"), FRAME_SIZE_ERROR),  # a 7-byte PING (6.7)
    ],
)
def test_forbidden_frames_are_connection_errors(px: Proxy, frame: bytes, code: int) -> None:
    """Frames the RFC forbids on a connection end it with GOAWAY and the RFC's code."""
    with RawH2(px.cfg.port) as c:
        c.send(frame)
        g = c.goaway()
    assert g is not None and g.error_code == code


def test_data_on_a_closed_stream_is_a_stream_error(px: Proxy) -> None:
    """DATA after the stream's END_STREAM: RST_STREAM STREAM_CLOSED (RFC 9113 5.1) or a
    connection error; the proxy survives either way and serves a new connection."""
    with RawH2(px.cfg.port) as c:
        c.send(c.headers(1, request_fields("/ok")))
        assert c.stream_end(1)[0] == 200
        c.send(c.data(1, b"late"))
        c.read_until(lambda: c.find(RstStreamFrame, 1) is not None or c.closed, timeout=5)
    with RawH2(px.cfg.port) as c:
        c.send(c.headers(1, request_fields("/ok")))
        assert c.stream_end(1)[0] == 200


@pytest.mark.parametrize("te", [True, False])
def test_trailers_pass_when_the_client_takes_them(px: Proxy, inst: RawInstance, te: bool) -> None:
    """A client that sent TE: trailers gets the instance's trailer fields as a final
    HEADERS frame (those a trailer must not carry, like Content-Type, dropped), and the
    instance was told TE: trailers with its Connection option; without it, the body
    ends the stream and the instance is told nothing."""
    with RawH2(px.cfg.port) as c:
        extra = [(b"te", b"trailers")] if te else []
        c.send(c.headers(1, [*request_fields("/trailers"), *extra]))
        assert c.stream_end(1)[0] == 200
        heads = [f for f in c.frames if isinstance(f, HeadersFrame) and f.stream_id == 1]
        body = b"".join(f.data for f in c.frames if isinstance(f, DataFrame) and f.stream_id == 1)
    assert body == b"hello"
    seen = inst.wait_requests(1)[0]
    if te:
        assert len(heads) == 2 and "END_STREAM" in heads[1].flags
        assert heads[1].decoded == [(b"grpc-status", b"0"), (b"x-sum", b"abc")]
        assert seen.fields("te") == [b"trailers"] and seen.fields("connection") == [b"TE"]
    else:
        assert len(heads) == 1
        assert seen.fields("te") == []
