"""Why a certificate bundle was refused (proxy.core.certcheck): stable metric labels.

Apart from certcheck so that the metrics (and every process that renders them) know the
labels without importing `cryptography`, which only the TLS paths need.
"""

from __future__ import annotations

from typing import Final

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
