"""The walk across real processes: picks while a writer moves loads, RTTs and instances."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
from shm_procs import spawn, unique_segment

from proxy.core.router import UNKNOWN_RTT_US, FullMarks, NoPick
from proxy.worker.walk import Walk
from shm.candidate import Candidate
from shm.layout import Layout
from shm.reader import TableReader

CFG = "Layout(8, 2, 96)"


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    yield from unique_segment("ept-walk")


# Loads jump across soft (5) and hard (9); RTTs of n1..n4 cross and meet each other and
# go down; every so often an instance moves to another node (a new group layout).
WRITER = """
    import random, select, sys
    from shm.layout import Layout
    from shm import codec
    from shm.writer import TableWriter
    w = TableWriter.open(CFG, sys.argv[1])
    nodes = ["n0", "n1", "n2", "n3", "n4"]
    ids = [f"i{j}" for j in range(60)]
    rnd = random.Random(int(sys.argv[2]))
    with w.batch():
        for n in nodes:
            w.put_node(codec.NodeRow(n, "r", "127.0.0.2:1", 0))
        w.put_app(codec.AppRow("a", ("a.test",), "closest", 5, 9, 2))
        for j, iid in enumerate(ids):
            w.put_instance(codec.InstanceRow("a", iid, nodes[1 + j % 4], "10.0.0.1:1", 5, 9))
    w.set_rtt("n0", rtt_us=0, jitter_us=0, loss_permille=0, last_heard=1.0, up=True)
    print("ready", flush=True)
    k = 0
    while True:
        k += 1
        for _ in range(20):
            w.set_load(rnd.choice(ids), rnd.randint(0, 10), float(k), 1)
        n = rnd.choice(nodes[1:])
        w.set_rtt(n, rtt_us=rnd.choice([100, 200, 200, 300, -1]), jitter_us=0,
                  loss_permille=0, last_heard=float(k), up=rnd.random() < 0.9)
        if k % 50 == 0:
            iid = rnd.choice(ids)
            w.put_instance(codec.InstanceRow("a", iid, rnd.choice(nodes[1:]), "10.0.0.1:1", 5, 9))
        if k % 64 == 0 and select.select([sys.stdin], [], [], 0)[0]:
            break
    print(k, flush=True)
""".replace("CFG", CFG)

READER = """
    import json, random, sys, time
    from proxy.core.router import NoPick
    from proxy.worker.walk import Walk
    from shm.candidate import Candidate
    from shm.layout import Layout
    from shm.reader import TableReader
    r = TableReader.attach(CFG, sys.argv[1], local_node="n0")
    walk = Walk(r, None)
    rng = random.Random(int(sys.argv[2]))
    picks = nopick = bad = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 3.0:
        view = r.view("a")
        got = (walk.closest(view, rng, 100.0) if picks % 2
               else walk.leastload(view, rng, 100.0, (), None, 2))
        picks += 1
        if isinstance(got, NoPick):
            nopick += 1
        elif not isinstance(got, Candidate) or got.app != "a" or got.load >= got.hard_limit:
            bad += 1
    print(json.dumps({"picks": picks, "nopick": nopick, "bad": bad, "retries": r.retries,
                      "generation": r.generation}), flush=True)
""".replace("CFG", CFG)


def rank(c: Candidate) -> int:
    return 0 if c.local else (c.rtt_us if c.rtt_us >= 0 else UNKNOWN_RTT_US)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_walk_under_a_busy_writer_never_picks_what_it_should_not(name: str) -> None:
    """Two reader processes pick flat out (closest and leastload) while a writer moves loads
    across soft and hard, RTTs across each other, and instances between nodes: every pick
    is an instance of the app under hard when read, nothing raises; once the writer stops,
    closest picks exactly what the full scan allows."""
    with spawn(WRITER, name, "1") as writer:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "ready"
        results = []
        with spawn(READER, name, "2") as r1, spawn(READER, name, "3") as r2:
            for p in (r1, r2):
                out, _ = p.communicate(timeout=60)
                assert p.returncode == 0
                results.append(json.loads(out))
        writer.stdin.write("stop\n")
        writer.stdin.flush()
        rounds = int(writer.stdout.readline())
        assert writer.wait(timeout=10) == 0
    print(f"\nwalk stress: writer rounds {rounds}, readers {results}")
    assert all(r["bad"] == 0 for r in results)
    assert sum(r["picks"] for r in results) >= 2000
    assert all(r["generation"] > 2 for r in results)  # instances really moved under them
    # Quiet now: the walk agrees with the rules over every candidate read now.
    r = TableReader.attach(Layout(8, 2, 96), name, local_node="n0")
    walk = Walk(r, None)
    view = r.view("a")
    assert view is not None
    everyone = list(r.candidates("a"))
    for c in everyone:
        if not c.local and not c.node_up:
            c.rtt_us = -1
    ok = [c for c in everyone if c.load < c.hard_limit]
    under = [c for c in ok if c.load < c.soft_limit]
    if under:
        allowed = {c.id for c in under if rank(c) == min(rank(x) for x in under)}
    else:
        low = min(((c.load, rank(c)) for c in ok), default=None)
        allowed = {c.id for c in ok if (c.load, rank(c)) == low}
    for seed in range(50):
        got = walk.closest(view, random.Random(seed), 100.0, (), FullMarks())
        if allowed:
            assert isinstance(got, Candidate) and got.id in allowed
        else:
            assert got is NoPick.ALL_FULL
    r.close()
