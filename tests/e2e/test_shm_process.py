"""The table across real processes: a torn-read stress test and a writer killed with -9."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from shm_procs import spawn, unique_segment

from shm import codec
from shm.errors import WriterBusyError
from shm.layout import Layout
from shm.reader import TableReader
from shm.writer import TableWriter

CFG = "Layout(8, 4, 64)"


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    yield from unique_segment("ept-proc")


# Every row the writer writes carries an invariant derived from one counter k, so a
# reader that used a torn row (fields from two writes) sees the invariant broken.
WRITER = """
    import json, select, sys
    from shm.layout import Layout
    from shm import codec
    from shm.writer import TableWriter
    w = TableWriter.open(CFG, sys.argv[1])
    nodes = [f"n{j}" for j in range(4)]
    ids = [f"i{j}" for j in range(8)]
    def inst(iid, k):
        return codec.InstanceRow("a", iid, nodes[k % 4], f"10.0.0.1:{k % 60000 + 1}", k, k + 1)
    with w.batch():
        for n in nodes:
            w.put_node(codec.NodeRow(n, "r", "127.0.0.2:1", 0))
        w.put_app(codec.AppRow("a", ("a.test",), "closest", 1, 2, 2))
        for j, iid in enumerate(ids):
            w.put_instance(inst(iid, j))
    print("ready", flush=True)
    k = loads = rtts = colds = 0
    while True:
        k += 1
        for iid in ids:
            w.set_load(iid, k, float(k), 7 * k)
        loads += len(ids)
        for n in nodes:
            w.set_rtt(n, rtt_us=k, jitter_us=2 * k + 1, loss_permille=k % 1000,
                      last_heard=float(k), up=k % 2 == 0)
        rtts += len(nodes)
        if k % 16 == 0:
            w.put_instance(inst(ids[k % 8], k))
            colds += 1
        if k % 64 == 0:
            w.heartbeat(float(k))
            if select.select([sys.stdin], [], [], 0)[0]:
                break
    print(json.dumps({"loads": loads, "rtts": rtts, "colds": colds}), flush=True)
""".replace("CFG", CFG)

READER = """
    import json, sys, time
    from shm.layout import Layout
    from shm.reader import TableReader
    r = TableReader.attach(CFG, sys.argv[1])
    target = int(sys.argv[2])
    rows = calls = bad_load = bad_rtt = bad_cold = 0
    start = time.perf_counter()
    while rows < target and time.perf_counter() - start < 30:
        calls += 1
        for c in r.candidates("a"):
            rows += 1
            k = c.load
            if c.load_time_us != k * 1_000_000 or c.publisher_epoch != 7 * k:
                bad_load += 1
            q = c.rtt_us
            if (c.jitter_us != 2 * q + 1 or c.loss_permille != q % 1000
                    or c.node_up != (q % 2 == 0) or c.last_heard_us != q * 1_000_000):
                bad_rtt += 1
            if c.hard_limit != c.soft_limit + 1 or not c.address.endswith(
                    f":{c.soft_limit % 60000 + 1}"):
                bad_cold += 1
    secs = time.perf_counter() - start
    bad = bad_load + bad_rtt + bad_cold
    print(json.dumps({"rows": rows, "calls": calls, "bad": bad, "secs": secs,
                      "why": [bad_load, bad_rtt, bad_cold],
                      "retries": r.retries, "fallbacks": r.fallbacks,
                      "generation": r.generation}), flush=True)
""".replace("CFG", CFG)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_no_torn_row_is_ever_used(name: str) -> None:
    """Two reader processes read 1M+ rows while a writer process rewrites them flat out."""
    with spawn(WRITER, name) as writer:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        results = []
        with spawn(READER, name, "600000") as r1, spawn(READER, name, "600000") as r2:
            for p in (r1, r2):
                out, _ = p.communicate(timeout=60)
                results.append(json.loads(out))
        elapsed = time.perf_counter() - start
        writer.stdin.write("stop\n")
        writer.stdin.flush()
        wrote = json.loads(writer.stdout.readline())
        assert writer.wait(timeout=10) == 0
    rows = sum(r["rows"] for r in results)
    writes = wrote["loads"] + wrote["rtts"] + wrote["colds"]
    print(
        f"\nstress: {rows} rows read in {elapsed:.1f}s "
        f"({sum(r['rows'] / r['secs'] for r in results):,.0f} rows/s over 2 readers, "
        f"{sum(r['calls'] / r['secs'] for r in results):,.0f} candidates()/s); "
        f"writer {writes} writes ({writes / elapsed:,.0f}/s: {wrote}); "
        f"torn rows used {sum(r['bad'] for r in results)} {[r['why'] for r in results]}; "
        f"retries {[r['retries'] for r in results]} fallbacks {[r['fallbacks'] for r in results]}"
    )
    assert sum(r["bad"] for r in results) == 0
    assert rows >= 1_000_000
    assert all(r["generation"] > 1 for r in results)  # topology really moved under them


KILLED_WRITER = """
    import sys, time
    from shm.layout import Layout
    from shm import codec
    from shm.writer import TableWriter
    w = TableWriter.open(CFG, sys.argv[1])
    w.put_node(codec.NodeRow("n0", "r", "127.0.0.2:1", 0))
    w.set_rtt("n0", rtt_us=1000, jitter_us=0, loss_permille=0, last_heard=1.0, up=True)
    w.put_app(codec.AppRow("a", ("a.test",), "closest", 1, 2, 2))
    w.put_instance(codec.InstanceRow("a", "i0", "n0", "10.0.0.1:1", 10, 20))
    w.set_load("i0", 5, 1.0, 1)
    w.heartbeat(1000.0)
    print("ready", flush=True)
    k = 5
    while True:  # killed with -9 somewhere in here, maybe mid-write
        k += 1
        w.set_load("i0", k, 1.0, 1)
""".replace("CFG", CFG)


@pytest.mark.timeout(60)
def test_writer_killed_with_9_is_taken_over(name: str) -> None:
    """After kill -9 readers serve on, go stale by heartbeat age, and a new writer takes over."""
    cfg = Layout(8, 4, 64)
    with spawn(KILLED_WRITER, name) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        r = TableReader.attach(cfg, name)
        with pytest.raises(WriterBusyError, match=f"pid {child.pid}"):
            TableWriter.open(cfg, name)
        assert r.writer() == (child.pid, 1)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL

    # Readers keep serving the last values; staleness comes from the heartbeat (injected now).
    # The kill may land inside a set_load: the reader then serves its last good value and
    # counts a fallback, and the new writer repairs that block to a clean zero.
    (c,) = r.candidates("a")
    last = c.load
    torn = r.fallbacks > 0
    assert last >= 5 and c.rtt_us == 1000 and c.node_up
    assert r.stale(1000.0 + 0.1, max_age=0.2) == (False, pytest.approx(0.1))
    stale, age = r.stale(1000.0 + 0.3, max_age=0.2)
    assert stale and age == pytest.approx(0.3)

    # A new writer takes the same segment: rows kept, boot epoch bumped, readers follow.
    gen = r.generation
    w = TableWriter.open(cfg, name)
    assert w.boot_epoch == 2
    assert set(w.instances()) == {"i0"} and set(w.nodes()) == {"n0"}
    (c,) = r.candidates("a")
    assert r.generation > gen and r.writer() == (os.getpid(), 2)
    assert c.load == (0 if torn else last) and c.rtt_us == 1000
    w.set_load("i0", 1, 2.0, 2)
    w.heartbeat(2000.0)
    (c,) = r.candidates("a")
    assert (c.load, c.publisher_epoch) == (1, 2)
    assert r.stale(2000.1, max_age=0.2)[0] is False
    w.put_instance(codec.InstanceRow("a", "i1", "n0", "10.0.0.1:2", 10, 20))
    assert [x.id for x in r.candidates("a")] == ["i0", "i1"]
    assert r.fallbacks == (1 if torn else 0)
    r.close()
    w.close()
