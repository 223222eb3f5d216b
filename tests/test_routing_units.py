"""proxy.routing.Routing without I/O: the config's view (no table), no in-flight cells.

Node n2 with a local instance, peers n3 (10 ms) and n4 (50 ms) with one instance each,
all hard limit 8 (the shape of the routing fleet in test_routing_fleet.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from proxy.config import loads
from proxy.routing import DOWN_HOLD, Routing, Target

HARD = 8
CONFIG = f"""
[node]
id = "n2"
[listen]
http = ["127.0.0.2:8080"]
backhaul = "127.0.0.2:9080"
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
