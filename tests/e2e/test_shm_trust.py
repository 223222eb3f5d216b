"""Shared-memory trust: a segment another local user planted or can write is refused."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import posix_ipc
import pytest
from proxyctl import REPO, Proxy, ProxyConfig, ProxyStartError, Upstream, env

from proxy.config import load
from proxy.config_table import static_rows, table_layout, table_name
from shm import segment
from shm.errors import SegmentTrustError
from shm.inflight import InflightSegment, InflightWriter
from shm.inflight_codec import inflight_segment_name
from shm.layout import Layout, table_segment_name
from shm.reader import TableReader
from shm.sync import reconcile
from shm.writer import TableWriter

pytestmark = [pytest.mark.timeout(30), pytest.mark.request_path]

NOBODY = 65534
CFG = Layout(8, 4, 16)
_COUNTER = itertools.count()


@pytest.fixture
def name() -> Iterator[str]:
    """A segment name unique to this test, unlinked afterwards."""
    n = f"/ept-trust-{os.getpid()}-{next(_COUNTER)}"
    yield n
    segment.unlink(n)


def plant(name: str, *, uid: int = NOBODY, mode: int = 0o640, size: int = 4096) -> None:
    """Create `name` as another local user would: first, with its own owner and mode."""
    shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        os.fchown(shm.fd, uid, -1)
        os.fchmod(shm.fd, mode)
    finally:
        shm.close_fd()


def restamp(name: str, *, uid: int | None = None, mode: int | None = None) -> None:
    """Change the owner or mode of an existing segment (ours, made by a real writer)."""
    shm = posix_ipc.SharedMemory(name, flags=0)
    try:
        if uid is not None:
            os.fchown(shm.fd, uid, -1)
        if mode is not None:
            os.fchmod(shm.fd, mode)
    finally:
        shm.close_fd()


def test_writer_refuses_a_segment_planted_by_another_uid(name: str) -> None:
    """A table or counter writer refuses a pre-created segment of another uid, naming it."""
    plant(name)
    with pytest.raises(SegmentTrustError) as e:
        TableWriter.open(CFG, name)
    assert name in str(e.value) and "uid 65534" in str(e.value) and "0640" in str(e.value)
    with pytest.raises(SegmentTrustError, match="uid 65534"):
        InflightWriter.create(name, max_workers=4, max_local_instances=4)


def test_writer_refuses_our_own_segment_when_others_may_write(name: str) -> None:
    """A segment of our own uid that is world-writable is refused, not adopted or chmod'ed."""
    plant(name, uid=os.geteuid(), mode=0o666)
    with pytest.raises(SegmentTrustError, match="mode 0666"):
        TableWriter.open(CFG, name)
    shm = posix_ipc.SharedMemory(name, flags=0)
    try:
        assert os.fstat(shm.fd).st_mode & 0o777 == 0o666  # left as found
    finally:
        shm.close_fd()


def test_writer_creates_exclusively_with_mode_640_and_adopts_its_own(name: str) -> None:
    """A new segment is ours with mode 0640 at most; our own dead writer's is taken over."""
    w = TableWriter.open(CFG, name)
    shm = posix_ipc.SharedMemory(name, flags=0)
    try:
        st = os.fstat(shm.fd)
    finally:
        shm.close_fd()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 & ~0o640 == 0
    w.close()
    w2 = TableWriter.open(CFG, name)
    assert w2.boot_epoch == 2
    w2.close()


@pytest.mark.parametrize(("uid", "mode"), [(NOBODY, 0o640), (0, 0o666), (0, 0o660), (0, 0o644)])
def test_readers_refuse_untrusted_table_and_counters(name: str, uid: int, mode: int) -> None:
    """Table and counter readers refuse a segment of another uid or that grants group write
    or anything to other, with an error naming the segment, owner and mode."""
    w = TableWriter.open(CFG, name)
    w.close()
    restamp(name, uid=uid, mode=mode)
    with pytest.raises(SegmentTrustError) as e:
        TableReader.attach(CFG, name)
    assert name in str(e.value) and f"uid {uid}" in str(e.value) and f"{mode:04o}" in str(e.value)
    inflight = name + "-i"
    try:
        InflightWriter.create(inflight, max_workers=4, max_local_instances=4).close()
        restamp(inflight, uid=uid, mode=mode)
        with pytest.raises(SegmentTrustError, match=f"{mode:04o}"):
            InflightSegment.attach(inflight)
    finally:
        segment.unlink(inflight)


def test_readers_accept_our_own_segment(name: str) -> None:
    """A reader attaches to a segment of our uid with mode 0640 (the check is not too tight)."""
    w = TableWriter.open(CFG, name)
    TableReader.attach(CFG, name).close()
    w.close()


@pytest.fixture
def planted() -> Iterator[Callable[[str], None]]:
    """Plant segments owned by uid 65534 under given names; unlinked afterwards."""
    names: list[str] = []

    def make(seg: str) -> None:
        names.append(seg)
        plant(seg, size=65536)

    yield make
    for n in names:
        segment.unlink(n)


def test_master_refuses_planted_counter_segment_and_says_why(
    tmp_path: Path, upstream_address: str, planted: Callable[[str], None]
) -> None:
    """A master whose in-flight segment was planted by another uid exits, saying why."""
    cfg = ProxyConfig(upstream=upstream_address)
    planted(inflight_segment_name(f"edgeproxy-test-{cfg.uid}"))
    with pytest.raises(ProxyStartError) as e:
        Proxy(cfg, tmp_path)
    assert "uid 65534" in str(e.value) and "refusing" in str(e.value), e.value


@pytest.mark.request_path
def test_master_does_not_use_planted_table_and_serves_from_config(
    proxy_factory: Callable[..., Proxy], planted: Callable[[str], None]
) -> None:
    """A planted table is not used: the master logs why and workers route from the config."""
    uid = "trust" + os.urandom(3).hex()
    planted(table_segment_name(f"edgeproxy-test-{uid}"))
    p = proxy_factory(uid=uid)
    r = p.get("/")
    assert r.status == 200, r
    assert "uid 65534" in p.stderr() and "route from the config" in p.stderr(), p.stderr()


@pytest.mark.request_path
def test_workers_do_not_route_from_a_planted_pinger_table(
    tmp_path: Path, proxy_factory: Callable[..., Proxy]
) -> None:
    """With writer = "pinger", a table another uid owns is not read: its rows (which send
    hello.test to a dead port) are ignored, the config's route serves, the master says why."""
    uid = "trust" + os.urandom(3).hex()
    forged = ProxyConfig(upstream="127.0.0.1:1", uid=uid, table_extra={"writer": "pinger"})
    path = tmp_path / "forged.toml"
    path.write_text(forged.render())
    config = load(str(path))
    w = TableWriter.open(table_layout(config.table), table_name(config.table))
    try:
        reconcile(w, static_rows(config, w.boot_epoch))
        w.set_rtt(
            config.node.id, rtt_us=0, jitter_us=0, loss_permille=0, last_heard=time.time(), up=True
        )
        w.heartbeat(time.time())
        restamp(w.name, uid=NOBODY)
        p = proxy_factory(uid=uid, table_extra={"writer": "pinger"})
        r = p.get("/")
        assert r.status == 200, r
        assert "uid 65534" in p.stderr() and "route from the config" in p.stderr(), p.stderr()
    finally:
        w.close(unlink=True)


def test_pinger_refuses_planted_table_and_says_why(
    tmp_path: Path, upstream_address: str, planted: Callable[[str], None]
) -> None:
    """The pinger exits non-zero, naming the segment and its owner, on a planted table."""
    cfg = ProxyConfig(upstream=upstream_address, table_extra={"writer": "pinger"})
    seg = table_segment_name(f"edgeproxy-test-{cfg.uid}")
    planted(seg)
    path = tmp_path / "pinger.toml"
    path.write_text(cfg.render())
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "pinger", "-c", str(path)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 1, r
    assert seg in r.stderr and "uid 65534" in r.stderr, r.stderr


@pytest.fixture
def upstream_address(upstream: Upstream) -> str:
    """The module upstream's host:port."""
    return upstream.address


def test_a_trusted_owner_opens_readers_only(name: str) -> None:
    """An owner the CLI learnt from the running master (trust_owner) is trusted by this
    process's readers, never by its writers; without it the same segment is refused."""
    w = TableWriter.open(CFG, name)
    w.close()
    restamp(name, uid=NOBODY, mode=0o640)
    code = (
        "import sys\n"
        "from shm import segment\n"
        "from shm.errors import SegmentTrustError\n"
        "from shm.reader import TableReader\n"
        "from shm.writer import TableWriter\n"
        "from shm.layout import Layout\n"
        "CFG = Layout(8, 4, 16)\n"
        f"name = {name!r}\n"
        "try:\n"
        "    TableReader.attach(CFG, name)\n"
        "    sys.exit('read without trust')\n"
        "except SegmentTrustError:\n"
        "    pass\n"
        f"segment.trust_owner({NOBODY})\n"
        "TableReader.attach(CFG, name).close()\n"
        "try:\n"
        "    TableWriter.open(CFG, name)\n"
        "    sys.exit('a writer trusted it')\n"
        "except SegmentTrustError:\n"
        "    print('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.strip() == "OK", (done.stdout, done.stderr)
