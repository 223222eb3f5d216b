"""The dashboard check's reading of PromQL: metric names kept; functions, label names,
strings, ranges, clauses and Grafana variables dropped; the shipped dashboard's JSON
parses and every panel has a query."""

from __future__ import annotations

import json
from pathlib import Path

from promql_names import dashboard_names, expr_names, exprs

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "edgeproxy.json"


def test_names_of_expressions() -> None:
    """Only the series names survive, however the expression is dressed."""
    e = (
        "histogram_quantile(0.99, sum by (app, le) (rate(edgeproxy_response_body_seconds_bucket"
        '{instance=~"$instance", app=~"a|b"}[$__rate_interval])))'
    )
    assert expr_names(e) == {"edgeproxy_response_body_seconds_bucket"}
    e = (
        'sum by (app) (rate(edgeproxy_requests_total{class="5xx"}[5m])) / on (app) '
        "sum without (class) (rate(edgeproxy_requests_totl[5m])) > bool 0.5"
    )
    assert expr_names(e) == {"edgeproxy_requests_total", "edgeproxy_requests_totl"}
    assert expr_names("edgeproxy_peers{state='up'} offset 5m or vector(0)") == {"edgeproxy_peers"}
    assert expr_names("max by (instance, worker) (edgeproxy_shedding)") == {"edgeproxy_shedding"}


def test_shipped_dashboard_reads() -> None:
    """The dashboard is JSON, every panel but the rows has a target, and the names it
    uses are all edgeproxy's (the live check is tests/fleet/test_dashboard.py)."""
    d = json.loads(DASHBOARD.read_text())
    for p in d["panels"]:
        if p["type"] != "row":
            assert p.get("targets") and all(t["expr"] for t in p["targets"]), p["title"]
    names = dashboard_names(d)
    assert len(exprs(d)) >= 20 and len(names) >= 20
    assert all(n.startswith("edgeproxy_") for n in names), names
    assert "edgeproxy_build_info" in names  # from the node variable's label_values()
