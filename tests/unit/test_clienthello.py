"""The strict ClientHello/SNI parser: real hellos, every split, every refusal, hypothesis.

Bytes in, a Hello, a byte count or a HelloError out (proxy.core.clienthello). Real hellos
come from Python's ssl, `openssl s_client` and curl (tests/support/hello_capture.py);
built and bent ones from tests/support/hello_builder.py.
"""

from __future__ import annotations

import random
import shutil
import ssl

import pytest
from hello_builder import (
    ALPN,
    COMMON,
    GREASE,
    MUTATIONS,
    PRE_SHARED_KEY,
    SERVER_NAME,
    SUPPORTED_VERSIONS,
    TLS12,
    Op,
    Spec,
    alpn_body,
    bare_tls12,
    body,
    build,
    expected,
    ext,
    handshake,
    mutate,
    random_bent_spec,
    records,
    sni_body,
    specs,
    u16,
)
from hello_capture import client_hello, python_hello
from hello_check import judge, violations
from hello_corpus import CORPUS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core import clienthello as ch
from proxy.core.clienthello import (
    MAX_HELLO,
    MAX_RECORDS,
    REASONS,
    Hello,
    HelloError,
    alert_record,
    parse_client_hello,
)

_FAST = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
DECODE = ch.ALERT_DECODE_ERROR
ILLEGAL = ch.ALERT_ILLEGAL_PARAMETER
UNEXPECTED = ch.ALERT_UNEXPECTED_MESSAGE
PROTOCOL = ch.ALERT_PROTOCOL_VERSION
OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")


def refused(data: bytes) -> tuple[str, int]:
    with pytest.raises(HelloError) as e:
        parse_client_hello(data)
    return e.value.reason, e.value.alert


def prefixes_wait(data: bytes, size: int) -> None:
    """Every proper prefix of a hello of `size` bytes asks for more, never past the hello."""
    for k in range(size):
        got = parse_client_hello(data[:k])
        assert isinstance(got, int), (k, got)
        assert k < got <= size, (k, got)


def fed_as_needed(data: bytes) -> tuple[Hello, int]:
    """Drive the parser like the shell: peek exactly the bytes it asked for (SO_RCVLOWAT)."""
    have = 0
    calls = 0
    while True:
        calls += 1
        got = parse_client_hello(data[:have])
        if isinstance(got, Hello):
            return got, calls
        assert have < got <= len(data)
        have = got


def with_exts(*exts: bytes, spec: Spec | None = None) -> bytes:
    return records(handshake(body(spec or Spec(), b"".join(exts))))


def with_sni(entries: list[tuple[int, bytes]]) -> bytes:
    return with_exts(ext(SERVER_NAME, sni_body(entries)))


def raw_body(suites: bytes, compression: bytes, tail: bytes = b"\x00\x00") -> bytes:
    """A ClientHello with the given raw cipher_suites and compression vectors."""
    b = u16(TLS12) + bytes(32) + b"\x00" + suites + compression + tail
    return records(handshake(b))


# --- real clients ----------------------------------------------------------------------------
def test_python_tls13_hello_with_sni_and_alpn() -> None:
    """Python's ssl client hello (TLS 1.3 offered) gives its SNI lower-cased, its ALPN in
    order, tls13 and its exact size."""
    data = python_hello("Hello.Example.TEST", ["h2", "http/1.1"])
    assert parse_client_hello(data) == Hello(
        "hello.example.test", (b"h2", b"http/1.1"), True, len(data)
    )


def test_python_tls12_only_hello() -> None:
    """A TLS 1.2-only Python client (no supported_versions) parses with tls13 False."""
    data = python_hello("app.test", ["http/1.1"], ssl.TLSVersion.TLSv1_2)
    assert parse_client_hello(data) == Hello("app.test", (b"http/1.1",), False, len(data))


def test_python_hello_without_sni_or_alpn() -> None:
    """No server_hostname and no ALPN: sni and alpn are None (the shell's default cert)."""
    data = python_hello(None)
    assert parse_client_hello(data) == Hello(None, None, True, len(data))


@pytest.mark.needs(present=OPENSSL is not None, reason="the openssl command")
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_hello(version: str) -> None:
    """The hello `openssl s_client` sends to a loopback listener parses to its SNI, ALPN
    and version, and every prefix of it only asks for more."""
    assert OPENSSL is not None
    data = client_hello(
        lambda port: [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "S-Client.Example.test",
            "-alpn",
            "h2,http/1.1",
            version,
        ]
    )
    got = parse_client_hello(data)
    assert got == Hello(
        "s-client.example.test", (b"h2", b"http/1.1"), version == "-tls1_3", len(data)
    )
    prefixes_wait(data, len(data))


@pytest.mark.needs(present=CURL is not None, reason="the curl command")
def test_curl_hello() -> None:
    """curl's hello (via --resolve to 127.0.0.1) carries the URL's host as SNI and offers
    http/1.1 over ALPN."""
    assert CURL is not None
    data = client_hello(
        lambda port: [
            CURL,
            "-sk",
            "--max-time",
            "20",
            "--resolve",
            f"curl.example.test:{port}:127.0.0.1",
            f"https://curl.example.test:{port}/",
        ]
    )
    got = parse_client_hello(data)
    assert isinstance(got, Hello)
    assert got.sni == "curl.example.test"
    assert got.alpn is not None and b"http/1.1" in got.alpn
    assert got.size == len(data)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_stored_real_hellos_parse_and_every_prefix_asks_for_more(name: str) -> None:
    """The hellos captured once from Python's ssl, openssl s_client and curl parse to what
    they hold, and each of their prefixes only asks for more, within the hello."""
    data, want = CORPUS[name]
    assert parse_client_hello(data) == want
    prefixes_wait(data, len(data))


# --- splits and what follows the hello -----------------------------------------------------
@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED])
def test_every_split_of_a_real_hello_asks_for_more(maximum: ssl.TLSVersion) -> None:
    """Cut anywhere before its end, a real hello gives a byte count (never a Hello, never an
    error) above the cut and within the hello, so SO_RCVLOWAT never waits past it."""
    data = python_hello("split.test", ["h2"], maximum)
    prefixes_wait(data, len(data))


def test_bytes_after_the_hello_are_not_its_business() -> None:
    """A change_cipher_spec record and early data after the hello's records change nothing:
    size stays the hello's records (the shell leaves the rest to OpenSSL)."""
    data = python_hello("after.test", ["h2"])
    after = data + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x03abc"
    assert parse_client_hello(after) == parse_client_hello(data)


def test_driven_as_the_shell_drives_it_it_takes_one_call_per_header_and_record() -> None:
    """Peeking exactly what it asks for, a hello in 4 records is parsed in 9 calls: one for
    each record header and one for each record body, plus the first."""
    spec = Spec(alpn=[b"h2"], fragments=[3, 20, 30])
    data = build(spec)
    assert len(data) > 3 * 5 + 53  # a fourth record holds the rest
    got, calls = fed_as_needed(data)
    assert got == expected(spec)
    assert calls == 1 + 2 * 4


def test_a_hello_split_across_records_at_the_handshake_header() -> None:
    """The handshake header itself split 1+1+1+rest across records is reassembled."""
    spec = Spec(sni=b"frag.test", fragments=[1, 1, 1])
    data = build(spec)
    assert parse_client_hello(data) == expected(spec)
    prefixes_wait(data, len(data))


def test_a_hello_in_max_records_parses_and_one_more_is_refused() -> None:
    """A hello in MAX_RECORDS records parses; in MAX_RECORDS + 1 it is refused as
    record_count once that record's header is in, before the rest arrives."""
    ok = Spec(fragments=[1] * (MAX_RECORDS - 1))
    assert parse_client_hello(build(ok)) == expected(ok)
    bad = build(Spec(fragments=[1] * MAX_RECORDS))
    cut = MAX_RECORDS * 6 + 5
    assert refused(bad[:cut]) == ("record_count", ILLEGAL)


@_FAST
@given(specs(), st.data())
def test_every_prefix_of_a_built_hello_asks_for_more(spec: Spec, data: st.DataObject) -> None:
    """For any valid hello, in any records, a prefix gives a byte count above it and within
    the hello; fed as asked, it ends in the expected Hello."""
    wire = build(spec)
    k = data.draw(st.integers(0, len(wire) - 1))
    got = parse_client_hello(wire[:k])
    assert isinstance(got, int)
    assert k < got <= len(wire)
    assert fed_as_needed(wire)[0] == expected(spec)


# --- round trip ---------------------------------------------------------------------------------
@_FAST
@given(specs())
def test_built_hellos_round_trip(spec: Spec) -> None:
    """Any valid hello (SNI in any case, ALPN, versions, extensions in any order, psk last,
    split into records) parses to exactly what it holds."""
    assert parse_client_hello(build(spec)) == expected(spec)


def test_a_bare_tls12_hello_without_extensions() -> None:
    """A hello that ends after compression_methods (RFC 5246 7.4.1.2) is TLS 1.2 without
    SNI or ALPN."""
    spec = bare_tls12()
    assert parse_client_hello(build(spec)) == Hello(None, None, False, len(build(spec)))


def test_a_browser_sized_hello_with_a_post_quantum_share() -> None:
    """A hello like a 2025 browser's (X25519MLKEM768 share of 1216+32 bytes, GREASE,
    padding to ~1.9 KiB) parses."""
    share = u16(0x11EC) + u16(1216) + bytes(1216) + u16(0x001D) + u16(32) + bytes(32)
    extras = [
        (GREASE[0], b""),
        (51, u16(len(share)) + share),
        *COMMON[:-2],
        (21, bytes(400)),
        (GREASE[5], b"\x00"),
    ]
    spec = Spec(sni=b"www.example.com", alpn=[b"h2", b"http/1.1"], extras=extras)
    data = build(spec)
    assert 1800 < len(data) < 2200
    assert parse_client_hello(data) == expected(spec)


def test_hello_of_max_hello_bytes_parses_and_one_more_is_refused_early() -> None:
    """A hello of exactly MAX_HELLO bytes (records included) parses; one byte more is
    too_large as soon as the handshake header is in (9 bytes), not after 16 KiB."""
    base = len(build(Spec(extras=[(21, b"")])))
    fits = Spec(extras=[(21, bytes(MAX_HELLO - base))])
    assert len(build(fits)) == MAX_HELLO
    assert parse_client_hello(build(fits)) == expected(fits)
    over = build(Spec(extras=[(21, bytes(MAX_HELLO - base + 1))]))
    assert refused(over[:9]) == ("too_large", ILLEGAL)


N253 = b".".join([b"a" * 63] * 3) + b"." + b"b" * 61  # 253 bytes: the longest name


@pytest.mark.parametrize(
    ("sent", "sni"),
    [
        (b"Example.COM.", "example.com"),
        (b"localhost", "localhost"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"1.example", "1.example"),
        (b"example.1a", "example.1a"),
        (b"a-b.c--d.e", "a-b.c--d.e"),
        (b"a" * 63 + b".test", "a" * 63 + ".test"),
        (N253, N253.decode()),
        (N253 + b".", N253.decode()),
    ],
)
def test_valid_host_names_are_normalised(sent: bytes, sni: str) -> None:
    """Valid names (63-byte labels, 253 bytes, punycode, one trailing dot, upper case) come
    out lower-cased without the trailing dot."""
    got = parse_client_hello(with_sni([(0, sent)]))
    assert isinstance(got, Hello)
    assert got.sni == sni


# --- bad input --------------------------------------------------------------------------------
def _hello_msg(spec: Spec | None = None) -> bytes:
    return handshake(body(spec or Spec()))


_MSG = _hello_msg()
_FIRST = records(_MSG[:10])

BAD: list[tuple[str, bytes, str, int]] = [
    # not TLS at all, refused at the first byte(s)
    ("http_request", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", "not_tls", UNEXPECTED),
    ("http_first_byte", b"G", "not_tls", UNEXPECTED),
    ("ssh_banner", b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls", UNEXPECTED),
    ("zeros", bytes(64), "not_tls", UNEXPECTED),
    ("handshake_byte_then_junk", b"\x16\x47\x45\x54", "not_tls", UNEXPECTED),
    ("sslv2_hello", bytes.fromhex("802e0103010015000000100100800300800700c0"), "sslv2", PROTOCOL),
    # the record layer
    ("alert_record_first", alert_record(40), "record_type", UNEXPECTED),
    ("application_data_first", b"\x17\x03\x03\x00\x03abc", "record_type", UNEXPECTED),
    ("record_version_ssl3", records(_MSG, version=0x0300), "record_version", PROTOCOL),
    ("record_version_3_4", records(_MSG, version=0x0304), "record_version", PROTOCOL),
    ("record_version_prefix", b"\x16\x03\x09", "record_version", PROTOCOL),
    ("record_length_zero", b"\x16\x03\x01\x00\x00" + records(_MSG), "record_length", DECODE),
    ("record_over_2_14", b"\x16\x03\x01\x40\x01\x01", "record_overflow", ch.ALERT_RECORD_OVERFLOW),
    ("second_record_not_handshake", _FIRST + b"\x17\x03\x03\x00\x01x", "record_type", UNEXPECTED),
    ("second_record_sslv2ish", _FIRST + b"\x80\x03\x03", "record_type", UNEXPECTED),
    ("second_record_version", _FIRST + b"\x16\x02\x00", "record_version", PROTOCOL),
    ("one_byte_records", build(Spec(fragments=[1] * 200)), "record_count", ILLEGAL),
    # the handshake message
    ("server_hello_type", records(handshake(body(Spec()), 2)), "handshake_type", UNEXPECTED),
    ("handshake_length_2_24", b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "too_large", ILLEGAL),
    (
        "handshake_length_split",
        b"\x16\x03\x01\x00\x01\x01\x16\x03\x01\x00\x03\x00\xff\xff",
        "too_large",
        ILLEGAL,
    ),
    (
        "hello_over_max",
        build(Spec(extras=[(21, bytes(MAX_HELLO))], fragments=[16000])),
        "too_large",
        ILLEGAL,
    ),
    (
        "record_length_past_the_hello",
        b"\x16\x03\x01" + u16(len(_MSG) + 10) + _MSG,
        "trailing_data",
        UNEXPECTED,
    ),
    ("second_message_in_record", records(_MSG + handshake(b"", 20)), "trailing_data", UNEXPECTED),
    (
        "record_after_header_overshoots",
        records(_MSG[:4]) + b"\x16\x03\x01" + u16(len(_MSG)),
        "trailing_data",
        UNEXPECTED,
    ),
    # the ClientHello body
    ("truncated_body", records(handshake(body(Spec())[:30])), "length", DECODE),
    ("legacy_version_2", records(handshake(b"\x02\x00" + body(Spec())[2:])), "version", PROTOCOL),
    (
        "tls10_without_extensions",
        build(bare_tls12(Spec(legacy_version=0x0301))),
        "version",
        PROTOCOL,
    ),
    (
        "tls11_without_supported_versions",
        build(Spec(legacy_version=0x0302, versions=None)),
        "version",
        PROTOCOL,
    ),
    ("supported_versions_old_only", build(Spec(versions=[0x0302, 0x0301])), "version", PROTOCOL),
    ("session_id_33", build(Spec(session_id=bytes(33))), "session_id", DECODE),
    ("cipher_suites_odd", raw_body(b"\x00\x03\x13\x01\x13", b"\x01\x00"), "cipher_suites", DECODE),
    ("cipher_suites_empty", raw_body(b"\x00\x00", b"\x01\x00"), "cipher_suites", DECODE),
    ("cipher_suites_past_end", raw_body(b"\x00\x40\x13\x01", b""), "length", DECODE),
    ("compression_empty", raw_body(b"\x00\x02\x13\x01", b"\x00"), "compression", DECODE),
    ("compression_no_null", build(Spec(compression=b"\x01")), "compression", ILLEGAL),
    ("compression_past_end", raw_body(b"\x00\x02\x13\x01", b"\x05\x00", b""), "length", DECODE),
    (
        "extensions_one_length_byte",
        raw_body(b"\x00\x02\x13\x01", b"\x01\x00", b"\x00"),
        "length",
        DECODE,
    ),
    (
        "extensions_block_too_long",
        raw_body(b"\x00\x02\x13\x01", b"\x01\x00", b"\x00\x05" + ext(23, b"")),
        "length",
        DECODE,
    ),
    (
        "extensions_block_too_short",
        raw_body(b"\x00\x02\x13\x01", b"\x01\x00", b"\x00\x03" + ext(23, b"")),
        "length",
        DECODE,
    ),
    ("extension_past_block", with_exts(u16(23) + u16(9) + b"abc"), "length", DECODE),
    (
        "extension_duplicate_alpn",
        with_exts(ext(ALPN, alpn_body([b"h2"])), ext(ALPN, alpn_body([b"h2"]))),
        "extension_duplicate",
        ILLEGAL,
    ),
    (
        "extension_duplicate_sni",
        with_exts(
            ext(0, sni_body([(0, b"a.test")])), ext(23, b""), ext(0, sni_body([(0, b"b.test")]))
        ),
        "extension_duplicate",
        ILLEGAL,
    ),
    (
        "extension_duplicate_grease",
        with_exts(ext(GREASE[2], b""), ext(GREASE[2], b"\x00")),
        "extension_duplicate",
        ILLEGAL,
    ),
    (
        "pre_shared_key_not_last",
        with_exts(ext(PRE_SHARED_KEY, b"\x00"), ext(23, b"")),
        "extension_order",
        ILLEGAL,
    ),
    (
        "supported_versions_empty",
        with_exts(ext(SUPPORTED_VERSIONS, b"")),
        "supported_versions",
        DECODE,
    ),
    (
        "supported_versions_odd",
        with_exts(ext(SUPPORTED_VERSIONS, b"\x03\x03\x04\x03")),
        "supported_versions",
        DECODE,
    ),
    (
        "supported_versions_length",
        with_exts(ext(SUPPORTED_VERSIONS, b"\x04\x03\x04")),
        "supported_versions",
        DECODE,
    ),
    # server_name (RFC 6066 3)
    ("sni_empty_extension", with_exts(ext(SERVER_NAME, b"")), "sni_length", DECODE),
    (
        "sni_list_length",
        with_exts(ext(SERVER_NAME, b"\x00\x20" + sni_body([(0, b"a.test")])[2:])),
        "sni_length",
        DECODE,
    ),
    ("sni_entry_truncated", with_exts(ext(SERVER_NAME, b"\x00\x02\x00\x00")), "sni_length", DECODE),
    (
        "sni_name_past_list",
        with_exts(ext(SERVER_NAME, b"\x00\x05\x00\x00\x09abc")),
        "sni_length",
        DECODE,
    ),
    ("sni_empty_list", with_exts(ext(SERVER_NAME, b"\x00\x00")), "sni_count", DECODE),
    ("sni_two_host_names", with_sni([(0, b"a.test"), (0, b"b.test")]), "sni_count", ILLEGAL),
    ("sni_host_name_and_other", with_sni([(0, b"a.test"), (1, b"b.test")]), "sni_count", ILLEGAL),
    ("sni_type_1", with_sni([(1, b"a.test")]), "sni_type", ILLEGAL),
    ("sni_empty_name", with_sni([(0, b"")]), "sni_name", DECODE),
    (
        "sni_300_bytes",
        with_sni([(0, b".".join([b"a" * 59] * 4 + [b"a" * 60]))]),
        "sni_name",
        ILLEGAL,
    ),
    (
        "sni_254_after_strip",
        with_sni([(0, b".".join([b"a" * 63] * 3) + b"." + b"b" * 62 + b".")]),
        "sni_name",
        ILLEGAL,
    ),
    ("sni_non_ascii", with_sni([(0, "bücher.example".encode())]), "sni_name", ILLEGAL),
    ("sni_label_64", with_sni([(0, b"a" * 64 + b".test")]), "sni_name", ILLEGAL),
    ("sni_leading_hyphen", with_sni([(0, b"-a.test")]), "sni_name", ILLEGAL),
    ("sni_trailing_hyphen", with_sni([(0, b"a-.test")]), "sni_name", ILLEGAL),
    ("sni_underscore", with_sni([(0, b"a_b.test")]), "sni_name", ILLEGAL),
    ("sni_empty_label", with_sni([(0, b"a..test")]), "sni_name", ILLEGAL),
    ("sni_leading_dot", with_sni([(0, b".a.test")]), "sni_name", ILLEGAL),
    ("sni_just_a_dot", with_sni([(0, b".")]), "sni_name", ILLEGAL),
    ("sni_two_trailing_dots", with_sni([(0, b"a.test..")]), "sni_name", ILLEGAL),
    ("sni_nul", with_sni([(0, b"a.test\x00.evil")]), "sni_name", ILLEGAL),
    ("sni_space", with_sni([(0, b"a test")]), "sni_name", ILLEGAL),
    ("sni_newline", with_sni([(0, b"a.test\n")]), "sni_name", ILLEGAL),
    ("sni_ipv4_short", with_sni([(0, b"127.1")]), "sni_ip_literal", ILLEGAL),
    ("sni_numeric_tld", with_sni([(0, b"example.123")]), "sni_ip_literal", ILLEGAL),
    ("sni_ipv6_zoned", with_sni([(0, b"fe80::1%eth0")]), "sni_ip_literal", ILLEGAL),
    ("sni_ipv6_bracketed", with_sni([(0, b"[2001:db8::1]")]), "sni_ip_literal", ILLEGAL),
    # ALPN (RFC 7301 3.1)
    ("alpn_no_list_length", with_exts(ext(ALPN, b"\x00")), "alpn", DECODE),
    ("alpn_empty_list", with_exts(ext(ALPN, b"\x00\x00")), "alpn", DECODE),
    ("alpn_empty_name", with_exts(ext(ALPN, alpn_body([b"h2", b""]))), "alpn", DECODE),
    ("alpn_list_length", with_exts(ext(ALPN, b"\x00\x09\x02h2")), "alpn", DECODE),
    ("alpn_name_past_list", with_exts(ext(ALPN, b"\x00\x03\x05h2")), "alpn", DECODE),
]


@pytest.mark.parametrize(("data", "reason", "alert"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_hello_is_refused_with_its_reason_and_alert(
    data: bytes, reason: str, alert: int
) -> None:
    """Each malformed hello is refused with its metric reason and the RFC's alert."""
    assert refused(data) == (reason, alert)


def test_every_reason_is_pinned_by_a_bad_case() -> None:
    """REASONS lists exactly the reasons the bad cases produce: none untested, none unlisted."""
    assert sorted({c[2] for c in BAD}) == sorted(REASONS)
    assert len(set(REASONS)) == len(REASONS)


@pytest.mark.parametrize(("data", "reason", "alert"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_refusal_is_final_and_comes_as_early_as_the_bytes_allow(
    data: bytes, reason: str, alert: int
) -> None:
    """Fed byte by byte, a bad hello asks for more or fails; once it fails every longer
    prefix fails the same way (the shell can stop at the first refusal)."""
    first = None
    for k in range(1, len(data) + 1):
        try:
            got = parse_client_hello(data[:k])
        except HelloError as e:
            if first is None:
                first = k
            assert (e.reason, e.alert) == (reason, alert), k
            continue
        assert first is None, k
        assert isinstance(got, int)
        assert k < got <= MAX_HELLO
    assert first is not None


def test_plain_http_is_refused_at_its_first_byte() -> None:
    """An HTTP request on the HTTPS port costs one byte of parsing: 'G' alone is not TLS."""
    for method in (b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"CONNECT", b"PRI"):
        assert refused(method[:1]) == ("not_tls", UNEXPECTED)


def test_a_record_longer_than_what_was_sent_waits_within_bounds() -> None:
    """A record whose length runs past the bytes sent (a hello that never completes) asks
    for the record's end, no more, and never more than MAX_HELLO: the shell's handshake
    timeout ends it."""
    msg = _hello_msg()
    data = b"\x16\x03\x01" + u16(len(msg)) + msg[:-7]
    assert parse_client_hello(data) == len(msg) + 5


def test_a_dribble_of_tiny_records_costs_a_bounded_number_of_calls() -> None:
    """A hello trickled in 1-byte records is refused after MAX_RECORDS records, so a client
    can make the stateless re-parse walk at most MAX_RECORDS records per call."""
    data = build(Spec(fragments=[1] * 300))
    have = 0
    calls = 0
    with pytest.raises(HelloError) as e:
        while True:
            calls += 1
            got = parse_client_hello(data[:have])
            assert isinstance(got, int)
            have = got
    assert e.value.reason == "record_count"
    assert calls <= 2 * MAX_RECORDS + 2


# --- hypothesis: nothing but HelloError, whatever the bytes ------------------------------------
@_FAST
@given(st.binary(max_size=700), st.integers(0, 700))
def test_random_bytes_raise_nothing_but_hello_error(data: bytes, cut: int) -> None:
    """Any bytes give a Hello, a byte count in (len, MAX_HELLO] or a HelloError (with a
    listed reason), and a refused prefix stays refused the same way."""
    assert violations(data, cut)[1] == []


@_FAST
@given(
    st.sampled_from(
        [b"\x16\x03\x01", b"\x16\x03\x03", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
    ),
    st.binary(max_size=700),
    st.integers(0, 700),
)
def test_random_bytes_behind_a_plausible_header_raise_nothing_but_hello_error(
    head: bytes, data: bytes, cut: int
) -> None:
    """Random bytes after a handshake record header (and a ClientHello header) give a
    Hello, a byte count or a HelloError, never another exception."""
    assert violations(head + data, cut)[1] == []


@_FAST
@given(specs(), MUTATIONS, st.integers(0, 4000))
def test_mutated_hellos_raise_nothing_but_hello_error(spec: Spec, ops: list[Op], cut: int) -> None:
    """A valid hello with bytes set, flipped, inserted, deleted, a length rewritten or a
    slice repeated gives a Hello (with a valid SNI, stable on its own bytes), a byte count
    or a HelloError; a refused prefix stays refused the same way, and a prefix of a Hello
    only asks for more, within it."""
    data = mutate(build(spec), ops)
    assert violations(data, cut)[1] == []


@_FAST
@given(st.randoms(use_true_random=False), st.integers(0, 4000))
def test_hellos_bent_where_the_parser_reads_deepest_raise_nothing_but_hello_error(
    rng: random.Random, cut: int
) -> None:
    """Hellos with near-valid or noisy SNI names and entries, odd ALPN lists, duplicate or
    misplaced extensions, many tiny records or odd versions keep every invariant."""
    assert violations(build(random_bent_spec(rng)), cut)[1] == []


def test_the_invariant_checker_catches_a_parser_that_breaks_them() -> None:
    """hello_check flags a byte count past MAX_HELLO, a non-LDH SNI and a foreign exception
    (so the properties above can fail)."""
    assert judge(b"", MAX_HELLO + 1)[0].invariant == "needed"
    assert judge(b"x" * 9, Hello("a_b", None, False, 9))[0].invariant == "sni"
    assert judge(b"", IndexError("x"))[0].invariant == "exception"


# --- alerts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("alert", "text"),
    [
        (ch.ALERT_UNEXPECTED_MESSAGE, "unexpected message"),
        (ch.ALERT_RECORD_OVERFLOW, "record overflow"),
        (ch.ALERT_HANDSHAKE_FAILURE, "handshake failure"),
        (ch.ALERT_ILLEGAL_PARAMETER, "illegal parameter"),
        (ch.ALERT_DECODE_ERROR, "decode error"),
        (ch.ALERT_PROTOCOL_VERSION, "protocol version"),
        (ch.ALERT_INTERNAL_ERROR, "internal error"),
        (ch.ALERT_UNRECOGNIZED_NAME, "unrecognized name"),
        (ch.ALERT_NO_APPLICATION_PROTOCOL, "no application protocol"),
    ],
)
def test_alert_record_is_read_by_openssl_as_that_alert(alert: int, text: str) -> None:
    """A client that sent its hello and gets alert_record(x) fails with alert x (OpenSSL's
    own reading of the record, through Python's ssl)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="alert.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    incoming.write(alert_record(alert))
    with pytest.raises(ssl.SSLError, match=text):
        obj.do_handshake()


def test_alert_record_bytes() -> None:
    """An alert record is type 21, version 3.3, length 2, level fatal, the description."""
    assert alert_record(50) == b"\x15\x03\x03\x00\x02\x02\x32"
    with pytest.raises(ValueError):
        alert_record(256)


@pytest.mark.parametrize(
    "name", [b"192.0.2.1", b"192.0.2.1.", b"127.0.0.1", b"::1", b"2001:db8::1"]
)
def test_a_well_formed_address_in_the_sni_is_taken_as_no_sni(name: bytes) -> None:
    """An IP address as host_name (RFC 6066 forbids it; wrk sends it): parsed, never used
    as a name: sni is None, as without the extension."""
    hello = parse_client_hello(with_sni([(0, name)]))
    assert isinstance(hello, Hello)
    assert hello.sni is None
