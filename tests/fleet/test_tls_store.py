"""HTTPS certificates from the cluster store, end to end: a real etcd (the harness's), a
real proxy with `[tls] store = true` and no certificate directory, real TLS clients.

What a fleet operator does: put a certificate bundle at `<prefix>certs/<host>`, and every
node serves it on the next handshake that needs it, without a reload.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from collections.abc import Callable

import pytest
from certgen import CA
from etcd_harness import EtcdCluster
from proxyctl import Client, Proxy, free_port

pytestmark = [pytest.mark.request_path, pytest.mark.etcd]

PREFIX = "/edgeproxy-tls-test/"


def put(etcd: EtcdCluster, host: str, value: bytes) -> None:
    body = {
        "key": base64.b64encode(f"{PREFIX}certs/{host}".encode()).decode(),
        "value": base64.b64encode(value).decode(),
    }
    req = urllib.request.Request(
        etcd.endpoints[0] + "/v3/kv/put", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def test_a_certificate_put_in_the_store_is_served_and_a_bad_one_refused(
    proxy_factory: Callable[..., Proxy], etcd1: EtcdCluster
) -> None:
    """A bundle put at <prefix>certs/hello.test is served on the next handshake; a name
    whose stored value is another name's certificate gets unrecognized_name (the check
    ran), counted as rejected by reason."""
    ca = CA.new()
    put(etcd1, "hello.test", ca.issue(("hello.test",)).bundle_pem())
    put(etcd1, "other.test", ca.issue(("not-other.test",)).bundle_pem())
    p = proxy_factory(
        https_port=free_port(),
        workers=1,
        tls={"store": True},
        cluster={"store": "etcd", "endpoints": etcd1.endpoints, "prefix": PREFIX},
        extra_apps=[{"name": "other", "hosts": ["other.test"]}],
    )
    assert p.cfg.https_port is not None
    ctx = ssl.create_default_context(cadata=ca.pem().decode())
    with Client(p.cfg.https_port, tls=ctx, sni="hello.test") as c:
        c.send(b"GET / HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
        assert c.response().status == 200
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        Client(p.cfg.https_port, tls=ctx, sni="other.test").close()
    series = 'edgeproxy_tls_certificates_rejected_total{reason="name_mismatch"}'
    assert p.wait_metric(series, 1) >= 1
