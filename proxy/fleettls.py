"""The backhaul's TLS material: [backhaul] ca, cert and key read, checked, made into contexts.

Owns what a node's certificate must be (this node's id as its one node URI,
signed by the fleet CA, valid now, its key), and the two contexts built from
it: the listener's (TLS 1.3, a client certificate required) and the one this
node connects to peers with (TLS 1.3, the CA verified, no host name: the node
id is checked instead, by the caller). The master checks the files before a
generation starts (a bad file refuses the reload); each worker builds its
contexts once, at start, so a reload re-reads them. No sockets here.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.config import Config, ConfigError
from proxy.core.fleetid import node_of_uris
from proxy.fleetca import issued_by

MAX_SESSIONS = 4096  # peers whose last TLS session is kept for resumption (per worker)


class BackhaulTLSError(ConfigError):
    """A [backhaul] file that cannot be used: names the key, the file and the problem."""


@dataclass(frozen=True, slots=True)
class Material:
    """This node's checked backhaul credentials (the CA bundle as read, the file paths)."""

    node: str
    ca_pem: str
    cert: str
    key: str
    not_after: dt.datetime
    # The backhaul listener's session ticket secret (see ticket_secret): never printed.
    ticket_secret: bytes = field(default=b"", repr=False)


def _read(config: Config, key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BackhaulTLSError(config.path, f"backhaul.{key}", f"{path}: {e.strerror}") from None


def load(config: Config, now: dt.datetime | None = None) -> Material | None:
    """The checked material, or None when the backhaul is not TLS (insecure, or no
    [backhaul] files); BackhaulTLSError names what is wrong."""
    b = config.backhaul
    if not b.tls:
        return None
    now = now or dt.datetime.now(dt.UTC)

    def fail(key: str, path: str, problem: str) -> BackhaulTLSError:
        return BackhaulTLSError(config.path, f"backhaul.{key}", f"{path}: {problem}")

    ca_raw = _read(config, "ca", b.ca)
    try:
        cas = x509.load_pem_x509_certificates(ca_raw)
    except ValueError:
        cas = []
    if not cas:
        raise fail("ca", b.ca, "no PEM certificate in it")
    for ca in cas:
        try:
            bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise fail("ca", b.ca, f"{ca.subject.rfc4514_string()} is not a CA certificate")

    try:
        leaf = x509.load_pem_x509_certificates(_read(config, "cert", b.cert))[0]
    except ValueError:
        raise fail("cert", b.cert, "no PEM certificate in it") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    node = node_of_uris(uris)
    if node is None:
        raise fail("cert", b.cert, "names no node (one SAN URI spiffe://edgeproxy/node/<id>)")
    if node != config.node.id:
        raise fail(
            "cert", b.cert, f"is the certificate of node {node!r}; this node is {config.node.id!r}"
        )
    if not issued_by(leaf, cas):
        raise fail("cert", b.cert, f"was not issued by a CA of {b.ca}")
    if now < leaf.not_valid_before_utc:
        raise fail(
            "cert", b.cert, f"not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now >= leaf.not_valid_after_utc:
        raise fail("cert", b.cert, f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    } <= set(eku):
        raise fail("cert", b.cert, "must allow both serverAuth and clientAuth (extendedKeyUsage)")

    key_raw = _read(config, "key", b.key)
    try:
        key = serialization.load_pem_private_key(key_raw, password=None)
    except (ValueError, TypeError) as e:
        raise fail("key", b.key, f"not an unencrypted PEM private key ({e})") from None
    if key.public_key() != leaf.public_key():
        raise fail("key", b.key, f"does not match the certificate {b.cert}")
    m = Material(
        node,
        ca_raw.decode("ascii", "replace"),
        b.cert,
        b.key,
        leaf.not_valid_after_utc,
        ticket_secret(key_raw, ca_raw),
    )
    try:
        server_context(m)
        client_context(m)
    except ssl.SSLError as e:  # what cryptography accepted and OpenSSL does not
        raise fail("cert", b.cert, f"OpenSSL refuses it: {e}") from None
    return m


def ticket_secret(key_pem: bytes, ca_pem: bytes) -> bytes:
    """The secret the backhaul listener's session ticket keys derive from (proxy.worker
    .tickets): HKDF-SHA256 of this node's private key, bound to the CA bundle. Every worker
    of every generation reads the same files, so a peer's reconnect resumes whichever
    worker it lands on, and after a reload; a new node key or CA file makes another secret,
    so no session made under the old trust resumes under the new one (a resumed session
    skips the certificate check). The key only feeds a KDF with its own label: nothing
    derived from it reveals it."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_sha256(ca_pem),
        info=b"edgeproxy backhaul session tickets",
    ).derive(key_pem)


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def insecure_warning(config: Config) -> str | None:
    """The warning every start logs when the backhaul is plaintext on purpose."""
    if not config.backhaul.insecure:
        return None
    where = f" on {config.listen.backhaul}" if config.listen.backhaul is not None else ""
    return (
        f"[backhaul] insecure = true: the backhaul{where} is plaintext and unauthenticated; "
        "whoever reaches it reaches every local instance, and requests to peers cross the "
        "network in clear (labs and tests only)"
    )


def _setup(ctx: ssl.SSLContext, m: Material) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # both ends are ours: no older protocol
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=m.ca_pem)
    ctx.load_cert_chain(m.cert, m.key)


def server_context(m: Material) -> ssl.SSLContext:
    """The backhaul listener's: a client certificate of the fleet CA is required (OpenSSL
    also checks its extendedKeyUsage allows clientAuth). Session tickets on (TLS 1.3).
    ALPN h2 and http/1.1 (RFC 7301): a peer that offers neither speaks HTTP/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _setup(ctx, m)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


class PeerContext(ssl.SSLContext):
    """The context this node connects to peers with. Peers are told apart by node id:
    `server_hostname` given to wrap_bio (by loop.start_tls) is the peer's node id, the key
    of its last session, never sent (no SNI: peers are not virtual hosts). That session is
    offered again on the next connection (TLS 1.3 resumption: no certificates, no
    signatures). A session belongs to the context that made it, so one context serves
    every peer of a worker."""

    sessions: dict[str, ssl.SSLObject]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and isinstance(server_hostname, str):
            last = self.sessions.get(server_hostname)
            if last is not None:
                s = last.session
                if s is not None and s.has_ticket:
                    session = s
        return super().wrap_bio(incoming, outgoing, server_side, None, session)

    def remember(self, peer: str, obj: ssl.SSLObject) -> None:
        """`obj` is the newest verified connection to `peer`: resume its session next time
        (its tickets arrive after the handshake, so the session is read when needed)."""
        s = self.sessions
        if len(s) >= MAX_SESSIONS and peer not in s:
            s.clear()
        s[peer] = obj


def client_context(m: Material) -> PeerContext:
    """Connections to peers: the CA verified; host names not checked (the caller checks
    the node id of the certificate against the node it meant to reach)."""
    ctx = PeerContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # before CERT_REQUIRED is set again by _setup
    ctx.sessions = {}
    _setup(ctx, m)
    return ctx
