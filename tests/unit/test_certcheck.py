"""The certificate bundle core: parsing a combined PEM and every check a cached one must pass."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from certgen import CA, Leaf, cert_pem, key_pem, new_key
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.certcheck import (
    MAX_BUNDLE_BYTES,
    REASONS,
    Bundle,
    CertError,
    check,
    covers,
    load_bundle,
    names,
    normalise,
    not_after,
)

UTC = dt.UTC
CA1 = CA.new()
GOOD = CA1.issue(("a.example.com", "*.w.example.com"))


def now() -> float:
    return time.time()


def reason(pem: bytes, name: str = "a.example.com", at: float | None = None) -> str | None:
    """The CertError reason of loading and checking, None when the bundle passes."""
    try:
        check(load_bundle(pem), name, now() if at is None else at)
    except CertError as e:
        assert e.reason in REASONS
        return e.reason
    return None


def intermediate(parent: CA, name: str = "edgeproxy test intermediate") -> CA:
    """A CA signed by `parent` (certgen makes only self-signed ones)."""
    key = new_key()
    t = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(parent.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - dt.timedelta(minutes=5))
        .not_valid_after(t + dt.timedelta(days=20))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(parent.key, hashes.SHA256())
    )
    return CA(key, cert)


# -- the good case ---------------------------------------------------------------------


def test_a_good_bundle_passes_and_reports_its_names_and_end() -> None:
    """A leaf + CA + key bundle passes for its name; names() and not_after() read the leaf."""
    b = load_bundle(GOOD.bundle_pem())
    check(b, "a.example.com", now())
    assert names(b) == ("a.example.com", "*.w.example.com")
    assert not_after(b) == GOOD.cert.not_valid_after_utc.timestamp()  # the CA lives longer
    assert b.leaf.subject == GOOD.cert.subject and len(b.certs) == 2


def test_a_three_certificate_chain_in_order_passes() -> None:
    """leaf, intermediate, root: each issued by the next."""
    inter = intermediate(CA1)
    leaf = inter.issue(("a.example.com",))
    pem = cert_pem(leaf.cert) + inter.pem() + CA1.pem() + key_pem(leaf.key)
    assert reason(pem) is None


def test_not_after_is_the_earliest_of_the_chain() -> None:
    """A chain certificate that ends before the leaf ends the bundle's validity."""
    inter = intermediate(CA1)  # 20 days; the leaf gets 30
    leaf = inter.issue(("a.example.com",))
    b = load_bundle(cert_pem(leaf.cert) + inter.pem() + key_pem(leaf.key))
    assert (
        not_after(b)
        == inter.cert.not_valid_after_utc.timestamp()
        < b.leaf.not_valid_after_utc.timestamp()
    )


def test_the_key_may_come_first_and_text_between_blocks_is_skipped() -> None:
    """Key before the chain, `openssl x509 -text`-like text around blocks: same bundle."""
    pem = (
        b"subject=CN=a.example.com\n" + key_pem(GOOD.key) + b"\nBag Attributes\n" + GOOD.chain_pem()
    )
    b = load_bundle(pem)
    assert b.digest == load_bundle(GOOD.bundle_pem()).digest
    assert b"Bag" not in b.pem and b"subject=" not in b.pem  # canonical: what OpenSSL gets


def test_sec1_keys_and_ec_parameters_blocks_are_accepted() -> None:
    """`openssl ecparam -genkey` output: an EC PARAMETERS block and a SEC1 EC PRIVATE KEY."""
    sec1 = GOOD.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    assert reason(GOOD.chain_pem() + params + sec1) is None


def test_the_canonical_pem_reloads_to_the_same_bundle() -> None:
    """Bundle.pem loads back to the same digest: what was checked is what is served."""
    b = load_bundle(GOOD.bundle_pem())
    assert load_bundle(b.pem).digest == b.digest


# -- poisoning cases ---------------------------------------------------------------------


def test_a_certificate_for_another_name_is_refused() -> None:
    """A valid certificate, but for b.example.com, never serves a.example.com."""
    other = CA1.issue(("b.example.com",))
    assert reason(other.bundle_pem(), "a.example.com") == "name_mismatch"
    assert reason(other.bundle_pem(), "b.example.com") is None


def test_an_expired_leaf_is_refused() -> None:
    """now past the leaf's notAfter: expired, and not a second before it."""
    t = dt.datetime.now(UTC)
    old = CA1.issue(
        ("a.example.com",), not_before=t - dt.timedelta(days=10), not_after=t - dt.timedelta(days=1)
    )
    assert reason(old.bundle_pem()) == "expired"
    alone = cert_pem(old.cert) + key_pem(old.key)  # the CA was not valid yet a day ago
    end = old.cert.not_valid_after_utc.timestamp()
    assert reason(alone, at=end) is None  # RFC 5280: notAfter is inclusive
    assert reason(alone, at=end + 1) == "expired"


def test_a_leaf_not_yet_valid_is_refused() -> None:
    """now before the leaf's notBefore: not_yet_valid."""
    t = dt.datetime.now(UTC)
    future = CA1.issue(("a.example.com",), not_before=t + dt.timedelta(days=1))
    assert reason(future.bundle_pem()) == "not_yet_valid"
    start = future.cert.not_valid_before_utc.timestamp()
    assert reason(future.bundle_pem(), at=start) is None
    assert reason(future.bundle_pem(), at=start - 1) == "not_yet_valid"


def test_an_expired_chain_certificate_is_refused() -> None:
    """The leaf is current but its issuer (second in the chain) has expired."""
    short = CA.new(days=1)
    leaf = short.issue(("a.example.com",))
    two_days = now() + 2 * 86400
    assert leaf.cert.not_valid_after_utc.timestamp() > two_days
    with pytest.raises(CertError, match="chain certificate 1 expired") as e:
        check(load_bundle(leaf.bundle_pem()), "a.example.com", two_days)
    assert e.value.reason == "expired"


def test_a_key_that_is_not_the_leafs_is_refused() -> None:
    """The chain of one leaf with another key: key_mismatch."""
    assert reason(GOOD.chain_pem() + key_pem(new_key())) == "key_mismatch"


def test_a_key_of_another_type_than_the_leafs_is_refused() -> None:
    """An RSA key beside an ECDSA leaf: key_mismatch, not a crash."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert reason(GOOD.chain_pem() + pem) == "key_mismatch"


def test_a_chain_out_of_order_is_refused() -> None:
    """leaf, root, intermediate (the intermediates swapped) is refused as chain_order."""
    inter = intermediate(CA1)
    leaf = inter.issue(("a.example.com",))
    pem = cert_pem(leaf.cert) + CA1.pem() + inter.pem() + key_pem(leaf.key)
    assert reason(pem) == "chain_order"


def test_a_chain_with_the_leaf_not_first_is_refused() -> None:
    """The CA first, then the leaf: chain_order (the first certificate must be the leaf)."""
    pem = CA1.pem() + cert_pem(GOOD.cert) + key_pem(GOOD.key)
    assert reason(pem) == "chain_order"


def test_a_chain_with_another_cas_certificate_is_refused() -> None:
    """A leaf followed by a CA that did not issue it: chain_order."""
    pem = cert_pem(GOOD.cert) + CA.new().pem() + key_pem(GOOD.key)
    assert reason(pem) == "chain_order"


def test_a_forged_issuer_with_the_right_name_is_refused() -> None:
    """A CA certificate with the issuer's name but another key: the signature fails."""
    forged = CA.new(name="edgeproxy test CA")
    assert forged.cert.subject == CA1.cert.subject
    pem = cert_pem(GOOD.cert) + forged.pem() + key_pem(GOOD.key)
    assert reason(pem) == "chain_order"


def test_a_leaf_alone_without_its_issuer_passes() -> None:
    """The chain may stop anywhere (the root is usually left out): one certificate passes."""
    assert reason(cert_pem(GOOD.cert) + key_pem(GOOD.key)) is None


# -- parse errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pem", "want"),
    [
        (b"", "pem_garbage"),
        (b"hello world\n", "pem_garbage"),
        (b"\x00\x01\x02binary", "pem_garbage"),
        (b"-----END CERTIFICATE-----\n", "pem_garbage"),
        (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "pem_garbage"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad_certificate"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "pem_garbage"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n", "pem_garbage"),
    ],
)
def test_garbage_gets_a_stable_reason(pem: bytes, want: str) -> None:
    """Non-PEM input, bad base64, an unexpected or mismatched block: its own reason."""
    assert reason(pem) == want


def test_no_key_two_keys_and_no_certificate() -> None:
    """Exactly one key and at least one certificate."""
    assert reason(GOOD.chain_pem()) == "no_key"
    assert reason(GOOD.bundle_pem() + key_pem(GOOD.key)) == "two_keys"
    assert reason(key_pem(GOOD.key)) == "no_certificate"


def test_an_encrypted_key_is_refused() -> None:
    """A passphrase-protected key cannot be loaded unattended: bad_key."""
    enc = GOOD.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert reason(GOOD.chain_pem() + enc) == "bad_key"
    legacy = GOOD.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert b"Proc-Type" in legacy
    assert reason(GOOD.chain_pem() + legacy) == "bad_key"


def test_a_short_rsa_key_is_refused() -> None:
    """RSA under 2048 bits: weak_key."""
    k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert reason(GOOD.chain_pem() + pem) == "weak_key"


def test_a_bundle_too_large_or_too_long_is_refused() -> None:
    """Past MAX_BUNDLE_BYTES, or more than MAX_CHAIN certificates: too_large."""
    assert reason(GOOD.bundle_pem() + b"\n" * MAX_BUNDLE_BYTES) == "too_large"
    assert reason(GOOD.chain_pem() * 5 + key_pem(GOOD.key)) == "too_large"


def test_every_truncation_is_refused_or_is_the_whole() -> None:
    """Every prefix of a bundle is refused as truncated, keyless or garbage (empty), unless
    only trailing whitespace was cut: a file caught half-written never passes."""
    pem = GOOD.bundle_pem()
    seen = set()
    for cut in range(len(pem)):
        part = pem[:cut]
        try:
            b = load_bundle(part)
        except CertError as e:
            seen.add(e.reason)
            assert e.reason in ("pem_truncated", "no_key", "pem_garbage"), (cut, e)
            assert e.reason != "pem_garbage" or not part.strip(), (cut, e)
            continue
        assert part == pem.rstrip(), cut
        assert b.digest == load_bundle(pem).digest
    assert seen == {"pem_truncated", "no_key", "pem_garbage"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_certerror(data: bytes) -> None:
    """Whatever the bytes, load_bundle returns a Bundle or raises CertError, nothing else."""
    try:
        load_bundle(data)
    except CertError as e:
        assert e.reason in REASONS


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(GOOD.bundle_pem()) - 1), st.integers(0, 255))
def test_a_changed_byte_is_caught_or_harmless(pos: int, value: int) -> None:
    """One byte of a good bundle changed: CertError, or a bundle whose signed leaf and key
    are the original ones (a change in the root's own signature, which nothing here relies
    on, may pass, as may the unused-bits octet of the leaf's signature BIT STRING, which
    cryptography reads leniently); never another exception."""
    pem = bytearray(GOOD.bundle_pem())
    pem[pos] = value
    try:
        b = load_bundle(bytes(pem))
        check(b, "a.example.com", now())
    except CertError as e:
        assert e.reason in REASONS
        return
    good = load_bundle(GOOD.bundle_pem())
    assert b.leaf.tbs_certificate_bytes == good.leaf.tbs_certificate_bytes
    assert b.leaf.signature == good.leaf.signature
    assert key_pem(b.key) == key_pem(good.key)  # type: ignore[arg-type]
    assert b.certs[1].public_key() == good.certs[1].public_key()


# -- names ----------------------------------------------------------------------------------


def test_wildcard_covers_exactly_one_label() -> None:
    """RFC 6125 6.4.3: *.w.example.com covers x.w.example.com only."""
    b = load_bundle(GOOD.bundle_pem())
    assert reason(GOOD.bundle_pem(), "x.w.example.com") is None
    for n in ("w.example.com", "y.x.w.example.com", "xw.example.com", "x.example.com"):
        with pytest.raises(CertError) as e:
            check(b, n, now())
        assert e.value.reason == "name_mismatch", n


def test_names_match_case_insensitively_with_a_trailing_dot() -> None:
    """A.Example.COM. is a.example.com."""
    assert reason(GOOD.bundle_pem(), "A.Example.COM.") is None
    upper = CA1.issue(("B.EXAMPLE.com",))
    assert names(load_bundle(upper.bundle_pem())) == ("b.example.com",)
    assert reason(upper.bundle_pem(), "b.example.com") is None


@pytest.mark.parametrize(
    "san", ["f*.example.com", "*f.example.com", "a.*.example.com", "*.*.example.com", "*", "*.com"]
)
def test_partial_and_broad_wildcards_never_match(san: str) -> None:
    """Partial-label, non-left-most, multi-label and TLD-wide wildcards cover nothing."""
    leaf = CA1.issue((san,))
    b = load_bundle(leaf.bundle_pem())
    assert names(b) == ()
    for n in ("foo.example.com", "a.b.example.com", "example.com", "a.com"):
        with pytest.raises(CertError, match="name_mismatch"):
            check(b, n, now())


def test_cn_is_ignored_when_a_san_exists() -> None:
    """CN x.example.com with a SAN of a.example.com does not cover x.example.com."""
    leaf = CA1.issue(("a.example.com",), cn="x.example.com")
    assert reason(leaf.bundle_pem(), "x.example.com") == "name_mismatch"
    assert reason(leaf.bundle_pem(), "a.example.com") is None


def test_cn_is_used_only_without_a_san() -> None:
    """A leaf with no subjectAltName at all is matched on its CN."""
    leaf = CA1.issue((), cn="cn.example.com")
    b = load_bundle(leaf.bundle_pem())
    assert names(b) == ("cn.example.com",)
    assert reason(leaf.bundle_pem(), "cn.example.com") is None


def test_a_wildcard_key_is_covered_only_by_the_same_wildcard() -> None:
    """Asked for *.w.example.com (a store key), only a *.w.example.com SAN passes."""
    assert reason(GOOD.bundle_pem(), "*.w.example.com") is None
    exact = CA1.issue(("x.w.example.com",))
    assert reason(exact.bundle_pem(), "*.w.example.com") == "name_mismatch"


@pytest.mark.parametrize(
    "bad", ["", ".", "a..b", "-a.com", "a-.com", "a_b.com", "1.2.3.4", "é.com", "a" * 64 + ".com"]
)
def test_names_that_are_not_host_names_match_nothing(bad: str) -> None:
    """Empty, empty labels, bad hyphens, underscores, IP literals, non-ASCII, long labels."""
    assert normalise(bad) is None
    assert reason(GOOD.bundle_pem(), bad) == "name_mismatch"


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
HOST = (
    st.lists(LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda s: not s.split(".")[-1].isdigit())
)


@given(LABEL, HOST.filter(lambda h: "." in h))
def test_wildcard_property_one_label_exactly(first: str, parent: str) -> None:
    """*.P covers L.P for every label L, and never P nor M.L.P."""
    pattern = "*." + parent
    assert normalise(pattern) == pattern
    assert covers(pattern, f"{first}.{parent}")
    assert not covers(pattern, parent)
    assert not covers(pattern, f"x{first}.{first}.{parent}")


@given(HOST, st.data())
def test_exact_names_match_under_any_case(host: str, data: st.DataObject) -> None:
    """An exact SAN covers its name whatever the case, and no other host."""
    flipped = "".join(c.upper() if data.draw(st.booleans()) else c for c in host)
    n = normalise(flipped + data.draw(st.sampled_from(["", "."])))
    assert n == host
    assert covers(host, n)
    other = data.draw(HOST)
    assert covers(host, other) == (other == host)


def test_reasons_are_unique_labels() -> None:
    """REASONS is a set of distinct snake_case labels (metric label values)."""
    assert len(set(REASONS)) == len(REASONS)
    assert all(r.replace("_", "").isalpha() and r.islower() for r in REASONS)


def test_a_bundle_is_immutable() -> None:
    """Bundle is frozen: a checked bundle cannot be changed after its check."""
    b = load_bundle(GOOD.bundle_pem())
    with pytest.raises(AttributeError):
        b.pem = b""  # type: ignore[misc]
    assert isinstance(b, Bundle)


def test_leaf_helper_is_what_the_tests_think() -> None:
    """certgen's bundle is leaf, CA, key (the order the tests above rely on)."""
    assert isinstance(GOOD, Leaf)
    b = load_bundle(GOOD.bundle_pem())
    assert b.certs[1].subject == CA1.cert.subject
