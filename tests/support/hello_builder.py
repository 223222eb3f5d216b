"""Builders of TLS ClientHellos as bytes, valid or deliberately bent, and their expected parse.

Owns the wire format the tests and the fuzz bench write (RFC 8446 4.1.2 and 4.2, RFC 5246
6.2, RFC 6066 3, RFC 7301): a `Spec` says what a hello holds, `build` makes its records,
`expected` what proxy.core.clienthello must make of it. Specs come from hypothesis
(`specs()`, shrinking) or a seeded random.Random (`random_spec`, the bench's speed).
It must not parse: the parser under test does.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

from proxy.core.clienthello import Hello

SERVER_NAME = 0
ALPN = 16
PRE_SHARED_KEY = 41
SUPPORTED_VERSIONS = 43
TLS12 = 0x0303
TLS13 = 0x0304

# Extensions a real hello carries besides the four the parser reads (types and a body).
COMMON = (
    (10, bytes.fromhex("000a001d0017001e00190018")),  # supported_groups
    (11, b"\x01\x00"),  # ec_point_formats
    (13, bytes.fromhex("001604030503060308040805080604010501060102010203")),  # sig algs
    (23, b""),  # extended_master_secret
    (35, b""),  # session_ticket
    (45, b"\x01\x01"),  # psk_key_exchange_modes
    (51, b"\x00\x26\x00\x1d\x00\x20" + bytes(range(32))),  # key_share, one X25519 share
    (65281, b"\x00"),  # renegotiation_info
)
GREASE = tuple(0x0A0A + 0x1010 * i for i in range(16))  # RFC 8701
READ = frozenset({SERVER_NAME, ALPN, PRE_SHARED_KEY, SUPPORTED_VERSIONS})


def u8(n: int) -> bytes:
    return struct.pack("!B", n)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u24(n: int) -> bytes:
    return struct.pack("!I", n)[1:]


def ext(etype: int, body: bytes) -> bytes:
    """One extension: type, length, body."""
    return u16(etype) + u16(len(body)) + body


def sni_body(entries: list[tuple[int, bytes]]) -> bytes:
    """A server_name extension body: server_name_list of (name_type, name) entries."""
    lst = b"".join(u8(t) + u16(len(n)) + n for t, n in entries)
    return u16(len(lst)) + lst


def alpn_body(names: list[bytes]) -> bytes:
    lst = b"".join(u8(len(n)) + n for n in names)
    return u16(len(lst)) + lst


def versions_body(versions: list[int]) -> bytes:
    lst = b"".join(u16(v) for v in versions)
    return u8(len(lst)) + lst


@dataclass
class Spec:
    """What one ClientHello holds, from the record layer to its extensions."""

    sni: bytes | None = b"example.test"  # the host_name as sent (None: no server_name)
    alpn: list[bytes] | None = None  # None: no ALPN extension
    versions: list[int] | None = field(default_factory=lambda: [TLS13, TLS12])
    extras: list[tuple[int, bytes]] = field(default_factory=list)  # types not in READ
    order: list[int] | None = None  # a permutation of the extensions (psk stays last)
    psk: bytes | None = None  # a pre_shared_key body: always the last extension
    legacy_version: int = TLS12
    random: bytes = bytes(32)
    session_id: bytes = bytes(32)
    suites: list[int] = field(default_factory=lambda: [0x1301, 0x1302, 0xC02B, 0xC02F])
    compression: bytes = b"\x00"
    ext_block: bool = True  # False: no extension block at all (a bare TLS 1.2 hello)
    record_version: int = 0x0301
    fragments: list[int] = field(default_factory=list)  # record sizes; the rest in one more


def extensions(spec: Spec) -> list[bytes]:
    """The extensions in the order they are sent."""
    out: list[bytes] = []
    if spec.sni is not None:
        out.append(ext(SERVER_NAME, sni_body([(0, spec.sni)])))
    if spec.alpn is not None:
        out.append(ext(ALPN, alpn_body(spec.alpn)))
    if spec.versions is not None:
        out.append(ext(SUPPORTED_VERSIONS, versions_body(spec.versions)))
    out += [ext(t, b) for t, b in spec.extras]
    if spec.order is not None:
        out = [out[i] for i in spec.order]
    if spec.psk is not None:
        out.append(ext(PRE_SHARED_KEY, spec.psk))
    return out


def body(spec: Spec, exts: bytes | None = None) -> bytes:
    """The ClientHello body (after the handshake header); `exts` replaces the block's content."""
    suites = b"".join(u16(s) for s in spec.suites)
    out = (
        u16(spec.legacy_version)
        + spec.random
        + u8(len(spec.session_id))
        + spec.session_id
        + u16(len(suites))
        + suites
        + u8(len(spec.compression))
        + spec.compression
    )
    if not spec.ext_block:
        return out
    block = b"".join(extensions(spec)) if exts is None else exts
    return out + u16(len(block)) + block


def handshake(hello_body: bytes, msg_type: int = 1) -> bytes:
    """A handshake message: type, 24-bit length, body."""
    return u8(msg_type) + u24(len(hello_body)) + hello_body


def records(msg: bytes, fragments: list[int] | None = None, version: int = 0x0301) -> bytes:
    """`msg` as handshake records of the given sizes (the rest in one more record)."""
    out = []
    i = 0
    for size in fragments or []:
        if i >= len(msg):
            break
        out.append(msg[i : i + size])
        i += size
    if i < len(msg):
        out.append(msg[i:])
    return b"".join(b"\x16" + u16(version) + u16(len(f)) + f for f in out)


def build(spec: Spec) -> bytes:
    """The hello's bytes on the wire."""
    return records(handshake(body(spec)), spec.fragments, spec.record_version)


def expected(spec: Spec) -> Hello:
    """What the parser must make of build(spec), for a valid spec."""
    sni = None
    if spec.sni is not None:
        name = spec.sni[:-1] if spec.sni.endswith(b".") else spec.sni
        sni = name.lower().decode("ascii")
    tls13 = spec.versions is not None and TLS13 in spec.versions
    return Hello(
        sni,
        tuple(spec.alpn) if spec.alpn is not None else None,
        tls13 and spec.ext_block,
        len(build(spec)),
    )


# --- valid specs from hypothesis ------------------------------------------------------------
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"


def _recase(draw: Callable[[st.SearchStrategy[Any]], Any], name: bytes) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(
        c ^ 0x20 if f and 0x61 <= c <= 0x7A else c for c, f in zip(name, flips, strict=True)
    )


@st.composite
def host_names(draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """A valid host_name as a client may send it: LDH labels in any case, <= 253 bytes
    (a trailing dot may follow), the last label not all digits."""
    labels = draw(st.lists(st.from_regex(_LABEL, fullmatch=True), min_size=1, max_size=6))
    last = labels[-1]
    if last.isdigit():
        labels[-1] = last + "x"
    name = ".".join(labels)[:253].rstrip(".-")
    # Cutting at 253 may leave a label ending in '-' or an all-digit last label: mend it.
    name = ".".join(lab.strip("-") or "a" for lab in name.split("."))
    if name.rsplit(".", 1)[-1].isdigit():
        name = name[:-1] + "z"
    raw = _recase(draw, name.encode())
    if draw(st.booleans()):
        raw += b"."
    return raw


_ALPN_NAMES = st.one_of(
    st.sampled_from([b"h2", b"http/1.1", b"h3", b"acme-tls/1", b"\x0a\x0a"]),
    st.binary(min_size=1, max_size=255),
)


@st.composite
def specs(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Spec:
    """A valid hello: random SNI, ALPN, versions, extensions in random order, records."""
    versions: list[int] | None = draw(
        st.sampled_from([None, [TLS13, TLS12], [TLS12], [TLS13], [GREASE[3], TLS13, TLS12]])
    )
    n_extra = draw(st.integers(0, 8))
    types = draw(
        st.lists(
            st.integers(1, 0xFFFF).filter(lambda t: t not in READ),
            min_size=n_extra,
            max_size=n_extra,
            unique=True,
        )
    )
    extras = [(t, draw(st.binary(max_size=64))) for t in types]
    if draw(st.booleans()):
        extras += [c for c in COMMON if c[0] not in types]
    spec = Spec(
        sni=draw(st.none() | host_names()),
        alpn=draw(st.none() | st.lists(_ALPN_NAMES, min_size=1, max_size=6)),
        versions=versions,
        extras=extras,
        psk=draw(st.none() | st.binary(min_size=1, max_size=300)),
        legacy_version=draw(st.sampled_from([TLS12, TLS12, 0x0304, 0x03FF])),
        random=draw(st.binary(min_size=32, max_size=32)),
        session_id=draw(st.binary(max_size=32)),
        suites=draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40)),
        compression=draw(st.sampled_from([b"\x00", b"\x01\x00"])),
        record_version=draw(st.sampled_from([0x0301, 0x0302, 0x0303])),
        fragments=draw(st.lists(st.integers(1, 800), max_size=6)),
    )
    count = len(extensions(spec)) - (spec.psk is not None)
    spec.order = draw(st.permutations(range(count)))
    return spec


# --- valid specs from a seeded random.Random (the fuzz bench) -----------------------------
_ALPHA = b"abcdefghijklmnopqrstuvwxyz0123456789"


def random_host(rng: random.Random) -> bytes:
    labels = []
    for _ in range(rng.randint(1, 4)):
        n = rng.choice((1, 3, 8, 20, 63))
        lab = bytes(rng.choice(_ALPHA + b"-" * 4) for _ in range(n))
        lab = lab.strip(b"-") or b"a"
        labels.append(lab)
    if labels[-1].isdigit():
        labels[-1] += b"x"
    name = b".".join(labels)
    if len(name) > 253:
        name = name[:253].rstrip(b".-")
        name = b".".join(lab.strip(b"-") or b"a" for lab in name.split(b"."))
        if name.rsplit(b".", 1)[-1].isdigit():
            name = name[:-1] + b"z"
    name = bytes(c ^ 0x20 if 0x61 <= c <= 0x7A and rng.random() < 0.2 else c for c in name)
    return name + b"." if rng.random() < 0.1 else name


def _rbytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "big") if n else b""


def random_spec(rng: random.Random) -> Spec:
    """A valid hello drawn from `rng` (the same space as specs(), roughly)."""
    types = rng.sample((5, 10, 11, 13, 18, 21, 27, 28, 35, 44, 45, 50, 51), 5)
    extras = [(t, _rbytes(rng, rng.choice((0, 2, 8, 40, 300)))) for t in types]
    extras.append((rng.choice(GREASE), b""))
    spec = Spec(
        sni=random_host(rng) if rng.random() < 0.9 else None,
        alpn=[rng.choice((b"h2", b"http/1.1", b"h3")) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.8
        else None,
        versions=rng.choice((None, [TLS13, TLS12], [TLS12], [TLS13])),
        extras=extras,
        psk=_rbytes(rng, rng.randint(1, 200)) if rng.random() < 0.2 else None,
        random=_rbytes(rng, 32),
        session_id=_rbytes(rng, rng.choice((0, 32))),
        suites=[rng.randrange(0x10000) for _ in range(rng.randint(1, 30))],
        fragments=[rng.randint(1, 400) for _ in range(rng.choice((0, 0, 0, 1, 3)))],
    )
    order = list(range(len(extensions(spec)) - (spec.psk is not None)))
    rng.shuffle(order)
    spec.order = order
    return spec


_TRICKY = b"abcXYZ019-._:*\x00 \x7f\xc3\xbc"


def random_name(rng: random.Random) -> bytes:
    """A host_name that is often almost valid: a valid one with tricky bytes, or noise."""
    if rng.random() < 0.5:
        name = bytearray(random_host(rng))
        for _ in range(rng.randint(1, 3)):
            name[rng.randrange(len(name))] = rng.choice(_TRICKY)
        return bytes(name)
    n = rng.choice((0, 1, 2, 5, 20, 63, 64, 200, 253, 254, 300))
    return bytes(rng.choice(_TRICKY) for _ in range(n))


def random_bent_spec(rng: random.Random) -> Spec:
    """A hello bent where the parser reads deepest: SNI names and entries, ALPN lists,
    duplicate or misplaced extensions, many tiny records, versions, legacy fields."""
    spec = random_spec(rng)
    for _ in range(rng.randint(1, 3)):
        bend = rng.randrange(8)
        if bend == 0:
            spec.sni = random_name(rng)
        elif bend == 1:
            spec.alpn = [
                _rbytes(rng, rng.choice((0, 1, 2, 8, 255))) for _ in range(rng.randint(0, 4))
            ]
        elif bend == 2:
            types = [t for t, _ in spec.extras] + [SERVER_NAME, ALPN, SUPPORTED_VERSIONS]
            spec.extras.append((rng.choice(types), _rbytes(rng, rng.choice((0, 2, 5)))))
        elif bend == 3:
            spec.extras.append((PRE_SHARED_KEY, _rbytes(rng, rng.randint(0, 4))))
        elif bend == 4:
            spec.fragments = [rng.randint(1, 8)] * rng.randint(1, 100)
        elif bend == 5:
            spec.sni = None
            entries = [
                (rng.choice((0, 0, 1, 255)), random_name(rng)) for _ in range(rng.randint(0, 3))
            ]
            spec.extras.append((SERVER_NAME, sni_body(entries)))
        elif bend == 6:
            spec.versions = [rng.choice((TLS12, TLS13, 0x0301, 0x7F1C, rng.randrange(0x10000)))]
            spec.versions *= rng.randint(0, 3)
            spec.legacy_version = rng.choice((0x0300, 0x0301, 0x0302, TLS12, 0x0204))
        else:
            spec.session_id = _rbytes(rng, rng.randint(0, 40))
            spec.compression = _rbytes(rng, rng.randint(0, 3))
            spec.suites = [rng.randrange(0x10000) for _ in range(rng.randint(0, 3))]
    order = list(range(len(extensions(spec)) - (spec.psk is not None)))
    rng.shuffle(order)
    spec.order = order
    return spec


def bare_tls12(spec: Spec | None = None) -> Spec:
    """A hello with no extension block at all (RFC 5246 7.4.1.2)."""
    return replace(spec or Spec(), ext_block=False, sni=None, alpn=None, versions=None)


# --- bent hellos: mutations ------------------------------------------------------------------
OPS = ("set", "flip", "cut", "insert", "delete", "len16", "dup")
Op = tuple[str, int, bytes]


def mutate(data: bytes, ops: list[Op]) -> bytes:
    """Apply (op, position, bytes) edits: set a byte, flip a bit, cut, insert, delete,
    overwrite a 16-bit length, or repeat a slice."""
    for op, at, b in ops:
        i = at % (len(data) + 1)
        if op == "set":
            data = data[:i] + b[:1] + data[i + 1 :]
        elif op == "flip":
            old = data[i] if i < len(data) else 0
            data = data[:i] + bytes([old ^ (1 << (b[0] % 8))]) + data[i + 1 :]
        elif op == "cut":
            data = data[:i]
        elif op == "insert":
            data = data[:i] + b + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + len(b) :]
        elif op == "len16":
            data = data[:i] + b[:2].rjust(2, b"\0") + data[i + 2 :]
        else:
            data = data[:i] + data[i : i + 4 * len(b)] + data[i:]
    return data


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 4000), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=4,
)


def random_mutations(rng: random.Random, size: int) -> list[Op]:
    """1..4 edits at random places of a `size`-byte hello."""
    out = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        out.append(
            (rng.choice(OPS), rng.randrange(size + 1), _rbytes(rng, rng.choice((1, 1, 2, 3, 8))))
        )
    return out
