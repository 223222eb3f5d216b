"""HTTP/2 heads as the HTTP/1.1 request path needs them, both ways (RFC 9113 8).

Owns the checks on a request's decoded header list (8.2.1 names and values, 8.2.2
connection-specific fields, 8.3 pseudo-header fields, one authority) and its
translation into a Request the exchange forwards (Host from :authority, cookie crumbs
joined as 8.2.3 says, the body's framing towards the instance), and the other way an
instance's response head as an HTTP/2 field list (hop-by-hop fields dropped).
Sans-io, no frames: the h2 library and proxy.worker.h2conn own those.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from proxy.core.headers import HeadError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from proxy.core.request_head import RequestHead

# Why a stream was refused as malformed (RST_STREAM PROTOCOL_ERROR, RFC 9113 8.1.1).
MALFORMED: Final = "malformed"  # pseudo-header fields, names, values, authority
CONNECTION_SPECIFIC: Final = "connection_specific"  # RFC 9113 8.2.2
CONTENT_LENGTH: Final = "content_length"  # content-length vs DATA (8.1.1)


class StreamError(Exception):
    """A malformed request: the stream is reset with PROTOCOL_ERROR, nothing forwarded."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# RFC 9113 8.2.2: fields that only mean something to one HTTP/1.1 connection.
_CONN_SPECIFIC: Final = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
# RFC 9110 5.6.2 token, lower case only (RFC 9113 8.2.1: upper case is malformed).
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
# RFC 9113 8.2.1: no NUL, CR or LF anywhere, no whitespace at either end; and, as
# llhttp holds HTTP/1.1 clients to it, no other control character but HTAB.
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\A[ \t]|[ \t]\Z")
_SCHEMES: Final = frozenset({b"http", b"https"})
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # a token (RFC 9110 9.1)
_TARGET: Final = re.compile(rb"[\x21-\x7e]+\Z")  # visible ASCII: it becomes a request line


def fill_request(r: RequestHead, fields: Sequence[tuple[bytes, bytes]], end_stream: bool) -> bool:
    """Check a request's decoded fields and fill `r` as if it came as HTTP/1.1; True when
    the client takes trailers (TE: trailers, which the instance is then told too).

    StreamError: malformed (reset the stream); HeadError: a well-formed request the proxy
    refuses with a status (431, 405, 400 ...), as it would over HTTP/1.1."""
    method = scheme = path = authority = None
    regular = False
    cookies: list[bytes] = []
    length = -1
    trailers = False
    for name, value in fields:
        if _BAD_VALUE.search(value) is not None:
            raise StreamError(MALFORMED, f"invalid value of {name[:64]!r}")
        if name[:1] == b":":
            if regular:
                raise StreamError(MALFORMED, "a pseudo-header field after a regular field")
            if name == b":method":
                if method is not None:
                    raise StreamError(MALFORMED, "two :method fields")
                method = value
            elif name == b":scheme":
                if scheme is not None:
                    raise StreamError(MALFORMED, "two :scheme fields")
                scheme = value
            elif name == b":path":
                if path is not None:
                    raise StreamError(MALFORMED, "two :path fields")
                path = value
            elif name == b":authority":
                if authority is not None:
                    raise StreamError(MALFORMED, "two :authority fields")
                authority = value
            else:  # :status, :protocol (no extended CONNECT here) or an invented one
                raise StreamError(MALFORMED, f"pseudo-header field {name[:64]!r} in a request")
            continue
        regular = True
        if _NAME.match(name) is None:
            raise StreamError(MALFORMED, f"invalid field name {name[:64]!r}")
        if name in _CONN_SPECIFIC:
            raise StreamError(CONNECTION_SPECIFIC, f"connection-specific field {name.decode()}")
        if name == b"te":
            if value != b"trailers":
                raise StreamError(CONNECTION_SPECIFIC, "te other than trailers")
            trailers = True
            continue
        if name == b"cookie":
            r.size += len(value) + 2  # bounded with the head (joined below)
            cookies.append(value)
            continue
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise StreamError(CONTENT_LENGTH, "invalid content-length")
            n = int(value)
            if length >= 0 and n != length:
                raise StreamError(CONTENT_LENGTH, "content-length fields disagree")
            if length >= 0:
                continue  # the same value again: one is forwarded
            length = n
        r.on_header(name, value)  # HeadError: too many, too large, two Host ...
    if method is None or _METHOD.match(method) is None:
        raise StreamError(MALFORMED, "no :method, or not a token")
    if method == b"CONNECT":
        raise HeadError(405, "CONNECT is not supported")
    if scheme is None or path is None or _TARGET.match(path) is None:
        raise StreamError(MALFORMED, "no :scheme, or no :path of visible characters")
    if scheme not in _SCHEMES:
        raise HeadError(400, "only http and https requests are served")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise StreamError(MALFORMED, "a :path that is neither absolute nor * for OPTIONS")
    if authority is not None:
        if not authority or b"@" in authority or _TARGET.match(authority) is None:
            raise StreamError(MALFORMED, "an :authority without a usable host")
        host = r.host
        if host and host.lower() != authority.lower():
            raise StreamError(MALFORMED, "Host and :authority name different hosts")
        if not host:
            r.on_header(b"host", authority)
    elif not r.host:
        raise StreamError(MALFORMED, "neither :authority nor Host")
    if cookies:
        r.on_header(b"cookie", b"; ".join(cookies))
    r.on_url(path)
    if length >= 0:
        if end_stream and length > 0:
            raise StreamError(CONTENT_LENGTH, "content-length with no DATA")
    elif not end_stream:
        # A body of unknown length: chunked towards the instance (the proxy's own framing).
        r.chunked = True
        r.te = b"chunked"
    r.decide(method, "1.1", False, True, frozenset())
    if trailers:
        # Hop-by-hop, so said again by the proxy itself (RFC 9110 10.1.4: with its
        # Connection option): the instance may then send trailer fields.
        r.parts += (b"TE", b": ", b"trailers", b"\r\n", b"Connection", b": ", b"TE", b"\r\n")
    return trailers


# Response fields that never cross into HTTP/2 (RFC 9113 8.2.2), besides what
# ResponseHead already dropped and what Connection named.
_RESP_DROP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
    }
)
_STATUS: Final = {n: str(n).encode() for n in range(100, 600)}


def response_fields(
    status: int, fields: bytes, named: Sequence[bytes] | None
) -> list[tuple[bytes, bytes]]:
    """An instance's response head (ResponseHead.fields: "Name: value" lines, each
    ending in CRLF, as llhttp validated them) as an HTTP/2 field list."""
    out = [(b":status", _STATUS.get(status) or str(status).encode())]
    for line in fields.split(b"\r\n"):
        colon = line.find(b":")
        if colon <= 0:
            continue
        name = line[:colon].rstrip(b" \t").lower()
        if name in _RESP_DROP or (named is not None and name in named):
            continue
        if name == b"content-length" and (status < 200 or status == 204):
            continue  # RFC 9110 8.6
        out.append((name, line[colon + 1 :].strip(b" \t")))
    return out


# Trailer fields that must not be (RFC 9110 6.5.1: framing, routing, controls), besides
# the connection-specific ones.
_TRAILER_DROP: Final = _RESP_DROP | {
    b"content-length",
    b"host",
    b"content-encoding",
    b"content-type",
    b"content-range",
    b"authorization",
    b"set-cookie",
    b"cache-control",
    b"expect",
    b"max-forwards",
}


def trailer_fields(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An instance's trailer fields (after a chunked body, as llhttp validated them) as
    HTTP/2 trailers: lower-cased, without the fields a trailer must not carry."""
    out = []
    for name, value in fields:
        lname = name.lower()
        if lname in _TRAILER_DROP or lname[:12] == b"x-edgeproxy-" or lname[:6] == b"proxy-":
            continue
        out.append((lname, value.strip(b" \t")))
    return out


def local_fields(status: int, length: int, extra: bytes) -> list[tuple[bytes, bytes]]:
    """The head of one of the proxy's own text answers; `extra`: "Name: value" lines."""
    out = [
        (b":status", _STATUS.get(status) or str(status).encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % length),
    ]
    if extra:
        out += extra_fields(extra)
    return out


def extra_fields(extra: bytes) -> list[tuple[bytes, bytes]]:
    """The proxy's own "Name: value" lines (each ending in CRLF) as HTTP/2 fields."""
    out = []
    for line in extra.split(b"\r\n"):
        colon = line.find(b":")
        if colon > 0:
            name = line[:colon].strip().lower()
            if name not in _RESP_DROP:
                out.append((name, line[colon + 1 :].strip(b" \t")))
    return out
