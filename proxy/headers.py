"""Header work of the request path: httptools header callbacks in, head bytes out.

Owns the hop-by-hop rules, X-Forwarded-* and Via, framing decisions and the
internal headers that clients may neither send nor see. Sans-io: no sockets,
no clock. It must stay allocation-lean: header fields are forwarded as the
bytes they arrived as, joined once.
"""

from __future__ import annotations

import re
from typing import Final

# Headers that never cross the proxy (RFC 9110 7.6.1) plus what we re-frame.
_REQ_DROP: Final = frozenset(
    {
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
    }
)

# Every request field name that is not simply forwarded (besides proxy-* and x-edgeproxy-*).
_REQ_SPECIAL: Final = _REQ_DROP | {
    b"host",
    b"connection",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
    b"upgrade",
    b"expect",
    b"content-length",
    b"transfer-encoding",
}

_STATUS: Final = {n: str(n).encode() for n in range(100, 600)}

# Internal headers (node to node). Stripped from what clients send and see.
INTERNAL_PREFIX: Final = b"x-edgeproxy-"
FORCE_INSTANCE: Final = b"x-edgeproxy-force-instance"  # documented, client may send
PREFER_INSTANCE: Final = b"x-edgeproxy-prefer-instance"  # documented, client may send
TARGET_INSTANCE: Final = b"x-edgeproxy-instance"  # backhaul: the instance a request is for
REJECT: Final = b"x-edgeproxy-reject"  # backhaul response: "full, come back later"
LOAD: Final = b"x-edgeproxy-load"  # backhaul response: the instance's in-flight count

# Framing of a message body.
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3

VIA: Final = b"1.1 edgeproxy"
CRLF: Final = b"\r\n"
CHUNK_END: Final = b"0\r\n\r\n"


class HeadError(Exception):
    """A request head that must be refused with `status` before anything is forwarded."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _connection_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class RequestHead:
    """One request's header fields, filtered as they arrive.

    `on_header` is httptools' callback; `build` makes the head for the upstream.
    """

    __slots__ = (
        "chunked",
        "conn_tokens",
        "content_length",
        "count",
        "expect_continue",
        "force",
        "host",
        "instance",
        "max_bytes",
        "max_count",
        "parts",
        "prefer",
        "size",
        "upgrade",
        "url",
        "via",
        "xff",
        "xfh",
        "xfp",
    )

    def __init__(self, max_count: int = 100, max_bytes: int = 65536) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        self.parts: list[bytes] = []
        self.url = b""
        self.host = b""
        self.xff = b""
        self.xfp = b""
        self.xfh = b""
        self.via = b""
        self.upgrade = b""
        self.conn_tokens: list[bytes] | None = None
        self.expect_continue = False
        self.chunked = False
        self.content_length = -1
        self.force = b""
        self.prefer = b""
        self.instance = b""
        self.count = 0
        self.size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.size += len(url)
        if self.size > self.max_bytes:
            raise HeadError(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        self.size += len(name) + len(value) + 4
        if self.count > self.max_count:
            raise HeadError(431, "too many header fields")
        if self.size > self.max_bytes:
            raise HeadError(431, "request head too large")
        lname = name.lower()
        if lname in _REQ_SPECIAL or lname[:6] == b"proxy-" or lname[:12] == INTERNAL_PREFIX:
            self._special(lname, name, value)
        else:
            self.parts += (name, b": ", value, CRLF)  # most fields: forwarded as they came

    def _special(self, lname: bytes, name: bytes, value: bytes) -> None:
        if lname == b"host":
            if self.host:
                raise HeadError(400, "more than one Host header")
            self.host = value
            self.parts += (name, b": ", value, CRLF)
        elif lname in _REQ_DROP or lname.startswith(b"proxy-"):
            pass
        elif lname == b"connection":
            toks = _connection_tokens(value)
            self.conn_tokens = toks if self.conn_tokens is None else self.conn_tokens + toks
        elif lname == b"x-forwarded-for":
            self.xff = value if not self.xff else self.xff + b", " + value
        elif lname == b"x-forwarded-proto":
            self.xfp = value
        elif lname == b"x-forwarded-host":
            self.xfh = value
        elif lname == b"via":
            self.via = value if not self.via else self.via + b", " + value
        elif lname == b"upgrade":
            self.upgrade = value
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise HeadError(417, "only Expect: 100-continue is supported")
            self.expect_continue = True
        elif lname == b"content-length":
            self.content_length = int(value)
            self.parts += (name, b": ", value, CRLF)
        elif lname == b"transfer-encoding":
            self.chunked = True  # re-framed by the proxy; llhttp validated it
        elif lname.startswith(INTERNAL_PREFIX):
            if lname == FORCE_INSTANCE:
                self.force = value.strip()
            elif lname == PREFER_INSTANCE:
                self.prefer = value.strip()
            elif lname == TARGET_INSTANCE:
                self.instance = value.strip()

    def hostname(self) -> str:
        """The Host without port, lower-cased (what apps are keyed by)."""
        h = self.host
        if h.startswith(b"["):
            end = h.find(b"]")
            h = h[: end + 1] if end > 0 else h
        else:
            colon = h.rfind(b":")
            if colon >= 0:
                h = h[:colon]
        return h.decode("latin-1").lower()

    def build(
        self,
        method: bytes,
        client_ip: bytes,
        framing: int,
        tunnel: bool,
        proto: bytes = b"http",
        extra: bytes = b"",
    ) -> bytes:
        """The head to send upstream (HTTP/1.1)."""
        parts = self.parts
        toks = self.conn_tokens
        if toks:
            named = {t for t in toks if t not in (b"close", b"keep-alive", b"upgrade")}
            if named:
                parts = _drop_named(parts, named)
        xff = self.xff + b", " + client_ip if self.xff else client_ip
        via = self.via + b", " + VIA if self.via else VIA
        out = [method, b" ", self.url or b"/", b" HTTP/1.1\r\n", *parts]
        out += (
            b"X-Forwarded-For: ",
            xff,
            b"\r\nX-Forwarded-Proto: ",
            self.xfp or proto,
            b"\r\nX-Forwarded-Host: ",
            self.xfh or self.host,
            b"\r\nVia: ",
            via,
            CRLF,
        )
        if tunnel:
            out += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade, CRLF)
        if framing == CHUNKED:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif framing == LENGTH:
            pass  # Content-Length travelled with the other fields
        if extra:
            out.append(extra)
        out.append(CRLF)
        return b"".join(out)


def _drop_named_lines(fields: bytes, named: set[bytes]) -> bytes:
    """Drop the field lines that a Connection header named (rare path)."""
    out = [
        line + CRLF
        for line in fields.split(CRLF)
        if line and line[: line.find(b":")].strip().lower() not in named
    ]
    return b"".join(out)


def _drop_named(parts: list[bytes], named: set[bytes]) -> list[bytes]:
    """Drop the fields that a Connection header named (rare path)."""
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in named:
            out += parts[i : i + 4]
    return out


# Response fields the proxy acts on, besides Content-Length, matched in the lower-cased
# head (llhttp allows no space before the colon).
_RESP_SPECIAL: Final = re.compile(
    rb"\r\n(connection|transfer-encoding|keep-alive|te|trailer|upgrade"
    rb"|proxy-[!#$%&'*+.^_`|~0-9a-z-]*|x-edgeproxy-[!#$%&'*+.^_`|~0-9a-z-]*)"
    rb":[ \t]*([^\r\n]*)"
)
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"
_CONNECTION: Final = b"\r\nconnection:"
# The fields of _RESP_SPECIAL that heads rarely carry (all but Connection, which most
# do): a head with none of them takes take()'s short path.
_RESP_RARE: Final = re.compile(
    rb"\r\n(?:transfer-encoding|keep-alive|te|trailer|upgrade|proxy-|x-edgeproxy-)"
)

_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"upgrade"})


class ResponseHead:
    """One upstream response's head, filtered whole (one regex pass, no per-field calls)."""

    __slots__ = (
        "chunked",
        "conn_tokens",
        "content_length",
        "fields",
        "load",
        "reason",
        "reject",
        "upgrade",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fields = b""  # the field lines that go on, each ending with CRLF
        self.reason = b""
        self.content_length = -1
        self.chunked = False
        self.conn_tokens: list[bytes] | None = None
        self.upgrade = b""
        self.reject = False
        self.load = -1

    def take(self, head: bytes) -> None:
        """Fill from a whole head (status line to the empty line), as llhttp validated it."""
        self.content_length = -1
        self.chunked = False
        self.conn_tokens = None
        self.upgrade = b""
        self.reject = False
        self.load = -1
        eol = head.find(b"\r\n")
        sp = head.find(b" ", 9, eol)  # "HTTP/1.1 200 OK": the reason follows the code
        self.reason = head[sp + 1 : eol] if sp > 0 else b""
        block = head[eol:-2]  # "\r\nName: value" per field, then the last field's CRLF
        low = block.lower()
        at = low.find(_CONTENT_LENGTH)
        if at >= 0:  # llhttp refused a second one
            at += len(_CONTENT_LENGTH)
            self.content_length = int(block[at : low.find(b"\r\n", at)])  # each field ends in CRLF
        if _RESP_RARE.search(low) is None:
            # The short path: at most one Connection field, a plain one, to drop.
            at = low.find(_CONNECTION)
            if at < 0:
                self.fields = block[2:]
                return
            end = low.find(b"\r\n", at + len(_CONNECTION))
            value = low[at + len(_CONNECTION) : end].strip(b" \t")
            if value in _PLAIN_CONNECTION and low.find(_CONNECTION, end) < 0:
                self.fields = block[2:at] + block[end:] if at else block[end + 2 :]
                return
        kept: list[bytes] | None = None
        pos = 0
        for m in _RESP_SPECIAL.finditer(low):
            lname = m.group(1)
            if kept is None:
                kept = []
            kept.append(block[pos : m.start()])
            pos = m.end()
            if lname == b"connection":
                value = m.group(2).rstrip(b" \t")
                if value not in _PLAIN_CONNECTION:  # names fields to drop
                    toks = _connection_tokens(value)
                    self.conn_tokens = toks if self.conn_tokens is None else self.conn_tokens + toks
            elif lname == b"transfer-encoding":
                self.chunked = m.group(2).rstrip(b" \t").endswith(b"chunked")
            elif lname == b"upgrade":
                self.upgrade = block[m.start(2) : pos].rstrip(b" \t")  # as sent, not lowered
            elif lname == REJECT:
                self.reject = True
            elif lname == LOAD:
                value = m.group(2).rstrip(b" \t")
                if value.isdigit():
                    self.load = int(value)
        if kept is not None:
            kept.append(block[pos:])
            block = b"".join(kept)
        self.fields = block[2:]

    def build(
        self,
        status: int,
        no_body: bool,
        client_keep_alive: bool,
        client_http10: bool,
        extra: bytes = b"",
    ) -> tuple[bytes, int, bool]:
        """(head for the client, body framing towards the client, keep-alive)."""
        fields = self.fields
        toks = self.conn_tokens
        if toks:
            named = {t for t in toks if t not in (b"close", b"keep-alive", b"upgrade")}
            if named:
                fields = _drop_named_lines(fields, named)
        code = _STATUS.get(status) or str(status).encode()
        out = [b"HTTP/1.1 ", code, b" ", self.reason, CRLF, fields]
        keep = client_keep_alive
        if status == 101:
            out += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade, CRLF)
            if extra:
                out.append(extra)
            out.append(CRLF)
            return b"".join(out), UNTIL_CLOSE, False
        if no_body or status < 200 or status in (204, 304):
            framing = NO_BODY
        elif self.chunked or self.content_length < 0:
            if client_http10:
                framing = UNTIL_CLOSE
                keep = False
            else:
                framing = CHUNKED
                out.append(b"Transfer-Encoding: chunked\r\n")
        else:
            framing = LENGTH
        if not keep:
            out.append(b"Connection: close\r\n")
        elif client_http10:
            out.append(b"Connection: keep-alive\r\n")
        if extra:
            out.append(extra)
        out.append(CRLF)
        return b"".join(out), framing, keep


def chunk(data: bytes | memoryview) -> bytes:
    """One chunk of a chunked body."""
    return b"".join((b"%x\r\n" % len(data), data, CRLF))


_REASONS: Final = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def simple_response(
    status: int, body: str, close: bool = True, extra: bytes = b"", head_only: bool = False
) -> bytes:
    """A complete text/plain response made by the proxy itself."""
    data = body.encode()
    reason = _REASONS.get(status, b"Error")
    head = (
        b"HTTP/1.1 %d %b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        % (
            status,
            reason,
            len(data),
        )
    )
    if close:
        head += b"Connection: close\r\n"
    return head + extra + CRLF + (b"" if head_only else data)
