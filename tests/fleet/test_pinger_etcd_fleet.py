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

import base64
import json
import signal
import socket
import threading
import time
import urllib.error
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
# The quick-restart scenario's TTL: the kill, the checks and the restart must fit in it
# (checked: the new life must take over the old life's keys). Nothing waits for it in a
# passing run, so it is roomy for a busy machine.
QUICK_TTL = 20.0
CONVERGE = 15.0  # seconds a fresh fleet may take to learn everyone (bounded wait)
HOLD_CLIENT_TIMEOUT = 60.0  # a held request's client waits this long at most

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


def http_get(
    addr: tuple[str, int], path: str, timeout: float = 10.0, host: str = "hello.test"
) -> tuple[int, bytes]:
    """(status, body) of one GET on a new connection; the response ends at the close."""
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    chunks = []
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(req)
        while data := s.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"0"
    return int(status) if status.isdigit() else 0, body


class Holds:
    """`count` requests through node n's proxy that its own instance holds until release().

    The instance is tests/support/upstream.py (a fleet with demo_instances=False): its
    /hold answers only after /_release for the same tag, and /_stats counts the held and
    answered ones, so the test knows the load is there instead of hoping a timed one is.
    """

    def __init__(self, n: Node, count: int, tag: str) -> None:
        self.n = n
        self.tag = tag
        host, _, port = n.upstream.rpartition(":")
        self.instance = (host, int(port))
        self.results: list[tuple[int, bytes] | str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _one(self) -> None:
        try:
            got: tuple[int, bytes] | str = http_get(
                (self.n.ip, self.n.http), f"/hold?tag={self.tag}", HOLD_CLIENT_TIMEOUT
            )
        except OSError as e:
            got = repr(e)
        with self._lock:
            self.results.append(got)

    def counts(self) -> tuple[int, int]:
        """(held, answered) as the instance counts them."""
        status, body = http_get(self.instance, "/_stats")
        assert status == 200, (status, body)
        tag = json.loads(body)["tags"].get(self.tag, {})
        return int(tag.get("held", 0)), int(tag.get("answered", 0))

    def release(self) -> None:
        """Let the instance answer them all; wait (bounded) until every client has its answer."""
        assert http_get(self.instance, f"/_release?tag={self.tag}")[0] == 200
        for t in self.threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in self.threads), "a held request never ended"

    def all_released(self) -> bool:
        """Every request ended with a 200 from the instance saying it was released."""
        ok = {"tag": self.tag, "released": True}
        return len(self.results) == len(self.threads) and all(
            isinstance(r, tuple) and r[0] == 200 and json.loads(r[1]) == ok for r in self.results
        )


def proxy_inflight(n: Node) -> dict[str, int]:
    """Node n's in-flight totals per local instance, from its proxy's counter segment."""
    from proxy.config import load as load_config
    from proxy.config_table import inflight_name
    from shm.inflight import InflightSegment

    seg = InflightSegment.attach(inflight_name(load_config(str(n.config_path)).table))
    try:
        return seg.totals()
    finally:
        seg.close()


def store_value(f: Fleet, rel: str) -> dict[str, Any] | None:
    """The record the store holds under the fleet's prefix + `rel` now (None: no such key),
    read from the store itself (etcd's JSON gateway, or the Consul double's KV API)."""
    prefix = f"/edgeproxy-{f.uid}/"
    ep = f.endpoints[0]
    if f.store == "etcd":
        body = json.dumps({"key": base64.b64encode((prefix + rel).encode()).decode()}).encode()
        req = urllib.request.Request(ep + "/v3/kv/range", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            kvs = json.loads(r.read()).get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
    assert f.store == "consul", f.store
    try:
        with urllib.request.urlopen(f"{ep}/v1/kv/{prefix.lstrip('/')}{rel}", timeout=5) as r:
            entries = json.loads(r.read())
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            return None
        raise
    return json.loads(base64.b64decode(entries[0]["Value"]))


def stored_load(f: Fleet, node: str, iid: str) -> tuple[int, int] | None:
    """(load, publisher epoch) of the store's load record for instance `iid` of `node`."""
    rec = store_value(f, f"load/{node}/{iid}")
    return None if rec is None else (rec["load"], rec["boot_epoch"])


def shown(watchers: Sequence[Node], iid: str) -> list[tuple[int, int] | None]:
    """(load, publisher epoch) of instance `iid` in each watcher's table (None: no row)."""
    out: list[tuple[int, int] | None] = []
    for n in watchers:
        i = instances(dump(n)).get(iid)
        out.append(None if i is None else (i["load"], i["publisher_epoch"]))
    return out


# The line a pinger's store logs when its registration found this node's keys still held
# by an older lease or session, i.e. a restart within the TTL (pinger/store/etcd.py, consul.py).
TAKEOVER = {"etcd": "took over the keys of lease", "consul": "holds our keys, destroying it"}


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
    restarted, it is back under a new epoch, and no load from before the kill is used.

    Needs a fleet with demo_instances=False: the load is held by Holds until the kill has
    been seen through (the instance answered nothing before), then released."""
    wait_converged(f)
    hkg = f.nodes["hkg"]
    watchers = [f.nodes["nrt"], f.nodes["sin"]]
    e1 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    held = 7
    holds = Holds(hkg, held, "kill9")
    try:
        assert poll(lambda: True if holds.counts() == (held, 0) else None, timeout=10.0), (
            holds.counts()
        )

        def loaded() -> bool | None:
            return True if shown(watchers, "hello-hkg") == [(held, e1)] * 2 else None

        assert poll(loaded, timeout=CONVERGE, step=0.05), shown(watchers, "hello-hkg")
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

        assert poll(all_gone, timeout=TTL + 1.0, step=0.02), (
            vanished,
            [dump(n) for n in watchers],
        )
        assert holds.counts() == (held, 0), "the load was not held through the kill"
    finally:
        holds.release()  # hkg's real load is 0 from now on
    assert holds.all_released(), holds.results
    assert poll(lambda: True if proxy_inflight(hkg) == {"hello-hkg": 0} else None, timeout=5.0)

    f.restart_pinger("hkg")
    t_restart = time.monotonic()
    e2 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    assert e2 > e1
    samples: list[tuple[str, int, int, float]] = []  # (watcher, epoch, load, seconds)

    def back() -> bool | None:
        """Until the store and both watchers hold hkg's new life: (0, e2), node at e2."""
        done = stored_load(f, "hkg", "hello-hkg") == (0, e2)
        for n in watchers:
            t = dump(n)
            i = instances(t).get("hello-hkg")
            if i is None:
                done = False
                continue
            s = (n.id, i["publisher_epoch"], i["load"], time.monotonic() - t_restart)
            samples.append(s)
            node_epoch = nodes(t).get("hkg", {}).get("boot_epoch")
            done = done and (s[1], s[2], node_epoch) == (e2, 0, e2)
        return True if done else None

    assert poll(back, timeout=TTL + 2.0, step=0.02), [dump(n) for n in watchers]
    returned = max(s[3] for s in samples)
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
    new epoch, hkg's instance shows that epoch and the new life's load, never the last life's.

    Every precondition is made and checked, not hoped for (fleet: TTL QUICK_TTL,
    demo_instances=False): the load (5) is held by the instance until the test releases it
    (Holds); before the kill the store and both watchers hold it under the old epoch; after
    the kill nothing has moved (still held, counted by the proxy, in the store, at the
    watchers), so the old life's last word is 5; the hold is released and the proxy counts
    0 before the restart, so the new life's real load is 0; the new life's store logs that
    it took over the old life's keys, so the restart came within the TTL. Then every sample
    of a watcher that shows the new epoch must show (0, new epoch), until the store and
    both watchers hold exactly that."""
    wait_converged(f)
    hkg = f.nodes["hkg"]
    watchers = [f.nodes["nrt"], f.nodes["sin"]]
    e1 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    held = 5

    holds = Holds(hkg, held, "quick")
    try:
        assert poll(lambda: True if holds.counts() == (held, 0) else None, timeout=10.0), (
            holds.counts()
        )
        assert proxy_inflight(hkg) == {"hello-hkg": held}
        assert poll(
            lambda: True if stored_load(f, "hkg", "hello-hkg") == (held, e1) else None,
            timeout=CONVERGE,
            step=0.02,
        ), stored_load(f, "hkg", "hello-hkg")
        assert poll(
            lambda: True if shown(watchers, "hello-hkg") == [(held, e1)] * 2 else None,
            timeout=CONVERGE,
            step=0.02,
        ), shown(watchers, "hello-hkg")

        assert hkg.pinger is not None
        hkg.pinger.signal(signal.SIGKILL)
        hkg.pinger.proc.wait(timeout=5)
        # nothing moved: the old life's last word, in the store and at the others, is 5
        assert holds.counts() == (held, 0)
        assert proxy_inflight(hkg) == {"hello-hkg": held}
        assert stored_load(f, "hkg", "hello-hkg") == (held, e1)
        assert shown(watchers, "hello-hkg") == [(held, e1)] * 2
    finally:
        holds.release()
    assert holds.all_released(), holds.results
    assert poll(lambda: True if proxy_inflight(hkg) == {"hello-hkg": 0} else None, timeout=5.0)

    p = f.restart_pinger("hkg")
    e2 = nodes(dump(hkg))["hkg"]["boot_epoch"]
    assert e2 > e1
    took_over = TAKEOVER[f.store]
    seen: list[tuple[str, int, int]] = []  # (watcher, publisher epoch, load)

    def settled() -> bool | None:
        done = took_over in p.stderr() and stored_load(f, "hkg", "hello-hkg") == (0, e2)
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
            done = done and (i["publisher_epoch"], i["load"]) == (e2, 0)
        return True if done else None

    ok = poll(settled, timeout=QUICK_TTL, step=0.01)
    assert took_over in p.stderr(), (
        f"not a quick restart: the new life did not find the old life's keys\n{p.stderr()}"
    )
    assert ok, (stored_load(f, "hkg", "hello-hkg"), [dump(n) for n in watchers])
    bad = [x for x in seen if (x[1], x[2]) != (e2, 0)]
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
    with store_fleet(tmp_path, "etcd", etcd1.endpoints, demo_instances=False) as f:
        got = scenario_kill9(f)
        print(f"etcd kill -9: {got}")


@pytest.mark.slow
@pytest.mark.etcd
def test_etcd_quick_restart_drops_the_last_lifes_load(tmp_path: Path, etcd1: EtcdCluster) -> None:
    """A pinger restarted within its TTL: peers show its new epoch and none of the old load."""
    with store_fleet(tmp_path, "etcd", etcd1.endpoints, ttl=QUICK_TTL, demo_instances=False) as f:
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
