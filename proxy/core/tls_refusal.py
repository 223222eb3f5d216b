"""Why a TLS handshake failed, in words a metric label and an operator can use.

Owns the mapping from what OpenSSL reported (its reason code, the X.509 verify
code of a certificate it refused, or how the connection ended) to one fixed
refusal reason (proxy.telemetry.metrics TLS_REFUSALS). Sans-io: strings and
ints in, a reason out; it must not decide anything about the connection.
"""

from __future__ import annotations

from typing import Final

# How a handshake ended when OpenSSL did not say why.
ENDED_SSL: Final = "ssl"  # an ssl.SSLError: `reason` and maybe `verify_code` say more
ENDED_TIMEOUT: Final = "timeout"
ENDED_CLOSED: Final = "closed"  # the peer closed or reset the connection mid-handshake

# X.509 verify codes (OpenSSL x509_vfy.h): the chain does not end at a CA we trust.
_UNKNOWN_CA: Final = frozenset(
    {
        2,  # UNABLE_TO_GET_ISSUER_CERT
        18,  # DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # SELF_SIGNED_CERT_IN_CHAIN
        20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)
_EXPIRED: Final = frozenset({9, 10})  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED

# OpenSSL reason codes (as ssl.SSLError.reason names them).
_REASONS: Final = {
    # Not TLS at all: an HTTP request, or bytes that are no TLS record.
    "HTTP_REQUEST": "plaintext",
    "HTTPS_PROXY_REQUEST": "plaintext",
    "WRONG_VERSION_NUMBER": "plaintext",
    "UNKNOWN_PROTOCOL": "plaintext",
    "PACKET_LENGTH_TOO_LONG": "plaintext",
    "RECORD_LAYER_FAILURE": "plaintext",
    "LENGTH_TOO_SHORT": "plaintext",
    # TLS, but nothing in common (an older version, no shared group or cipher).
    "UNSUPPORTED_PROTOCOL": "protocol",
    "NO_PROTOCOLS_AVAILABLE": "protocol",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol",
    "NO_SHARED_CIPHER": "protocol",
    "NO_SUITABLE_KEY_SHARE": "protocol",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "protocol",
    "TLSV1_ALERT_DECODE_ERROR": "protocol",
    "DECODE_ERROR": "protocol",
    "UNEXPECTED_MESSAGE": "protocol",
    "SSLV3_ALERT_UNEXPECTED_MESSAGE": "protocol",
    # The client sent no certificate (server side), or the server said one was required.
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_certificate",
    # The other side refused ours, and said why.
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "bad_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "bad_certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "bad_certificate",
    # The connection ended inside the handshake.
    "UNEXPECTED_EOF_WHILE_READING": "incomplete",
    "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL": "incomplete",
}


def refusal(ended: str, reason: str | None = None, verify_code: int | None = None) -> str:
    """The refusal reason of a failed handshake (one of metrics.TLS_REFUSALS)."""
    if ended == ENDED_TIMEOUT:
        return "timeout"
    if ended == ENDED_CLOSED:
        return "incomplete"
    if verify_code is not None and verify_code != 0:
        if verify_code in _EXPIRED:
            return "expired"
        if verify_code in _UNKNOWN_CA:
            return "unknown_ca"
        return "bad_certificate"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return "bad_certificate"
    return _REASONS.get(reason or "", "protocol")
