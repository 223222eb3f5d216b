"""The fleet simulation (bench/fleet_sim.py) in small: 30 nodes on a real etcd, 2 real pingers.

The bench's scenario runs as is (28 simulated nodes over the real ping codec and real
leases, the real pingers' tables read through shm); these tests assert what is not a
timing: membership reaches every real table, crashes leave them, and the store's write
rate per node, counted by a watch that decodes every event, stays within its goal.
Deadlines are correctness bounds, far above the figures the bench reports.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from etcd_harness import EtcdCluster

from bench.fleetsim.run import Options, scenario

TTL = 3.0


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One 30-node scenario on a one-member etcd, shared by the tests of this module."""
    from etcd_harness import require_etcd

    require_etcd()
    base: Path = tmp_path_factory.mktemp("fleetsim")
    cluster = EtcdCluster(1, base / "etcd")
    cluster.start()
    try:
        pids = [m.proc.pid for m in cluster.members if m.proc is not None]
        opts = Options(
            nodes=30,
            real=2,
            ttl=TTL,
            interval=0.5,
            window=5.0,
            max_seconds=90.0,
            workdir=base,
            log=lambda s: None,
        )
        out = asyncio.run(scenario(opts, cluster.endpoints, pids))
    finally:
        cluster.close()
    assert "error" not in out, out
    return out


def test_every_real_table_learns_the_whole_fleet(figures: Any) -> None:
    """Both real pingers' tables hold all 28 other nodes, every one up, after the start."""
    assert all(v is not None for v in figures["converge_s"].values()), figures["converge_s"]
    assert set(figures["converge_rows"].values()) == {(28, 28)}


def test_a_join_reaches_every_real_table(figures: Any) -> None:
    """A node that registers mid-run shows up, and up, in both real tables."""
    assert all(v is not None for v in figures["join_seen_s"].values()), figures
    assert all(v is not None for v in figures["join_up_s"].values()), figures


def test_a_crashed_node_leaves_every_real_table(figures: Any) -> None:
    """A simulated node dropped without revoking, and a real pinger killed with SIGKILL,
    leave the real tables (their leases expire)."""
    assert all(v is not None for v in figures["kill_sim_gone_s"].values()), figures
    assert all(v is not None for v in figures["kill_sim_down_s"].values()), figures
    assert all(v is not None for v in figures["kill_real_gone_s"].values()), figures


def test_store_writes_per_node_stay_under_one_per_second(figures: Any) -> None:
    """With every node's load changing all the time, no node writes the store more than
    once a second (counted by key on a watch), and load changes still flow (pings)."""
    w = figures["steady"]["writes_per_node_s"]
    assert max(w["sim_max"], *w["real"].values()) <= 1.0, w
    assert figures["steady"]["revisions_per_node_s"] <= 1.0, figures["steady"]  # etcd's count
    assert figures["sim_totals"]["replies"] > 0
