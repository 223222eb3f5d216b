"""The pinger with the Consul backend, end to end: the same behaviour tests as with etcd.

No Consul server can be installed here: these run against tests/support/consul_double.py, a test
double of Consul's HTTP API written from its documentation (sessions with TTL and
Behavior=delete, KV acquire, blocking queries with X-Consul-Index). The double invalidates
a session at its TTL (ttl_multiplier 1); a real Consul may take up to twice the TTL, so
on a real Consul the kill -9 bound would be 2 x TTL + 1 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from consul_double import ConsulDouble
from test_pinger_etcd_fleet import (
    QUICK_TTL,
    scenario_kill9,
    scenario_quick_restart,
    scenario_routing,
    store_fleet,
)

pytestmark = pytest.mark.request_path


@pytest.mark.slow
def test_consul_routes_local_then_closest_remote(tmp_path: Path, consul: ConsulDouble) -> None:
    """Through Consul (double): nrt's instance serves >= 99 % of nrt's requests; then hkg's."""
    with store_fleet(tmp_path, "consul", [consul.url]) as f:
        got = scenario_routing(f)
        print(f"consul routing: {got}")


@pytest.mark.slow
def test_consul_kill9_pinger_keys_vanish_and_come_back_new(
    tmp_path: Path, consul: ConsulDouble
) -> None:
    """kill -9 of hkg's pinger: gone from the others' tables in TTL + 1 s, back with a new epoch."""
    with store_fleet(tmp_path, "consul", [consul.url], demo_instances=False) as f:
        got = scenario_kill9(f)
        print(f"consul kill -9: {got}")


@pytest.mark.slow
def test_consul_quick_restart_drops_the_last_lifes_load(
    tmp_path: Path, consul: ConsulDouble
) -> None:
    """A pinger restarted within its session TTL: peers show its new epoch, none of the old load."""
    with store_fleet(tmp_path, "consul", [consul.url], ttl=QUICK_TTL, demo_instances=False) as f:
        got = scenario_quick_restart(f)
        print(f"consul quick restart: {got}")
