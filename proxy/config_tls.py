"""The TLS sections of the node configuration: [tls] (the edge's certificates and
tickets) and [backhaul] (mutual TLS between nodes), as proxy.config reads them.

Owns their records, defaults and rules. Like proxy.config, pure: it names files and
checks their presence in the config, never opens them (proxy.fleettls reads them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from proxy.config_reader import HOST_RE, Address, Reader


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certs_dir: str | None = None  # combined PEM files (chain + key), picked up live
    store: bool = False  # also fetch <prefix>certs/<host> from the [cluster] store
    default_host: str | None = None  # the certificate for a ClientHello without SNI
    cache_size: int = 10000  # certificates (SSL contexts) per worker, LRU
    miss_ttl: float = 10.0  # how long a name without a certificate is remembered
    ticket_rotate: float = 3600.0  # session-ticket key period (tickets live two periods)
    max_handshakes: int = 1024  # per worker, in progress at once; accepting pauses past it


@dataclass(frozen=True, slots=True)
class BackhaulConfig:
    """[backhaul]: mutual TLS between nodes (proxy.fleettls reads and checks the files)."""

    ca: str = ""  # PEM: the fleet CA certificate(s) a peer's certificate must chain to
    cert: str = ""  # PEM: this node's certificate (SAN URI spiffe://edgeproxy/node/<id>)
    key: str = ""  # PEM: its private key
    insecure: bool = False  # plaintext, unauthenticated backhaul (labs and tests only)
    handshake_timeout: float = 5.0  # seconds a peer may take to finish its TLS handshake

    @property
    def tls(self) -> bool:
        return bool(self.cert)


def backhaul_section(r: Reader, listener: Address | None) -> BackhaulConfig:
    """[backhaul]: all three files or none; a backhaul listener needs them, or an explicit
    `insecure = true`. Relative paths are relative to the config file's folder."""
    r.check_keys(BackhaulConfig.__slots__)
    insecure = r.get("insecure", bool, False)
    base = os.path.dirname(os.path.abspath(r.path))
    files = {}
    for k in ("ca", "cert", "key"):
        if k in r.data:
            files[k] = os.path.join(base, os.path.expanduser(r.text(k)))
    if files and len(files) != 3:
        missing = [k for k in ("ca", "cert", "key") if k not in files]
        raise r.fail(missing[0], f"required with {', '.join(files)}: ca, cert and key go together")
    if files and insecure:
        raise r.fail("insecure", "true with certificates: mutual TLS or plaintext, choose one")
    if listener is not None and not files and not insecure:
        raise r.fail(
            "cert",
            f"the backhaul listener ({listener}) needs ca, cert and key (mutual TLS "
            "between nodes: `edgeproxy ca --help`), or insecure = true (labs and tests only)",
        )
    return BackhaulConfig(
        ca=files.get("ca", ""),
        cert=files.get("cert", ""),
        key=files.get("key", ""),
        insecure=insecure,
        handshake_timeout=r.positive("handshake_timeout", float, 5.0),
    )


def tls_section(r: Reader, https: tuple[Address, ...]) -> TlsConfig:
    r.check_keys(TlsConfig.__slots__)
    d = TlsConfig()
    certs_dir = r.text("certs_dir") if "certs_dir" in r.data else None
    store = r.get("store", bool, False)
    default_host = None
    if "default_host" in r.data:
        default_host = r.text("default_host").lower().rstrip(".")
        if not HOST_RE.match(default_host) or default_host.startswith("*"):
            raise r.fail("default_host", f"{default_host!r} is not a host name")
    if https and certs_dir is None and not store:
        raise r.fail("certs_dir", "[listen] https needs certificates: set certs_dir or store")
    return TlsConfig(
        certs_dir=certs_dir,
        store=store,
        default_host=default_host,
        cache_size=r.positive("cache_size", int, d.cache_size),
        miss_ttl=r.positive("miss_ttl", float, d.miss_ttl),
        ticket_rotate=r.positive("ticket_rotate", float, d.ticket_rotate),
        max_handshakes=r.positive("max_handshakes", int, d.max_handshakes),
    )
