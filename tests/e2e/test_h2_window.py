"""The adaptive HTTP/2 receive window, end to end: a real proxy (h2c, one worker) behind
the userspace latency relay (20 ms round trip), a real HTTP/2 client (the h2 library,
which answers PINGs) uploading to a real instance. The windows the client is granted
are read from what it received (SETTINGS, PING); throughput is bench/h2_window.py's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import h2.events
import pytest
from h2client import H2Client
from proxyctl import HOST, Proxy, ProxyConfig, Upstream, stop_proxies

from pinger.relay import Relay, Route

pytestmark = pytest.mark.request_path

CAP = 262144  # max_window of the adaptive proxy: reached after a few samples
SIZE = 3_000_000


def start(tmp: pytest.TempPathFactory, upstream: Upstream, adaptive: bool) -> Proxy:
    cfg = ProxyConfig(
        upstream=upstream.address,
        workers=1,
        listen_extra={"h2c": True},
        http2={
            "initial_window": 65535,
            "connection_window": 65535,
            "adaptive_window": adaptive,
            "max_window": CAP,
        },
    )
    return Proxy(cfg, tmp.mktemp("h2win"))


@pytest.fixture(scope="module")
def proxies(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[dict[bool, Proxy]]:
    """One proxy with the adaptive window (capped at CAP), one with it off."""
    ps = {flag: start(tmp_path_factory, upstream, flag) for flag in (True, False)}
    yield ps
    stop_proxies(list(ps.values()))


def upload_through_relay(p: Proxy) -> H2Client:
    """POST SIZE bytes to /echo over a 20 ms path; the client, once the answer is in."""
    relay = Relay([Route("tcp", (HOST, 0), (HOST, p.port), 0.010, 0.010)])
    relay.start()
    try:
        port = relay.addresses[0][1][1]
        c = H2Client(port, sni=None, timeout=60)
        r = c.request("/echo", method="POST", body=b"w" * SIZE)
        assert r.status == 200 and r.ended
        assert json.loads(r.body)["body_len"] == SIZE
        c.close()
        return c
    finally:
        relay.close()


def test_the_windows_grow_up_to_max_window(proxies: dict[bool, Proxy]) -> None:
    """With adaptive_window the proxy measures the path with PINGs and raises the
    stream window (SETTINGS_INITIAL_WINDOW_SIZE) and the connection's (WINDOW_UPDATE)
    above 65535, never past max_window; the whole body arrives."""
    c = upload_through_relay(proxies[True])
    pings = [ev for ev in c.events if isinstance(ev, h2.events.PingReceived)]
    assert pings, "the proxy sent no BDP PING"
    window = c.conn.remote_settings.initial_window_size
    assert 65535 < window <= CAP
    # Credit held now: what the proxy granted and the client has not used (<= the window).
    assert c.conn.outbound_flow_control_window <= CAP


def test_a_fixed_window_stays_as_configured(proxies: dict[bool, Proxy]) -> None:
    """adaptive_window = false: no PING, the stream window stays at initial_window."""
    c = upload_through_relay(proxies[False])
    assert not [ev for ev in c.events if isinstance(ev, h2.events.PingReceived)]
    assert c.conn.remote_settings.initial_window_size == 65535
    assert c.conn.outbound_flow_control_window <= 65535
