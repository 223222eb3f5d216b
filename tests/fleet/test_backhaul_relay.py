"""The backhaul's mutual TLS through the latency relay: real pingers, proxies and relay."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fleet import fleet, poll
from proxyctl import metric_value

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(90)]


def _get(ip: str, port: int, instance: str) -> bytes:
    """One GET through a node's proxy, forced to `instance`; the whole response."""
    req = (
        f"GET / HTTP/1.1\r\nHost: hello.test\r\nX-Edgeproxy-Force-Instance: {instance}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    out = b""
    with socket.create_connection((ip, port), timeout=10) as s:
        s.sendall(req)
        while data := s.recv(65536):
            out += data
    return out


def _metrics(ip: str, port: int) -> str:
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        out = b""
        while data := s.recv(65536):
            out += data
    return out.partition(b"\r\n\r\n")[2].decode()


def test_mutual_tls_crosses_the_relay(tmp_path: Path) -> None:
    """A request from nrt to hkg's instance crosses the TCP relay (20 ms each way) over
    mutual TLS: the relay passes the TLS bytes unchanged, both ends count the handshake."""
    with fleet(
        tmp_path, [("nrt", "nrt"), ("hkg", "hkg")], delays={("nrt", "hkg"): 20.0},
        demo_instances=True,
    ) as f:  # fmt: skip
        nrt, hkg = f.nodes["nrt"], f.nodes["hkg"]
        assert ("nrt", "hkg") in f.via, "no relay route between the nodes"
        got = _get(nrt.ip, nrt.http, hkg.instance)
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        assert got.rstrip().endswith(f"instance {hkg.instance}".encode()), got[-200:]

        def counted() -> tuple[float, float] | None:
            a = metric_value(
                _metrics(nrt.ip, nrt.admin),
                'edgeproxy_backhaul_tls_handshakes_total{side="connect",kind="full"}',
            )
            b = metric_value(
                _metrics(hkg.ip, hkg.admin),
                'edgeproxy_backhaul_tls_handshakes_total{side="accept",kind="full"}',
            )
            return (a, b) if a >= 1 and b >= 1 else None

        assert poll(counted, timeout=5.0) is not None
