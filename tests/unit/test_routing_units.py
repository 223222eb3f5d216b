"""proxy.worker.routing.Routing without I/O: the config's view (no table); in-flight cells none,
or a real shared segment where two workers' admissions race.

Node n2 with a local instance, peers n3 (10 ms) and n4 (50 ms) with one instance each,
all hard limit 8 (the shape of the routing fleet in test_routing_fleet.py).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.config import loads
from proxy.core.target import Target
from proxy.telemetry.metrics import (
    ADMIT_EDGE,
    NO_PICK_ALL_FAILED,
    NO_PICK_ALL_FULL,
    RETRY_REASONS,
    WorkerStats,
)
from proxy.worker.routing import DOWN_HOLD, MAX_TRIES, Routing
from shm import segment
from shm.inflight import InflightCells, InflightWriter

HARD = 8
CONFIG = f"""
[node]
id = "n2"
[listen]
http = ["127.0.0.2:8080"]
backhaul = "127.0.0.2:9080"
[backhaul]
insecure = true  # routing only: no connection is made
[[app]]
name = "shop"
hosts = ["shop.test"]
strategy = "closest"
soft_limit = 5
hard_limit = {HARD}
[[peer]]
id = "n3"
backhaul = "127.0.0.3:9080"
ping = "127.0.0.3:9999"
rtt_ms = 10
[[peer]]
id = "n4"
backhaul = "127.0.0.4:9080"
ping = "127.0.0.4:9999"
rtt_ms = 50
[[instance]]
app = "shop"
id = "shop-n2"
address = "127.0.0.2:7000"
[[instance]]
app = "shop"
id = "shop-n3"
address = "127.0.0.3:7000"
node = "n3"
[[instance]]
app = "shop"
id = "shop-n4"
address = "127.0.0.4:7000"
node = "n4"
"""


@dataclass
class Req:
    target: Target | None = None
    tries: int = 0
    force: bytes = b""
    prefer: bytes = b""
    tried: set[str] | None = None
    full: int = 0
    slot: int = -1


def routing() -> Routing:
    return Routing(loads(CONFIG), None, random.Random(1))


def test_closest_prefers_the_local_instance() -> None:
    t, status, _ = routing().pick("shop", Req(), 100.0)
    assert status == 0 and t is not None and t.instance == "shop-n2" and t.local


def test_unreachable_local_instance_sends_to_the_next_closest() -> None:
    r = routing()
    req = Req()
    req.target, _, _ = r.pick("shop", req, 100.0)
    t, status, _ = r.retry(req, "shop", 100.0, unreachable=True)
    assert status == 0 and t is not None and t.instance == "shop-n3"
    # A new request within DOWN_HOLD skips the dead instance without trying it.
    t2, _, _ = r.pick("shop", Req(), 100.0 + DOWN_HOLD / 2)
    assert t2 is not None and t2.instance == "shop-n3"


def test_dead_local_instance_and_remotes_full_by_own_count_still_asks_a_remote() -> None:
    """The local instance refused a connection (marked down); this worker has sent a burst
    to n3 and n4, enough to reach their hard limits in its own count. Its count is a guess
    (responses bring the real one), so the request goes to a remote node, which decides;
    the dead local instance is never the answer, and the answer is never a 503."""
    r = routing()
    now = 100.0
    req = Req()
    req.target, _, _ = r.pick("shop", req, now)
    r.retry(req, "shop", now, unreachable=True)
    for iid in ("shop-n3", "shop-n4"):
        r.feedback(iid, HARD, now)
    for _ in range(20):
        t, status, reason = r.pick("shop", Req(), now + 0.01)
        assert status == 0, reason
        assert t is not None and not t.local and t.instance in ("shop-n3", "shop-n4")


# -- two workers on one real in-flight segment ------------------------------------------

_SEG = itertools.count()
_N2 = '[[instance]]\napp = "shop"\nid = "shop-n2"\naddress = "127.0.0.2:7000"\n'
_N4 = '[[instance]]\napp = "shop"\nid = "shop-n4"\naddress = "127.0.0.4:7000"\nnode = "n4"\n'
assert _N2 in CONFIG and CONFIG.endswith(_N4)
# Soft limit = hard limit: the local instance stays the closest choice up to its last slot.
_RACE = CONFIG.replace("soft_limit = 5", f"soft_limit = {HARD}")
LOCAL_ONLY = _RACE[: _RACE.index("[[peer]]")] + _N2  # shop-n2 alone
LOCAL_AND_N3 = _RACE.removesuffix(_N4)  # shop-n2 and shop-n3


@pytest.fixture
def cells() -> Iterator[tuple[InflightCells, InflightCells]]:
    """Worker 0's and worker 1's cells of a fresh counter segment with shop-n2 in a slot."""
    name = f"/ept-route-{os.getpid()}-{next(_SEG)}"
    w = InflightWriter.create(name, max_workers=4, max_local_instances=4)
    w.assign_instances(["shop-n2"])
    try:
        yield InflightCells(w.segment, 0), InflightCells(w.segment, 1)
    finally:
        w.close()
        segment.unlink(name)


def worker(config: str, c: InflightCells) -> tuple[Routing, WorkerStats]:
    stats = WorkerStats(["shop"], slot=c.cell_index, generation=1, pid=c.cell_index)
    return Routing(loads(config), c, random.Random(1), stats), stats


def fill(r: Routing, n: int) -> None:
    """`n` requests admitted on shop-n2 by this worker's routing."""
    for _ in range(n):
        t, status, why = r.pick("shop", Req(), 100.0)
        assert status == 0 and t is not None and t.local, why


def test_local_admission_lost_to_another_worker_is_a_503_not_a_502(
    cells: tuple[InflightCells, InflightCells],
) -> None:
    """Worker 1 takes the only instance's last slot between worker 0's load read and its
    admission: worker 0 answers 503 "at capacity" (no upstream error, no retry counted)."""
    w0, s0 = worker(LOCAL_ONLY, cells[0])
    w1, _ = worker(LOCAL_ONLY, cells[1])
    fill(w1, HARD - 1)
    req = Req()
    cands, info = w0.view("shop")  # sees HARD - 1: one slot left
    fill(w1, 1)  # the other worker takes it now
    t, status, text = w0.choose("shop", cands, info, req, 100.0)
    assert (t, status) == (None, 503), text
    assert "at capacity" in text
    assert req.full == 1 and req.slot == -1
    assert cells[0].total(cells[0].slot_of("shop-n2") or 0) == HARD  # nothing leaked
    assert s0.admissions_refused[ADMIT_EDGE] == 1
    assert s0.no_pick[NO_PICK_ALL_FULL] == 1 and s0.no_pick[NO_PICK_ALL_FAILED] == 0
    assert s0.retries == [0] * len(RETRY_REASONS)


def test_lost_local_admission_then_remote_full_reject_is_a_503(
    cells: tuple[InflightCells, InflightCells],
) -> None:
    """The local instance's last slot goes to another worker, the next candidate answers
    "full": with no candidate left, every one was full, so the retry answers 503."""
    w0, s0 = worker(LOCAL_AND_N3, cells[0])
    w1, _ = worker(LOCAL_AND_N3, cells[1])
    fill(w1, HARD - 1)
    req = Req()
    cands, info = w0.view("shop")
    fill(w1, 1)
    req.target, status, text = w0.choose("shop", cands, info, req, 100.0)
    assert status == 0 and req.target is not None, text
    assert req.target.instance == "shop-n3" and req.full == 1
    w0.rejected(req, 100.0)
    t, status, text = w0.retry(req, "shop", 100.0)
    assert (t, status) == (None, 503), text
    assert "at capacity" in text and req.full == 2
    assert s0.no_pick[NO_PICK_ALL_FULL] == 1 and s0.no_pick[NO_PICK_ALL_FAILED] == 0


def test_out_of_tries_after_a_full_reject_is_a_503_and_after_a_failure_a_502() -> None:
    """Tries used up: the last one answered "full" -> 503; it failed -> 502."""
    r = routing()
    full, failed = Req(), Req()
    for req in (full, failed):
        req.target, _, _ = r.pick("shop", req, 100.0)
        req.tries = MAX_TRIES
    assert r.retry(full, "shop", 100.0)[1] == 503
    assert r.retry(failed, "shop", 100.0, unreachable=True)[1] == 502


def test_backhaul_pool_key_names_the_node_not_only_its_address() -> None:
    """A connection pooled for node n3 (its certificate checked as n3) is never handed to
    another node that now has n3's backhaul address; the same node keeps one pool."""
    r = routing()
    a = r._target("shop-n3", "shop", "n3", "127.0.0.3:7000", "127.0.0.3:9080")
    b = r._target("shop-n5", "shop", "n5", "127.0.0.3:7000", "127.0.0.3:9080")
    again = r._target("shop-n3b", "shop", "n3", "127.0.0.3:7001", "127.0.0.3:9080")
    assert a.key != b.key
    assert a.key == again.key
