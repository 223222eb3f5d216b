"""The first bytes of a TLS connection: the record layer and the ClientHello, checked strictly.

Owns what a client's hello may be before OpenSSL sees it: records (RFC 8446 5.1, RFC 5246
6.2), the ClientHello (RFC 8446 4.1.2, RFC 5246 7.4.1.2), its extension block (RFC 8446
4.2), server_name (RFC 6066 3), ALPN (RFC 7301) and supported_versions. Stateless and
sans-io: the shell peeks and calls it again on the whole prefix as more arrives; no
sockets, no clock, no buffering of its own. It must not decide certificates or routes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

# TLS alert descriptions (RFC 8446 6.2) the shell sends; HelloError.alert is one of these.
ALERT_UNEXPECTED_MESSAGE: Final = 10
ALERT_RECORD_OVERFLOW: Final = 22
ALERT_HANDSHAKE_FAILURE: Final = 40
ALERT_ILLEGAL_PARAMETER: Final = 47
ALERT_DECODE_ERROR: Final = 50
ALERT_PROTOCOL_VERSION: Final = 70
ALERT_INTERNAL_ERROR: Final = 80
ALERT_UNRECOGNIZED_NAME: Final = 112
ALERT_NO_APPLICATION_PROTOCOL: Final = 120

# The bound on the whole hello, record headers included. Real hellos are 0.5-2 KiB
# (a browser's with an X25519MLKEM768 share, ECH GREASE and padding is ~1.9 KiB); 16 KiB
# leaves room for larger post-quantum shares, ECH and resumption tickets, and is the most
# one record may carry, so a hello that fits in one record is never refused for its size.
# The shell peeks at most this much per connection, and one parse stays tens of µs.
MAX_HELLO: Final = 16384
# The bound on the records that carry it. A hello may be split across records (some
# clients do it to hide the SNI from middleboxes); each record costs the stateless
# re-parse a walk on every later call, so a dribble of 1-byte records is cut here.
MAX_RECORDS: Final = 64

RECORD_HEADER: Final = 5
MAX_RECORD: Final = 16384  # 2^14 bytes of plaintext per record (RFC 8446 5.1)
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_EXT_PRE_SHARED_KEY: Final = 41
_EXT_SUPPORTED_VERSIONS: Final = 43
_TLS12: Final = 0x0303
_TLS13: Final = 0x0304
_MAX_HOST: Final = 253

# Every HelloError.reason: the metric labels (one per rule, stable).
REASONS: Final = (
    "not_tls",  # the first bytes are not a TLS record (e.g. plaintext HTTP)
    "sslv2",  # an SSLv2-compatible hello (the first byte has its high bit set)
    "record_type",  # a record that is not a handshake record (alert, application data...)
    "record_version",  # a record version outside 0x0301..0x0303
    "record_length",  # a record of length 0
    "record_overflow",  # a record longer than 2^14
    "record_count",  # the hello spread over more than MAX_RECORDS records
    "handshake_type",  # the first handshake message is not a ClientHello
    "too_large",  # the hello (records included) is longer than MAX_HELLO
    "trailing_data",  # the records carry bytes after the ClientHello
    "version",  # neither TLS 1.2 nor TLS 1.3 offered
    "length",  # a length that disagrees with its container
    "session_id",  # a legacy_session_id longer than 32
    "cipher_suites",  # an empty or odd-length cipher_suites
    "compression",  # no compression methods, or no null one
    "extension_duplicate",  # two extensions of the same type
    "extension_order",  # pre_shared_key not last
    "supported_versions",  # a malformed supported_versions extension
    "sni_length",  # a server_name extension whose lengths disagree
    "sni_count",  # a server_name_list without exactly one entry
    "sni_type",  # an entry that is not a host_name
    "sni_name",  # a host_name that is not a valid DNS name (empty, long, not LDH, not ASCII)
    "sni_ip_literal",  # a host_name that is an IP address (RFC 6066 3 forbids it)
    "alpn",  # a malformed ALPN extension (empty list, empty name, lengths)
)

# A lower-cased DNS name of LDH labels (RFC 1123 2.1, RFC 5890 2.3.1), 1..63 bytes each.
_LABEL: Final = rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LDH: Final = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*\Z")


class HelloError(Exception):
    """A hello to refuse: `reason` is the metric label, `alert` the fatal alert to send."""

    def __init__(self, reason: str, alert: int, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.alert = alert


@dataclass(frozen=True, slots=True)
class Hello:
    """What the shell needs from a well-formed ClientHello.

    `sni`: the host_name, lower-cased, one trailing dot stripped (None: no server_name, or
    a well-formed IP address there, which RFC 6066 3 forbids but clients such as wrk send
    when they are pointed at an address: never used as a name, taken as no SNI).
    `alpn`: the offered protocols in the client's order (None: no ALPN extension).
    `tls13`: supported_versions offers TLS 1.3. `size`: bytes of the records that
    carried the hello (what the shell leaves in the socket for OpenSSL to read).
    """

    sni: str | None
    alpn: tuple[bytes, ...] | None
    tls13: bool
    size: int


def alert_record(description: int) -> bytes:
    """One fatal alert record (RFC 8446 6; the record version a server uses before
    negotiation, 0x0303)."""
    if not 0 <= description <= 255:
        raise ValueError(f"alert description {description} is not a byte")
    return bytes((21, 3, 3, 0, 2, 2, description))


def parse_client_hello(data: bytes) -> Hello | int:
    """The hello at the start of `data`, or the total byte count needed before the parse
    can go further (always more than len(data), never more than MAX_HELLO and never
    more than the hello's own size); raises HelloError as soon as the prefix is bad, and
    the same error for any longer prefix. `data` is bytes (the compiled module refuses a
    bytearray): what recv(MSG_PEEK) returns."""
    n = len(data)
    if n == 0:
        return RECORD_HEADER
    pos = 0
    records = 0
    hs_total = -1  # 4 + the handshake message's length, once its header is in
    got = 0  # handshake bytes in the complete records so far
    parts: list[bytes] = []
    while True:
        if hs_total >= 0 and pos + RECORD_HEADER + hs_total - got > MAX_HELLO:
            raise HelloError("too_large", ALERT_ILLEGAL_PARAMETER, f"needs > {MAX_HELLO} bytes")
        if n < pos + RECORD_HEADER:
            _record_prefix(data, pos, n)
            return pos + RECORD_HEADER
        rlen = _record_header(data, pos)
        records += 1
        if records > MAX_RECORDS:
            raise HelloError("record_count", ALERT_ILLEGAL_PARAMETER, f"> {MAX_RECORDS} records")
        start = pos + RECORD_HEADER
        end = start + rlen
        if hs_total < 0 and got + min(end, n) - start >= 4:
            # The handshake header is in reach (maybe split across records): check it
            # before waiting for the rest of the record.
            head = b"".join(parts) + data[start : start + 4 - got]
            hs_total = _handshake_header(head)
            if pos + RECORD_HEADER + hs_total - got > MAX_HELLO:
                raise HelloError("too_large", ALERT_ILLEGAL_PARAMETER, f"needs > {MAX_HELLO} bytes")
        if hs_total >= 0 and got + rlen > hs_total:
            raise HelloError(
                "trailing_data", ALERT_UNEXPECTED_MESSAGE, "a record goes past the ClientHello"
            )
        if end > MAX_HELLO:
            raise HelloError("too_large", ALERT_ILLEGAL_PARAMETER, f"a record ends at {end}")
        if n < end:
            return end
        got += rlen
        if got == hs_total:
            if not parts:
                return _client_hello(data[start + 4 : end], end)
            parts.append(data[start:end])
            return _client_hello(b"".join(parts)[4:], end)
        parts.append(data[start:end])
        pos = end


def _record_prefix(data: bytes, pos: int, n: int) -> None:
    """Refuse an incomplete record header as soon as its first bytes are wrong."""
    if n == pos:
        return
    _content_type(data[pos], pos)
    if n > pos + 1:
        _record_major(data[pos + 1], pos)
    if n > pos + 2:
        _record_minor(data[pos + 2])


def _record_header(data: bytes, pos: int) -> int:
    """A complete record header's length, once its type, version and length are checked."""
    _content_type(data[pos], pos)
    _record_major(data[pos + 1], pos)
    _record_minor(data[pos + 2])
    rlen = (data[pos + 3] << 8) | data[pos + 4]
    if rlen == 0:
        # RFC 8446 5.1: no zero-length handshake fragments.
        raise HelloError("record_length", ALERT_DECODE_ERROR, "an empty record")
    if rlen > MAX_RECORD:
        raise HelloError("record_overflow", ALERT_RECORD_OVERFLOW, f"a record of {rlen} bytes")
    return rlen


def _content_type(t: int, pos: int) -> None:
    """Only handshake records carry a hello. The first byte alone tells plaintext (an HTTP
    request on the HTTPS port) and an SSLv2-compatible hello from TLS."""
    if t == _HANDSHAKE:
        return
    if pos == 0:
        if t & 0x80:
            raise HelloError("sslv2", ALERT_PROTOCOL_VERSION, "an SSLv2-compatible hello")
        if not 20 <= t <= 24:
            raise HelloError("not_tls", ALERT_UNEXPECTED_MESSAGE, f"first byte {t:#04x}")
    # change_cipher_spec, alert, application_data, heartbeat or junk where the hello's
    # next record should be (RFC 8446 5: an unexpected record type is unexpected_message;
    # 5.1: handshake messages are not interleaved with other record types).
    raise HelloError("record_type", ALERT_UNEXPECTED_MESSAGE, f"content type {t}")


def _record_major(major: int, pos: int) -> None:
    if major != 3:
        if pos == 0:
            raise HelloError("not_tls", ALERT_UNEXPECTED_MESSAGE, f"record version {major}.x")
        raise HelloError("record_version", ALERT_PROTOCOL_VERSION, f"record version {major}.x")


def _record_minor(minor: int) -> None:
    # Record versions 0x0301..0x0303 (RFC 8446 5.1: 0x0301 or 0x0303 in a ClientHello).
    # 0x0300 is refused: RFC 5246 E.1 lets a client that also speaks SSL 3.0 put it
    # there, but only TLS 1.2 and 1.3 are served and no client of either sends it.
    if not 1 <= minor <= 3:
        raise HelloError("record_version", ALERT_PROTOCOL_VERSION, f"record version 3.{minor}")


def _handshake_header(head: bytes) -> int:
    """4 + the ClientHello's length, from the handshake message's first 4 bytes."""
    if head[0] != _CLIENT_HELLO:
        raise HelloError("handshake_type", ALERT_UNEXPECTED_MESSAGE, f"handshake type {head[0]}")
    hlen = (head[1] << 16) | (head[2] << 8) | head[3]
    if hlen + 4 + RECORD_HEADER > MAX_HELLO:
        raise HelloError("too_large", ALERT_ILLEGAL_PARAMETER, f"a ClientHello of {hlen} bytes")
    return hlen + 4


def _client_hello(b: bytes, size: int) -> Hello:
    """The ClientHello body (after the handshake header), RFC 8446 4.1.2 / RFC 5246 7.4.1.2."""
    n = len(b)
    if n < 35:
        raise HelloError("length", ALERT_DECODE_ERROR, "shorter than version and random")
    if b[0] != 3:
        raise HelloError("version", ALERT_PROTOCOL_VERSION, f"legacy_version {b[0]}.{b[1]}")
    legacy = (b[0] << 8) | b[1]
    i = 34
    sid = b[i]
    if sid > 32:
        raise HelloError("session_id", ALERT_DECODE_ERROR, f"legacy_session_id of {sid}")
    i += 1 + sid
    if i + 2 > n:
        raise HelloError("length", ALERT_DECODE_ERROR, "ends in legacy_session_id")
    cs = (b[i] << 8) | b[i + 1]
    i += 2
    if cs < 2 or cs & 1:
        raise HelloError("cipher_suites", ALERT_DECODE_ERROR, f"cipher_suites of {cs} bytes")
    i += cs
    if i + 1 > n:
        raise HelloError("length", ALERT_DECODE_ERROR, "ends in cipher_suites")
    cm = b[i]
    i += 1
    if cm == 0:
        raise HelloError("compression", ALERT_DECODE_ERROR, "no compression methods")
    if i + cm > n:
        raise HelloError("length", ALERT_DECODE_ERROR, "ends in compression methods")
    if 0 not in b[i : i + cm]:
        # RFC 5246 7.4.1.2: the list MUST include null; RFC 8446 4.1.2: only null.
        raise HelloError("compression", ALERT_ILLEGAL_PARAMETER, "no null compression")
    i += cm
    if i == n:
        # No extension block at all (RFC 5246 7.4.1.2 allows it): plain TLS 1.2 or older.
        if legacy < _TLS12:
            raise HelloError("version", ALERT_PROTOCOL_VERSION, f"legacy_version {legacy:#06x}")
        return Hello(None, None, False, size)
    if i + 2 > n:
        raise HelloError("length", ALERT_DECODE_ERROR, "one byte of extensions length")
    elen = (b[i] << 8) | b[i + 1]
    i += 2
    if i + elen != n:
        raise HelloError("length", ALERT_DECODE_ERROR, "extensions do not end the ClientHello")
    return _extensions(b, i, n, legacy, size)


def _extensions(b: bytes, i: int, n: int, legacy: int, size: int) -> Hello:
    """The extension block b[i:n] (RFC 8446 4.2): each once, pre_shared_key last."""
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[bytes, ...] | None = None
    versions = -1  # -1: no supported_versions; else bit 0: TLS 1.2, bit 1: TLS 1.3
    psk = False
    while i < n:
        if i + 4 > n:
            raise HelloError("length", ALERT_DECODE_ERROR, "a truncated extension header")
        etype = (b[i] << 8) | b[i + 1]
        elen = (b[i + 2] << 8) | b[i + 3]
        i += 4
        end = i + elen
        if end > n:
            raise HelloError("length", ALERT_DECODE_ERROR, f"extension {etype} past the block")
        if etype in seen:
            raise HelloError(
                "extension_duplicate", ALERT_ILLEGAL_PARAMETER, f"extension {etype} twice"
            )
        seen.add(etype)
        if psk:
            # RFC 8446 4.2.11: pre_shared_key MUST be the last extension.
            raise HelloError("extension_order", ALERT_ILLEGAL_PARAMETER, "pre_shared_key not last")
        if etype == _EXT_SERVER_NAME:
            sni = _server_name(b, i, end) or None  # "": an address, as if no SNI
        elif etype == _EXT_ALPN:
            alpn = _alpn(b, i, end)
        elif etype == _EXT_SUPPORTED_VERSIONS:
            versions = _supported_versions(b, i, end)
        elif etype == _EXT_PRE_SHARED_KEY:
            psk = True
        i = end
    if versions < 0:
        # RFC 8446 4.2.1: without supported_versions, legacy_version is the version.
        if legacy < _TLS12:
            raise HelloError("version", ALERT_PROTOCOL_VERSION, f"legacy_version {legacy:#06x}")
        return Hello(sni, alpn, False, size)
    if versions == 0:
        raise HelloError("version", ALERT_PROTOCOL_VERSION, "neither TLS 1.2 nor 1.3 offered")
    return Hello(sni, alpn, versions & 2 != 0, size)


def _supported_versions(b: bytes, i: int, end: int) -> int:
    """ProtocolVersion versions<2..254> (RFC 8446 4.2.1): bit 0 TLS 1.2, bit 1 TLS 1.3."""
    if end - i < 1:
        raise HelloError("supported_versions", ALERT_DECODE_ERROR, "empty extension")
    vlen = b[i]
    if vlen + 1 != end - i or vlen < 2 or vlen & 1:
        raise HelloError("supported_versions", ALERT_DECODE_ERROR, f"a list of {vlen} bytes")
    got = 0
    i += 1
    while i < end:
        v = (b[i] << 8) | b[i + 1]
        if v == _TLS13:
            got |= 2
        elif v == _TLS12:
            got |= 1
        i += 2
    return got


def _alpn(b: bytes, i: int, end: int) -> tuple[bytes, ...]:
    """ProtocolName protocol_name_list<2..2^16-1>, each name <1..2^8-1> (RFC 7301 3.1)."""
    if end - i < 2:
        raise HelloError("alpn", ALERT_DECODE_ERROR, "no list length")
    llen = (b[i] << 8) | b[i + 1]
    i += 2
    if i + llen != end:
        raise HelloError("alpn", ALERT_DECODE_ERROR, "list length disagrees with the extension")
    if llen == 0:
        raise HelloError("alpn", ALERT_DECODE_ERROR, "an empty list")
    names: list[bytes] = []
    while i < end:
        plen = b[i]
        i += 1
        if plen == 0:
            raise HelloError("alpn", ALERT_DECODE_ERROR, "an empty protocol name")
        if i + plen > end:
            raise HelloError("alpn", ALERT_DECODE_ERROR, "a name past the list")
        names.append(b[i : i + plen])
        i += plen
    return tuple(names)


def _server_name(b: bytes, i: int, end: int) -> str:
    """ServerName server_name_list<1..2^16-1> with exactly one host_name (RFC 6066 3)."""
    if end - i < 2:
        raise HelloError("sni_length", ALERT_DECODE_ERROR, "no list length")
    llen = (b[i] << 8) | b[i + 1]
    i += 2
    if i + llen != end:
        raise HelloError("sni_length", ALERT_DECODE_ERROR, "list length disagrees")
    count = 0
    ntype = 0
    name = b""
    while i < end:
        if i + 3 > end:
            raise HelloError("sni_length", ALERT_DECODE_ERROR, "a truncated entry")
        ntype = b[i]
        nlen = (b[i + 1] << 8) | b[i + 2]
        i += 3
        if i + nlen > end:
            raise HelloError("sni_length", ALERT_DECODE_ERROR, "a name past the list")
        name = b[i : i + nlen]
        i += nlen
        count += 1
    if count == 0:
        raise HelloError("sni_count", ALERT_DECODE_ERROR, "an empty server_name_list")
    if count > 1:
        # RFC 6066 3: at most one name per type, and host_name is the only type.
        raise HelloError("sni_count", ALERT_ILLEGAL_PARAMETER, f"{count} names")
    if ntype != 0:
        raise HelloError("sni_type", ALERT_ILLEGAL_PARAMETER, f"name_type {ntype}")
    return host_name(name)


def host_name(name: bytes) -> str:
    """A host_name as a DNS name: one trailing dot dropped, lower-cased, LDH labels of
    1..63 bytes, at most 253 bytes, not an IP literal (RFC 6066 3, RFC 1123 2.1)."""
    if not name:
        raise HelloError("sni_name", ALERT_DECODE_ERROR, "an empty host_name")
    if name[-1] == 0x2E:
        name = name[:-1]
    if not name or len(name) > _MAX_HOST:
        raise HelloError("sni_name", ALERT_ILLEGAL_PARAMETER, f"a name of {len(name)} bytes")
    if b":" in name:
        if _is_address(name):
            return ""
        raise HelloError("sni_ip_literal", ALERT_ILLEGAL_PARAMETER, "an IPv6 literal")
    low = name.lower()
    if _LDH.match(low) is None:
        raise HelloError("sni_name", ALERT_ILLEGAL_PARAMETER, "not LDH labels")
    if low.rpartition(b".")[2].isdigit():
        # An all-numeric last label: an IPv4 literal (or one in disguise, 127.1).
        if _is_address(low):
            return ""
        raise HelloError("sni_ip_literal", ALERT_ILLEGAL_PARAMETER, "an IPv4 literal")
    return low.decode("ascii")


def _is_address(name: bytes) -> bool:
    """A well-formed IPv4 dotted quad or IPv6 text address (nothing in disguise: 127.1,
    a bracketed or zoned address, a numeric top-level label are no addresses here)."""
    if not name.isascii() or b"%" in name:
        return False
    text = name.decode("ascii")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return addr.version == 6 or text.count(".") == 3
