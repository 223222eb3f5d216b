"""A harness that drives proxy.core.request_head and proxy.core.headers as the connections do, and
the invariants on what they would forward, checked by re-parsing it twice.

Owns the driving (httptools callbacks into RequestHead, as proxy.worker.client does; a cut head
into ResponseHead, as proxy.worker.upstream does), a strict line scanner written from RFC 9112
(independent of llhttp) and the invariant checks. It must not generate inputs
(hostile_heads does) nor mirror the proxy's code to compute what to expect: expectations
come from what the parser saw the client send and from the RFCs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httptools

from proxy.core.headers import (
    BAD_CODING,
    CHUNK_END,
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    HeadError,
    ResponseHead,
    chunk,
)
from proxy.core.request_head import FWD_APPEND, FWD_KEEP, FWD_SET, Front, RequestHead

ALLOWED = frozenset({"websocket"})  # [trust] upgrade of the harness
FRONT_IP = b"192.0.2.7"
FRONT_PROTO = b"http"
FRONT_PORT = b"8080"
MODES = (FWD_SET, FWD_APPEND, FWD_KEEP)
MODE_NAMES = {FWD_SET: "FWD_SET", FWD_APPEND: "FWD_APPEND", FWD_KEEP: "FWD_KEEP"}
VIA = b"1.1 edgeproxy"
FRONTS = {m: Front(m, FRONT_IP, FRONT_PROTO, FRONT_PORT) for m in MODES}

# Invariants the proxy is known to break, each pinned by an xfail(strict=True) regression test
# in tests/unit/test_fuzz_heads.py: the properties tolerate exactly these (none today).
KNOWN: frozenset[str] = frozenset()


class Violation(NamedTuple):
    invariant: str
    detail: str


# --- the independent scanner (RFC 9112 2.1, 3, 4, 5; RFC 9110 5.1, 5.5) -------------------
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")  # field-content: VCHAR, obs-text, SP, HTAB
# origin-form = absolute-path [ "?" query ] (RFC 9112 3.2.1): no fragment, no SP, no CTL.
_ORIGIN = re.compile(rb"/[\x21-\x22\x24-\x7e]*\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [\t\x20-\x7e\x80-\xff]*\Z")


def scan_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(start line, [(name, value)]) of a head that must be strictly well-formed: CRLF line
    ends only, no obs-fold, token names, no CTL in values. Raises ValueError otherwise."""
    if not head.endswith(b"\r\n\r\n"):
        raise ValueError("head does not end with CRLF CRLF")
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise ValueError(f"bare CR or LF in {line!r}")
    fields = []
    for line in lines[1:]:
        colon = line.find(b":")
        if colon <= 0:
            raise ValueError(f"not a field line: {line!r}")
        name, value = line[:colon], line[colon + 1 :].lstrip(b" \t")
        if not _TOKEN.match(name):
            raise ValueError(f"field name is not a token: {name!r}")
        if not _VALUE.match(value):
            raise ValueError(f"CTL in the value of {name!r}: {value!r}")
        fields.append((name, value))
    return lines[0], fields


def elements(values: list[bytes]) -> list[bytes]:
    """The non-empty elements of a list-based field's values (RFC 9110 5.6.1)."""
    return [e.strip(b" \t") for v in values for e in v.split(b",") if e.strip(b" \t")]


def values_of(fields: list[tuple[bytes, bytes]], lname: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == lname]


# --- the request side: the harness -----------------------------------------------------------
@dataclass
class Message:
    """One request whose head the proxy accepted, as the client's parser saw it."""

    head: RequestHead
    method: bytes = b""
    version: str = ""
    url: bytes = b""
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    upgrade: bool = False  # the parser's verdict
    body: bytes = b""
    complete: bool = False


@dataclass
class Outcome:
    """What the proxy makes of a client's bytes: the requests it forwards, and how it ends."""

    messages: list[Message] = field(default_factory=list)
    end: str = "open"  # open | tunnel | refused | parser | crash
    status: int = 0  # refused: the proxy's answer; parser: 400
    reason: str = ""
    tail: bytes = b""  # tunnel: the bytes after the upgrade head

    def signature(self) -> tuple[Any, ...]:
        """What must not depend on how the bytes were cut into reads: what is forwarded and
        whether the connection is refused (not with which status: with two faults in a head,
        httptools reports a field before the next one's fault only when a read ended in
        between)."""
        msgs = tuple(
            (m.method, m.url, tuple(m.fields), m.body, m.complete, *heads_of(m))
            for m in self.messages
        )
        end = "refused" if self.end == "parser" else self.end
        return (end, self.tail, msgs)


def heads_of(m: Message) -> list[bytes]:
    """The heads the proxy would forward for `m`, one per forwarding mode."""
    return [m.head.build(FRONTS[mode]) for mode in MODES]


class Harness:
    """httptools' callback target, driving RequestHead as the client connection does."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.out = Outcome()
        self.cur: Message | None = None
        self.in_head = False

    def on_message_begin(self) -> None:
        self.cur = Message(RequestHead(100, 65536))
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        assert self.cur is not None
        self.cur.url += url
        self.cur.head.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        m = self.cur
        assert m is not None
        if self.in_head:
            m.fields.append((name, value))
            m.head.on_header(name, value)
            return
        h = m.head  # a trailer: not forwarded, bounded like the head
        h.size += len(name) + len(value) + 4
        if h.size > h.max_bytes:
            raise HeadError(431, "request trailer too large")

    def on_headers_complete(self) -> None:
        m = self.cur
        assert m is not None
        self.in_head = False
        p = self.parser
        m.method = p.get_method()
        m.version = p.get_http_version()
        m.upgrade = p.should_upgrade()
        m.head.decide(m.method, m.version, m.upgrade, p.should_keep_alive(), ALLOWED)
        self.out.messages.append(m)

    def on_body(self, body: bytes) -> None:
        assert self.cur is not None
        self.cur.body += body

    def on_message_complete(self) -> None:
        assert self.cur is not None
        self.cur.complete = True

    def run(self, pieces: list[bytes]) -> Outcome:
        out = self.out
        for i, piece in enumerate(pieces):
            data = piece
            while True:
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserUpgrade as e:
                    rest = data[e.args[0] :]
                    if out.messages and out.messages[-1].head.tunnel:
                        out.end = "tunnel"
                        out.tail = rest + b"".join(pieces[i + 1 :])
                        return out
                    # Not granted: what follows the head is the next request.
                    self.parser = httptools.HttpRequestParser(self)
                    if rest:
                        data = rest
                        continue
                except httptools.HttpParserCallbackError as e:
                    cause = e.__context__
                    if isinstance(cause, HeadError):
                        out.end, out.status, out.reason = "refused", cause.status, cause.reason
                    else:
                        out.end, out.reason = "crash", repr(cause)
                    return out
                except httptools.HttpParserError as e:
                    out.end, out.status, out.reason = "parser", 400, str(e)
                    return out
                break
        return out


def drive(data: bytes, cuts: list[int] | None = None) -> Outcome:
    """Feed `data` to a fresh harness, cut into reads at `cuts` (offsets)."""
    pieces = []
    prev = 0
    for at in sorted(cuts or ()):
        pieces.append(data[prev:at])
        prev = at
    pieces.append(data[prev:])
    return Harness().run([p for p in pieces if p])


# --- the request side: the invariants ----------------------------------------------------------
_PROXY_SET = frozenset({
    b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"via", b"connection", b"upgrade", b"content-length", b"transfer-encoding",
})  # fmt: skip
# What never crosses a proxy (RFC 9110 7.6.1), besides proxy-* and the internal x-edgeproxy-*.
_HOP = frozenset({b"keep-alive", b"te", b"trailer"})
# Fields of the client's that the proxy acts on rather than forwards (Expect: the proxy
# answers 100-continue itself, RFC 9110 10.1.1).
_OWNED = _PROXY_SET | _HOP | {b"expect"}


def _hop_or_internal(lname: bytes) -> bool:
    return lname in _HOP or lname.startswith((b"proxy-", b"x-edgeproxy-"))


def _shadow(lname: bytes) -> bool:
    """A name with `_` that a CGI-style server reads as a field the proxy owns (`_` -> `-`):
    never forwarded, as nginx's default drops every underscored field."""
    dashed = lname.replace(b"_", b"-")
    return b"_" in lname and (dashed in _OWNED or _hop_or_internal(dashed))


def _authority(url: bytes) -> tuple[bytes, bytes] | None:
    """(authority, path-and-query without fragment) of an absolute-form target, else None."""
    if url[:1] == b"/" or url == b"*":
        return None
    at = url.find(b"://")
    rest = url[at + 3 :]
    end = min(
        [i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0] or [len(rest)]
    )
    path = rest[end:].split(b"#", 1)[0]
    return rest[:end], (path if path[:1] == b"/" else b"/" + path)


def _one(
    fields: list[tuple[bytes, bytes]], lname: bytes, v: list[Violation], inv: str
) -> bytes | None:
    got = values_of(fields, lname)
    if len(got) != 1:
        v.append(Violation(inv, f"{len(got)} {lname.decode()} fields: {got!r}"))
        return None
    return got[0]


def check_request(m: Message, mode: int) -> list[Violation]:
    """Every invariant on the head forwarded for `m` from a connection in `mode`."""
    v: list[Violation] = []
    out = m.head.build(FRONTS[mode])
    try:
        start, fields = scan_head(out)
    except ValueError as e:
        return [Violation("well-formed", str(e))]
    # 1. One request line: METHOD SP origin-form-or-* SP HTTP/1.1, the client's target.
    parts = start.split(b" ")
    absolute = _authority(m.url)
    if len(parts) != 3 or parts[0] != m.method or parts[2] != b"HTTP/1.1":
        v.append(Violation("request-line", f"{start!r}"))
    else:
        target = parts[1]
        if not (target == b"*" or _ORIGIN.match(target)):
            # RFC 9110 4.2.5 / RFC 9112 3.2.1: a fragment is never part of a request target.
            inv = "fragment" if b"#" in target else "origin-form"
            v.append(Violation(inv, f"target {target!r} (client sent {m.url!r})"))
        want = absolute[1] if absolute else m.url.split(b"#", 1)[0]
        if target != want and _ORIGIN.match(target):
            v.append(Violation("target", f"forwarded {target!r}, client sent {m.url!r}"))
    # 2. Exactly one Host: the authority of an absolute-form target, else the client's.
    client_hosts = values_of(m.fields, b"host")
    if absolute or client_hosts:
        host = _one(fields, b"host", v, "one-host")
    else:  # HTTP/1.0 without a Host: none is made up
        host = None
        if values_of(fields, b"host"):
            v.append(Violation("one-host", f"a Host was made up: {values_of(fields, b'host')!r}"))
    if len(client_hosts) > 1:
        v.append(Violation("one-host", f"forwarded although the client sent {client_hosts!r}"))
    want_host = absolute[0] if absolute else (client_hosts[0] if client_hosts else b"")
    if host is not None and host != want_host:
        v.append(Violation("host", f"Host {host!r}, expected {want_host!r}"))
    # 3. One framing: at most one of CL / TE, TE only chunked, CL the client's.
    cl, te = values_of(fields, b"content-length"), values_of(fields, b"transfer-encoding")
    ccl, cte = values_of(m.fields, b"content-length"), values_of(m.fields, b"transfer-encoding")
    if len(cl) + len(te) > 1:
        v.append(Violation("one-framing", f"Content-Length {cl!r}, Transfer-Encoding {te!r}"))
    if te and te != [b"chunked"]:
        v.append(Violation("te-chunked", f"Transfer-Encoding {te!r}"))
    if bool(te) != bool(cte) or (cte and ccl):
        v.append(Violation("framing", f"forwarded TE {te!r} for client TE {cte!r} CL {ccl!r}"))
    if cl and (len(ccl) != 1 or not ccl[0].strip().isdigit() or int(cl[0]) != int(ccl[0])):
        v.append(Violation("content-length", f"forwarded {cl!r}, client sent {ccl!r}"))
    if ccl and not cte and not cl:
        v.append(Violation("content-length", f"client's {ccl!r} not forwarded"))
    # 4. Hop-by-hop and internal fields never cross; Connection only for a granted tunnel.
    ups = values_of(m.fields, b"upgrade")
    toks = [t.split(b"/", 1)[0].lower() for t in elements(ups)]
    want_tunnel = m.upgrade and bool(toks) and all(t.decode("latin-1") in ALLOWED for t in toks)
    if m.head.tunnel != want_tunnel:
        # An Upgrade that names no protocol names none that [trust] upgrade allows.
        inv = "tunnel-no-protocol" if m.head.tunnel and not toks else "tunnel"
        v.append(Violation(inv, f"tunnel {m.head.tunnel} for Upgrade {ups!r}"))
    conn, upg = values_of(fields, b"connection"), values_of(fields, b"upgrade")
    if m.head.tunnel:
        if conn != [b"upgrade"] or len(upg) != 1 or elements(upg) != elements(ups):
            v.append(Violation("tunnel-fields", f"Connection {conn!r} Upgrade {upg!r}"))
    elif conn or upg:
        v.append(Violation("hop-by-hop", f"Connection {conn!r} Upgrade {upg!r}"))
    for n, _ in fields:
        if _hop_or_internal(n.lower()):
            v.append(Violation("hop-by-hop", f"{n!r} forwarded"))
    # 5. Forwarding fields as the mode says.
    xff = _one(fields, b"x-forwarded-for", v, "forwarding")
    xfp = _one(fields, b"x-forwarded-proto", v, "forwarding")
    xfh = _one(fields, b"x-forwarded-host", v, "forwarding")
    xfport = _one(fields, b"x-forwarded-port", v, "forwarding")
    via = _one(fields, b"via", v, "forwarding")
    fwd = values_of(fields, b"forwarded")
    cfwd = elements(values_of(m.fields, b"forwarded"))
    cxff = elements(values_of(m.fields, b"x-forwarded-for"))
    cvia = elements(values_of(m.fields, b"via"))
    if mode == FWD_SET:
        want = {b"for": FRONT_IP, b"proto": FRONT_PROTO, b"host": host, b"port": FRONT_PORT}
        if fwd:
            v.append(Violation("forwarding", f"client's Forwarded {fwd!r} kept in FWD_SET"))
        if via is not None and via != VIA:
            v.append(Violation("forwarding", f"Via {via!r} in FWD_SET"))
    else:
        own = {b"proto": FRONT_PROTO, b"host": host, b"port": FRONT_PORT}
        want = {b"for": None}
        for key in (b"proto", b"host", b"port"):
            # A trusted front's value goes on; an empty one (or none) means the proxy's.
            sent = values_of(m.fields, b"x-forwarded-" + key)
            want[key] = sent[-1] if sent and sent[-1] else own[key]
        want_xff = [*cxff, FRONT_IP] if mode == FWD_APPEND or not cxff else cxff
        if xff is not None and elements([xff]) != want_xff:
            v.append(Violation("forwarding", f"X-Forwarded-For {xff!r}, expected {want_xff!r}"))
        want_via = [*cvia, VIA] if mode == FWD_APPEND or not cvia else cvia
        if via is not None and elements([via]) != want_via:
            v.append(Violation("forwarding", f"Via {via!r}, expected {want_via!r}"))
        if elements(fwd) != cfwd or len(fwd) > 1:
            v.append(Violation("forwarding", f"Forwarded {fwd!r}, client sent {cfwd!r}"))
    for key, got in ((b"for", xff), (b"proto", xfp), (b"host", xfh), (b"port", xfport)):
        if want.get(key) is not None and got is not None and got != want[key]:
            v.append(
                Violation("forwarding", f"X-Forwarded-{key.decode()} {got!r} in {MODE_NAMES[mode]}")
            )
    # 6. Every ordinary field the client sent, not named by Connection, goes on unchanged.
    named = {t.lower() for t in elements(values_of(m.fields, b"connection"))}
    want_fields = [
        (n, val)
        for n, val in m.fields
        if n.lower() not in _OWNED
        and not _hop_or_internal(n.lower())
        and n.lower() not in named
        and not _shadow(n.lower())
    ]
    got_fields = [
        (n, val)
        for n, val in fields
        if n.lower() not in _PROXY_SET and not _hop_or_internal(n.lower())
    ]
    if got_fields != want_fields:
        v.append(
            Violation("ordinary-fields", f"forwarded {got_fields!r}, expected {want_fields!r}")
        )
    # 7. The instance's parser reads the same head, one message, the same body.
    v += _reparse_request(m, out, start, fields)
    return v


class _Sink:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.body = b""
        self.begun = 0
        self.complete = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def _reparse_request(
    m: Message, out: bytes, start: bytes, fields: list[tuple[bytes, bytes]]
) -> list[Violation]:
    h = m.head
    if h.framing == CHUNKED:
        body = (chunk(m.body) if m.body else b"") + (CHUNK_END if m.complete else b"")
    else:
        body = m.body
    sink = _Sink()
    p = httptools.HttpRequestParser(sink)
    try:
        p.feed_data(out + body)
    except httptools.HttpParserUpgrade as e:
        if not h.tunnel or e.args[0] != len(out):
            return [Violation("reparse", f"upgrade at {e.args[0]} of {len(out)}")]
    except httptools.HttpParserError as e:
        return [Violation("reparse", f"the instance's parser refuses it: {e}")]
    v = []
    if sink.fields != fields or sink.url != start.split(b" ")[1]:
        v.append(Violation("reparse", f"httptools reads {sink.fields!r}, the scanner {fields!r}"))
    if sink.begun != 1 or sink.body != m.body or bool(sink.complete) != (m.complete or h.tunnel):
        v.append(
            Violation(
                "reparse-body",
                f"{sink.begun} messages, body {sink.body!r} complete {sink.complete}; "
                f"client's body {m.body!r} complete {m.complete}",
            )
        )
    return v


def check_outcome(out: Outcome) -> list[Violation]:
    """Every invariant on every request the proxy forwards, in every mode."""
    if out.end == "crash":
        return [Violation("no-crash", f"the proxy raised {out.reason} (not a HeadError)")]
    v = []
    for m in out.messages:
        for mode in MODES:
            v += [
                Violation(x.invariant, f"{MODE_NAMES[mode]}: {x.detail}")
                for x in check_request(m, mode)
            ]
    return v


def check_request_bytes(data: bytes, cut: int) -> tuple[Outcome, list[Violation]]:
    """Drive `data` whole, cut at `cut`, and byte by byte: one outcome, every invariant."""
    whole = drive(data)
    v = check_outcome(whole)
    sig = whole.signature()
    for cuts in ([cut], list(range(1, len(data)))):
        other = drive(data, cuts)
        if other.signature() != sig:
            how = "byte by byte" if len(cuts) > 1 else f"cut at {cut}"
            v.append(Violation("split", f"{how}: {other.signature()!r} != whole {sig!r}"))
            break
    return whole, v


# --- the response side --------------------------------------------------------------------------
@dataclass
class Response:
    """An upstream response head as the proxy's parser saw it, taken by ResponseHead."""

    head: bytes
    status: int
    fields: list[tuple[bytes, bytes]]
    taken: ResponseHead


class _RespSink:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


def drive_response(data: bytes) -> Response | str:
    """The head cut at its end and parsed, as proxy.worker.upstream does; a str when refused."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return "incomplete"
    head = data[: end + 4]
    sink = _RespSink()
    p = httptools.HttpResponseParser(sink)
    try:
        p.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as e:
        return f"bad response: {e}"
    if not sink.done:
        return "incomplete"
    taken = ResponseHead()
    taken.take(head)
    return Response(head, p.get_status_code(), sink.fields, taken)


_RESP_OWNED = frozenset({b"connection", b"transfer-encoding", b"upgrade"})


def check_response(r: Response, no_body: bool, keep: bool, http10: bool) -> list[Violation]:
    """Every invariant on the head the client gets for `r`."""
    v: list[Violation] = []
    out, framing, kept = r.taken.build(r.status, no_body, keep, http10)
    te_up = elements(values_of(r.fields, b"transfer-encoding"))
    cl_up = values_of(r.fields, b"content-length")
    bodiless = no_body or r.status < 200 or r.status in (204, 304)
    if framing == BAD_CODING:
        low = [t.lower() for t in te_up]
        refusable = http10 and low not in ([], [b"chunked"])  # HTTP/1.0 has no codings
        refusable = refusable or b"chunked" in low[:-1]  # chunked once, last (RFC 9112 6.1)
        if bodiless or not refusable:
            v.append(Violation("bad-coding", f"refused for TE {te_up!r}"))
        return v
    try:
        start, fields = scan_head(out)
    except ValueError as e:
        return [Violation("well-formed", str(e))]
    sm = _STATUS_LINE.match(start)
    if sm is None or int(sm.group(1)) != r.status:
        v.append(Violation("status-line", f"{start!r}"))
    cl, te = values_of(fields, b"content-length"), values_of(fields, b"transfer-encoding")
    codings = [t.lower() for t in elements(te)]
    if len(cl) + len(te) > 1:
        v.append(Violation("one-framing", f"Content-Length {cl!r}, Transfer-Encoding {te!r}"))
    if te and (codings.count(b"chunked") != 1 or codings[-1] != b"chunked"):
        # RFC 9112 6.1: chunked is applied exactly once, and last.
        v.append(
            Violation(
                "te-chunked-once", f"client gets Transfer-Encoding {te!r} for upstream's {te_up!r}"
            )
        )
    if (r.status < 200 or r.status == 204) and (cl or te):
        # RFC 9110 8.6 and RFC 9112 6.1: no Content-Length nor Transfer-Encoding on 1xx or 204.
        v.append(Violation("no-framing-1xx-204", f"status {r.status} with CL {cl!r} TE {te!r}"))
    # The framing a client reads from the head (RFC 9112 6.3) is the proxy's.
    if r.status == 101:
        want = UNTIL_CLOSE
    elif bodiless:
        want = NO_BODY
    elif te:
        want = CHUNKED
    elif cl:
        want = LENGTH
    else:
        want = UNTIL_CLOSE
    if framing != want:
        v.append(Violation("framing", f"proxy frames {framing}, the client reads {want}"))
    if framing == LENGTH and (len(cl_up) != 1 or cl != cl_up or te_up != []):
        v.append(Violation("content-length", f"{cl!r} for upstream CL {cl_up!r} TE {te_up!r}"))
    if framing == UNTIL_CLOSE and kept:
        v.append(Violation("framing", "body until close on a kept connection"))
    conn, upg = values_of(fields, b"connection"), values_of(fields, b"upgrade")
    if r.status == 101:
        ok = conn == [b"upgrade"] and len(upg) == 1
    elif not kept:
        ok = conn == [b"close"] and not upg
    else:
        ok = conn == ([b"keep-alive"] if http10 else []) and not upg
    if not ok:
        v.append(Violation("connection", f"Connection {conn!r} Upgrade {upg!r} keep={kept}"))
    for n, _ in fields:
        if _hop_or_internal(n.lower()):
            v.append(Violation("hop-by-hop", f"{n!r} forwarded"))
    named = {t.lower() for t in elements(values_of(r.fields, b"connection"))} - {
        b"content-length",
        b"transfer-encoding",
    }
    no_length = r.status < 200 or r.status == 204  # RFC 9110 8.6: no Content-Length
    want_fields = [
        (n, val)
        for n, val in r.fields
        if n.lower() not in _RESP_OWNED
        and not _hop_or_internal(n.lower())
        and n.lower() not in named
        and not (no_length and n.lower() == b"content-length")
    ]
    got_fields = [(n, val) for n, val in fields if n.lower() not in _RESP_OWNED]
    if got_fields != want_fields:
        v.append(
            Violation("ordinary-fields", f"forwarded {got_fields!r}, expected {want_fields!r}")
        )
    sink = _RespSink()
    p = httptools.HttpResponseParser(sink)
    try:
        p.feed_data(out)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as e:
        if r.status == 101 and str(e).startswith("Pause on"):
            return v  # llhttp's pause at a 101 whose Upgrade is empty: the head was read
        v.append(Violation("reparse", f"a client's parser refuses it: {e}"))
        return v
    if sink.fields != fields:
        v.append(Violation("reparse", f"httptools reads {sink.fields!r}, the scanner {fields!r}"))
    return v


def check_response_bytes(data: bytes) -> tuple[Response | str, list[Violation]]:
    """Every invariant for every way the response may be asked for (HEAD, keep, HTTP/1.0)."""
    r = drive_response(data)
    if isinstance(r, str):
        return r, []
    if r.status == 100:
        return r, []  # the proxy's own business, never forwarded
    if r.status < 200 and r.status != 101:
        return r, check_response(r, True, True, False)  # as proxy.worker.upstream sends an interim
    v = []
    for no_body in (False, True):
        for keep in (True, False):
            for http10 in (False, True):
                v += [
                    Violation(
                        x.invariant, f"head={no_body} keep={keep} http10={http10}: {x.detail}"
                    )
                    for x in check_response(r, no_body, keep, http10)
                ]
    return r, v
