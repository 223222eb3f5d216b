"""[backhaul] at start and on reload: missing certificates, insecure mode, bad files, a new CA."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from backhaul_nodes import BackhaulNode, client_context, talk, wait_for
from fleet_certs import FleetCerts
from proxyctl import REPO, Proxy, env, stop_proxies
from routing_fleet import Instance

from proxy.fleetca import init_ca, issue

pytestmark = [pytest.mark.timeout(90), pytest.mark.request_path]

REQUEST = (
    b"GET / HTTP/1.1\r\nHost: hello.test\r\nX-Edgeproxy-Instance: hello-n3\r\n"
    b"Connection: close\r\n\r\n"
)


@pytest.fixture
def instance() -> Iterator[Instance]:
    i = Instance(3)
    yield i
    i.stop()


@pytest.fixture
def started() -> Iterator[list[Proxy]]:
    out: list[Proxy] = []
    yield out
    stop_proxies(out)


def _node(instance: Instance, backhaul: dict[str, object]) -> BackhaulNode:
    return BackhaulNode(
        "n3", "127.0.0.3", backhaul, instances=[{"id": "hello-n3", "address": instance.address}]
    )


def _run(cfg: BackhaulNode, where: Path) -> subprocess.CompletedProcess[str]:
    path = where / "n3.toml"
    path.write_text(cfg.render())
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(path)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_backhaul_listener_without_certificates_does_not_start(
    tmp_path: Path, instance: Instance
) -> None:
    """No [backhaul] files, no insecure: `edgeproxy run` exits 2 naming the key and the ways out."""
    r = _run(_node(instance, {}), tmp_path)
    assert r.returncode == 2, r
    assert "backhaul.cert: the backhaul listener" in r.stderr
    assert "insecure = true" in r.stderr and "edgeproxy ca" in r.stderr


def test_a_certificate_of_another_node_does_not_start(tmp_path: Path, instance: Instance) -> None:
    """Node n3 given n2's certificate: exit 2, the file and both node ids named."""
    certs = FleetCerts(tmp_path)
    r = _run(_node(instance, certs.backhaul_keys("n2")), tmp_path)
    assert r.returncode == 2, r
    assert "backhaul.cert:" in r.stderr and "n2.pem" in r.stderr
    assert "node 'n2'; this node is 'n3'" in r.stderr


def test_insecure_warns_at_every_start_and_serves_plaintext(
    tmp_path: Path, instance: Instance, started: list[Proxy]
) -> None:
    """insecure = true: the master warns at start and at each reload, and the listener takes
    plaintext requests naming an instance (the lab behaviour it asks for)."""
    cfg = _node(instance, {"insecure": True})
    p = Proxy(cfg, tmp_path)  # type: ignore[arg-type]
    started.append(p)
    assert p.stderr().count("[backhaul] insecure = true") == 1
    got = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, None, REQUEST)
    assert got.data.startswith(b"HTTP/1.1 200"), got
    r = p.cli("reload")
    assert r.returncode == 0, r.stderr
    wait_for("a second warning", lambda: p.stderr().count("[backhaul] insecure = true") == 2)


def test_bad_files_refuse_the_reload_and_the_old_generation_serves(
    tmp_path: Path, instance: Instance, started: list[Proxy]
) -> None:
    """A certificate file replaced by garbage: the reload is refused naming the file, and the
    running generation keeps serving mutual TLS with what it read at its start."""
    certs = FleetCerts(tmp_path)
    keys = certs.backhaul_keys("n3")
    cfg = _node(instance, keys)
    p = Proxy(cfg, tmp_path)  # type: ignore[arg-type]
    started.append(p)
    n2 = client_context(certs.backhaul_keys("n2")["cert"], certs.backhaul_keys("n2")["key"])
    before = p.status()["master"]["generation"]
    Path(keys["cert"]).write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    r = p.cli("reload")
    assert r.returncode != 0
    assert "backhaul.cert" in r.stderr and "n3.pem" in r.stderr, r.stderr
    assert p.status()["master"]["generation"] == before
    got = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, n2, REQUEST)
    assert got.data.startswith(b"HTTP/1.1 200"), got


def test_a_new_ca_is_read_on_reload(
    tmp_path: Path, instance: Instance, started: list[Proxy]
) -> None:
    """The CA file is re-read on reload: after n3 moves to a new fleet CA (its certificate
    re-issued by it, ca.pem holding only it), a peer of the old CA is refused and one of
    the new CA is served, without a restart."""
    certs = FleetCerts(tmp_path)
    keys = certs.backhaul_keys("n3")
    cfg = _node(instance, keys)
    p = Proxy(cfg, tmp_path)  # type: ignore[arg-type]
    started.append(p)
    old = client_context(certs.backhaul_keys("n2")["cert"], certs.backhaul_keys("n2")["key"])
    first = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, old, REQUEST)
    assert first.data.startswith(b"HTTP/1.1 200") and first.session is not None
    init_ca(str(tmp_path / "ca2"))
    issue("n3", str(tmp_path / "ca2"), str(tmp_path / "certs"))  # n3's files, rotated
    Path(keys["ca"]).write_bytes((tmp_path / "ca2" / "ca.pem").read_bytes())
    new2 = issue("n2", str(tmp_path / "ca2"), str(tmp_path / "certs2"))
    r = p.cli("reload")
    assert r.returncode == 0, r.stderr
    got = talk("127.0.0.12", "127.0.0.3", cfg.backhaul_port, old, REQUEST)
    assert b"HTTP/" not in got.data, got
    # Nor may a session made under the old CA resume (a resumption skips the certificate).
    got = talk("127.0.0.13", "127.0.0.3", cfg.backhaul_port, old, REQUEST, session=first.session)
    assert not got.resumed and b"HTTP/" not in got.data, got
    series = 'edgeproxy_backhaul_tls_refused_total{side="accept",reason="unknown_ca"}'
    assert p.wait_metric(series, 2) == 2
    new = client_context(new2.cert, new2.key)
    got = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, new, REQUEST)
    assert got.data.startswith(b"HTTP/1.1 200"), got


def test_sessions_resume_on_any_worker_and_across_a_reload(
    tmp_path: Path, instance: Instance, started: list[Proxy]
) -> None:
    """With two workers on n3, eight reconnects in a row each resume the last session, on
    whichever worker accepts them (one ticket key for the node), and so does one after a
    reload (the same files: the same key). Per-worker keys would fail about half of them."""
    certs = FleetCerts(tmp_path)
    cfg = _node(instance, certs.backhaul_keys("n3"))
    cfg.workers = 2
    p = Proxy(cfg, tmp_path)  # type: ignore[arg-type]
    started.append(p)
    n2 = client_context(certs.backhaul_keys("n2")["cert"], certs.backhaul_keys("n2")["key"])
    got = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, n2, REQUEST)
    assert got.data.startswith(b"HTTP/1.1 200") and not got.resumed
    resumed = []
    for _ in range(8):
        got = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, n2, REQUEST, session=got.session)
        assert got.data.startswith(b"HTTP/1.1 200"), got
        resumed.append(got.resumed)
    assert all(resumed), resumed
    r = p.cli("reload")
    assert r.returncode == 0, r.stderr
    got = talk("127.0.0.2", "127.0.0.3", cfg.backhaul_port, n2, REQUEST, session=got.session)
    assert got.data.startswith(b"HTTP/1.1 200") and got.resumed, got
    series = 'edgeproxy_backhaul_tls_handshakes_total{side="accept",kind="resumed"}'
    assert p.wait_metric(series, 9) >= 9
    assert "session tickets per worker" not in p.stderr()
