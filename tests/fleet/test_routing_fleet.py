"""Routing across a 3-node fleet: closest + soft/hard limits,
"full" rejects retried elsewhere over the backhaul, bodies that survive a reject,
a crashed instance, forced/preferred instances and internal header stripping.

Nodes n2, n3, n4 on 127.0.0.2-4; static RTT n2-n3 10 ms, n2-n4 50 ms (n3-n4 40 ms);
one demo-app instance per node (soft 5, hard 8) on the node's own address. Every
request carries a unique X-Request-Id, which the instances record (/stats ids).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from routing_fleet import (
    HARD,
    Fleet,
    Held,
    Outcome,
    instance_id,
    request_bytes,
    run_clients,
    start_fleet,
    wait_for,
)

pytestmark = pytest.mark.request_path

N2, N3, N4 = instance_id(2), instance_id(3), instance_id(4)
FORCE = "X-Edgeproxy-Force-Instance"
PREFER = "X-Edgeproxy-Prefer-Instance"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One fleet per module; stopped with SIGTERM, then its shm segments must be gone."""
    f = start_fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        rcs = f.stop()
        for n, node in f.nodes.items():
            err = node.proxy.stderr()
            print(f"--- node n{n} exit {rcs[n]}; stderr ({len(err)} chars):\n{err[-8000:]}")
        left = wait_for_shm_gone(f)
        assert not left, f"shared memory left in /dev/shm after a clean stop: {left}"
        assert all(rc == 0 for rc in rcs.values()), f"proxy exit codes: {rcs}"


def wait_for_shm_gone(f: Fleet, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    left = f.shm_leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = f.shm_leftovers()
    return left


@pytest.fixture
def clean(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet, idle, with the instances' counters reset; instances must be alive."""
    for inst in fleet.instances().values():
        assert inst.proc is not None and inst.proc.poll() is None, f"{inst.id} is not running"
    fleet.wait_idle()
    for n in fleet.nodes:
        wait_for(f"n{n} in-flight back to 0", lambda n=n: fleet[n].local_inflight() == 0)
    fleet.reset_stats()
    yield fleet


def ids_by_instance(stats: dict[int, dict]) -> dict[str, list[str]]:
    return {s["instance"]: list(s["ids"]) for s in stats.values()}


def check_delivery(outcomes: list[Outcome], stats: dict[int, dict], prefix: str) -> None:
    """No id delivered twice; every 200 in exactly the instance that answered it;
    nothing the proxy answered itself (non-200) reached any instance."""
    seen: Counter[str] = Counter()
    where: dict[str, str] = {}
    for iid, ids in ids_by_instance(stats).items():
        for rid in ids:
            if rid.startswith(prefix + "-"):
                seen[rid] += 1
                where[rid] = iid
    dups = {rid: c for rid, c in seen.items() if c > 1}
    assert not dups, f"request ids delivered more than once: {dict(list(dups.items())[:10])}"
    for o in outcomes:
        if o.status == 200:
            assert seen[o.rid] == 1, (
                f"{o.rid}: a 200 from {o.instance} but delivered {seen[o.rid]}x"
            )
            assert where[o.rid] == o.instance, (
                f"{o.rid}: answered by {o.instance} (X-Instance) but recorded by {where[o.rid]}"
            )
        else:
            assert seen[o.rid] == 0, f"{o.rid}: status {o.status} yet it reached {where[o.rid]}"


def shares(outcomes: list[Outcome]) -> dict[str | None, int]:
    return dict(Counter(o.instance for o in outcomes if o.status == 200))


def no_internal_headers(outcomes: list[Outcome]) -> None:
    leaked = [(o.rid, o.status, o.internal_headers) for o in outcomes if o.internal_headers]
    assert not leaked, f"X-Edgeproxy-* headers reached clients: {leaked[:5]}"


# -- load ------------------------------------------------------------------------------


def test_ten_clients_overflow_to_the_closer_node(clean: Fleet) -> None:
    """10 concurrent clients at n2: n2's instance never exceeds its hard limit, overflow goes
    to n3 (the closer), n4 gets next to nothing, and every request gets a 200."""
    fleet = clean
    before = fleet[2].retries()
    out = run_clients(fleet[2].host, fleet[2].port, clients=10, per_client=30, prefix="ten")
    stats = fleet.all_stats()
    after = fleet[2].wait_retries("reject", before.get("reject", 0.0), timeout=1.5)
    got = shares(out)
    maxc = {s["instance"]: s["max_concurrency"] for s in stats.values()}
    print(f"ten clients: served {got}; max concurrency {maxc}; retries {before} -> {after}")
    bad = [(o.rid, o.status, o.error, o.body[:120]) for o in out if o.status != 200]
    assert not bad, f"{len(bad)} of {len(out)} requests were not 200: {bad[:5]}"
    assert len(out) == 300
    assert maxc[N2] <= HARD, f"n2's instance reached {maxc[N2]} concurrent requests (hard {HARD})"
    assert got.get(N2, 0) > 0 and got.get(N3, 0) > 0, f"no overflow to n3: {got}"
    assert got.get(N3, 0) > 5 * got.get(N4, 0), f"overflow did not prefer n3 over n4: {got}"
    assert got.get(N4, 0) <= 0.05 * len(out), f"n4 (50 ms away) served too much: {got}"
    for s in stats.values():
        assert s["max_concurrency"] <= HARD, f"{s['instance']} reached {s['max_concurrency']}"
    check_delivery(out, stats, "ten")
    no_internal_headers(out)


def test_forty_clients_excess_gets_503_never_502_or_duplicates(clean: Fleet) -> None:
    """40 concurrent clients at n2 (over the fleet's hard capacity of 24): the excess gets
    503 + Retry-After, never a 502, no instance goes over 8, no request id twice."""
    fleet = clean
    before = fleet[2].retries()
    out = run_clients(fleet[2].host, fleet[2].port, clients=40, per_client=12, prefix="forty")
    stats = fleet.all_stats()
    after = fleet[2].wait_retries("reject", before.get("reject", 0.0))
    statuses = Counter(o.status for o in out)
    maxc = {s["instance"]: s["max_concurrency"] for s in stats.values()}
    print(
        f"forty clients: statuses {dict(statuses)}; served {shares(out)}; "
        f"max concurrency {maxc}; retries {before} -> {after}"
    )
    errors = [(o.rid, o.status, o.error) for o in out if o.status not in (200, 503)]
    assert not errors, f"statuses other than 200/503: {errors[:5]}"
    assert statuses[503] > 0, f"40 clients against 24 slots and no 503: {dict(statuses)}"
    for o in out:
        if o.status == 503:
            assert o.retry_after is not None, f"{o.rid}: 503 without Retry-After: {o.body!r}"
            assert b"capacity" in o.body, f"{o.rid}: 503 body does not say why: {o.body!r}"
    for s in stats.values():
        assert s["max_concurrency"] <= HARD, f"{s['instance']} reached {s['max_concurrency']}"
    check_delivery(out, stats, "forty")
    no_internal_headers(out)
    rejects = after.get("reject", 0) - before.get("reject", 0)
    assert rejects > 0, f"no retry counted with reason=reject in /metrics: {before} -> {after}"


# -- a body survives a reject ----------------------------------------------------------


FILL_MS = 2000  # how long the fillers keep an instance full


def fill(fleet: Fleet, n: int, held: Held, tag: str) -> None:
    """Pin HARD slow requests to node n's instance (force header) and wait until it is full."""
    node = fleet[n]
    for i in range(HARD):
        raw = request_bytes(
            "GET",
            f"/?sleep={FILL_MS}",
            [(FORCE, node.instance.id), ("X-Request-Id", f"{tag}-{i}")],
        )
        held.open(node.host, node.port, raw)
    wait_for(
        f"{node.instance.id} holding {HARD} requests",
        lambda: node.instance.stats()["current"] == HARD,
    )
    wait_for(f"n{n} counting {HARD} in flight", lambda: node.local_inflight() == HARD)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_rejected_post_is_delivered_once_intact_elsewhere(clean: Fleet, chunked: bool) -> None:
    """A 100 KiB POST that n3 backhauls to n2's full instance (prefer header) is rejected by
    n2 and delivered exactly once, intact, to n3's own instance; n2's instance never sees it."""
    fleet = clean
    body = os.urandom(100 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    held = Held()
    try:
        fill(fleet, 2, held, "filler")
        before = fleet[3].retries()
        rid = f"post-{int(chunked)}"
        raw = request_bytes(
            "POST", "/upload", [(PREFER, N2), ("X-Request-Id", rid)], body, chunked, close=True
        )
        r = fleet[3].request(raw)
        stats = fleet.all_stats()
        fillers = held.finish()
    finally:
        held.close()
    after = fleet[3].wait_retries("reject", before.get("reject", 0.0))
    print(f"POST via n3 preferring full {N2}: {r!r}; retries {before} -> {after}")
    assert r.status == 200, r
    assert r.header("x-instance") == N3, f"expected the POST on {N3}: {r!r}"
    assert r.header("x-body-sha256") == digest, f"body arrived altered: {r!r}"
    assert r.header("x-body-length") == str(len(body)), r
    got = {s["instance"]: s["ids"].count(rid) for s in stats.values()}
    assert got == {N2: 0, N3: 1, N4: 0}, f"deliveries of the POST per instance: {got}"
    assert stats[2]["requests"] == HARD, f"n2's instance saw more than the fillers: {stats[2]}"
    assert after["reject"] - before["reject"] >= 1, f"no reject retry counted: {before} {after}"
    assert not [n for n, _ in r.headers if n.lower().startswith("x-edgeproxy-")], r
    assert [(f.status, f.header("x-instance")) for f in fillers] == [(200, N2)] * HARD, fillers


# -- a crashed instance ----------------------------------------------------------------


DEATH_RETRIES = ("connect_refused", "reset_before_response")


def test_killed_instance_idempotent_requests_retried_elsewhere(clean: Fleet) -> None:
    """n2's instance is SIGKILLed while 10 clients send GETs to n2: every GET still gets a
    200 (from n3 or n4 once n2's instance is gone); afterwards the instance is restarted."""
    fleet = clean
    inst = fleet[2].instance
    killed_at: list[float] = []

    def kill_once(done: int) -> None:
        if done >= 60 and not killed_at:
            killed_at.append(time.monotonic())
            inst.kill()

    before = fleet[2].retries()
    try:
        out = run_clients(
            fleet[2].host,
            fleet[2].port,
            clients=10,
            per_client=25,
            prefix="kill",
            on_progress=kill_once,
        )
    finally:
        if inst.proc is not None and inst.proc.poll() is not None:
            inst.start()  # same port: the fleet's configs stay valid
    deadline = time.monotonic() + 5  # workers publish their counters about once a second
    after = fleet[2].retries()
    while time.monotonic() < deadline and all(
        after.get(k, 0.0) == before.get(k, 0.0) for k in DEATH_RETRIES
    ):
        time.sleep(0.1)
        after = fleet[2].retries()
    stats = {n: s for n, s in fleet.all_stats().items() if n != 2}
    assert killed_at, "the instance was never killed"
    early = Counter(o.status for o in out if o.at < killed_at[0])
    late = Counter(o.status for o in out if o.at >= killed_at[0])
    print(
        f"kill: statuses before the kill {dict(early)}, after {dict(late)}; "
        f"served {shares(out)}; retries {before} -> {after}"
    )
    bad = [(o.rid, o.status, o.error, o.body[:120]) for o in out if o.status != 200]
    assert not bad, f"{len(bad)} of {len(out)} GETs failed around the kill: {bad[:5]}"
    # GETs that met the dead instance (its port refusing connections, or a pooled
    # connection to it reset) were retried elsewhere; overflow alone counts only rejects.
    died = sum(after.get(k, 0.0) - before.get(k, 0.0) for k in DEATH_RETRIES)
    assert died >= 1, f"no retry for the dead instance counted around the kill: {before} -> {after}"
    # Survivors' records: no duplicates, and every 200 they answered is theirs exactly once.
    survivors = [o for o in out if o.instance in (N3, N4)]
    check_delivery(survivors, stats, "kill")
    assert shares(out).get(N3, 0) + shares(out).get(N4, 0) > 0


# -- forced and preferred instances, internal headers ------------------------------------


def test_force_to_a_remote_instance(clean: Fleet) -> None:
    """The force header at n2 naming n4's instance sends the request there over the backhaul."""
    r = clean[2].request(request_bytes("GET", "/", [(FORCE, N4), ("X-Request-Id", "f-1")]))
    assert r.status == 200, r
    assert r.header("x-instance") == N4, r
    assert clean[4].instance.stats()["ids"] == ["f-1"]


def test_force_unknown_instance_is_404(clean: Fleet) -> None:
    """Forcing an instance the app does not have answers 404 naming it, and reaches nobody."""
    r = clean[2].request(request_bytes("GET", "/", [(FORCE, "nope-1"), ("X-Request-Id", "f-2")]))
    assert r.status == 404, r
    assert b"nope-1" in r.body, r
    assert all(not s["ids"] for s in clean.all_stats().values())


def test_force_full_instance_is_503(clean: Fleet) -> None:
    """Forcing a full instance answers 503 with Retry-After, from its own node and from a
    remote one (the reject passes through, without internal headers), and no fallback."""
    fleet = clean
    held = Held()
    try:
        fill(fleet, 3, held, "filler")
        local = fleet[3].request(request_bytes("GET", "/", [(FORCE, N3), ("X-Request-Id", "f-3")]))
        remote = fleet[2].request(request_bytes("GET", "/", [(FORCE, N3), ("X-Request-Id", "f-4")]))
        stats = fleet.all_stats()
        fillers = held.finish()
    finally:
        held.close()
    assert [(f.status, f.header("x-instance")) for f in fillers] == [(200, N3)] * HARD, fillers
    for r in (local, remote):
        assert r.status == 503, r
        assert r.header("retry-after") is not None, r
        assert not [n for n, _ in r.headers if n.lower().startswith("x-edgeproxy-")], r
    delivered = [i for s in stats.values() for i in s["ids"] if i in ("f-3", "f-4")]
    assert not delivered, f"forced requests to a full instance were delivered: {delivered}"


def test_prefer_unknown_falls_back_to_normal_routing(clean: Fleet) -> None:
    """Preferring an unknown instance routes normally (n2's local instance, the closest)."""
    r = clean[2].request(request_bytes("GET", "/", [(PREFER, "nope-1"), ("X-Request-Id", "p-1")]))
    assert r.status == 200, r
    assert r.header("x-instance") == N2, r


def test_prefer_a_remote_instance(clean: Fleet) -> None:
    """Preferring n4's instance at n2 (with n2's own instance idle) lands on n4."""
    r = clean[2].request(request_bytes("GET", "/", [(PREFER, N4), ("X-Request-Id", "p-2")]))
    assert r.status == 200, r
    assert r.header("x-instance") == N4, r


@pytest.mark.parametrize("route", ["local", "backhaul"])
def test_client_internal_headers_never_reach_the_instance(clean: Fleet, route: str) -> None:
    """X-Edgeproxy-* headers a client sends are stripped (locally and across the backhaul):
    the instance's /headers echo shows none, and a client's X-Edgeproxy-Instance routes
    nothing."""
    sent = [
        ("X-Edgeproxy-Instance", N4),
        ("X-Edgeproxy-Load", "0"),
        ("X-Edgeproxy-Reject", "full"),
        ("X-Edgeproxy-Hop", "1"),
        ("x-edgeproxy-whatever", "secret"),
        ("X-Request-Id", f"h-{route}"),
    ]
    if route == "backhaul":
        sent.append((FORCE, N3))
    r = clean[2].request(request_bytes("GET", "/headers", sent))
    assert r.status == 200, r
    assert r.header("x-instance") == (N3 if route == "backhaul" else N2), r
    seen = json.loads(r.body)["headers"]
    internal = [(k, v) for k, v in seen if k.lower().startswith("x-edgeproxy-")]
    assert not internal, f"internal headers reached the instance: {internal}"
    assert ["X-Request-Id", f"h-{route}"] in seen, seen
    assert not [n for n, _ in r.headers if n.lower().startswith("x-edgeproxy-")], r


FORWARDING = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port")


def test_a_backhauled_request_carries_the_same_forwarding_fields_as_a_local_one(
    clean: Fleet,
) -> None:
    """The peer keeps what the edge set: the instance across the backhaul sees the same
    X-Forwarded-* as a local one (the client's address once), and a client's spoofed
    values reach neither."""
    spoof = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-Port", "1"),
        ("Forwarded", "for=203.0.113.9"),
    ]
    got = {}
    for route, extra in (("local", []), ("backhaul", [(FORCE, N3)])):
        r = clean[2].request(request_bytes("GET", "/headers", [*spoof, *extra]))
        assert r.status == 200, r
        seen = json.loads(r.body)["headers"]
        got[route] = sorted((k.lower(), v) for k, v in seen if k.lower() in FORWARDING)
        assert not [k for k, _ in seen if k.lower() == "forwarded"], seen
    assert got["backhaul"] == got["local"], got
    assert dict(got["local"])["x-forwarded-for"] == "127.0.0.1", got
    assert len(got["local"]) == len(FORWARDING), got
