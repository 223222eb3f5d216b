"""Certificates for tests, made with `cryptography`: a throwaway CA and leaves signed by it.

ECDSA P-256 throughout (what the benchmarks compare against HAProxy with). A leaf's
names go in its subjectAltName (DNS names, and URIs for node identities); validity and
key can be bent to build the bad cases a certificate check must refuse.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class CA:
    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, name: str = "edgeproxy test CA", days: int = 365) -> CA:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(
        self,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        *,
        cn: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
        server: bool = True,
        client: bool = False,
    ) -> Leaf:
        """A leaf signed by this CA; defaults: valid from 5 minutes ago for 30 days."""
        key = key or new_key()
        now = _now()
        name = cn or (dns[0] if dns else uris[0] if uris else "edgeproxy test leaf")
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return Leaf(key, b.sign(self.key, hashes.SHA256()), self)


@dataclass
class Leaf:
    key: PrivateKey
    cert: x509.Certificate
    ca: CA

    def chain_pem(self) -> bytes:
        """The leaf then its issuer: the order a server sends."""
        return cert_pem(self.cert) + self.ca.pem()

    def bundle_pem(self) -> bytes:
        """Chain then key in one PEM: the format of a certificate file or store value."""
        return self.chain_pem() + key_pem(self.key)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.bundle_pem())
        path.chmod(0o600)
        return path
