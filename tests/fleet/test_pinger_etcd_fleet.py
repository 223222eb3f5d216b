"""The pinger with a real etcd, end to end: 3 nodes (proxy + pinger + demo instance each).

Peers and their instances are learned through the store only (no [[peer]], no remote
[[instance]]); distances are injected by a source-aware UDP relay (tests/support/fleet_relay.py):
nrt-hkg 25 ms, nrt-sin 35 ms, hkg-sin 17 ms one way. The scenario functions here are
shared with tests/fleet/test_pinger_consul_fleet.py (same behaviour against the Consul double).

"Gone" for nrt's instance (scenario_routing): its process is stopped AND nrt's pinger is
restarted (clean stop, so its old lease/session is revoked) on a config without the
instance, so the instance leaves every table; routing then never tries it at all.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from etcd_harness import EtcdCluster
from fleet import Fleet, Node, fleet, poll

pytestmark = pytest.mark.request_path

THREE = [("nrt", "nrt"), ("hkg", "hkg"), ("sin", "sin")]
ONE_WAY = {("nrt", "hkg"): 25.0, ("nrt", "sin"): 35.0, ("hkg", "sin"): 17.0}
TTL = 3.0
QUICK_TTL = 8.0  # the quick-restart scenario: room for a held load, a kill and a restart
CONVERGE = 15.0  # seconds a fresh fleet may take to learn everyone (bounded wait)

FleetFactory = Callable[..., AbstractContextManager[Fleet]]


# --- helpers -------------------------------------------------------------------------------
def store_fleet(
    tmp_path: Path, store: str, endpoints: Sequence[str], **kw: Any
) -> AbstractContextManager[Fleet]:
    """The 3-node fleet on a store: demo instances, TTL 3 s, relay-injected distances."""
    args: dict[str, Any] = {
        "delays": ONE_WAY,
        "interval": 0.25,
        "store": store,
        "endpoints": list(endpoints),
        "ttl": TTL,
        "demo_instances": True,
    }
    args.update(kw)
    return fleet(tmp_path, THREE, **args)


def dump(n: Node) -> dict[str, Any]:
    t = n.dump()
    assert t is not None, f"cannot read {n.id}'s table"
    return t


def instances(t: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["id"]: i for i in t["instances"]}


def nodes(t: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in t["nodes"]}


def converged(f: Fleet, expect: Sequence[str] = ("nrt", "hkg", "sin")) -> bool:
    """Every node's table holds every node (measured RTT) and every instance."""
    for n in f.nodes.values():
        t = n.dump()
        if t is None or t["stale"]:
            return False
        ns = nodes(t)
        if set(ns) != set(expect) or set(instances(t)) != {f"hello-{x}" for x in expect}:
            return False
        if any(r["rtt_ms"] is None for r in ns.values()):
            return False
    return True


def wait_converged(f: Fleet, timeout: float = CONVERGE) -> None:
    ok = poll(lambda: True if converged(f) else None, timeout=timeout, step=0.1)
    assert ok, {n.id: n.dump() for n in f.nodes.values()}


def served_by(n: Node, path: str = "/") -> str:
    """Which instance answered one GET through node n's proxy ("" and status if not 200)."""
    req = f"GET {path} HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n".encode()
    chunks = []
    try:
        with socket.create_connection((n.ip, n.http), timeout=10) as s:
            s.sendall(req)
            while data := s.recv(65536):
                chunks.append(data)
    except OSError as e:
        return f"error {e!r}"
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if b" " in head else b"?"
    if status != b"200":
        return f"status {status.decode(errors='replace')}"
    text = body.decode(errors="replace").strip()
    return text.removeprefix("instance ") if text.startswith("instance ") else f"body {text!r}"


def shares(n: Node, count: int) -> Counter[str]:
    return Counter(served_by(n) for _ in range(count))


def hold_inflight(n: Node, count: int, ms: int) -> list[threading.Thread]:
    """`count` requests to node n's own instance that each take `ms` milliseconds."""
    threads = [
        threading.Thread(target=served_by, args=(n, f"/?sleep={ms}"), daemon=True)
        for _ in range(count)
    ]
    for t in threads:
        t.start()
    return threads


# --- scenarios (shared with the Consul tests) ------------------------------------------------
def scenario_routing(f: Fleet) -> dict[str, Any]:
    """nrt's own instance serves nrt's requests; with it gone, hkg's (closer) does."""
    wait_converged(f)
    nrt = f.nodes["nrt"]
    rtt = {k: v["rtt_ms"] for k, v in nodes(dump(nrt)).items()}
    assert rtt["hkg"] < rtt["sin"], rtt
    local = shares(nrt, 300)
    local_share = local["hello-nrt"] / 300
    assert local_share >= 0.99, local

    # gone: the process stops and nrt's pinger restarts without it (clean stop first)
    f.upstream_procs["nrt"].stop()
    assert nrt.pinger is not None
    old_epoch = nodes(dump(nrt))["nrt"]["boot_epoch"]
    assert nrt.pinger.stop() == 0
    t0 = time.monotonic()
    f.restart_pinger("nrt", f.config_without_instance("nrt"))

    def left() -> bool | None:
        for n in f.nodes.values():
            t = dump(n)
            if (
                "hello-nrt" in instances(t)
                or nodes(t).get("nrt", {}).get("boot_epoch", old_epoch) == old_epoch
            ):
                return None
        return True

    assert poll(left, timeout=TTL + 1.0, step=0.05), {n.id: dump(n) for n in f.nodes.values()}
    gone_after = time.monotonic() - t0
    remote = shares(nrt, 200)
    assert remote["hello-hkg"] >= 198 and remote["hello-sin"] == 0, remote
    return {"local": local, "local_share": local_share, "remote": remote, "gone_s": gone_after}


def scenario_kill9(f: Fleet) -> dict[str, Any]:
    """kill -9 of hkg's pinger: its instance leaves nrt's and sin's tables within TTL + 1 s;
    restarted, it is back under a new epoch, and no load from before the kill is used."""
    wait_converged(f)
    hkg = f.nodes["hkg"]
    watchers = [f.nodes["nrt"], f.nodes["sin"]]
    e1 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    held = 7
    threads = hold_inflight(hkg, held, ms=int((TTL + 2.5) * 1000))

    def loaded() -> bool | None:
        for n in watchers:
            i = instances(dump(n)).get("hello-hkg")
            if i is None or i["load"] != held or i["publisher_epoch"] != e1:
                return None
        return True

    assert poll(loaded, timeout=5.0, step=0.05), [instances(dump(n)) for n in watchers]
    before = {n.id: instances(dump(n))["hello-hkg"] for n in watchers}

    assert hkg.pinger is not None
    hkg.pinger.signal(signal.SIGKILL)
    hkg.pinger.proc.wait(timeout=5)
    t_kill = time.monotonic()
    vanished: dict[str, float] = {}

    def all_gone() -> bool | None:
        for n in watchers:
            if n.id not in vanished:
                t = dump(n)
                if "hello-hkg" not in instances(t) and "hkg" not in nodes(t):
                    vanished[n.id] = time.monotonic() - t_kill
        return True if len(vanished) == len(watchers) else None

    assert poll(all_gone, timeout=TTL + 1.0, step=0.02), (vanished, [dump(n) for n in watchers])
    for t in threads:  # the held requests end: hkg's real load is 0 from now on
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)

    f.restart_pinger("hkg")
    t_restart = time.monotonic()
    samples: list[tuple[str, int, int, float]] = []  # (watcher, epoch, load, seconds)

    def back() -> bool | None:
        done = True
        for n in watchers:
            i = instances(dump(n)).get("hello-hkg")
            if i is None:
                done = False
            else:
                samples.append(
                    (n.id, i["publisher_epoch"], i["load"], time.monotonic() - t_restart)
                )
        return True if done else None

    assert poll(back, timeout=TTL + 2.0, step=0.02), [dump(n) for n in watchers]
    returned = max(s[3] for s in samples)
    end = time.monotonic() + 2.0  # keep sampling: a late old value must not show up
    while time.monotonic() < end:
        back()
        time.sleep(0.05)
    e2 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    assert e2 > e1
    for n in watchers:
        assert nodes(dump(n))["hkg"]["boot_epoch"] == e2
    bad = [s for s in samples if s[1] != e2 or s[2] == held]
    assert not bad, (e1, e2, bad[:10])
    return {
        "e1": e1,
        "e2": e2,
        "before": before,
        "vanished_s": vanished,
        "back_s": returned,
        "samples": len(samples),
    }


def scenario_quick_restart(f: Fleet) -> dict[str, Any]:
    """kill -9 of hkg's pinger and a restart before its TTL ran out: once the others see the
    new epoch, hkg's instance shows that epoch and never the load of the last life.

    Run with a fleet of TTL QUICK_TTL: the held load must still be held when the pinger is
    killed (else the old life's last word was 0, and there is nothing to hide), over before
    the restart (the new life must see the real load, 0), and the restart must come before
    the TTL runs out. A load that reached the others too late in the hold is not a result:
    the hold is waited out and the setup tried again."""
    wait_converged(f)
    hkg = f.nodes["hkg"]
    watchers = [f.nodes["nrt"], f.nodes["sin"]]
    e1 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    held = 5
    hold = QUICK_TTL / 2  # seconds: the kill comes at least 1.5 s before its end

    def seen(load: int) -> Callable[[], bool | None]:
        def check() -> bool | None:
            views = [instances(dump(n)).get("hello-hkg", {}).get("load") for n in watchers]
            return True if all(v == load for v in views) else None

        return check

    for _attempt in range(3):
        started = time.monotonic()
        threads = hold_inflight(hkg, held, ms=int(hold * 1000))
        if poll(seen(held), timeout=hold - 1.5, step=0.02):
            break
        for t in threads:
            t.join(timeout=hold + 5)
        # The next attempt starts from a load the others see as 0: else the end of this
        # hold could still be on its way and reach them after they showed the next one's.
        assert poll(seen(0), timeout=QUICK_TTL, step=0.02), [instances(dump(n)) for n in watchers]
    else:
        raise AssertionError(
            f"hkg's load never reached the others within {hold - 1.5} s of {hold} s holds: "
            f"{[instances(dump(n)) for n in watchers]}"
        )
    assert hkg.pinger is not None
    hkg.pinger.signal(signal.SIGKILL)
    hkg.pinger.proc.wait(timeout=5)
    assert time.monotonic() - started < hold, "killed after the hold ended"
    # the old life's keys are still there (TTL), with load 5: the restart must hide them
    assert all(instances(dump(n))["hello-hkg"]["load"] == held for n in watchers)
    for t in threads:
        t.join(timeout=10)
    f.restart_pinger("hkg")
    e2 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    assert e2 > e1
    seen: list[tuple[str, int, int]] = []

    def renewed() -> bool | None:
        done = True
        for n in watchers:
            t = dump(n)
            if nodes(t).get("hkg", {}).get("boot_epoch") != e2:
                done = False
                continue
            i = instances(t).get("hello-hkg")
            if i is None:
                done = False
                continue
            seen.append((n.id, i["publisher_epoch"], i["load"]))
        return True if done else None

    assert poll(renewed, timeout=QUICK_TTL + 1.0, step=0.01), [dump(n) for n in watchers]
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        renewed()
        time.sleep(0.02)
    bad = [x for x in seen if x[1] != e2 or x[2] == held]
    assert not bad, (e1, e2, bad[:10])
    return {"e1": e1, "e2": e2, "samples": len(seen)}


# --- etcd ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.etcd
def test_etcd_routes_local_then_closest_remote(tmp_path: Path, etcd1: EtcdCluster) -> None:
    """Through etcd: nrt's instance serves >= 99 % of nrt's requests; without it, hkg's does."""
    with store_fleet(tmp_path, "etcd", etcd1.endpoints) as f:
        got = scenario_routing(f)
        print(f"etcd routing: {got}")


@pytest.mark.slow
@pytest.mark.etcd
def test_etcd_kill9_pinger_keys_vanish_and_come_back_new(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    """kill -9 of hkg's pinger: gone from the others' tables in TTL + 1 s, back with a new epoch."""
    with store_fleet(tmp_path, "etcd", etcd1.endpoints) as f:
        got = scenario_kill9(f)
        print(f"etcd kill -9: {got}")


@pytest.mark.slow
@pytest.mark.etcd
def test_etcd_quick_restart_drops_the_last_lifes_load(tmp_path: Path, etcd1: EtcdCluster) -> None:
    """A pinger restarted within its TTL: peers show its new epoch and none of the old load."""
    with store_fleet(tmp_path, "etcd", etcd1.endpoints, ttl=QUICK_TTL) as f:
        got = scenario_quick_restart(f)
        print(f"etcd quick restart: {got}")


def etcd_node_keys(endpoints: Sequence[str], prefix: str) -> dict[str, int]:
    """node id -> lease of its nodes/ key, read directly from etcd's JSON gateway."""
    import base64

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    key = (prefix + "nodes/").encode()
    end = key[:-1] + bytes([key[-1] + 1])
    body = json.dumps({"key": b64(key), "range_end": b64(end)}).encode()
    for ep in endpoints:
        try:
            req = urllib.request.Request(ep + "/v3/kv/range", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                data = json.loads(r.read())
        except OSError:
            continue
        out = {}
        for kv in data.get("kvs", []):
            k = base64.b64decode(kv["key"]).decode()
            out[k.rsplit("/", 1)[1]] = int(kv.get("lease", 0))
        return out
    raise AssertionError("no etcd member answered")


def table_rows(f: Fleet) -> dict[str, tuple[Any, ...]]:
    """Per node: its table's nodes (id, epoch) and instances (id, node), as comparable rows."""
    out = {}
    for n in f.nodes.values():
        t = dump(n)
        out[n.id] = (
            sorted((r["id"], r["boot_epoch"]) for r in t["nodes"]),
            sorted((i["id"], i["node"]) for i in t["instances"]),
        )
    return out


@pytest.mark.slow
@pytest.mark.etcd
def test_etcd_member_outages(tmp_path: Path, etcd3: EtcdCluster) -> None:
    """One of three members down changes nothing; all down keeps the tables, flagged in the
    pinger status (store unhealthy, with its age); back: re-registered within TTL."""
    with store_fleet(tmp_path, "etcd", etcd3.endpoints) as f:
        wait_converged(f)
        nrt = f.nodes["nrt"]
        rows = table_rows(f)
        prefix = f"/edgeproxy-{f.uid}/"
        leases = etcd_node_keys(etcd3.endpoints, prefix)
        assert set(leases) == {"nrt", "hkg", "sin"}

        # one member down (member 0: the one every pinger talks to first)
        etcd3.stop_member(0)
        end = time.monotonic() + 2 * TTL
        served: Counter[str] = Counter()
        while time.monotonic() < end:
            served[served_by(nrt)] += 1
            assert table_rows(f) == rows
            assert not any(dump(n)["stale"] for n in f.nodes.values())
            time.sleep(0.05)
        statuses = [n.pinger_status() for n in f.nodes.values()]
        assert all(s and s["store_healthy"] and s["store_outages"] == 0 for s in statuses), statuses
        assert etcd_node_keys(etcd3.endpoints[1:], prefix) == leases, "re-registered needlessly"
        assert set(served) == {"hello-nrt"}, served

        # all down: the last known data stays, the pinger flags the store unhealthy
        etcd3.stop()
        t_down = time.monotonic()

        def flagged() -> bool | None:
            st = [n.pinger_status() for n in f.nodes.values()]
            return True if all(s and s["store_healthy"] is False for s in st) else None

        assert poll(flagged, timeout=TTL, step=0.05), [n.pinger_status() for n in f.nodes.values()]
        flag_s = time.monotonic() - t_down
        end = time.monotonic() + 2 * TTL  # longer than a lease would live
        while time.monotonic() < end:
            assert table_rows(f) == rows, "rows changed during the store outage"
            assert not any(dump(n)["stale"] for n in f.nodes.values()), "writer heartbeat"
            assert served_by(nrt) == "hello-nrt"
            time.sleep(0.1)
        st = nrt.pinger_status()
        assert st is not None
        outage_age = time.time() - st["store_since"]
        assert outage_age >= 2 * TTL

        # back: every node re-registers (a new lease) within TTL of etcd answering again
        for i in range(len(etcd3.members)):
            etcd3.members[i].start(etcd3.initial_cluster)
        etcd3.wait_healthy()
        t_up = time.monotonic()
        again: dict[str, float] = {}

        def registered() -> bool | None:
            for n in f.nodes.values():
                s = n.pinger_status()
                if n.id not in again and s and s["store_healthy"]:
                    again[n.id] = time.monotonic() - t_up
            if len(again) < 3:
                return None
            now = etcd_node_keys(etcd3.endpoints, prefix)
            new = set(now) == set(leases) and all(now[k] != leases[k] for k in leases)
            return True if new else None

        assert poll(registered, timeout=TTL, step=0.05), (
            again,
            etcd_node_keys(etcd3.endpoints, prefix),
        )
        reg_s = time.monotonic() - t_up
        wait_converged(f, timeout=TTL)
        assert table_rows(f) == rows, "same lives: same epochs and rows after the outage"
        print(
            f"etcd outage: flagged after {flag_s:.2f} s, outage age {outage_age:.1f} s, "
            f"healthy again {again}, all re-registered {reg_s:.2f} s after etcd answered"
        )
