"""Host name -> app lookup, shared by the static routes and the table reader.

Owns the matching rule: an exact host first, else one wildcard for the leftmost
label (`*.example.test` covers `a.example.test`, not `example.test` nor
`a.b.example.test`; RFC 6125 6.4.3 and nginx's `*.` server_name). Two dict
lookups at most per request. It must not validate patterns (the config does).
"""

from __future__ import annotations

from collections.abc import Mapping


def app_for_host(hosts: Mapping[str, str], host: str) -> str | None:
    """The app of `host` (lower-case, no port) in `hosts` (host or `*.`pattern -> app).

    An exact entry always wins over a wildcard. A host that is itself a pattern
    (`*.x.y` sent by a client) matches nothing: it names no real host.
    """
    app = hosts.get(host)
    if app is None:
        dot = host.find(".")
        if dot > 0:  # the leftmost label is not empty
            return hosts.get("*" + host[dot:])
        return None
    return app if host[0] != "*" else None
