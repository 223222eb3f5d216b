"""The demo's TLS certificates: a throwaway CA and one leaf for the demo's host names.

Owns writing them (ECDSA P-256, `cryptography`) into the demo's temporary folder: the
leaf's chain and key as one PEM in a certs_dir the proxy serves from, the CA alone for
curl's --cacert. Never used outside `edgeproxy demo`: real certificates come from an
operator's certs_dir or the cluster store.
"""

from __future__ import annotations

import datetime as dt
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 7


def write_demo_certs(workdir: str, names: tuple[str, ...]) -> tuple[str, str]:
    """(certs_dir, ca_file): a CA and a leaf covering `names`, valid DAYS days."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeproxy demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    certs_dir = os.path.join(workdir, "certs")
    os.mkdir(certs_dir, 0o700)
    bundle = leaf.public_bytes(pem) + ca.public_bytes(pem)
    bundle += key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(os.path.join(certs_dir, f"{names[0]}.pem"), bundle)
    ca_file = os.path.join(workdir, "demo-ca.pem")
    _write(ca_file, ca.public_bytes(pem))
    return certs_dir, ca_file


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
