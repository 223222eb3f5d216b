"""The master's admin listener on a running proxy, end to end: /healthz as the master's
health() decides it (serving, no worker serving, stopping), and /metrics counters that
never go down across a reload or a worker killed and restarted by the master."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from proxyctl import Client, Proxy, Upstream, request_bytes, wait_until

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(90)]

Factory = Callable[..., Proxy]
OK = 'edgeproxy_requests_total{app="hello",class="2xx"}'


def healthz(p: Proxy) -> tuple[int, str]:
    """(status, body) of GET /healthz on the proxy's admin listener."""
    with Client(p.admin_port, timeout=5) as c:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        r = c.response()
    return r.status, r.body.decode()


def counters(p: Proxy) -> dict[str, float]:
    """Every series of every counter family in /metrics, by its name and labels."""
    kinds: dict[str, str] = {}
    out: dict[str, float] = {}
    for line in p.metrics().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
        elif line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            if kinds.get(series.split("{", 1)[0]) == "counter":
                out[series] = float(value)
    return out


class Readings:
    """Successive /metrics readings, each checked against the one before: no counter
    series goes down, and none disappears."""

    def __init__(self, p: Proxy) -> None:
        self.p = p
        self.last = counters(p)

    def read(self) -> dict[str, float]:
        now = counters(self.p)
        went_down = {s: (v, now.get(s)) for s, v in self.last.items() if s not in now or now[s] < v}
        assert not went_down, f"counters went down or vanished (before, after): {went_down}"
        self.last = now
        return now

    def wait(self, series: str, at_least: float, timeout: float = 10.0) -> float:
        """Read until `series` reaches `at_least` (workers publish about once a second)."""
        deadline = time.monotonic() + timeout
        while self.read().get(series, 0.0) < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
        got = self.last.get(series, 0.0)
        assert got >= at_least, f"{series} stayed at {got}, expected at least {at_least}"
        return got


def send_gets(p: Proxy, n: int, tag: str) -> None:
    """`n` GETs, each on its own connection (so both workers serve some), all 200."""
    for i in range(n):
        r = p.request(request_bytes("GET", f"/{tag}{i}", close=True))
        assert r.status == 200, r


def test_healthz_is_200_while_a_worker_serves(proxy_factory: Factory) -> None:
    """A running proxy whose workers serve answers /healthz with 200 "ok"."""
    p = proxy_factory(workers=2)
    assert healthz(p) == (200, "ok\n")


def test_healthz_is_503_while_no_worker_serves(proxy_factory: Factory) -> None:
    """With its only worker killed and not yet serving again, /healthz is 503 naming that,
    and 200 again once the master's replacement serves."""
    p = proxy_factory(workers=1)
    seen: list[tuple[int, str]] = []
    # The master restarts a crashed worker at once, then with a growing delay: a few kills
    # in a row leave a window that a poll of /healthz sees (bounded: at most 8 kills).
    for _ in range(8):
        assert wait_until(lambda: len(p.serving_pids()) == 1, timeout=20), p.workers()
        os.kill(p.serving_pids()[0], signal.SIGKILL)
        wait_until(lambda: seen.append(healthz(p)) or seen[-1][0] != 200, timeout=2, interval=0.02)
        if seen[-1][0] != 200:
            break
    assert seen[-1] == (503, "no worker serves\n"), seen[-5:]
    assert wait_until(lambda: healthz(p)[0] == 200, timeout=20), healthz(p)
    assert healthz(p) == (200, "ok\n")
    assert p.get("/after").status == 200


def test_healthz_is_503_while_the_master_stops(proxy_factory: Factory, upstream: Upstream) -> None:
    """After SIGTERM, while a worker drains a hanging request, /healthz says 503 "stopping"
    (a load balancer takes the node out before it is gone)."""
    p = proxy_factory(workers=1, timeouts={"upstream_response": 30})
    tag = f"healthz{time.monotonic_ns()}"
    with Client(p.port, timeout=10) as c:
        c.send(request_bytes("GET", f"/hang?hold=20&tag={tag}"))
        assert wait_until(lambda: tag in upstream.stats()["tags"], timeout=5)
        assert healthz(p) == (200, "ok\n")
        os.kill(p.proc.pid, signal.SIGTERM)
        assert wait_until(lambda: healthz(p)[0] != 200, timeout=5), healthz(p)
        assert healthz(p) == (503, "stopping\n")
        assert p.proc.poll() is None, "the master did not wait for the draining request"


def test_metrics_counters_monotonic_across_reload_and_killed_worker(
    proxy_factory: Factory,
) -> None:
    """/metrics counters never go down, and keep counting new requests, across a real
    `edgeproxy reload` and across a worker killed with SIGKILL and restarted by the master."""
    p = proxy_factory(workers=2)
    m = Readings(p)
    send_gets(p, 20, "before")
    total = m.wait(OK, 20)

    r = p.cli("reload")
    assert r.returncode == 0, (r.stdout, r.stderr)
    gen = p.status()["master"]["generation"]
    # The old generation retires while we read: its counts stay in the totals.
    assert wait_until(lambda: m.read() and all(w["generation"] == gen for w in p.workers()), 15)
    send_gets(p, 20, "reloaded")
    total = m.wait(OK, total + 20)

    victim = p.serving_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(
        lambda: m.read() and len(p.serving_pids()) == 2 and victim not in p.serving_pids(), 15
    ), p.workers()
    send_gets(p, 20, "restarted")
    m.wait(OK, total + 20)
