"""proxy.core.h2_head: an HTTP/2 request's decoded fields checked (RFC 9113 8.2, 8.3) and
made into the HTTP/1.1 head an instance receives; a response head made into HTTP/2
fields. Fields in, a Request (or the error) out; and bytes in through the h2 library."""

from __future__ import annotations

import httptools
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.h2_head import (
    CONNECTION_SPECIFIC,
    CONTENT_LENGTH,
    MALFORMED,
    StreamError,
    extra_fields,
    fill_request,
    local_fields,
    response_fields,
    trailer_fields,
)
from proxy.core.headers import CHUNKED, LENGTH, NO_BODY, HeadError
from proxy.core.request import Request
from proxy.core.request_head import FWD_SET, Front

FRONT = Front(FWD_SET, b"192.0.2.7", b"https", b"443")
BASE = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"hello.test"),
    (b":path", b"/a?b=1"),
]


def made(fields: list[tuple[bytes, bytes]], end: bool = True) -> Request:
    r = Request(100, 65536)
    fill_request(r, fields, end)
    return r


def head_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The head as llhttp parses it (what the instance will see)."""
    got: list[tuple[bytes, bytes]] = []

    class P:
        def on_header(self, name: bytes, value: bytes) -> None:
            got.append((name.lower(), value))

    httptools.HttpRequestParser(P()).feed_data(head)
    return got


def test_a_get_becomes_one_http11_head_with_host_from_authority() -> None:
    """:authority is the Host (exactly one), :path the target, forwarding fields the proxy's."""
    r = made([*BASE, (b"accept", b"*/*")])
    head = r.build(FRONT)
    assert head.startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: hello.test\r\n")
    fields = head_fields(head)
    assert [v for k, v in fields if k == b"host"] == [b"hello.test"]
    assert (b"x-forwarded-proto", b"https") in fields
    assert (b"accept", b"*/*") in fields
    assert r.framing == NO_BODY


def test_cookie_crumbs_are_joined() -> None:
    """RFC 9113 8.2.3: several cookie fields become one, joined with "; "."""
    r = made([*BASE, (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert (b"cookie", b"a=1; b=2") in head_fields(r.build(FRONT))


def test_body_framing() -> None:
    """No content-length and no END_STREAM: chunked towards the instance; with one: as is."""
    assert made(BASE, end=False).framing == CHUNKED
    r = made([*BASE, (b"content-length", b"5")], end=False)
    assert r.framing == LENGTH and r.content_length == 5
    assert b"Content-Length: 5\r\n" in r.build(FRONT)


def test_host_field_alone_is_accepted_and_must_match_authority() -> None:
    """Host without :authority is the Host; Host differing from :authority is malformed."""
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"x.test")]
    assert made(fields).host == b"x.test"
    with pytest.raises(StreamError) as e:
        made([*BASE, (b"host", b"evil.test")])
    assert e.value.kind == MALFORMED
    assert made([*BASE, (b"host", b"HELLO.test")]).host == b"HELLO.test"


@pytest.mark.parametrize(
    "fields",
    [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"h.test")],  # no :path
        [(b":scheme", b"https"), (b":authority", b"h.test"), (b":path", b"/")],  # no :method
        [*BASE, (b":method", b"GET")],  # pseudo after... duplicated
        [
            (b":method", b"GET"),
            (b"accept", b"x"),
            (b":scheme", b"https"),
            (b":path", b"/"),
            (b":authority", b"h"),
        ],
        [*BASE, (b":status", b"200")],
        [*BASE[:3], (b":path", b"/a b")],  # a space would split the request line
        [*BASE[:3], (b":path", b"http://h.test/")],  # not origin-form
        [*BASE[:3], (b":path", b"*")],  # * is for OPTIONS only
        [*BASE, (b"X-Upper", b"1")],  # upper case name
        [*BASE, (b"x-a", b"1\r\nx-b: 2")],  # CR LF in a value
        [*BASE, (b"x-a", b" lead")],
        [*BASE, (b"x-a", b"nul\x00")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],  # no authority, no Host
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"u@h.test"),
            (b":path", b"/"),
        ],
        [(b":method", b"G ET"), (b":scheme", b"https"), (b":authority", b"h"), (b":path", b"/")],
    ],
)
def test_malformed_requests_are_stream_errors(fields: list[tuple[bytes, bytes]]) -> None:
    """Missing, repeated, late or unknown pseudo-header fields, bad names and values:
    StreamError (RST_STREAM PROTOCOL_ERROR), nothing forwarded."""
    with pytest.raises(StreamError) as e:
        made(fields)
    assert e.value.kind == MALFORMED


@pytest.mark.parametrize(
    "field",
    [
        (b"connection", b"keep-alive"),
        (b"proxy-connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"te", b"gzip"),
    ],
)
def test_connection_specific_fields_are_stream_errors(field: tuple[bytes, bytes]) -> None:
    """RFC 9113 8.2.2: connection-specific fields (and TE other than trailers) are malformed."""
    with pytest.raises(StreamError) as e:
        made([*BASE, field])
    assert e.value.kind == CONNECTION_SPECIFIC


@pytest.mark.parametrize(
    ("fields", "end"),
    [
        ([*BASE, (b"content-length", b"5")], True),  # a length, no DATA
        ([*BASE, (b"content-length", b"5x")], False),
        ([*BASE, (b"content-length", b"5"), (b"content-length", b"6")], False),
    ],
)
def test_content_length_errors(fields: list[tuple[bytes, bytes]], end: bool) -> None:
    """A content-length that is no number, disagrees with itself or with END_STREAM."""
    with pytest.raises(StreamError) as e:
        made(fields, end)
    assert e.value.kind == CONTENT_LENGTH


def test_refusals_keep_their_status() -> None:
    """Well-formed requests the proxy refuses get a status, as over HTTP/1.1."""
    with pytest.raises(HeadError) as e:
        made([(b":method", b"CONNECT"), (b":authority", b"h.test:443")])
    assert e.value.status == 405
    many = [*BASE] + [(b"x-%d" % i, b"v") for i in range(200)]
    with pytest.raises(HeadError) as e:
        made(many)
    assert e.value.status == 431


def test_response_fields_drop_hop_by_hop() -> None:
    """Connection-named and connection-specific fields go; names are lower-cased; 204
    loses Content-Length."""
    fields = b"Content-Type: text/plain\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nContent-Length: 3\r\n"
    out = response_fields(200, fields, [b"x-hop"])
    assert out == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"3"),
    ]
    assert (b"content-length", b"3") not in response_fields(204, fields, None)


def test_local_fields() -> None:
    """The proxy's own answers carry their length and the extra fields, lower-cased."""
    out = local_fields(503, 10, b"Retry-After: 1\r\n")
    assert (b":status", b"503") in out and (b"retry-after", b"1") in out
    assert (b"content-length", b"10") in out


def test_extra_fields_for_a_peer() -> None:
    """The proxy's own lines for a peer (X-Edgeproxy-Load on a backhaul answer) become
    lower-cased fields; a connection-specific one is dropped."""
    out = extra_fields(b"X-Edgeproxy-Load: 3\r\nConnection: close\r\n")
    assert out == [(b"x-edgeproxy-load", b"3")]


def test_bytes_in_through_the_library() -> None:
    """A client's real HEADERS bytes (HPACK) through h2's server connection come out as
    a request whose HTTP/1.1 head names the same target and host."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, [*BASE, (b"accept", b"text/html")], end_stream=True)
    server = H2Connection(
        H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
    )
    server.initiate_connection()
    events = server.receive_data(client.data_to_send())
    req = next(e for e in events if isinstance(e, RequestReceived))
    r = made(list(req.headers or []), req.stream_ended is not None)
    assert r.build(FRONT).startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: hello.test\r\n")


_names = st.sampled_from(
    [b"accept", b"x-a", b"cookie", b"host", b"content-length", b"te", b":path", b"X-Up", b"via"]
)
_values = st.binary(max_size=12)


@given(st.lists(st.tuples(_names, _values), max_size=8), st.booleans())
def test_whatever_the_fields_the_head_is_one_clean_message(
    extra: list[tuple[bytes, bytes]], end: bool
) -> None:
    """Any field list either is refused or becomes a head llhttp parses as one request
    with exactly one Host (no smuggling through values or names)."""
    try:
        r = made([*BASE, *extra], end)
    except (StreamError, HeadError):
        return
    head = r.build(FRONT)
    fields = head_fields(head)
    assert [k for k, _ in fields].count(b"host") == 1
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    assert b"\x00" not in head


def test_te_trailers_is_told_to_the_instance_with_its_connection_option() -> None:
    """TE: trailers makes fill_request say so and the instance's head carry TE: trailers
    and Connection: TE (RFC 9110 10.1.4); without it, neither."""
    r = Request(100, 65536)
    assert fill_request(r, [*BASE, (b"te", b"trailers")], True) is True
    fields = head_fields(r.build(FRONT))
    assert (b"te", b"trailers") in fields and (b"connection", b"TE") in fields
    r = Request(100, 65536)
    assert fill_request(r, BASE, True) is False
    assert all(k not in (b"te", b"connection") for k, _ in head_fields(r.build(FRONT)))


def test_trailer_fields_drop_what_a_trailer_must_not_carry() -> None:
    """Trailer fields are lower-cased; framing, routing and control fields are dropped."""
    got = trailer_fields(
        [
            (b"Grpc-Status", b"0"),
            (b"Content-Length", b"5"),
            (b"Host", b"x"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Edgeproxy-Load", b"3"),
            (b"X-Sum", b" abc "),
        ]
    )
    assert got == [(b"grpc-status", b"0"), (b"x-sum", b"abc")]
