"""A node's identity in the fleet's certificates: the SAN URI spiffe://edgeproxy/node/<id>.

Owns the URI's form and reading it back, from the subjectAltName entries of a
certificate (as ssl's getpeercert() or cryptography give them). Sans-io: no
ssl, no files; it must not decide what a mismatch costs (the shells refuse).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

PREFIX: Final = "spiffe://edgeproxy/node/"
# A node id as [node] id allows it (proxy.config): also a valid SPIFFE path segment
# (letters, digits, . _ -; never "." or ".." since it starts with a letter or digit).
_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def node_uri(node_id: str) -> str:
    """The SAN URI naming `node_id`; ValueError for an id a config could not hold."""
    if not _ID_RE.match(node_id):
        raise ValueError(f"{node_id!r} is not a valid node id (letters, digits, _ . -; <= 63)")
    return PREFIX + node_id


def node_of_uris(uris: Iterable[str]) -> str | None:
    """The node a certificate names, from its SAN URIs: exactly one node URI with a valid
    id, else None (none, two, or a malformed one: an identity that is not one node)."""
    found: str | None = None
    for uri in uris:
        if not uri.startswith(PREFIX):
            continue
        nid = uri[len(PREFIX) :]
        if found is not None or not _ID_RE.match(nid):
            return None
        found = nid
    return found


def node_of_peercert(peercert: Mapping[str, Any] | None) -> str | None:
    """`node_of_uris` over the URI entries of ssl.SSLObject.getpeercert()'s dict."""
    if not peercert:
        return None
    sans = peercert.get("subjectAltName", ())
    uris = []
    for entry in sans if isinstance(sans, tuple | list) else ():
        if isinstance(entry, tuple | list) and len(entry) == 2 and entry[0] == "URI":
            uris.append(str(entry[1]))
    return node_of_uris(uris)
