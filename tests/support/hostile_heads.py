"""Generators of hostile HTTP/1 heads: request heads a client may send, response heads an
instance may send.

Owns the generators only, written against a small `Chooser` so that the same code is
driven by hypothesis (tests: shrinking) or by a seeded random.Random (bench: speed). It
must not judge what it generates: head_check does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st

T = TypeVar("T")


class Chooser(Protocol):
    """Where the generators' choices come from."""

    def pick(self, seq: Sequence[T]) -> T: ...
    def int_in(self, lo: int, hi: int) -> int: ...
    def flip(self, pct: int) -> bool: ...


class RandomChooser:
    """Choices from a seeded random.Random (reproducible by seed and position)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, seq: Sequence[T]) -> T:
        return seq[self.rng.randrange(len(seq))]

    def int_in(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def flip(self, pct: int) -> bool:
        return self.rng.randrange(100) < pct


class DrawChooser:
    """Choices drawn by hypothesis: every choice shrinks towards the first, plain option."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def pick(self, seq: Sequence[T]) -> T:
        return seq[self.draw(st.integers(0, len(seq) - 1))]  # type: ignore[no-any-return]

    def int_in(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))  # type: ignore[no-any-return]

    def flip(self, pct: int) -> bool:
        return self.draw(st.integers(0, 99)) >= 100 - pct  # type: ignore[no-any-return]


def case(c: Chooser, name: bytes) -> bytes:
    """A field name in one of its spellings (RFC 9110 5.1: names are case-insensitive)."""
    how = c.int_in(0, 9)
    if how <= 5:
        return name
    if how == 6:
        return name.lower()
    if how == 7:
        return name.upper()
    if how == 8:
        return bytes(
            ch ^ 0x20 if 0x61 <= (ch | 0x20) <= 0x7A and i % 2 else ch for i, ch in enumerate(name)
        )
    return name.replace(b"-", b"_")  # an alias some application stacks fold into the same name


def field(c: Chooser, name: bytes, value: bytes) -> bytes:
    """One field line's content (no line end), with whitespace variants."""
    sep = c.pick((b": ", b": ", b": ", b":", b":\t", b":  "))
    if c.flip(1):
        sep = c.pick((b" : ", b"\t:", b" :"))  # whitespace before the colon (RFC 9112 5.1)
    tail = c.pick((b" ", b"\t", b" \t")) if c.flip(12) else b""
    return case(c, name) + sep + value + tail


def tokens(c: Chooser, choices: Sequence[bytes], most: int) -> bytes:
    """A comma-separated list (RFC 9110 5.6.1), sometimes with empty elements."""
    n = c.int_in(1, most)
    parts = [case(c, c.pick(choices)) for _ in range(n)]
    sep = c.pick((b", ", b",", b" , ", b",, ", b",\t"))
    out = sep.join(parts)
    if c.flip(5):
        out = b", " + out
    return out


CONNECTION_TOKENS = (
    b"close",
    b"keep-alive",
    b"upgrade",
    b"Content-Length",
    b"Host",
    b"Transfer-Encoding",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Forwarded-Port",
    b"Forwarded",
    b"Via",
    b"Upgrade",
    b"TE",
    b"Trailer",
    b"Expect",
    b"X-Edgeproxy-Instance",
    b"X-Custom",
    b"Cookie",
    b"Keep-Alive",
    b"X-Unsent",
)
CL_VALUES = (
    b"0", b"3", b"5", b"005", b"00", b"+5", b"-5", b"5,5", b"5, 5", b"0x5", b"5 5", b"1e1",
    b"", b"18446744073709551615", b"99999999999999999999", b"\xef\xbc\x95",
)  # fmt: skip
TE_VALUES = (
    b"chunked", b"Chunked", b"CHUNKED", b"gzip, chunked", b"chunked, gzip", b"identity",
    b"chunked, chunked", b"chunked;q=1", b"gzip", b"x", b"chunked ,", b",chunked", b"",
    b"identity, chunked", b"chunkedx",
)  # fmt: skip
UPGRADES = (
    b"websocket", b"WebSocket", b"h2c", b"websocket, h2c", b"h2c, websocket", b"websocket/13",
    b"foo", b"", b",", b"websocket, ", b"websocket websocket", b"HTTP/2.0",
)  # fmt: skip
HOSTS = (
    b"example.com", b"a.example", b"EXAMPLE.COM.", b"127.0.0.1", b"[::1]", b"[2001:db8::1]",
    b"xn--bcher-kva.example", b"h_x", b"", b"exa mple", b"a@b", b"[::1", b"a/b", b"\xffa",
)  # fmt: skip
PORTS = (b"", b"", b":80", b":8080", b":", b":0", b":99999", b":123456", b":x")
CLIENT_FORWARDING = (
    (b"X-Forwarded-For", (b"203.0.113.9", b"1.1.1.1, 2.2.2.2", b"unknown", b"", b"::1")),
    (b"X-Forwarded-Proto", (b"https", b"http", b"", b"gopher")),
    (b"X-Forwarded-Host", (b"evil.example", b"example.com:443", b"")),
    (b"X-Forwarded-Port", (b"443", b"1", b"")),
    (b"Forwarded", (b"for=203.0.113.9;proto=https", b'for="[::1]"', b"")),
    (b"Via", (b"1.1 evil", b"1.0 a, 1.1 b", b"")),
)
INTERNAL = (
    (b"X-Edgeproxy-Instance", (b"i-1", b"")),
    (b"X-Edgeproxy-Force-Instance", (b"i-2", b" i-2 ")),
    (b"X-Edgeproxy-Prefer-Instance", (b"i-3",)),
    (b"X-Edgeproxy-Load", (b"0", b"999")),
    (b"X-Edgeproxy-Reject", (b"1",)),
    (b"X-Edgeproxy-Other", (b"x",)),
)
HOP_BY_HOP = (
    (b"Keep-Alive", (b"timeout=5, max=100",)),
    (b"TE", (b"trailers", b"gzip")),
    (b"Trailer", (b"X-T", b"Content-Length")),
    (b"Proxy-Authorization", (b"Basic Zm9vOmJhcg==",)),
    (b"Proxy-Connection", (b"keep-alive",)),
    (b"Proxy-Authenticate", (b"Basic",)),
)
ORDINARY = (
    (b"X-Custom", (b"1", b"a b", b"a\tb", b"\xe2\x9c\x93", b"x, y", b"", b'"q"')),
    (b"Cookie", (b"a=b; c=d",)),
    (b"Accept", (b"*/*", b"text/html;q=0.9")),
    (b"User-Agent", (b"fuzz/1.0",)),
    (b"X-Unsent", (b"named by Connection?",)),
    (b"Content-Type", (b"text/plain",)),
    (b"Hostx", (b"not a host",)),
    (b"Content-Lengthx", (b"5",)),
)
EXPECTS = (b"100-continue", b"100-Continue", b"100-continue", b"200-ok", b"100-continue", b"")
# Bytes no field line may hold (RFC 9110 5.5: no CTL but HTAB in a value; 5.1: names are tokens).
BAD_BYTES = (b"\x00", b"\x01", b"\x7f", b"\r", b"\n", b"\x0b", b"\x1b", b" ", b"\xff", b"@")


def _named(c: Chooser, table: Sequence[tuple[bytes, Sequence[bytes]]]) -> bytes:
    name, values = c.pick(table)
    return field(c, name, c.pick(values))


def request_target(c: Chooser) -> bytes:
    """An origin-form, asterisk-form or absolute-form target (RFC 9112 3.2)."""
    kind = c.int_in(0, 9)
    if kind <= 4:
        return c.pick((
            b"/", b"/a/b?c=d", b"/a#frag", b"/?q=\"<>`{}", b"//x/y", b"/%2e%2e/", b"/a?b#c",
            b"/", b"/x", b"/?a=b",
        ) if c.flip(95) else (b"/\xff", b"/ a", b"/a\tb", b"/\x7f"))  # fmt: skip
    if kind == 5:
        return b"*"
    scheme = c.pick((b"http", b"https", b"HTTP", b"hTTps"))
    if c.flip(15):
        scheme = c.pick((b"ftp", b"ws", b"http:", b""))
    user = c.pick((b"user@", b"u:p@", b"@")) if c.flip(10) else b""
    host = c.pick(HOSTS) if c.flip(20) else c.pick(HOSTS[:7])
    path = c.pick((b"", b"/", b"/p?q", b"?q", b"#f", b"/p#f", b"/@evil", b"/a?b=http://c/"))
    port = c.pick(PORTS) if c.flip(30) else b""
    return scheme + b"://" + user + host + port + path


def chunked_body(c: Chooser) -> bytes:
    """A chunked body (RFC 9112 7.1), maybe with extensions, odd sizes and trailers."""
    out = b""
    for _ in range(c.int_in(0, 3)):
        data = b"x" * c.int_in(1, 12)
        size = c.pick((b"%x" % len(data), b"%X" % len(data), b"0%x" % len(data)))
        if c.flip(10):
            size = c.pick((b"+", b"-", b" ", b"0x")) + size
        ext = c.pick((b"", b"", b"", b";a=b", b';a="q"', b" ;a", b";"))
        out += size + ext + b"\r\n" + data + b"\r\n"
    out += c.pick((b"0", b"0", b"00", b"0;x=y")) + b"\r\n"
    for _ in range(c.int_in(0, 2) if c.flip(30) else 0):
        table = c.pick((ORDINARY, HOP_BY_HOP, INTERNAL, CLIENT_FORWARDING))
        if c.flip(20):
            out += field(c, b"Host", b"evil.example") + b"\r\n"
        elif c.flip(10):
            out += field(c, b"Content-Length", b"5") + b"\r\n"
        else:
            out += _named(c, table) + b"\r\n"
    return out + b"\r\n"


def request_field(c: Chooser) -> bytes:
    """One hostile field line's content."""
    kind = c.int_in(0, 15)
    if kind == 0 and c.flip(30):
        return field(c, b"Host", c.pick(HOSTS) + c.pick(PORTS))
    if kind == 1:
        return field(c, b"Connection", tokens(c, CONNECTION_TOKENS, 4))
    if kind == 2:
        return field(c, b"Content-Length", c.pick(CL_VALUES))
    if kind == 3:
        return field(c, b"Transfer-Encoding", c.pick(TE_VALUES))
    if kind == 4:
        return field(c, b"Upgrade", c.pick(UPGRADES))
    if kind == 5:
        return _named(c, CLIENT_FORWARDING)
    if kind == 6:
        return _named(c, INTERNAL)
    if kind == 7:
        return _named(c, HOP_BY_HOP)
    if kind == 8:
        return field(c, b"Expect", c.pick(EXPECTS))
    if kind == 9 and c.flip(25):
        line = _named(c, ORDINARY)
        at = c.int_in(0, len(line))
        return line[:at] + c.pick(BAD_BYTES) + line[at:]  # a CTL, NUL, bare CR or LF, SP
    if kind == 10 and c.flip(25):
        return c.pick((b" folded", b"\tfolded", b"NoColon", b": empty name", b"X-A:b\r\n c"))
    return _named(c, ORDINARY)


def request(c: Chooser) -> bytes:
    """A hostile request: head, a body as its framing says (or not), maybe another request."""
    method = c.pick((
        b"GET", b"GET", b"POST", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH",
        b"CONNECT", b"TRACE",
    ))  # fmt: skip
    if c.flip(2):
        method = c.pick((b"PRI", b"get", b"G\x00T", b"GET\t"))
    version = c.pick((b"1.1", b"1.1", b"1.1", b"1.1", b"1.0", b"1.0"))
    if c.flip(4):
        version = c.pick((b"0.9", b"2.0", b"1.2", b"11", b"1.1 "))
    sp = c.pick((b" ", b"  ", b"\t")) if c.flip(3) else b" "
    lines = [method + b" " + request_target(c) + sp + b"HTTP/" + version]
    if c.flip(85):
        lines.append(field(c, b"Host", c.pick(HOSTS[:7]) + c.pick(PORTS[:4])))
    if c.flip(40):
        lines.append(field(c, b"Connection", tokens(c, CONNECTION_TOKENS, 4)))
    if c.flip(25):
        lines.append(field(c, b"Upgrade", c.pick(UPGRADES)))
    framing = c.int_in(0, 5)
    if framing == 1:
        lines.append(field(c, b"Content-Length", c.pick(CL_VALUES[:6])))
    elif framing == 2:
        lines.append(field(c, b"Transfer-Encoding", c.pick(TE_VALUES[:6])))
    elif framing == 3 and c.flip(25):
        lines.append(field(c, b"Transfer-Encoding", c.pick(TE_VALUES)))
        lines.append(field(c, b"Content-Length", c.pick(CL_VALUES)))
    for _ in range(c.int_in(0, 6)):
        lines.insert(c.int_in(1, len(lines)), request_field(c))
    eol = b"\r\n"
    head = b""
    for line in lines:
        head += line + (c.pick((b"\n", b"\r", b"\r\r\n")) if c.flip(1) else eol)
    head += b"\n" if c.flip(2) else eol
    body = b""
    if any(b"chunked" in line.lower() for line in lines) and c.flip(90):
        body = chunked_body(c)
    else:
        body = b"x" * c.pick((0, 0, 3, 5, 10))
    nxt = b""
    if c.flip(20):
        nxt = c.pick((
            b"GET /next HTTP/1.1\r\nHost: b.example\r\n\r\n",
            b"POST /next HTTP/1.1\r\nHost: b.example\r\nContent-Length: 2\r\n\r\nok",
            b"GET /next HTTP/1.1\r\nHost: b.example\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
        ))  # fmt: skip
    return head + body + nxt


RESPONSE_TE = (
    b"chunked", b"Chunked", b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity",
    b"chunked, chunked", b"br", b"",
)  # fmt: skip
RESPONSE_CONNECTION = (
    b"close", b"keep-alive", b"upgrade", b"Content-Length", b"Transfer-Encoding", b"X-Custom",
    b"Keep-Alive", b"Set-Cookie", b"Server", b"Upgrade", b"TE", b"Trailer", b"Date",
)  # fmt: skip
RESPONSE_ORDINARY = (
    (b"Server", (b"nginx", b"")),
    (b"Set-Cookie", (b"a=b; Path=/", b"c=d")),
    (b"X-Custom", (b"1", b"a b ", b"\xc3\xa9")),
    (b"Content-Type", (b"text/plain",)),
    (b"Date", (b"Mon, 01 Jan 2024 00:00:00 GMT",)),
    (b"Tea", (b"earl grey",)),
    (b"X-Te", (b"x",)),
    (b"Connectionx", (b"close",)),
)


def response(c: Chooser) -> bytes:
    """A hostile upstream response head (and a few body bytes)."""
    code = c.pick((200, 200, 200, 201, 206, 204, 304, 100, 101, 102, 103, 301, 404, 500, 502))
    version = c.pick((b"1.1", b"1.1", b"1.1", b"1.0"))
    reason = c.pick((b" OK", b" ", b"", b" Weird  Reason", b" \xe9"))
    lines = [b"HTTP/" + version + b" %d" % code + reason]
    for _ in range(c.int_in(0, 7)):
        kind = c.int_in(0, 7)
        if kind == 0:
            lines.append(field(c, b"Content-Length", c.pick((b"0", b"5", b"007", b"13"))))
        elif kind == 1:
            lines.append(field(c, b"Transfer-Encoding", c.pick(RESPONSE_TE)))
        elif kind == 2:
            lines.append(field(c, b"Connection", tokens(c, RESPONSE_CONNECTION, 3)))
        elif kind == 3:
            lines.append(field(c, b"Upgrade", c.pick((b"websocket", b"h2c", b""))))
        elif kind == 4:
            lines.append(_named(c, HOP_BY_HOP))
        elif kind == 5:
            lines.append(_named(c, INTERNAL))
        else:
            lines.append(_named(c, RESPONSE_ORDINARY))
    return b"\r\n".join(lines) + b"\r\n\r\n" + b"x" * c.pick((0, 5, 13))


@st.composite
def requests(draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """hypothesis strategy: one hostile request (and what follows it on the connection)."""
    return request(DrawChooser(draw))


@st.composite
def responses(draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """hypothesis strategy: one hostile upstream response."""
    return response(DrawChooser(draw))
