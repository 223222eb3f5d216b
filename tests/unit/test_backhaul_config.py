"""[backhaul]: the config rules, and the checks of the certificate files (proxy.fleettls)."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from certgen import CA, key_pem

from proxy.config import ConfigError, load, loads
from proxy.fleetca import init_ca, issue
from proxy.fleettls import BackhaulTLSError, client_context, insecure_warning, server_context
from proxy.fleettls import load as load_tls
from proxy.worker import tickets

LISTEN = '[node]\nid = "n1"\n[listen]\nbackhaul = "127.0.0.2:4280"\n'


def test_a_backhaul_listener_needs_certificates_or_insecure() -> None:
    """A backhaul listener with no [backhaul] files is refused, naming both ways out."""
    with pytest.raises(
        ConfigError, match=r"backhaul\.cert: the backhaul listener.*insecure = true"
    ):
        loads(LISTEN)
    c = loads(LISTEN + "[backhaul]\ninsecure = true\n")
    assert c.backhaul.insecure and not c.backhaul.tls
    assert insecure_warning(c) is not None and "127.0.0.2:4280" in (insecure_warning(c) or "")
    assert insecure_warning(loads("")) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('ca = "a"\n', r"backhaul\.cert: required with ca"),
        ('ca = "a"\ncert = "b"\n', r"backhaul\.key: required with ca, cert"),
        ('ca = "a"\ncert = "b"\nkey = "c"\ninsecure = true\n', r"backhaul\.insecure: true with"),
        ('ca = ""\ncert = "b"\nkey = "c"\n', r"backhaul\.ca: must not be empty"),
        ("insecure = 1\n", r"backhaul\.insecure: must be true or false"),
        ("handshake_timeout = 0\n", r"backhaul\.handshake_timeout: must be > 0"),
        ('certs = "x"\n', r"backhaul\.certs: unknown key"),
    ],
)
def test_backhaul_keys_are_checked(body: str, message: str) -> None:
    """All three files or none, not both TLS and insecure, typed values, no unknown key."""
    with pytest.raises(ConfigError, match=message):
        loads("[backhaul]\n" + body)


def test_relative_paths_are_the_config_folders(tmp_path: Path) -> None:
    """A relative file name in [backhaul] is relative to the config file's folder."""
    path = tmp_path / "etc" / "node.toml"
    path.parent.mkdir()
    path.write_text('[backhaul]\nca = "tls/ca.pem"\ncert = "tls/n.pem"\nkey = "/abs/n.key"\n')
    b = load(str(path)).backhaul
    assert (b.ca, b.cert, b.key) == (
        str(tmp_path / "etc" / "tls" / "ca.pem"),
        str(tmp_path / "etc" / "tls" / "n.pem"),
        "/abs/n.key",
    )


def _node(tmp_path: Path, node: str, files: dict[str, str]) -> str:
    body = "".join(f'{k} = "{v}"\n' for k, v in files.items())
    return f'[node]\nid = "{node}"\n[listen]\nbackhaul = "127.0.0.2:4280"\n[backhaul]\n{body}'


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    init_ca(str(tmp_path / "ca"))
    issue("n1", str(tmp_path / "ca"), str(tmp_path / "out"))
    return tmp_path


def _files(d: Path, node: str = "n1") -> dict[str, str]:
    return {
        "ca": str(d / "out/ca.pem"),
        "cert": str(d / f"out/{node}.pem"),
        "key": str(d / f"out/{node}.key"),
    }


def test_good_material_makes_both_contexts(fleet: Path) -> None:
    """Good files: TLS 1.3 only, a peer certificate required both ways, no host name check."""
    m = load_tls(loads(_node(fleet, "n1", _files(fleet))))
    assert m is not None and m.node == "n1"
    server, client = server_context(m), client_context(m)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not client.check_hostname
    assert load_tls(loads("")) is None


def test_bad_material_is_refused_naming_the_file(fleet: Path) -> None:
    """Another node's certificate, a key of another certificate, another CA, a missing file,
    a CA file that holds a leaf: each refused with the key and the file named."""
    issue("n2", str(fleet / "ca"), str(fleet / "out"))
    init_ca(str(fleet / "ca2"))
    files = _files(fleet)
    cases = [
        ({**files, "cert": str(fleet / "out/n2.pem"), "key": str(fleet / "out/n2.key")},
         r"backhaul\.cert: .*n2\.pem: is the certificate of node 'n2'; this node is 'n1'"),
        ({**files, "key": str(fleet / "out/n2.key")},
         r"backhaul\.key: .*n2\.key: does not match the certificate"),
        ({**files, "ca": str(fleet / "ca2/ca.pem")},
         r"backhaul\.cert: .*n1\.pem: was not issued by a CA of"),
        ({**files, "ca": str(fleet / "nope.pem")}, r"backhaul\.ca: .*nope\.pem: No such file"),
        ({**files, "ca": str(fleet / "out/n1.pem")}, r"backhaul\.ca: .* is not a CA certificate"),
        ({**files, "key": str(fleet / "out/n1.pem")}, r"backhaul\.key: .* not an unencrypted PEM"),
    ]  # fmt: skip
    for given, message in cases:
        with pytest.raises(BackhaulTLSError, match=message):
            load_tls(loads(_node(fleet, "n1", given)))


def test_certificates_outside_their_validity_are_refused(tmp_path: Path) -> None:
    """An expired or not yet valid node certificate is a config error (the date is named)."""
    ca = CA.new()
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    now = dt.datetime.now(dt.UTC)
    for name, nb, na, message in (
        ("old", now - dt.timedelta(days=9), now - dt.timedelta(days=1), "expired on"),
        ("new", now + dt.timedelta(days=1), now + dt.timedelta(days=9), "not valid before"),
    ):
        leaf = ca.issue(uris=("spiffe://edgeproxy/node/n1",), not_before=nb, not_after=na,
                        server=True, client=True)  # fmt: skip
        (tmp_path / f"{name}.pem").write_bytes(leaf.chain_pem())
        (tmp_path / f"{name}.key").write_bytes(key_pem(leaf.key))
        files = {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / f"{name}.pem"),
                 "key": str(tmp_path / f"{name}.key")}  # fmt: skip
        with pytest.raises(BackhaulTLSError, match=message):
            load_tls(loads(_node(tmp_path, "n1", files)))


def test_a_certificate_that_cannot_be_a_client_is_refused(tmp_path: Path) -> None:
    """A node certificate without clientAuth could not open connections to peers: refused."""
    ca = CA.new()
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    leaf = ca.issue(uris=("spiffe://edgeproxy/node/n1",), server=True, client=False)
    (tmp_path / "n1.pem").write_bytes(leaf.chain_pem())
    (tmp_path / "n1.key").write_bytes(key_pem(leaf.key))
    files = {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "n1.pem"),
             "key": str(tmp_path / "n1.key")}  # fmt: skip
    with pytest.raises(BackhaulTLSError, match="serverAuth and clientAuth"):
        load_tls(loads(_node(tmp_path, "n1", files)))


def test_the_listener_context_takes_node_wide_ticket_keys(fleet: Path) -> None:
    """The listener's context (a client certificate required) accepts the shared ticket key
    callback, and the secret is bound to the node's key and to the CA file: another CA
    bundle makes another secret, so sessions made under the old trust cannot resume."""
    m = load_tls(loads(_node(fleet, "n1", _files(fleet))))
    assert m is not None and len(m.ticket_secret) == 32
    assert "ticket_secret" not in repr(m)
    ctx = server_context(m)
    assert tickets.install(ctx, tickets.TicketKeys(m.ticket_secret, 3600)), tickets.last_failure()
    init_ca(str(fleet / "ca2"))
    bundle = fleet / "bundle.pem"
    bundle.write_bytes((fleet / "out/ca.pem").read_bytes() + (fleet / "ca2/ca.pem").read_bytes())
    other = load_tls(loads(_node(fleet, "n1", {**_files(fleet), "ca": str(bundle)})))
    assert other is not None and other.ticket_secret != m.ticket_secret
    again = load_tls(loads(_node(fleet, "n1", _files(fleet))))
    assert again is not None and again.ticket_secret == m.ticket_secret
