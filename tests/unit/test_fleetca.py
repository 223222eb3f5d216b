"""The fleet CA and node certificates: what `edgeproxy ca init` and `ca issue` write."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from proxyctl import REPO, env

from proxy.fleetca import FleetCAError, init_ca, issue, issued_by


def _cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_writes_a_p256_ca_0600(tmp_path: Path) -> None:
    """`ca init` writes an ECDSA P-256 CA certificate and key, mode 0600 whatever the umask."""
    old = os.umask(0)
    try:
        w = init_ca(str(tmp_path / "ca"))
    finally:
        os.umask(old)
    assert _mode(w.cert) == 0o600 and _mode(w.key) == 0o600
    cert = _cert(w.cert)
    key = serialization.load_pem_private_key(Path(w.key).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued_by(cert, [cert])  # self-signed
    assert not [p for p in os.listdir(tmp_path / "ca") if p.endswith(".tmp")]


def test_init_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    """A second `ca init` on the same folder is refused and leaves the first CA as it was."""
    w = init_ca(str(tmp_path))
    before = Path(w.key).read_bytes()
    with pytest.raises(FleetCAError, match="exists: refusing to replace a fleet CA"):
        init_ca(str(tmp_path))
    assert Path(w.key).read_bytes() == before


def test_issue_names_the_node_for_server_and_client(tmp_path: Path) -> None:
    """A node certificate carries exactly the SAN URI spiffe://edgeproxy/node/<id>, both
    serverAuth and clientAuth, is signed by the CA, and its files (and the CA copy) are 0600."""
    init_ca(str(tmp_path / "ca"))
    w = issue("nrt1", str(tmp_path / "ca"), str(tmp_path / "nrt1"), days=30)
    cert, ca = _cert(w.cert), _cert(str(tmp_path / "ca" / "ca.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://edgeproxy/node/nrt1"
    ]
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued_by(cert, [ca])
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= life <= dt.timedelta(days=30, minutes=6)
    assert _cert(w.ca) == ca
    for p in (w.cert, w.key, w.ca):
        assert _mode(p) == 0o600, p


def test_issue_again_rotates_the_node_files(tmp_path: Path) -> None:
    """Issuing a node again replaces its key and certificate (a new serial, the new key)."""
    init_ca(str(tmp_path / "ca"))
    first = issue("n1", str(tmp_path / "ca"), str(tmp_path / "out"))
    serial, key = _cert(first.cert).serial_number, Path(first.key).read_bytes()
    second = issue("n1", str(tmp_path / "ca"), str(tmp_path / "out"))
    assert second.cert == first.cert
    assert _cert(second.cert).serial_number != serial
    assert Path(second.key).read_bytes() != key
    pub = serialization.load_pem_private_key(Path(second.key).read_bytes(), None).public_key()
    assert pub == _cert(second.cert).public_key()


def test_issue_leaves_another_ca_bundle_alone(tmp_path: Path) -> None:
    """An existing ca.pem without this CA (another fleet's) is left as it is; a note says so."""
    init_ca(str(tmp_path / "ca"))
    init_ca(str(tmp_path / "other"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "ca.pem").write_bytes((tmp_path / "other" / "ca.pem").read_bytes())
    w = issue("n1", str(tmp_path / "ca"), str(out))
    assert (out / "ca.pem").read_bytes() == (tmp_path / "other" / "ca.pem").read_bytes()
    assert w.notes and "does not hold this CA's certificate" in w.notes[0]


@pytest.mark.parametrize(
    ("node", "days", "message"),
    [
        ("bad id", 30, "is not a valid node id"),
        ("-lead", 30, "is not a valid node id"),
        ("x" * 64, 30, "is not a valid node id"),
        ("n1", 0, "--days must be 1.."),
        ("n1", 4000, "would outlive the CA"),
    ],
)
def test_issue_refuses_bad_input(tmp_path: Path, node: str, days: int, message: str) -> None:
    """A node id no config holds, 0 days, or past the CA's validity: a clear error, no file."""
    init_ca(str(tmp_path / "ca"), days=3650)
    with pytest.raises(FleetCAError, match=message):
        issue(node, str(tmp_path / "ca"), str(tmp_path / "out"), days=days)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_issue_refuses_a_broken_ca(tmp_path: Path) -> None:
    """A missing CA, a key of another CA, a leaf in place of a CA: the error names the file."""
    with pytest.raises(FleetCAError, match=r"ca\.pem: cannot read the CA certificate"):
        issue("n1", str(tmp_path / "none"), str(tmp_path / "out"))
    init_ca(str(tmp_path / "a"))
    init_ca(str(tmp_path / "b"))
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(FleetCAError, match=r"ca\.key: does not match the certificate"):
        issue("n1", str(tmp_path / "a"), str(tmp_path / "out"))
    leaf = issue("n1", str(tmp_path / "b"), str(tmp_path / "leafca"))
    os.replace(leaf.cert, tmp_path / "leafca" / "ca.pem")
    os.replace(leaf.key, tmp_path / "leafca" / "ca.key")
    with pytest.raises(FleetCAError, match="not a CA certificate"):
        issue("n2", str(tmp_path / "leafca"), str(tmp_path / "out"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "ca", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_commands_as_the_readme_gives_them(tmp_path: Path) -> None:
    """`edgeproxy ca init --out DIR` then `ca issue ID --ca DIR --out DIR --days N` exit 0 and
    print the node's [backhaul] section; a second init exits 1 and says why."""
    r = _cli("init", "--out", str(tmp_path / "ca"))
    assert r.returncode == 0, r.stderr
    r = _cli(
        "issue", "nrt1", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "n"), "--days", "90"
    )
    assert r.returncode == 0, r.stderr
    assert "[backhaul]" in r.stdout
    assert f'cert = "{tmp_path}/n/nrt1.pem"' in r.stdout
    assert f'key = "{tmp_path}/n/nrt1.key"' in r.stdout
    assert f'ca = "{tmp_path}/n/ca.pem"' in r.stdout
    r = _cli("init", "--out", str(tmp_path / "ca"))
    assert r.returncode == 1 and "refusing to replace a fleet CA" in r.stderr
