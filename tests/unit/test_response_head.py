"""proxy.core.headers.ResponseHead: a whole response head in, the filtered fields and facts out.

Sans-io: bytes in, attributes out, against a line-by-line model of the rules (hop-by-hop
and internal fields dropped, everything else kept byte for byte, in order).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.headers import CHUNKED, LENGTH, ResponseHead

HOP = {b"connection", b"transfer-encoding", b"keep-alive", b"te", b"trailer", b"upgrade"}


def head_of(fields: list[tuple[bytes, bytes]], status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
        + b"\r\n"
    )


def model_kept(fields: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for n, v in fields:
        ln = n.lower()
        if ln in HOP or ln.startswith(b"proxy-") or ln.startswith(b"x-edgeproxy-"):
            continue
        out += n + b": " + v + b"\r\n"
    return out


def test_a_typical_upstream_head() -> None:
    h = ResponseHead()
    fields = [
        (b"Server", b"nginx/1.22.1"),
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"13"),
        (b"Connection", b"keep-alive"),
        (b"ETag", b'"6565f000-d"'),
    ]
    h.take(head_of(fields))
    assert h.content_length == 13 and not h.chunked and h.conn_tokens is None
    assert h.reason == b"OK"
    assert h.fields == model_kept(fields)
    out, framing, keep = h.build(200, False, True, False)
    assert framing == LENGTH and keep
    assert out == b"HTTP/1.1 200 OK\r\n" + model_kept(fields) + b"\r\n"


def test_mixed_case_names_and_values() -> None:
    h = ResponseHead()
    fields = [
        (b"CONTENT-LENGTH", b"5"),
        (b"Connection", b"Keep-Alive, X-Secret"),
        (b"X-Secret", b"drop me"),
        (b"Transfer-Encoding", b"gzip, Chunked"),
        (b"Upgrade", b"WebSocket"),
        (b"X-Edgeproxy-Reject", b"full"),
        (b"x-edgeproxy-load", b"7 "),
        (b"Proxy-Thing", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"),
        (b"Connection-Id", b"kept"),
        (b"Tex", b"kept"),
        (b"Upgrade-Insecure-Requests", b"1"),
        (b"Content-Length-Hint", b"9"),
    ]
    h.take(head_of(fields, b"101 Switching Protocols"))
    assert h.content_length == 5
    assert h.chunked
    assert h.conn_tokens == [b"keep-alive", b"x-secret"]
    assert h.upgrade == b"WebSocket"  # as sent
    assert h.reject and h.load == 7
    assert h.reason == b"Switching Protocols"
    assert h.fields == model_kept(fields)
    out, framing, _ = h.build(200, False, True, False)
    assert b"X-Secret" not in out and b"Connection-Id: kept\r\n" in out
    assert framing == CHUNKED


def test_no_content_length() -> None:
    h = ResponseHead()
    h.take(head_of([(b"Date", b"today")], b"204 No Content"))
    assert h.content_length == -1 and h.fields == b"Date: today\r\n"


NAMES = st.sampled_from(
    [b"Connection", b"keep-alive", b"TE", b"Te-Extra", b"Trailer", b"Upgrade", b"Proxy-A",
     b"proxy-b", b"X-Edgeproxy-Load", b"X-EDGEPROXY-x", b"Server", b"Date", b"X-A",
     b"Upgraded", b"Connectionx", b"Via", b"Set-Cookie", b"Transfer-Encodings"]
)  # fmt: skip
VALUES = st.binary(min_size=0, max_size=12).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E and c != 0x2C)  # no CR/LF/commas
)


@given(st.lists(st.tuples(NAMES, VALUES), max_size=12), st.integers(0, 10**9))
def test_kept_fields_match_the_line_model(fields: list[tuple[bytes, bytes]], n: int) -> None:
    """Whatever the mix, the kept fields are exactly the model's, in order, byte for byte;
    Content-Length anywhere is read and kept."""
    fields = [
        *fields[: len(fields) // 2],
        (b"Content-Length", b"%d" % n),
        *fields[len(fields) // 2 :],
    ]
    h = ResponseHead()
    h.take(head_of(fields))
    assert h.content_length == n
    assert h.fields == model_kept(fields)


PLAIN = st.sampled_from([b"keep-alive", b"Keep-Alive", b"close", b"CLOSE", b"upgrade", b"close "])
COMMON = st.sampled_from(
    [b"Server", b"Date", b"Content-Type", b"ETag", b"Set-Cookie", b"Connectionx", b"X-A"]
)


@given(
    st.lists(st.tuples(COMMON, VALUES), max_size=8),
    st.integers(0, 8),
    st.one_of(st.none(), PLAIN),
    st.integers(0, 10**9),
)
def test_plain_connection_among_common_fields(
    fields: list[tuple[bytes, bytes]], at: int, conn: bytes | None, n: int
) -> None:
    """The usual head (common fields, at most one plain Connection anywhere, first or
    last included): the Connection field is dropped, everything else kept in order."""
    fields = [*fields, (b"Content-Length", b"%d" % n)]
    if conn is not None:
        fields.insert(min(at, len(fields)), (b"Connection", conn))
    h = ResponseHead()
    h.take(head_of(fields))
    assert h.content_length == n
    assert h.fields == model_kept(fields)
    assert h.conn_tokens is None and not h.chunked and h.upgrade == b""


def test_connection_as_the_only_or_the_first_field() -> None:
    h = ResponseHead()
    h.take(head_of([(b"Connection", b"close")]))
    assert h.fields == b"" and h.content_length == -1
    h.take(head_of([(b"Connection", b"keep-alive"), (b"Date", b"today")]))
    assert h.fields == b"Date: today\r\n"
    h.take(head_of([(b"Date", b"today"), (b"Connection", b"keep-alive")]))
    assert h.fields == b"Date: today\r\n"


def test_two_connection_fields_are_both_read() -> None:
    """A second Connection field after a plain one still names fields to drop."""
    h = ResponseHead()
    h.take(head_of([(b"Connection", b"close"), (b"Date", b"d"), (b"Connection", b"X-Secret")]))
    assert h.fields == b"Date: d\r\n" and h.conn_tokens == [b"x-secret"]
