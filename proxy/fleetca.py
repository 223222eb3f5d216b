"""The fleet CA: `edgeproxy ca init` and `edgeproxy ca issue` (ECDSA P-256, `cryptography`).

Owns making the CA key and certificate, and node keys and certificates whose
identity is the node id (SAN URI spiffe://edgeproxy/node/<id>, usable as TLS
server and client), written 0600 and atomically (a reload never reads half a
file). Errors say which file and what is wrong. It must not touch a running proxy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.core.fleetid import node_uri

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
NODE_DAYS = 365
MAX_DAYS = 36500
SKEW = dt.timedelta(minutes=5)  # notBefore this far back: peers' clocks differ a little


class FleetCAError(Exception):
    """A CA operation that cannot be done; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Written:
    """What a command wrote (paths), and what it left alone and why."""

    cert: str
    key: str
    ca: str
    notes: tuple[str, ...] = field(default=())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _days(days: int) -> dt.timedelta:
    if not 1 <= days <= MAX_DAYS:
        raise FleetCAError(f"--days must be 1..{MAX_DAYS}, not {days}")
    return dt.timedelta(days=days)


def _key_usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: str, data: bytes) -> None:
    """Write `data` to `path` as mode 0600, atomically (a temporary file renamed over it)."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise FleetCAError(f"{path}: cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FleetCAError(f"{path}: cannot write: {e.strerror}") from None


def _folder(path: str) -> str:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise FleetCAError(f"{path}: cannot create the folder: {e.strerror}") from None
    if not os.path.isdir(path):
        raise FleetCAError(f"{path}: not a folder")
    return path


def init_ca(out: str, days: int = CA_DAYS) -> Written:
    """A new fleet CA in `out` (ca.pem, ca.key); refuses to replace an existing one."""
    life = _days(days)
    _folder(out)
    cert_path, key_path = os.path.join(out, CA_CERT), os.path.join(out, CA_KEY)
    for p in (key_path, cert_path):
        if os.path.lexists(p):
            raise FleetCAError(
                f"{p} exists: refusing to replace a fleet CA (every node certificate it "
                "signed would stop being trusted); remove it, or use another --out"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own, so that another fleet's CA never shares it (a peer then says
    # "unknown CA" rather than "bad signature").
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgeproxy fleet CA {secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + life)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign=False, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Written(cert=cert_path, key=key_path, ca=cert_path)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FleetCAError(f"{path}: cannot read the {what}: {e.strerror}") from None


def load_ca(ca_dir: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in `ca_dir`, checked to belong together and to be a CA."""
    cert_path, key_path = os.path.join(ca_dir, CA_CERT), os.path.join(ca_dir, CA_KEY)
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "CA certificate"))
    except ValueError as e:
        raise FleetCAError(f"{cert_path}: not a PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except (ValueError, TypeError) as e:
        raise FleetCAError(f"{key_path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FleetCAError(f"{key_path}: not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise FleetCAError(f"{key_path}: does not match the certificate {cert_path}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise FleetCAError(f"{cert_path}: not a CA certificate (no basicConstraints CA:TRUE)")
    if cert.not_valid_after_utc <= _now():
        raise FleetCAError(f"{cert_path}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def issue(node_id: str, ca_dir: str, out: str, days: int = NODE_DAYS) -> Written:
    """A key and certificate for node `node_id` in `out` (<id>.key, <id>.pem), and the CA
    certificate beside them (ca.pem) unless one is there. A new issue replaces the node's
    files (rotation: peers trust the CA, not the certificate, so none needs a restart)."""
    try:
        uri = node_uri(node_id)
    except ValueError as e:
        raise FleetCAError(str(e)) from None
    life = _days(days)
    ca_cert, ca_key = load_ca(ca_dir)
    now = _now()
    if now + life > ca_cert.not_valid_after_utc:
        raise FleetCAError(
            f"--days {days} would outlive the CA (valid until "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d}): fewer days, or a new CA"
        )
    _folder(out)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + life)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True, cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(out, f"{node_id}.key"), os.path.join(out, f"{node_id}.pem")
    # The key first: a reader that finds the new certificate finds its key too.
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    ca_path = os.path.join(out, CA_CERT)
    notes: list[str] = []
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if not os.path.lexists(ca_path):
        write_private(ca_path, ca_pem)
    elif not _holds(ca_path, ca_cert):
        notes.append(
            f"{ca_path} exists and does not hold this CA's certificate: left as it is; the "
            "peers' [backhaul] ca must hold it"
        )
    return Written(cert=cert_path, key=key_path, ca=ca_path, notes=tuple(notes))


def _holds(path: str, cert: x509.Certificate) -> bool:
    """Whether the PEM bundle at `path` holds `cert`."""
    try:
        return cert in x509.load_pem_x509_certificates(_read(path, "CA bundle"))
    except (ValueError, FleetCAError):
        return False


def issued_by(cert: x509.Certificate, cas: list[x509.Certificate]) -> bool:
    """Whether one of `cas` signed `cert` (its signature checks out under that CA's key)."""
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False
