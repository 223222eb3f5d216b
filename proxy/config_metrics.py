"""The [metrics] section of the node configuration: how many series /metrics may have,
as proxy.config reads it.

Owns the record, its defaults and its rules. Like proxy.config, pure: the caps are
applied by the workers' counters and the master's renderer (proxy.telemetry).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config_reader import Reader

MAX_APPS_LIMIT = 10_000
MAX_PEERS_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: bounds on the labels whose values come from the fleet, not the code."""

    # Apps with series of their own: the first max_apps of the config, in file order; the
    # rest are summed under app="_other". An app costs 35 series (5 status classes, two
    # body-time histograms of 15 series each): 100 apps keep a scrape near 4,000 series,
    # under what one Prometheus target is usually allowed, and the busiest apps of a node
    # are the ones an operator lists first.
    max_apps: int = 100
    # Peers whose RTT and state get a series of their own (edgeproxy_peer_*): the first
    # max_peers node ids in sorted order; counts by state cover all of them.
    max_peers: int = 64


def metrics_section(r: Reader) -> MetricsConfig:
    r.check_keys(MetricsConfig.__slots__)
    d = MetricsConfig()
    max_apps = r.get("max_apps", int, d.max_apps)
    if not 0 <= max_apps <= MAX_APPS_LIMIT:
        raise r.fail("max_apps", f"must be between 0 and {MAX_APPS_LIMIT}")
    max_peers = r.get("max_peers", int, d.max_peers)
    if not 0 <= max_peers <= MAX_PEERS_LIMIT:
        raise r.fail("max_peers", f"must be between 0 and {MAX_PEERS_LIMIT}")
    return MetricsConfig(max_apps=max_apps, max_peers=max_peers)
