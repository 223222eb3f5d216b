"""Bounded label sets: per-app series for the config's first [metrics] max_apps apps, the
rest summed under app="_other" (in the workers' counters and again in the master's sums),
and per-peer series for the first max_peers node ids."""

from __future__ import annotations

import pytest
from exposition import get, label_values, samples
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, loads
from proxy.telemetry import peers
from proxy.telemetry.aggregate import Aggregator
from proxy.telemetry.histograms import REQUEST_BODY
from proxy.telemetry.metrics import NO_APP, OTHER_APPS, SERVING, WorkerStats, app_labels, app_rows

APPS = ("a", "b", "c", "d", "e")
PER_APP = ("edgeproxy_requests_total", "edgeproxy_request_body_seconds_count")


def worker(apps: tuple[str, ...], max_apps: int, pid: int, hits: dict[str, int]) -> WorkerStats:
    """A worker counting under the capped labels, with `hits[app]` 2xx requests each."""
    s = WorkerStats(app_labels(apps, max_apps), slot=0, generation=1, pid=pid)
    s.state = SERVING
    rows = app_rows(apps, max_apps)
    for app, n in hits.items():
        row = rows.get(app, s.no_app)
        s.requests[row * 5 + 1] += n
        for _ in range(n):
            s.hists[REQUEST_BODY].observe(row, 0.002)
    return s


def test_labels_are_the_first_apps_then_other() -> None:
    """Under the cap every app is a label; over it the first max_apps and "_other"."""
    assert app_labels(APPS, 5) == APPS
    assert app_labels(APPS, 2) == ("a", "b", OTHER_APPS)
    assert app_labels(APPS, 0) == (OTHER_APPS,)
    assert app_rows(APPS, 2) == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 2}
    assert app_rows(APPS, 9) == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}


def test_apps_past_the_cap_sum_under_other() -> None:
    """With max_apps = 2, requests of c, d and e render once, summed under _other, in the
    request counts and the per-app histograms; a and b keep their own series."""
    agg = Aggregator(APPS, max_apps=2)
    agg.update(worker(APPS, 2, 1, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}).snapshot())
    s = samples(agg.render())
    for name in PER_APP:
        assert label_values(s, name, "app") == {"a", "b", OTHER_APPS, NO_APP}, name
    assert get(s, "edgeproxy_requests_total", app="a", **{"class": "2xx"}) == 1
    assert get(s, "edgeproxy_requests_total", app="b", **{"class": "2xx"}) == 2
    assert get(s, "edgeproxy_requests_total", app=OTHER_APPS, **{"class": "2xx"}) == 12
    assert get(s, "edgeproxy_request_body_seconds_count", app=OTHER_APPS) == 12


def test_the_master_folds_what_a_worker_did_not() -> None:
    """A worker of an older config (no cap) counted every app; the master still renders at
    most max_apps of them and sums the others, nothing lost."""
    agg = Aggregator(APPS, max_apps=2)
    agg.update(worker(APPS, 99, 7, {"a": 1, "c": 3, "e": 5}).snapshot())
    agg.update(worker(APPS, 2, 8, {"d": 4}).snapshot())
    s = samples(agg.render())
    assert label_values(s, "edgeproxy_requests_total", "app") == {"a", "b", OTHER_APPS, NO_APP}
    assert get(s, "edgeproxy_requests_total", app=OTHER_APPS, **{"class": "2xx"}) == 12
    assert get(s, "edgeproxy_request_body_seconds_count", app=OTHER_APPS) == 12


def test_other_renders_at_zero_when_capped_and_not_otherwise() -> None:
    """A capped config shows _other from the start; a config under the cap never shows it."""
    capped = samples(Aggregator(APPS, max_apps=2).render())
    assert get(capped, "edgeproxy_requests_total", app=OTHER_APPS, **{"class": "5xx"}) == 0
    under = samples(Aggregator(APPS, max_apps=5).render())
    assert OTHER_APPS not in label_values(under, "edgeproxy_requests_total", "app")


def test_reload_keeps_removed_apps_only_while_there_is_room() -> None:
    """An app a reload removed keeps its series while the named apps stay within max_apps;
    past that its counts move under _other (the total is kept)."""
    agg = Aggregator(("a", "b"), max_apps=3)
    agg.update(worker(("a", "b"), 3, 1, {"a": 1, "b": 2}).snapshot())
    agg.retire(1)
    agg.set_apps(("c",), 3)
    assert agg.named() == ["c", "a", "b"]
    agg.set_apps(("c", "d"), 3)
    s = samples(agg.render())
    assert label_values(s, "edgeproxy_requests_total", "app") == {"c", "d", "a", OTHER_APPS, NO_APP}
    assert get(s, "edgeproxy_requests_total", app=OTHER_APPS, **{"class": "2xx"}) == 2


@given(
    n_apps=st.integers(0, 40),
    max_apps=st.integers(0, 12),
    hits=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 5)), max_size=30),
)
def test_cap_bounds_series_and_keeps_every_count(
    n_apps: int, max_apps: int, hits: list[tuple[int, int]]
) -> None:
    """For any apps and cap: at most max_apps + 2 app labels per family, and the requests
    summed over them equal the requests counted."""
    apps = tuple(f"app{i}" for i in range(n_apps))
    counted: dict[str, int] = {}
    for i, n in hits:
        if i < n_apps:
            counted[apps[i]] = counted.get(apps[i], 0) + n
    agg = Aggregator(apps, max_apps=max_apps)
    agg.update(worker(apps, max_apps, 3, counted).snapshot())
    s = samples(agg.render())
    for name in PER_APP:
        assert len(label_values(s, name, "app")) <= max_apps + 2
    total = sum(v for (n, _), v in s.items() if n == "edgeproxy_requests_total")
    assert total == sum(counted.values())


def test_peer_series_are_capped_by_id_order() -> None:
    """Peers past max_peers (by sorted id) get no series of their own but are counted by
    state; this node is never its own peer; an unmeasured RTT is absent, not -1."""
    fleet = [
        peers.Peer("n3", 3000, 0, True),
        peers.Peer("n1", 1500, 250, True),
        peers.Peer("me", 0, 0, True),
        peers.Peer("n2", -1, 1000, False),
    ]
    s = samples("\n".join(peers.render(fleet, "me", 2)) + "\n")
    assert get(s, "edgeproxy_peers", state="up") == 2
    assert get(s, "edgeproxy_peers", state="down") == 1
    assert label_values(s, "edgeproxy_peer_up", "peer") == {"n1", "n2"}
    assert get(s, "edgeproxy_peer_rtt_seconds", peer="n1") == 0.0015
    assert label_values(s, "edgeproxy_peer_rtt_seconds", "peer") == {"n1"}
    assert get(s, "edgeproxy_peer_loss_ratio", peer="n2") == 1.0


def test_metrics_section() -> None:
    """[metrics] defaults to 100 apps and 64 peers; out-of-range or unknown keys fail."""
    base = '[node]\nid = "n"\n'
    c = loads(base)
    assert (c.metrics.max_apps, c.metrics.max_peers) == (100, 64)
    c = loads(base + "[metrics]\nmax_apps = 3\nmax_peers = 0\n")
    assert (c.metrics.max_apps, c.metrics.max_peers) == (3, 0)
    for bad in ("max_apps = -1", "max_apps = 10001", "max_peers = 1.5", "apps = 3"):
        with pytest.raises(ConfigError):
            loads(base + "[metrics]\n" + bad + "\n")
