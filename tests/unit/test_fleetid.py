"""Node identities in certificates, and why a handshake was refused: the sans-io halves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.fleetid import PREFIX, node_of_peercert, node_of_uris, node_uri
from proxy.core.tls_refusal import ENDED_CLOSED, ENDED_SSL, ENDED_TIMEOUT, refusal
from proxy.telemetry.metrics import TLS_REFUSALS

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


@given(ids)
def test_a_node_uri_reads_back_as_its_node(nid: str) -> None:
    """Every id a config accepts makes a URI that reads back as that id, among other names too."""
    uri = node_uri(nid)
    assert node_of_uris([uri]) == nid
    assert node_of_uris(["https://example.test/", uri, "spiffe://other/x"]) == nid


@pytest.mark.parametrize("bad", ["", "-a", "a b", "a/b", ".", "x" * 64, "é"])
def test_node_uri_refuses_what_no_config_holds(bad: str) -> None:
    """Ids a config refuses (empty, leading dash, slash, space, too long, non-ASCII) get no URI."""
    with pytest.raises(ValueError, match="not a valid node id"):
        node_uri(bad)


@pytest.mark.parametrize(
    "uris",
    [
        [],
        ["spiffe://edgeproxy/other/a"],
        [PREFIX + "a", PREFIX + "b"],  # two identities: none
        [PREFIX + "a", PREFIX + "a"],
        [PREFIX],
        [PREFIX + "a/b"],
        [PREFIX + "../a"],
        ["SPIFFE://edgeproxy/node/a"],
    ],
)
def test_no_single_node_name_is_no_node(uris: list[str]) -> None:
    """None, two, an empty or a path-like node name: the certificate names no node."""
    assert node_of_uris(uris) is None


def test_peercert_dict_as_ssl_gives_it() -> None:
    """getpeercert()'s subjectAltName tuples: URI entries count, DNS ones do not."""
    cert = {"subjectAltName": (("DNS", PREFIX + "x"), ("URI", PREFIX + "n3"))}
    assert node_of_peercert(cert) == "n3"
    assert node_of_peercert({"subjectAltName": (("DNS", "n3"),)}) is None
    assert node_of_peercert({}) is None
    assert node_of_peercert(None) is None
    assert node_of_peercert({"subjectAltName": "garbage"}) is None


@pytest.mark.parametrize(
    ("ended", "reason", "code", "want"),
    [
        (ENDED_SSL, "HTTP_REQUEST", None, "plaintext"),
        (ENDED_SSL, "WRONG_VERSION_NUMBER", None, "plaintext"),
        (ENDED_SSL, "UNSUPPORTED_PROTOCOL", None, "protocol"),
        (ENDED_SSL, "PEER_DID_NOT_RETURN_A_CERTIFICATE", None, "no_certificate"),
        (ENDED_SSL, "TLSV13_ALERT_CERTIFICATE_REQUIRED", None, "no_certificate"),
        (ENDED_SSL, "CERTIFICATE_VERIFY_FAILED", 20, "unknown_ca"),
        (ENDED_SSL, "CERTIFICATE_VERIFY_FAILED", 18, "unknown_ca"),
        (ENDED_SSL, "CERTIFICATE_VERIFY_FAILED", 10, "expired"),
        (ENDED_SSL, "CERTIFICATE_VERIFY_FAILED", 9, "expired"),
        (ENDED_SSL, "CERTIFICATE_VERIFY_FAILED", 26, "bad_certificate"),
        (ENDED_SSL, "TLSV1_ALERT_UNKNOWN_CA", None, "unknown_ca"),
        (ENDED_SSL, "SSLV3_ALERT_CERTIFICATE_EXPIRED", None, "expired"),
        (ENDED_SSL, "UNEXPECTED_EOF_WHILE_READING", None, "incomplete"),
        (ENDED_SSL, None, None, "protocol"),
        (ENDED_TIMEOUT, None, None, "timeout"),
        (ENDED_CLOSED, "HTTP_REQUEST", None, "incomplete"),
    ],
)
def test_refusal_reasons(ended: str, reason: str | None, code: int | None, want: str) -> None:
    """What OpenSSL said maps to the refusal reason an operator can act on."""
    assert refusal(ended, reason, code) == want


@given(
    st.sampled_from([ENDED_SSL, ENDED_TIMEOUT, ENDED_CLOSED]),
    st.one_of(st.none(), st.text(max_size=40)),
    st.one_of(st.none(), st.integers(-5, 200)),
)
def test_every_refusal_is_a_metric_label(ended: str, reason: str | None, code: int | None) -> None:
    """Whatever OpenSSL says, the reason is one of the fixed label values of /metrics."""
    assert refusal(ended, reason, code) in TLS_REFUSALS
