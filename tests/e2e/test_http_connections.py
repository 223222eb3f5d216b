"""Client connections of a worker over real sockets: counted as accepted, and capped by
[limits] max_connections (accepting pauses at the cap, queued connections wait in the
listening socket's queue and are served once below it)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from proxyctl import Client, Proxy, request_bytes, wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.request_path]

Factory = Callable[..., Proxy]


def _value(metrics: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
    assert m is not None, f"{name} not in /metrics"
    return float(m[1])


def _served(c: Client) -> None:
    c.send(request_bytes(path="/ping"))
    r = c.response()
    assert r.status == 200, r


def test_accepted_connections_are_counted(proxy_factory: Factory) -> None:
    """Every accepted client connection counts once, in /metrics and in `status --json`."""
    p = proxy_factory(workers=2)
    for _ in range(5):
        with Client(p.port) as c:
            _served(c)
    assert wait_until(
        lambda: _value(p.metrics(), "edgeproxy_connections_accepted_total") == 5, 5.0
    ), p.metrics()
    assert wait_until(lambda: sum(w.get("accepted", 0) for w in p.workers()) == 5, 5.0), p.workers()


def test_max_connections_pauses_accepting_and_resumes_without_losing_queued_ones(
    proxy_factory: Factory,
) -> None:
    """With max_connections = 4, four served connections pause accepting: three more wait
    unanswered in the kernel's queue; closing three of the four serves all three."""
    p = proxy_factory(workers=1, limits={"max_connections": 4})
    first = [Client(p.port) for _ in range(4)]
    waiting: list[Client] = []
    try:
        for c in first:
            _served(c)  # accepted and answered: the cap is reached
        for _ in range(3):
            c = Client(p.port)  # the kernel completes the handshake; nobody accepts it
            waiting.append(c)
            c.send(request_bytes(path="/queued"))
        assert wait_until(lambda: _value(p.metrics(), "edgeproxy_accept_pauses_total") == 1, 5.0)
        assert 'edgeproxy_open_connections{worker="0"} 4' in p.metrics()
        for c in waiting:  # nothing answers them while paused
            c.sock.setblocking(False)
            try:
                got = c.sock.recv(1)
            except BlockingIOError:
                got = None
            c.sock.setblocking(True)
            assert got is None, got
        # One close at a time, each queued connection answered before the next close: the
        # room one close makes is taken by one queued connection, and the proxy is back at
        # 4 open and pauses again before the next (closing them together let the resumes
        # and accepts interleave, and the pause count depended on the scheduler).
        for n, (gone, c) in enumerate(zip(first[:3], waiting, strict=True), start=2):
            gone.close()
            r = c.response(timeout=5.0)  # the kernel's queue is first in, first out
            assert r.status == 200 and b'"/queued"' in r.body, r
            assert wait_until(
                lambda n=n: _value(p.metrics(), "edgeproxy_accept_pauses_total") == n, 5.0
            ), p.metrics()
        _served(first[3])  # the connection that stayed open still works
        assert wait_until(
            lambda: _value(p.metrics(), "edgeproxy_connections_accepted_total") == 7, 5.0
        ), p.metrics()
        assert _value(p.metrics(), "edgeproxy_accept_paused_seconds_total") > 0
    finally:
        for c in first + waiting:
            c.close()
    # Below the cap again, a new connection is served at once.
    with Client(p.port) as c:
        _served(c)
