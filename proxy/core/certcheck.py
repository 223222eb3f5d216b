"""Certificate bundles: parse a combined PEM and decide whether it may serve a name now.

Owns the bundle format (a certificate chain, leaf first, and exactly one private key, in
one PEM), the name rules (SAN dNSName, exact or an RFC 6125 6.4.3 one-label wildcard) and
the checks a cached certificate must pass (name, dates, key match, chain order). It must
not do I/O, read a clock or touch `ssl`: bytes and `now` in, a Bundle or a CertError out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

# Why a bundle was refused; stable strings, used as metric labels (a bounded set).
REASONS: Final = (
    "too_large",  # over MAX_BUNDLE_BYTES, or more than MAX_CHAIN certificates
    "pem_garbage",  # not PEM: binary bytes, bad base64, an unexpected or unmatched block
    "pem_truncated",  # a BEGIN line without its END (a file cut short)
    "no_certificate",
    "no_key",
    "two_keys",
    "bad_certificate",  # a CERTIFICATE block that is not an X.509 certificate
    "bad_key",  # a key that does not decode, is encrypted, or is of a type TLS cannot use
    "weak_key",  # RSA under 2048 bits
    "name_mismatch",  # the leaf does not cover the name
    "not_yet_valid",  # now is before a notBefore of the chain
    "expired",  # now is after a notAfter of the chain
    "key_mismatch",  # the private key is not the leaf's
    "chain_order",  # a certificate is not directly issued by the next one
    "tls_refused",  # OpenSSL would not load it (e.g. a digest its security level refuses)
)

MAX_BUNDLE_BYTES: Final = 64 * 1024  # a leaf, three RSA-4096 intermediates and a key fit
MAX_CHAIN: Final = 8
MIN_RSA_BITS: Final = 2048

_CERT_LABEL: Final = b"CERTIFICATE"
_KEY_LABELS: Final = frozenset(
    (b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY", b"ENCRYPTED PRIVATE KEY")
)
_IGNORED_LABELS: Final = frozenset((b"EC PARAMETERS",))  # `openssl ecparam -genkey` writes it
_EC_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_LDH: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
# Printable ASCII plus TAB, CR, LF: what may stand between blocks (RFC 7468 5.2 text)
_TEXT: Final = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CertError(Exception):
    """A bundle refused; `reason` is one of REASONS, the message says what and where."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True, eq=False)
class Bundle:
    """A parsed bundle. `pem` is its canonical form (the chain then the key, PKCS#8): what
    was parsed and checked is exactly what OpenSSL is given, no stray block or text."""

    certs: tuple[x509.Certificate, ...]
    key: PrivateKey
    pem: bytes
    names: tuple[str, ...]  # the DNS names the leaf covers, lower-case (wildcards as "*.x")
    not_before: float  # the latest notBefore of the chain: valid from then
    not_after: float  # the earliest notAfter of the chain: valid until then
    digest: str  # sha256 of `pem`: the same digest, the same certificate and key

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]


# -- parsing --------------------------------------------------------------------------


def _blocks(pem: bytes) -> list[tuple[bytes, bytes]]:
    """(label, DER) of every PEM block, in order; text between blocks is skipped.

    A file cut short (a BEGIN without its END, or a last line cut inside a boundary) is
    `pem_truncated`; anything else that is not PEM is `pem_garbage`.
    """
    if not _TEXT.issuperset(pem):
        raise CertError("pem_garbage", "binary bytes (not a PEM file)")
    out: list[tuple[bytes, bytes]] = []
    label: bytes | None = None
    body: list[bytes] = []
    lines = pem.splitlines()
    cut = bool(pem) and pem[-1:] not in b"\r\n"  # the last line has no end: maybe cut

    def bad(line_no: int, what: str) -> CertError:
        if cut and line_no == len(lines) - 1:
            return CertError("pem_truncated", f"the last line is cut short: {what}")
        return CertError("pem_garbage", what)

    for n, raw in enumerate(lines):
        line = raw.strip()
        if label is None:
            if line.startswith(b"-----BEGIN ") and line.endswith(b"-----") and len(line) > 16:
                label, body = line[11:-5], []
            elif line.startswith(b"-----"):
                raise bad(n, f"{line[:40]!r} outside a block")
            elif cut and n == len(lines) - 1 and line and b"-----BEGIN ".startswith(line):
                raise bad(n, f"{line!r}")
            continue
        if line == b"-----END " + label + b"-----":
            try:
                der = base64.b64decode(b"".join(body), validate=True)
            except binascii.Error:
                raise CertError("pem_garbage", f"bad base64 in a {label.decode()} block") from None
            out.append((label, der))
            label = None
        elif line.startswith(b"-----BEGIN "):
            raise CertError("pem_truncated", f"a {label.decode()} block without its END")
        elif line.startswith(b"-----"):
            raise bad(n, f"{line[:40]!r} inside a {label.decode()} block")
        elif b":" in line:  # RFC 1421 headers: only legacy encrypted keys carry them
            if label in _KEY_LABELS:
                raise CertError("bad_key", "an encrypted private key (Proc-Type header)")
            raise bad(n, f"a header line in a {label.decode()} block")
        else:
            body.append(line)
    if label is not None:
        raise CertError("pem_truncated", f"a {label.decode()} block without its END")
    if not out:
        raise CertError("pem_garbage", "no PEM block")
    return out


def _load_key(label: bytes, der: bytes) -> PrivateKey:
    if label == b"ENCRYPTED PRIVATE KEY":
        raise CertError("bad_key", "an encrypted private key")
    text = base64.encodebytes(der)
    block = b"-----BEGIN " + label + b"-----\n" + text + b"-----END " + label + b"-----\n"
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertError("bad_key", f"{label.decode()}: {e}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise CertError("bad_key", f"EC curve {key.curve.name} (P-256/384/521 only)")
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertError("weak_key", f"RSA {key.key_size} bits (< {MIN_RSA_BITS})")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise CertError("bad_key", f"a {type(key).__name__} cannot sign a TLS handshake")


def load_bundle(pem: bytes) -> Bundle:
    """Parse a combined PEM: certificates (leaf first) and exactly one private key.

    The key may stand before, between or after the certificates; certificates keep their
    order. Nothing here depends on a name or on the time: see `check`.
    """
    if len(pem) > MAX_BUNDLE_BYTES:
        raise CertError("too_large", f"{len(pem)} bytes (> {MAX_BUNDLE_BYTES})")
    certs: list[x509.Certificate] = []
    keys: list[tuple[bytes, bytes]] = []
    for label, der in _blocks(pem):
        if label == _CERT_LABEL:
            try:  # the warning is raised only where warnings are errors (the tests);
                # elsewhere it is printed and the serial check below refuses its case
                cert = x509.load_der_x509_certificate(der)
            except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning) as e:
                raise CertError("bad_certificate", f"certificate {len(certs)}: {e}") from None
            if cert.serial_number <= 0:  # RFC 5280 4.1.2.2; cryptography will refuse it too
                raise CertError("bad_certificate", f"certificate {len(certs)}: serial <= 0")
            certs.append(cert)
        elif label in _KEY_LABELS:
            keys.append((label, der))
        elif label not in _IGNORED_LABELS:
            raise CertError("pem_garbage", f"an unexpected {label[:40].decode()} block")
    if not certs:
        raise CertError("no_certificate", "no CERTIFICATE block")
    if len(certs) > MAX_CHAIN:
        raise CertError("too_large", f"{len(certs)} certificates (> {MAX_CHAIN})")
    if not keys:
        raise CertError("no_key", "no private key block")
    if len(keys) > 1:
        raise CertError("two_keys", f"{len(keys)} private keys")
    key = _load_key(*keys[0])
    try:
        names = _names_of(certs[0])
        not_before = max(c.not_valid_before_utc.timestamp() for c in certs)
        not_after = min(c.not_valid_after_utc.timestamp() for c in certs)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        # a malformed extension is only decoded when read
        raise CertError("bad_certificate", f"leaf: {e}") from None
    canonical = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    canonical += key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    digest = hashlib.sha256(canonical).hexdigest()
    return Bundle(tuple(certs), key, canonical, names, not_before, not_after, digest)


# -- names ------------------------------------------------------------------------------


def normalise(name: str) -> str | None:
    """`name` lower-cased without one trailing dot, if it is a DNS host name (LDH labels,
    not an IP literal) or a one-label wildcard of one ("*.example.com"); else None."""
    if not name.isascii():
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if labels[0] == "*":
        if len(labels) < 3:  # "*.com" would cover a whole TLD
            return None
        labels = labels[1:]
    for label in labels:
        raw = label.encode()
        if not 0 < len(raw) <= 63 or not _LDH.issuperset(raw):
            return None
        if raw[0] == 0x2D or raw[-1] == 0x2D:  # no leading or trailing hyphen
            return None
    if labels[-1].isdigit():  # an IPv4 literal, or a numeric TLD: not a host name
        return None
    return name


def _names_of(leaf: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a leaf covers: its SAN dNSNames; its CN only when it has no SAN."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        raw = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        raw = [
            a.value
            for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    out: list[str] = []
    for r in raw:
        n = normalise(r)
        if n is not None and n not in out:
            out.append(n)
    return tuple(out)


def covers(pattern: str, name: str) -> bool:
    """Whether a normalised presented name (`pattern`) covers a normalised reference name.

    Exact, or RFC 6125 6.4.3: a `*` that is the whole left-most label stands for exactly
    one label (`*.example.com` covers `a.example.com`, not `example.com` nor
    `a.b.example.com`). A wildcard name asked for (a store key) is covered only by the
    same wildcard. Partial-label wildcards (`f*.example.com`) never match: `normalise`
    refuses them.
    """
    if pattern == name:
        return True
    if not pattern.startswith("*.") or name.startswith("*."):
        return False
    first, dot, parent = name.partition(".")
    return bool(dot) and bool(first) and parent == pattern[2:]


def names(bundle: Bundle) -> tuple[str, ...]:
    """The DNS names the bundle's leaf covers (SAN dNSNames, else its CN), lower-case."""
    return bundle.names


def not_after(bundle: Bundle) -> float:
    """When the bundle stops passing `check`: the earliest notAfter of its chain (Unix time)."""
    return bundle.not_after


# -- checks -------------------------------------------------------------------------------


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _where(i: int) -> str:
    return "leaf" if i == 0 else f"chain certificate {i}"


def check(bundle: Bundle, name: str, now: float) -> None:
    """Raise CertError unless the bundle may serve `name` at `now` (Unix time).

    In order: each certificate is directly issued by the next (issuer name and signature:
    a misordered file says so first); the key is the leaf's; the leaf covers the name; now
    is inside notBefore..notAfter (inclusive, RFC 5280 4.1.2.5) of every certificate.
    """
    for i in range(len(bundle.certs) - 1):
        child, issuer = bundle.certs[i], bundle.certs[i + 1]
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
            detail = str(e) or type(e).__name__
            raise CertError(
                "chain_order", f"{_where(i)} is not issued by certificate {i + 1}: {detail}"
            ) from None
    try:  # any key type: SubjectPublicKeyInfo DER compares them all
        leaf_spki = bundle.leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm):
        raise CertError("key_mismatch", "the leaf's public key cannot be read") from None
    if leaf_spki != _spki(bundle.key.public_key()):
        raise CertError("key_mismatch", "the private key is not the leaf's")
    asked = normalise(name)
    if asked is None:
        raise CertError("name_mismatch", f"{name[:80]!r} is not a DNS host name")
    if not any(covers(p, asked) for p in bundle.names):
        raise CertError("name_mismatch", f"{asked} not in {list(bundle.names)[:8]}")
    for i, c in enumerate(bundle.certs):
        if now < c.not_valid_before_utc.timestamp():
            raise CertError("not_yet_valid", f"{_where(i)} valid from {c.not_valid_before_utc}")
        if now > c.not_valid_after_utc.timestamp():
            raise CertError("expired", f"{_where(i)} expired at {c.not_valid_after_utc}")
