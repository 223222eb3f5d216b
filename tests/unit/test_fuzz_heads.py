"""A differential fuzzer of the head path against hostile clients and upstreams.

Hostile request heads (tests/support/hostile_heads.py) go through a real httptools parser
into proxy.core.request_head as proxy.worker.client drives it (tests/support/head_check.py);
what the proxy would forward, in each forwarding mode, is read again by httptools and by a
strict line scanner
and checked against the invariants: one request line in origin-form, one Host, one
framing, no hop-by-hop field, forwarding fields as the mode says, ordinary fields
unchanged. Upstream response heads go through ResponseHead the same way. What the fuzzer
found broken is pinned below as explicit regression cases.
"""

from __future__ import annotations

import pytest
from head_check import (
    FRONTS,
    KNOWN,
    MODES,
    Violation,
    check_outcome,
    check_request,
    check_request_bytes,
    check_response,
    check_response_bytes,
    drive,
    drive_response,
)
from hostile_heads import requests, responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.headers import NO_BODY
from proxy.core.request_head import FWD_APPEND, FWD_SET, Front

_FAST = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _new(v: list[Violation]) -> list[Violation]:
    return [x for x in v if x.invariant not in KNOWN]


@_FAST
@given(requests())
def test_forwarded_request_heads_keep_every_invariant(data: bytes) -> None:
    """Whatever a client sends, what the proxy forwards has one request line, one Host, one
    framing, no hop-by-hop field, the mode's forwarding fields and the client's other fields."""
    assert _new(check_outcome(drive(data))) == []


@_FAST
@given(requests(), st.floats(0, 1))
def test_the_outcome_does_not_depend_on_how_reads_cut_the_bytes(data: bytes, at: float) -> None:
    """Fed whole, cut at one point, or byte by byte, the same bytes make the same requests
    forwarded (or the same refusal)."""
    cut = max(1, min(len(data) - 1, int(len(data) * at)))
    _, v = check_request_bytes(data, cut)
    assert [x for x in _new(v) if x.invariant == "split"] == []


@settings(max_examples=600, deadline=None, database=None)
@given(responses())
def test_response_heads_keep_one_framing_and_no_hop_by_hop_field(data: bytes) -> None:
    """Whatever an instance answers, the client's head has one framing that matches the
    proxy's, no hop-by-hop or internal field and the instance's other fields unchanged."""
    _, v = check_response_bytes(data)
    assert _new(v) == []


# --- explicit cases: behaviour the fuzzer pins ------------------------------------------------
def _forwarded(data: bytes) -> list[bytes]:
    out = drive(data)
    assert out.end not in ("refused", "parser", "crash"), out.reason
    assert check_outcome(out) == []
    return [m.head.build(FRONTS[mode]) for m in out.messages for mode in MODES]


def test_connection_cannot_drop_framing_host_or_forwarding_fields() -> None:
    """A Connection token naming Content-Length, Host or X-Forwarded-For drops none of them
    (RFC 9110 7.6.1: the framing and what the proxy sets are not the client's to drop)."""
    data = (
        b"POST / HTTP/1.1\r\nHost: a.example\r\n"
        b"Connection: Content-Length, Host, X-Forwarded-For, X-Custom\r\n"
        b"X-Custom: gone\r\nContent-Length: 3\r\n\r\nabc"
    )
    heads = _forwarded(data)
    assert all(b"\r\nContent-Length: 3\r\n" in h and b"X-Custom" not in h for h in heads)


def test_client_forwarding_fields_are_replaced_for_an_untrusted_client() -> None:
    """FWD_SET: the client's X-Forwarded-*, Forwarded and Via never reach the instance."""
    data = (
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 203.0.113.9\r\n"
        b"Forwarded: for=203.0.113.9\r\nX-Forwarded-Proto: https\r\nVia: 1.1 evil\r\n\r\n"
    )
    out = drive(data)
    head = out.messages[0].head.build(FRONTS[FWD_SET])
    assert b"203.0.113.9" not in head and b"evil" not in head and b"https" not in head
    head = out.messages[0].head.build(FRONTS[FWD_APPEND])
    assert b"X-Forwarded-For: 203.0.113.9, 192.0.2.7\r\n" in head


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 2\r\n\r\nab",
    ],
)
def test_ambiguous_heads_are_refused(data: bytes) -> None:
    """Two framings, a coding the proxy does not decode, two Hosts, userinfo or an upgrade
    with a body: the request is refused, nothing is forwarded (RFC 9112 6.1, 6.3, 3.2)."""
    out = drive(data)
    assert out.end in ("refused", "parser") and out.messages == []


def test_a_refused_upgrade_is_an_ordinary_request_and_the_next_one_follows() -> None:
    """An Upgrade to a protocol not allowed is served as an ordinary request, without
    Connection or Upgrade, and the bytes after its head are the next request."""
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: b\r\n\r\n"
    )
    out = drive(data)
    assert [m.url for m in out.messages] == [b"/", b"/next"]
    assert not out.messages[0].head.tunnel and check_outcome(out) == []


# --- regressions: invariants the fuzzer found broken, fixed since -------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/p#f HTTP/1.1\r\n\r\n",
    ],
)
def test_no_fragment_is_forwarded(data: bytes) -> None:
    """The target the instance receives has no fragment: origin-form is a path and a query."""
    assert check_outcome(drive(data)) == []


def test_an_upgrade_that_names_no_protocol_is_not_granted() -> None:
    """`Upgrade: ,` names no protocol, hence none that [trust] upgrade allows: no tunnel."""
    data = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: ,\r\n\r\n"
    out = drive(data)
    assert out.end != "tunnel" and check_outcome(out) == []


@pytest.mark.parametrize(
    "te",
    [b"chunked, gzip", b"chunked, chunked"],
)
def test_chunked_is_applied_once(te: bytes) -> None:
    """The client's Transfer-Encoding names chunked once, last (RFC 9112 6.1), when an
    instance sent a list in which chunked is not the only final coding."""
    r = drive_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    assert not isinstance(r, str)
    assert check_response(r, False, True, False) == []


@pytest.mark.parametrize("status", [b"204 No Content", b"103 Early Hints"])
def test_no_content_length_on_1xx_or_204(status: bytes) -> None:
    """A 1xx or 204 response reaches the client without Content-Length (RFC 9110 8.6)."""
    r = drive_response(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\n")
    assert not isinstance(r, str)
    assert check_response(r, False, True, False) == []


# --- the checker itself: a planted fault is caught ---------------------------------------------
class _Planted:
    """A RequestHead stand-in whose build() returns a planted head."""

    tunnel = False
    framing = NO_BODY

    def __init__(self, head: bytes) -> None:
        self.head = head

    def build(self, front: Front, extra: bytes = b"") -> bytes:
        return self.head


_GOOD = (
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Custom: 1\r\nX-Forwarded-For: 192.0.2.7\r\n"
    b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: 8080\r\nX-Forwarded-Host: a\r\n"
    b"Via: 1.1 edgeproxy\r\n\r\n"
)


@pytest.mark.parametrize(
    ("planted", "invariant"),
    [
        (_GOOD.replace(b"X-Custom: 1\r\n", b"X-Custom: 1\r\nKeep-Alive: 5\r\n"), "hop-by-hop"),
        (_GOOD.replace(b"Host: a\r\n", b"Host: a\r\nHost: b\r\n"), "one-host"),
        (_GOOD.replace(b"Host: a\r\n", b"Host: a\r\nTransfer-Encoding: chunked\r\n"), "framing"),
        (_GOOD.replace(b"X-Custom: 1", b"X-Custom: 2"), "ordinary-fields"),
        (_GOOD.replace(b"For: 192.0.2.7", b"For: 6.6.6.6"), "forwarding"),
        (_GOOD.replace(b"X-Custom: 1\r\n", b"X-Custom: 1\n"), "well-formed"),
        (_GOOD.replace(b"GET / ", b"GET /#x "), "fragment"),
        (_GOOD.replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1), "request-line"),
    ],
)
def test_the_checker_catches_a_planted_fault(planted: bytes, invariant: str) -> None:
    """A forwarded head with one fault planted in it fails exactly the invariant it breaks."""
    m = drive(b"GET / HTTP/1.1\r\nHost: a\r\nX-Custom: 1\r\n\r\n").messages[0]
    assert check_request(m, FWD_SET) == []
    m.head = _Planted(planted)  # type: ignore[assignment]
    assert invariant in {v.invariant for v in check_request(m, FWD_SET)}
