"""The Grafana dashboard (packaging/grafana/edgeproxy.json) reads only series that exist:
every metric name in its PromQL is in the /metrics of a real node of a two-node fleet
whose real pinger measured the other (the pinger's RTT reaches /metrics through the
table, there is no other exposition); and a misspelled name is caught."""

from __future__ import annotations

import copy
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from fleet import Node, fleet, poll
from promql_names import dashboard_names, exprs, series_names

pytestmark = pytest.mark.request_path

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "edgeproxy.json"


def scrape(n: Node) -> str:
    conn = http.client.HTTPConnection(n.ip, n.admin, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def missing(dashboard: dict[str, Any], text: str) -> set[str]:
    return dashboard_names(dashboard) - series_names(text)


@pytest.mark.timeout(90)
def test_dashboard_names_exist_in_a_real_nodes_metrics(tmp_path: Path) -> None:
    """Once node a's pinger has an RTT for b and its worker has published, every name the
    dashboard uses has samples in a's /metrics; renaming one of them in a copy of the
    dashboard makes exactly that name missing."""
    dashboard = json.loads(DASHBOARD.read_text())
    with fleet(tmp_path, [("a", "r1"), ("b", "r2")], tls=False, interval=0.25) as f:
        a = f.nodes["a"]

        def ready() -> str | None:
            text = scrape(a)
            names = series_names(text)
            want = {"edgeproxy_peer_rtt_seconds", "edgeproxy_loop_lag_seconds_bucket"}
            return text if want <= names else None

        text = poll(ready, timeout=20.0, step=0.2)
        assert text is not None, scrape(a)
    assert 'edgeproxy_peer_rtt_seconds{peer="b"}' in text
    assert missing(dashboard, text) == set()
    assert len(dashboard_names(dashboard)) >= 20

    doctored = copy.deepcopy(dashboard)
    target = next(t for p in doctored["panels"] for t in p.get("targets", []))
    name = sorted(n for n in dashboard_names(doctored) if n in target["expr"])[0]
    target["expr"] = target["expr"].replace(name, name.replace("edgeproxy_", "edgeprxy_"))
    assert missing(doctored, text) == {name.replace("edgeproxy_", "edgeprxy_")}
    assert len(exprs(doctored)) == len(exprs(dashboard))
