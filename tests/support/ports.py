"""Ports for services that a test configures before they bind (etcd, proxies, pingers).

A port that bind(0) hands out is in the kernel's ephemeral range, which every outgoing
connection draws from too: between the check here and the service's own bind, a connect()
elsewhere may take it (CI saw etcd fail with "address already in use"). Ports below that
range are never given to outgoing sockets, so one that is free now stays free until the
service binds it. Each port is handed out once per test process.
"""

from __future__ import annotations

import random
import socket

_LOW = 10000
_given: set[tuple[str, int, int]] = set()
_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low if low > _LOW + 1000 else 32768


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port on `host` below the ephemeral range that nothing is bound to right now."""
    high = _ephemeral_low()
    for _ in range(2000):
        port = _rng.randrange(_LOW, high)
        if (host, kind, port) in _given:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add((host, kind, port))
        return port
    raise RuntimeError(f"no free port on {host} in {_LOW}..{high - 1}")
