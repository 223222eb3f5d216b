"""Header work of the request path: response heads, framing, the proxy's own answers.

Owns the constants both directions share (framing kinds, internal header
names), the response head filter (hop-by-hop rules, framing decided by the
proxy) and the proxy's own simple responses; proxy.core.request_head owns the
request side. Sans-io: no sockets, no clock. It must stay allocation-lean:
header fields are forwarded as the bytes they arrived as, joined once.
"""

from __future__ import annotations

import re
from typing import Final

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
BAD_CODING: Final = -1  # a response the client cannot be sent (a coding HTTP/1.0 lacks)

VIA: Final = b"1.1 edgeproxy"
CRLF: Final = b"\r\n"
CHUNK_END: Final = b"0\r\n\r\n"


class HeadError(Exception):
    """A request head that must be refused with `status` before anything is forwarded."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-cased tokens of a Connection (or Upgrade) field value."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def _drop_named_lines(fields: bytes, named: set[bytes]) -> bytes:
    """Drop the field lines that a Connection header named (rare path)."""
    out = [
        line + CRLF
        for line in fields.split(CRLF)
        if line and line[: line.find(b":")].strip().lower() not in named
    ]
    return b"".join(out)


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
# Connection tokens never obeyed: the framing is the proxy's (RFC 9110 7.6.1 lets a proxy
# drop what Connection names, never the message's own framing).
_KEEP_FIELDS: Final = _PLAIN_CONNECTION | {b"content-length", b"transfer-encoding"}


class ResponseHead:
    """One upstream response's head, filtered whole (one regex pass, no per-field calls)."""

    __slots__ = (
        "chunked",
        "codings",
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
        self.codings = b""
        self.conn_tokens: list[bytes] | None = None
        self.upgrade = b""
        self.reject = False
        self.load = -1

    def take(self, head: bytes) -> None:
        """Fill from a whole head (status line to the empty line), as llhttp validated it."""
        self.content_length = -1
        self.chunked = False
        self.codings = b""
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
                    toks = connection_tokens(value)
                    self.conn_tokens = toks if self.conn_tokens is None else self.conn_tokens + toks
            elif lname == b"transfer-encoding":
                # The body is decoded from chunked and framed again by the proxy; any other
                # coding stays on it and is declared again (RFC 9112 6.1).
                toks = connection_tokens(block[m.start(2) : pos])
                if self.codings:
                    toks = [*connection_tokens(self.codings), *toks]
                self.chunked = bool(toks) and toks[-1] == b"chunked"
                self.codings = b", ".join(toks[:-1] if self.chunked else toks)
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
            named = {t for t in toks if t not in _KEEP_FIELDS}
            if named:
                fields = _drop_named_lines(fields, named)
        if (status < 200 or status == 204) and self.content_length >= 0:
            fields = _drop_named_lines(fields, {b"content-length"})  # RFC 9110 8.6
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
            if self.codings:
                if client_http10 or b"chunked" in connection_tokens(self.codings):
                    # HTTP/1.0 has no transfer codings; a body chunked before another
                    # coding cannot be chunked again (RFC 9112 6.1: at most once, last).
                    return b"", BAD_CODING, False
                framing = CHUNKED
                out += (b"Transfer-Encoding: ", self.codings, b", chunked\r\n")
            elif client_http10:
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
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
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
