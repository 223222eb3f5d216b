"""One request's head: httptools' callbacks in, the head an instance receives out.

Owns what a client's head may carry and what the instance gets instead: the
request target (origin-form; an absolute-form target's authority becomes the
Host, RFC 9112 3.2.2), exactly one Host, the body's framing (decided from the
proxy's own parse and emitted by the proxy, never a client's field), hop-by-hop
fields (RFC 9110 7.6.1: a Connection token can drop ordinary fields, never
the framing, the Host or what the proxy sets), the forwarding fields (set by
the proxy; a client's are kept only when it is trusted), upgrades (only
allowed protocols) and the trace context fields (kept aside for
proxy.core.traceparent, never forwarded as they came). Sans-io: no sockets, no clock; it must stay
allocation-lean: ordinary fields are forwarded as the bytes they came as.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.core.headers import (
    CHUNKED,
    CRLF,
    FORCE_INSTANCE,
    INTERNAL_PREFIX,
    LENGTH,
    NO_BODY,
    PREFER_INSTANCE,
    TARGET_INSTANCE,
    VIA,
    HeadError,
    connection_tokens,
)

# Fields that never cross the proxy (RFC 9110 7.6.1), besides proxy-* and x-edgeproxy-*.
_DROP: Final = frozenset({b"keep-alive", b"te", b"trailer"})

# Every field name that is not simply forwarded (besides proxy-* and x-edgeproxy-*).
_SPECIAL: Final = _DROP | {
    b"host",
    b"connection",
    b"content-length",
    b"transfer-encoding",
    b"upgrade",
    b"expect",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"forwarded",
    b"traceparent",
    b"tracestate",
}

# Connection tokens that name no field to drop.
_PLAIN_TOKENS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

# How a connection's forwarding fields are made.
FWD_SET: Final = 0  # a client: the proxy's own fields replace whatever it sent
FWD_APPEND: Final = 1  # a trusted client ([trust] forwarded_from): X-F-F appended, others kept
FWD_KEEP: Final = 2  # a peer node (backhaul): the edge set them; they go on as they came

# Host: a reg-name or an IP literal, with an optional port (RFC 9110 7.2, RFC 3986 3.2.2).
_HOST_RE: Final = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
_SCHEMES: Final = (b"http://", b"https://")


class Front:
    """What a connection's requests are forwarded with: who sent them and how to trust it."""

    __slots__ = ("ip", "mode", "port", "proto", "tail")

    def __init__(self, mode: int, ip: bytes, proto: bytes, port: bytes) -> None:
        self.mode = mode
        self.ip = ip
        self.proto = proto
        self.port = port
        # FWD_SET: every request of the connection gets these (X-Forwarded-Host follows).
        self.tail = b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\nX-Forwarded-Port: %b\r\n" % (
            ip,
            proto,
            port,
        )


class RequestHead:
    """One request's head, filtered as its fields arrive.

    `on_url` and `on_header` are httptools' callbacks; `decide` checks the whole head
    and fixes the framing; `build` makes the head for the instance."""

    __slots__ = (
        "chunked",
        "conn_tokens",
        "content_length",
        "count",
        "expect_continue",
        "force",
        "forwarded",
        "framing",
        "host",
        "http10",
        "instance",
        "keep_alive",
        "max_bytes",
        "max_count",
        "method",
        "parts",
        "prefer",
        "size",
        "te",
        "tp_count",
        "traceparent",
        "tracestate",
        "tunnel",
        "upgrade",
        "url",
        "via",
        "xff",
        "xfh",
        "xfp",
        "xfport",
    )

    def __init__(self, max_count: int = 100, max_bytes: int = 65536) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.parts: list[bytes] = []
        self.url = b""
        self.host = b""
        self.xff = b""
        self.xfp = b""
        self.xfh = b""
        self.xfport = b""
        self.forwarded = b""
        self.via = b""
        self.upgrade = b""
        self.te = b""
        self.conn_tokens: list[bytes] | None = None
        self.expect_continue = False
        self.chunked = False
        self.content_length = -1
        self.force = b""
        self.prefer = b""
        self.instance = b""
        self.count = 0
        self.size = 0
        self.method = b""
        self.keep_alive = True
        self.http10 = False
        self.framing = NO_BODY
        self.tunnel = False
        # W3C Trace Context, as the client sent it (proxy.core.traceparent reads it).
        self.traceparent = b""
        self.tp_count = 0  # more than one traceparent field: invalid
        self.tracestate = b""  # every tracestate field, joined with ","

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
        if lname in _SPECIAL or lname[:6] == b"proxy-" or lname[:12] == INTERNAL_PREFIX:
            self._special(lname, value)
        elif b"_" in lname and _shadows(lname):
            pass  # X_Forwarded_For and kin: CGI-style stacks read them as the real field
        else:
            self.parts += (name, b": ", value, CRLF)  # most fields: forwarded as they came

    def _special(self, lname: bytes, value: bytes) -> None:
        if lname == b"host":
            if self.host:
                raise HeadError(400, "more than one Host header")
            self.host = value
            if not value:
                raise HeadError(400, "empty Host header")
        elif lname in _DROP or lname.startswith(b"proxy-"):
            pass
        elif lname == b"connection":
            toks = connection_tokens(value)
            self.conn_tokens = toks if self.conn_tokens is None else self.conn_tokens + toks
        elif lname == b"content-length":
            self.content_length = int(value)  # llhttp allows digits only, and one field
        elif lname == b"transfer-encoding":
            self.chunked = True
            self.te = value if not self.te else self.te + b", " + value
        elif lname == b"x-forwarded-for":
            self.xff = value if not self.xff else self.xff + b", " + value
        elif lname == b"x-forwarded-proto":
            self.xfp = value
        elif lname == b"x-forwarded-host":
            self.xfh = value
        elif lname == b"x-forwarded-port":
            self.xfport = value
        elif lname == b"forwarded":
            self.forwarded = value if not self.forwarded else self.forwarded + b", " + value
        elif lname == b"via":
            self.via = value if not self.via else self.via + b", " + value
        elif lname == b"upgrade":
            self.upgrade = value if not self.upgrade else self.upgrade + b", " + value
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise HeadError(417, "only Expect: 100-continue is supported")
            self.expect_continue = True
        elif lname == b"traceparent":
            self.traceparent = value
            self.tp_count += 1
        elif lname == b"tracestate":
            self.tracestate = value if not self.tracestate else self.tracestate + b"," + value
        elif lname == FORCE_INSTANCE:
            self.force = value.strip()
        elif lname == PREFER_INSTANCE:
            self.prefer = value.strip()
        elif lname == TARGET_INSTANCE:
            self.instance = value.strip()

    def decide(
        self, method: bytes, version: str, upgrade: bool, keep_alive: bool, allowed: frozenset[str]
    ) -> bool:
        """The whole head is in: check it, fix target, Host and framing.

        `upgrade` is the parser's verdict (Connection: upgrade and an Upgrade field);
        `allowed`, the protocols that may become a tunnel. True when the parser paused for
        an upgrade that is not granted: what follows the head is the next request."""
        self.method = method
        self.keep_alive = keep_alive
        if version == "1.0":
            self.http10 = True
        elif version != "1.1":
            raise HeadError(505, f"HTTP/{version} is not supported")
        if method == b"CONNECT":
            raise HeadError(405, "CONNECT is not supported")
        url = self.url
        hash_at = url.find(b"#")
        if hash_at >= 0:
            url = self.url = url[:hash_at]  # a fragment is the client's own (RFC 9112 3.2.1)
        if url[:1] != b"/":
            if url == b"*":
                if method != b"OPTIONS":
                    raise HeadError(400, "the * target is for OPTIONS only")
            else:
                self._absolute(url)
        host = self.host
        if host:
            if _HOST_RE.match(host) is None:
                raise HeadError(400, "invalid Host header")
        elif not self.http10:
            raise HeadError(400, "missing Host header")
        body = self.content_length > 0
        if self.chunked:
            if self.http10:
                # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
                raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if self.te.lower().replace(b" ", b"").replace(b"\t", b"") != b"chunked":
                # llhttp made sure chunked is the final coding; nothing else is decoded here.
                raise HeadError(501, "only the chunked transfer coding is supported")
            self.framing = CHUNKED
            body = True
        elif body:
            self.framing = LENGTH
        else:
            self.framing = NO_BODY
        if not upgrade:
            return False
        # The parser skips the body of an upgrade request: a body here would be ambiguous.
        if body:
            raise HeadError(400, "a request that asks for an upgrade must not have a body")
        protocols = connection_tokens(self.upgrade)
        for tok in protocols or (b"",):  # an Upgrade that names nothing grants nothing
            name = tok.split(b"/", 1)[0].decode("latin-1")
            if name not in allowed:
                self.upgrade = b""  # not granted: served as an ordinary request
                return True
        self.tunnel = True
        self.keep_alive = False
        return False

    def _absolute(self, url: bytes) -> None:
        """An absolute-form target: its authority is the Host (RFC 9112 3.2.2)."""
        low = url[:8].lower()
        if low.startswith(_SCHEMES[0]):
            rest = url[7:]
        elif low.startswith(_SCHEMES[1]):
            rest = url[8:]
        else:
            raise HeadError(400, "the request target must be a path or an http(s) URI")
        end = len(rest)
        for sep in (b"/", b"?", b"#"):
            at = rest.find(sep)
            if 0 <= at < end:
                end = at
        authority = rest[:end]
        if not authority or b"@" in authority:
            raise HeadError(400, "the request target has no usable authority")
        path = rest[end:]
        if path[:1] == b"#":
            path = b""
        self.url = path if path[:1] == b"/" else b"/" + path
        self.host = authority

    def hostname(self) -> str:
        """The Host without port or trailing dot, lower-cased (what apps are keyed by)."""
        h = self.host
        if h.startswith(b"["):
            end = h.find(b"]")
            h = h[: end + 1] if end > 0 else h
        else:
            colon = h.rfind(b":")
            if colon >= 0:
                h = h[:colon]
            if h.endswith(b"."):
                h = h[:-1]
        return h.decode("latin-1").lower()

    def build(self, front: Front, extra: bytes = b"") -> bytes:
        """The head to send to the instance (HTTP/1.1, one framing, one Host)."""
        parts = self.parts
        toks = self.conn_tokens
        if toks:
            named = {t for t in toks if t not in _PLAIN_TOKENS}
            if named:
                parts = _drop_named(parts, named)
        host = self.host
        if host:
            out = [self.method, b" ", self.url, b" HTTP/1.1\r\nHost: ", host, CRLF, *parts]
        else:  # HTTP/1.0 without one: none is made up
            out = [self.method, b" ", self.url, b" HTTP/1.1\r\n", *parts]
        mode = front.mode
        if mode == FWD_SET:
            out += (front.tail, b"X-Forwarded-Host: ", host, CRLF, b"Via: ", VIA, CRLF)
        else:
            xff = self.xff
            if mode == FWD_APPEND:
                xff = xff + b", " + front.ip if xff else front.ip
                via = self.via + b", " + VIA if self.via else VIA
            else:
                xff = xff or front.ip
                via = self.via or VIA
            out += (
                b"X-Forwarded-For: ", xff,
                b"\r\nX-Forwarded-Proto: ", self.xfp or front.proto,
                b"\r\nX-Forwarded-Host: ", self.xfh or host,
                b"\r\nX-Forwarded-Port: ", self.xfport or front.port,
                b"\r\nVia: ", via, CRLF,
            )  # fmt: skip
            if self.forwarded:
                out += (b"Forwarded: ", self.forwarded, CRLF)
        if self.tunnel:
            out += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade, CRLF)
        framing = self.framing
        if framing == CHUNKED:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif self.content_length >= 0:
            out.append(b"Content-Length: %d\r\n" % self.content_length)
        if extra:
            out.append(extra)
        out.append(CRLF)
        return b"".join(out)


def _shadows(lname: bytes) -> bool:
    """Whether a field name with underscores reads as one the proxy owns once a CGI-style
    server maps `_` to `-` (nginx drops every such field by default)."""
    dashed = lname.replace(b"_", b"-")
    return dashed in _SPECIAL or dashed[:6] == b"proxy-" or dashed[:12] == INTERNAL_PREFIX


def _drop_named(parts: list[bytes], named: set[bytes]) -> list[bytes]:
    """Drop the ordinary fields that a Connection header named (rare path)."""
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in named:
            out += parts[i : i + 4]
    return out
