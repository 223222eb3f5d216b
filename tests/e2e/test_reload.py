"""Hitless reloads end to end: SIGHUP and `edgeproxy reload` under wrk,
long downloads and WebSocket tunnels across a drain, a refused config, new code
by re-exec in place, takeover through the control socket, `status` during a
drain, and systemd's notify protocol.

Real processes on 127.0.0.1: the proxy master and workers, tests/support/upstream.py,
and wrk (every run bounded by -d and a subprocess timeout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from proxyctl import (
    Client,
    Proxy,
    ProxyConfig,
    ProxyStartError,
    Upstream,
    request_bytes,
    stop_proxies,
    wait_until,
)
from reloadctl import (
    NotifySocket,
    TreeProxy,
    Wrk,
    alive,
    copy_tree,
    fields,
    hup,
    wait_generation,
)
from upstream import pattern_sha256

from proxy.master.control import call

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the code under test, so edits to the working tree never re-exec a master."""
    return copy_tree(tmp_path_factory.mktemp("code"))


@pytest.fixture
def tree_proxy(
    tmp_path: Path, upstream: Upstream, snapshot: Path
) -> Iterator[Callable[..., TreeProxy]]:
    """Start proxies (from the snapshot unless `root` is given); all stopped at teardown."""
    started: list[Proxy] = []

    def make(cfg: ProxyConfig | None = None, **kw: Any) -> TreeProxy:
        if cfg is None:
            cfg = ProxyConfig(upstream=upstream.address, workers=kw.pop("workers", 2))
        kw.setdefault("root", snapshot)
        p = TreeProxy(cfg, tmp_path, **kw)
        started.append(p)
        return p

    yield make
    stop_proxies(started)


def generation(p: Proxy) -> int:
    return int(p.status()["master"]["generation"])


def no_tracebacks(p: Proxy) -> None:
    err = p.stderr()
    assert "Traceback" not in err, f"the proxy logged a traceback:\n{err[-5000:]}"


def wait_old_gone(p: Proxy, pids: set[int], timeout: float) -> set[int]:
    """Wait until none of `pids` lives and status lists none of them; what is left."""
    deadline = time.monotonic() + timeout
    while True:
        listed = {w["pid"] for w in p.workers()}
        left = {pid for pid in pids if alive(pid)} | (pids & listed)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def assert_one_generation(p: Proxy, gen: int, count: int) -> list[int]:
    """Every listed worker is of `gen`, serving, `count` of them; their pids."""
    ws = p.workers()
    assert [(w["generation"], w["state"]) for w in ws] == [(gen, "serving")] * count, ws
    return sorted(w["pid"] for w in ws)


# -- 1. wrk across three SIGHUP reloads ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1])
def test_wrk_across_three_sighup_reloads_counts_no_errors(
    tree_proxy: Callable[..., TreeProxy], tmp_path: Path, workers: int
) -> None:
    """wrk -t1 -c64 -d10s across three evenly spaced SIGHUPs counts 0 errors of every kind."""
    p = tree_proxy(workers=workers)
    gen0 = generation(p)
    pids0 = set(assert_one_generation(p, gen0, workers))
    retired: set[int] = set(pids0)
    wrk = Wrk(p.port, tmp_path, duration=10, connections=64, threads=1, path="/")
    try:
        for i, at in enumerate((2.5, 5.0, 7.5), 1):
            wrk.sleep_until(at)
            hup(p)
            st = wait_generation(p, gen0 + i, timeout=2.4)
            assert st["master"]["generation"] == gen0 + i, f"reload {i} did not serve: {st}"
            retired |= {w["pid"] for w in st["workers"] if w["generation"] < gen0 + i}
        res = wrk.result()
    finally:
        wrk.kill()
    print(res.text)
    print(res.summary())
    res.assert_clean(min_requests=2000)
    final = assert_one_generation(p, gen0 + 3, workers)
    assert not set(final) & retired
    left = wait_old_gone(p, retired, timeout=10)
    assert not left, f"old-generation workers still alive after wrk ended: {left}"
    assert p.proc.poll() is None
    no_tracebacks(p)


# -- 2. a 30 s download and a WebSocket across a reload ------------------------------------

DL_BYTES = 48 << 20
DL_RATE = DL_BYTES / 30.0  # bytes per second: the client reads no faster (~30 s in all)
HOLD_AT = 4 << 20  # the upstream sends this much, then waits for the test's release


class SlowDownload(threading.Thread):
    """GET /big read at DL_RATE at most by a small-buffered client; length and sha256
    recorded. The upstream stops after HOLD_AT bytes until the test releases `tag`."""

    def __init__(self, port: int, tag: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.tag = tag
        self.received = 0
        self.sha = ""
        self.error: BaseException | None = None
        self.head: tuple[int, list[tuple[str, str]]] | None = None
        self.elapsed = 0.0
        self.client: Client | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self) -> None:
        c = Client(self.port, timeout=20, rcvbuf=65536)
        self.client = c
        t0 = time.monotonic()
        c.send(request_bytes(path=f"/big?bytes={DL_BYTES}&tag={self.tag}&hold_at={HOLD_AT}"))
        status, _, _, headers, _ = c.read_head()
        self.head = (status, headers)
        h = hashlib.sha256()
        data, c.buf = c.buf, b""
        next_at = time.monotonic()  # the reading pace: no credit for time spent waiting
        while True:
            if data:
                h.update(data)
                self.received += len(data)
                next_at = max(next_at, time.monotonic()) + len(data) / DL_RATE
            if self.received >= DL_BYTES:
                break
            ahead = next_at - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the reader, not waiting for an event
            data = c.sock.recv(min(65536, DL_BYTES - self.received))
            if not data:
                break
        self.elapsed = time.monotonic() - t0
        self.sha = h.hexdigest()


def ws_echo(ws: Client, msg: bytes, timeout: float = 5.0) -> bytes:
    ws.send(msg)
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < len(msg):
        ws.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = ws.sock.recv(65536)
        if not data:
            break
        got += data
    return got


@pytest.mark.slow
def test_long_download_and_websocket_finish_intact_across_reload(
    tree_proxy: Callable[..., TreeProxy], upstream: Upstream
) -> None:
    """A ~30 s download and an open WebSocket begun before a reload finish intact after it.

    The upstream sends HOLD_AT bytes, then waits until the reload is done: the rest
    provably goes through the draining worker, whatever the socket buffers could hold;
    the client reads at DL_RATE at most from then on, so it outlasts quiet_period."""
    p = tree_proxy(workers=2)  # drain_timeout: the default (300 s)
    gen0 = generation(p)
    old = set(assert_one_generation(p, gen0, 2))
    tag = f"dl{time.monotonic_ns()}"
    dl = SlowDownload(p.port, tag)
    dl.start()
    try:  # on every path the download's client is closed: a failed run must not leak it
        ws = Client(p.port, timeout=10)
        try:
            ws.send(
                request_bytes(
                    path="/ws",
                    headers=[
                        ("Connection", "Upgrade"),
                        ("Upgrade", "websocket"),
                        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                        ("Sec-WebSocket-Version", "13"),
                    ],
                )
            )
            r = ws.response()
            assert r.status == 101, r
            assert ws_echo(ws, b"before the reload\n") == b"before the reload\n"

            # The download runs through an old worker: the upstream sent HOLD_AT bytes and
            # waits, the client has read part of them.
            def under_way() -> bool:
                got = upstream.stats()["tags"].get(tag, {}).get("held_at") == HOLD_AT
                return (got and dl.received >= 1 << 20) or dl.error is not None

            assert wait_until(under_way, 20), (dl.received, upstream.stats()["tags"].get(tag))
            assert dl.error is None, dl.error
            sent_at_reload = upstream.stats()["tags"].get(tag, {}).get("sent", 0)

            rr = p.cli("reload", timeout=60)
            assert rr.returncode == 0, (rr.returncode, rr.stdout, rr.stderr)
            assert f"generation {gen0 + 1} serves" in rr.stdout
            st = p.status()
            draining = [w for w in st["workers"] if w["generation"] == gen0]
            # An old worker with no connection may be gone already; the busy one drains.
            assert draining and {w["pid"] for w in draining} <= old, st
            assert all(w["state"] == "draining" for w in draining), st
            assert sum(w["open_connections"] for w in draining) == 2, draining
            print(
                f"at the reload: client had {dl.received} B, upstream had sent {sent_at_reload} B"
            )
            upstream.release(tag)  # the rest goes through the draining worker

            # Echo through the tunnel every 2 s until the download is done (past quiet_period).
            n = 0
            while dl.is_alive():
                n += 1
                msg = b"after the reload %d\n" % n
                assert ws_echo(ws, msg) == msg, f"echo {n} failed after the reload"
                dl.join(timeout=2.0)
            assert n >= 10, f"the download ended only {2 * n} s after the reload"
            assert ws_echo(ws, b"last\n") == b"last\n"
            assert any(alive(pid) for pid in old), "the old workers left before the tunnel closed"
            ws.sock.shutdown(socket.SHUT_WR)  # the client ends the tunnel
            ws.expect_clean_close(timeout=5)
        finally:
            ws.close()
            dl.join(timeout=60)
        assert dl.error is None, f"download failed after {dl.received} B: {dl.error!r}"
        assert dl.head is not None and dl.head[0] == 200, dl.head
        assert dl.received == DL_BYTES, f"got {dl.received} of {DL_BYTES} bytes"
        assert dl.sha == pattern_sha256(DL_BYTES), "download content differs from what was sent"
        assert dl.elapsed >= 25, f"the download took only {dl.elapsed:.1f} s"
        print(
            f"download: {dl.received} B in {dl.elapsed:.1f} s, sha ok; {n} echoes after the reload"
        )
        up_tag = upstream.stats()["tags"][tag]
        assert up_tag.get("done") is True, up_tag
        assert sent_at_reload < DL_BYTES // 2, (
            f"the upstream had sent {sent_at_reload} of {DL_BYTES} B before the reload: "
            "the draining worker did not relay most of it"
        )
        # The download's connection, idle on a draining worker, closes cleanly after quiet_period.
        assert dl.client is not None
        closed, extra = dl.client.closed_within(10)
        dl.client.close()
        assert closed and extra == b"", (closed, extra)
        left = wait_old_gone(p, old, timeout=10)
        assert not left, f"old workers outlived their last connection: {left}"
        assert_one_generation(p, gen0 + 1, 2)
        no_tracebacks(p)
    finally:
        dl.join(timeout=60)
        if dl.client is not None:
            dl.client.close()


# -- 3. a broken config ---------------------------------------------------------------------


class Traffic(threading.Thread):
    """Requests in a loop (new connections and one keep-alive connection); failures kept."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop_ev = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        ka: Client | None = None
        while not self.stop_ev.is_set():
            try:
                with Client(self.port, timeout=5) as c:
                    c.send(request_bytes(path="/fresh", close=True))
                    r = c.response()
                self._check(r.status, "fresh")
                if ka is None:
                    ka = Client(self.port, timeout=5)
                ka.send(request_bytes(path="/keepalive"))
                r = ka.response()
                self._check(r.status, "keep-alive")
                if "close" in r.tokens("connection"):
                    ka.close()
                    ka = None
            except (OSError, EOFError, AssertionError) as e:
                self.failures.append(repr(e))
                if ka is not None:
                    ka.close()
                    ka = None
            time.sleep(0.01)
        if ka is not None:
            ka.close()

    def _check(self, status: int, what: str) -> None:
        if status == 200:
            self.ok += 1
        else:
            self.failures.append(f"{what}: status {status}")

    def finish(self) -> None:
        self.stop_ev.set()
        self.join(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("count = 2\n", "count = -1\n", "workers.count"),
        ("[workers]\n", "[workers\n", "(syntax)"),
    ],
    ids=["bad-value", "bad-syntax"],
)
def test_broken_config_reload_is_refused_and_traffic_flows(
    tree_proxy: Callable[..., TreeProxy], old: str, new: str, key: str
) -> None:
    """A reload with a broken config is refused with `FILE: key: problem` and changes nothing."""
    p = tree_proxy(workers=2)
    gen0 = generation(p)
    pids0 = assert_one_generation(p, gen0, 2)
    good = p.path.read_text()
    assert old in good
    traffic = Traffic(p.port)
    traffic.start()
    try:
        time.sleep(0.5)
        p.path.write_text(good.replace(old, new, 1))
        # `edgeproxy reload`: prints the reason, exits non-zero.
        rr = p.cli("reload", timeout=30)
        assert rr.returncode != 0, (rr.returncode, rr.stdout, rr.stderr)
        assert f"{p.path.name}: {key}: " in rr.stderr, rr.stderr
        assert rr.stdout == "", rr.stdout
        # SIGHUP (systemd's ExecReload) and the control socket (past the CLI's own check).
        hup(p)
        out = call(p.cfg.control, "reload", timeout=30)
        assert out.get("ok") is False, out
        assert f"{p.path.name}: {key}: " in str(out.get("error")), out
        time.sleep(1.0)
        # `edgeproxy status -c FILE` needs a readable FILE: ask the control socket itself.
        st = call(p.cfg.control, "status", timeout=10)
        assert st["master"]["generation"] == gen0, st
        ws = [(w["pid"], w["generation"], w["state"]) for w in st["workers"]]
        assert ws == [(pid, gen0, "serving") for pid in pids0], st
        assert p.get("/after").status == 200
    finally:
        traffic.finish()
        p.path.write_text(good)
    print(f"requests during the refused reloads: {traffic.ok} ok, failures {traffic.failures}")
    assert traffic.failures == []
    assert traffic.ok >= 20
    assert p.stderr().count("reload refused") >= 2, p.stderr()[-3000:]
    # The master is not wedged: the good config reloads.
    rr = p.cli("reload", timeout=60)
    assert rr.returncode == 0, (rr.returncode, rr.stdout, rr.stderr)
    assert generation(p) == gen0 + 1
    no_tracebacks(p)


# -- 4. new code: re-exec in place -------------------------------------------------------------


@pytest.mark.slow
def test_reload_after_code_upgrade_runs_new_version_same_pid(
    tree_proxy: Callable[..., TreeProxy], tmp_path: Path
) -> None:
    """After a code change `reload` serves the new version from the same master PID, 0 errors."""
    root = copy_tree(tmp_path / "installed")
    p = tree_proxy(root=root)
    st0 = p.status()
    gen0 = st0["master"]["generation"]
    assert st0["master"]["pid"] == p.proc.pid
    assert st0["master"]["version"] == "0.1.0"
    old = set(assert_one_generation(p, gen0, 2))
    wrk = Wrk(p.port, tmp_path, duration=8)
    try:
        wrk.sleep_until(3.0)
        init = root / "proxy" / "__init__.py"
        text = init.read_text()
        assert '__version__ = "0.1.0"' in text
        init.write_text(text.replace('__version__ = "0.1.0"', '__version__ = "0.1.0+upgraded"'))
        rr = p.cli("reload", timeout=60)
        res = wrk.result()
    finally:
        wrk.kill()
    print(res.text)
    print(res.summary())
    assert rr.returncode == 0, (rr.returncode, rr.stdout, rr.stderr, p.stderr()[-3000:])
    assert f"generation {gen0 + 1} serves" in rr.stdout, rr.stdout
    res.assert_clean(min_requests=1000)
    st = p.status()
    assert st["master"]["pid"] == p.proc.pid, st["master"]
    assert st["master"]["version"] == "0.1.0+upgraded", st["master"]
    assert st["master"]["generation"] == gen0 + 1, st["master"]
    new = set(assert_one_generation(p, gen0 + 1, 2))
    assert not new & old
    m = p.metrics()
    assert 'edgeproxy_build_info{version="0.1.0+upgraded"} 1' in m, [
        ln for ln in m.splitlines() if "build_info" in ln
    ]
    assert p.proc.poll() is None
    readies = [ln for ln in p.reader.all if ln.startswith("READY")]
    assert readies[-1].startswith(f"READY pid={p.proc.pid} generation={gen0 + 1} "), readies
    assert not wait_old_gone(p, old, timeout=10)
    assert p.get("/after").status == 200
    no_tracebacks(p)


# -- 5. takeover through the control socket ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("admin", ["same-config", "other-admin-port"])
def test_takeover_through_control_socket_under_wrk(
    tree_proxy: Callable[..., TreeProxy], tmp_path: Path, admin: str
) -> None:
    """`run --takeover CONTROL` under wrk: 0 errors, the old master exits, the new one serves."""
    old_p = tree_proxy()
    mode = Path(old_p.cfg.control).stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    old_pids = set(old_p.serving_pids())
    if admin == "same-config":  # the usual case: the same file, so the same admin port
        cfg, path = old_p.cfg, old_p.path
    else:  # isolates the socket handover from the admin listener's port
        cfg, path = dataclasses.replace(old_p.cfg, admin_port=free_port()), tmp_path / "new.toml"
        path.write_text(
            old_p.path.read_text().replace(f':{old_p.cfg.admin_port}"', f':{cfg.admin_port}"')
        )
    wrk = Wrk(old_p.port, tmp_path, duration=8)
    new_p: TreeProxy | None = None
    start_error = ""
    try:
        wrk.sleep_until(3.0)
        try:
            new_p = tree_proxy(cfg, takeover=old_p.cfg.control, path=path)
        except ProxyStartError as e:
            start_error = str(e)
        try:
            old_rc = old_p.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            old_rc = None
        res = wrk.result()
    finally:
        wrk.kill()
    print(res.text)
    print(res.summary())
    try:
        after = f"status {old_p.get('/after').status}"
    except OSError as e:
        after = repr(e)
    print(f"old master exit {old_rc}; the port after the takeover: {after}")
    assert not start_error, (
        f"the taking-over master did not start; wrk: {res.summary()}; port after: {after}\n"
        f"{start_error[-1500:]}"
    )
    assert new_p is not None
    assert old_rc == 0, f"old master exit {old_rc}; stderr:\n{old_p.stderr()[-3000:]}"
    res.assert_clean(min_requests=1000)
    assert after == "status 200"
    assert not {pid for pid in old_pids if alive(pid)}, "the old master's workers live on"
    st = new_p.status()
    assert st["master"]["pid"] == new_p.proc.pid, st["master"]
    new_pids = [w["pid"] for w in st["workers"] if w["state"] == "serving"]
    assert len(new_pids) == 2 and not set(new_pids) & old_pids, st
    mode = Path(new_p.cfg.control).stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    assert "edgeproxy_build_info" in new_p.metrics()
    no_tracebacks(new_p)
    no_tracebacks(old_p)


# -- 6. status during a drain ---------------------------------------------------------------------


@pytest.mark.slow
def test_status_shows_draining_workers_with_inflight(
    tree_proxy: Callable[..., TreeProxy], upstream: Upstream
) -> None:
    """During a drain `status` shows the old workers as draining with their in-flight count."""
    p = tree_proxy(workers=2)
    gen0 = generation(p)
    old = set(assert_one_generation(p, gen0, 2))
    result: dict[str, Any] = {}
    tag = f"drain{time.monotonic_ns()}"

    def slow() -> None:
        try:
            with Client(p.port, timeout=60) as c:
                c.send(request_bytes(path=f"/hold?tag={tag}", close=True))
                result["response"] = c.response(timeout=60)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    # In flight on an old worker until released (tests/support/upstream.py /hold).
    assert wait_until(lambda: upstream.stats()["tags"].get(tag, {}).get("held"), 10), (
        "the request never reached the instance"
    )
    rr = p.cli("reload", timeout=30)
    assert rr.returncode == 0, (rr.returncode, rr.stdout, rr.stderr)
    seen: dict[str, Any] = {}

    def draining_with_one() -> bool:
        st = p.status()
        ws = [w for w in st["workers"] if w["generation"] == gen0]
        seen["status"] = st
        return (
            len(ws) >= 1
            and all(w["state"] == "draining" for w in ws)
            and sum(w.get("inflight", 0) for w in ws) == 1
        )

    assert wait_until(draining_with_one, 3.0, 0.1), seen.get("status")
    st = seen["status"]
    drained = [w for w in st["workers"] if w["generation"] == gen0]
    assert {w["pid"] for w in drained} <= old
    assert sum(w["open_connections"] for w in drained) == 1, drained
    assert [
        (w["generation"], w["state"], w["inflight"])
        for w in st["workers"]
        if w["generation"] == gen0 + 1
    ] == [(gen0 + 1, "serving", 0)] * 2, st
    text = p.cli("status").stdout
    rows = [ln.split() for ln in text.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    busy = [r for r in rows if int(r[0]) in old and r[3] == "draining" and r[5] == "1"]
    assert busy, text
    print(text)
    assert upstream.stats()["tags"][tag].get("answered") is None
    upstream.release(tag)
    t.join(timeout=20)
    assert "error" not in result, result
    assert result["response"].status == 200, result["response"]
    assert not wait_old_gone(p, old, timeout=10)
    assert_one_generation(p, gen0 + 1, 2)


# -- 7. systemd notify -----------------------------------------------------------------------------


def _mono_usec() -> int:
    return time.monotonic_ns() // 1000


@pytest.mark.slow
def test_systemd_notify_ready_and_reloading(tree_proxy: Callable[..., TreeProxy]) -> None:
    """NOTIFY_SOCKET gets READY=1 at start, RELOADING=1 + MONOTONIC_USEC then READY=1 per reload."""
    ns = NotifySocket()
    try:
        p = tree_proxy(extra_env={"NOTIFY_SOCKET": ns.path})
        msg, seen = ns.wait_for(b"READY=1", 10)
        assert msg is not None, f"no READY=1 at start; got {seen}"
        assert fields(msg).get("MAINPID", str(p.proc.pid)) == str(p.proc.pid), msg
        assert seen == [msg], f"unexpected messages before READY=1: {seen}"
        gen0 = generation(p)

        for how in ("sighup", "cli"):
            before = _mono_usec()
            if how == "sighup":
                hup(p)
            else:
                rr = p.cli("reload", timeout=60)
                assert rr.returncode == 0, (rr.stdout, rr.stderr)
            reloading, seen = ns.wait_for(b"RELOADING=1", 15)
            after = _mono_usec()
            assert reloading is not None, f"no RELOADING=1 ({how}); got {seen}"
            f = fields(reloading)
            assert "MONOTONIC_USEC" in f, reloading
            usec = int(f["MONOTONIC_USEC"])
            assert before <= usec <= after, (before, usec, after)
            ready, seen = ns.wait_for(b"READY=1", 15)
            assert ready is not None, f"no READY=1 after RELOADING=1 ({how}); got {seen}"
            gen0 += 1
            assert wait_generation(p, gen0)["master"]["generation"] == gen0

        # A refused reload still ends the RELOADING=1 state with READY=1.
        good = p.path.read_text()
        p.path.write_text(good.replace("count = 2\n", "count = -1\n", 1))
        try:
            hup(p)
            reloading, seen = ns.wait_for(b"RELOADING=1", 15)
            assert reloading is not None, f"no RELOADING=1 for a refused reload; got {seen}"
            ready, seen = ns.wait_for(b"READY=1", 15)
            assert ready is not None, f"no READY=1 after a refused reload; got {seen}"
        finally:
            p.path.write_text(good)
        assert generation(p) == gen0

        # Every message came from the master itself (systemd's NotifyAccess=main).
        assert set(ns.senders) == {p.proc.pid}, (ns.senders, p.proc.pid)
        assert ns.next(0.5) is None, ns.messages[-1]
    finally:
        ns.close()


# -- 8. fifty reloads under load -------------------------------------------------------------------


def master_footprint(pid: int) -> dict[str, Any]:
    """The master's open fds, RSS (KiB), threads, children and zombie children."""
    kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1])
    threads = int(next(ln for ln in status.splitlines() if ln.startswith("Threads:")).split()[1])
    return {
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "rss_kib": rss,
        "threads": threads,
        "children": len(kids),
        "zombies": [k for k in kids if not alive(k) and Path(f"/proc/{k}").exists()],
    }


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fifty_reloads_under_load_leave_the_master_flat(
    tree_proxy: Callable[..., TreeProxy], tmp_path: Path
) -> None:
    """50 reloads in a row under wrk: 0 errors; the master's fds, children and memory stay flat."""
    p = tree_proxy(workers=2)
    pid = p.proc.pid

    def settled() -> dict[str, Any]:
        wait_until(lambda: master_footprint(pid)["children"] == 2, 10, 0.1)
        return master_footprint(pid)

    results = []
    wrk = Wrk(p.port, tmp_path, duration=10)
    base: dict[str, Any] = {}
    try:
        for i in range(1, 51):
            if wrk.proc.poll() is not None:
                results.append(wrk.result())
                wrk = Wrk(p.port, tmp_path, duration=10)
            rr = p.cli("reload", timeout=60)
            assert rr.returncode == 0, (i, rr.returncode, rr.stdout, rr.stderr)
            if i == 5:  # warm: imports, pools and caches are in place
                base = settled()
        results.append(wrk.result())
    finally:
        wrk.kill()
    end = settled()
    print(f"master after reload 5: {base}; after reload 50: {end}")
    for r in results:
        print(r.summary())
    assert all(r.errors() == dict.fromkeys(r.errors(), 0) for r in results), [
        r.summary() for r in results
    ]
    assert sum(r.requests for r in results) >= 5000
    assert generation(p) == 51
    problems = []
    if end["zombies"] or end["children"] != 2:
        problems.append(f"children {end['children']}, zombies {end['zombies']}")
    if end["fds"] != base["fds"]:
        fds = sorted(os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir() if f.is_symlink())
        problems.append(f"master fds {base['fds']} -> {end['fds']}: {fds}")
    if end["threads"] > base["threads"]:
        problems.append(f"master threads {base['threads']} -> {end['threads']}")
    if end["rss_kib"] - base["rss_kib"] >= 4096:
        problems.append(f"master RSS {base['rss_kib']} -> {end['rss_kib']} KiB")
    listed = [(w["pid"], w["generation"], w["state"], alive(w["pid"])) for w in p.workers()]
    if [(g, st, a) for _, g, st, a in listed] != [(51, "serving", True)] * 2:
        problems.append(f"status lists workers (pid, generation, state, alive): {listed}")
    no_tracebacks(p)
    t0 = time.monotonic()
    rc = p.stop(timeout=10)
    if rc != 0:
        problems.append(f"SIGTERM: master exit {rc} after {time.monotonic() - t0:.1f} s")
    assert problems == [], "\n".join(problems)


def test_wrk_report_parser_is_strict() -> None:
    """The wrk report parser accepts a clean report and rejects any error line."""
    from reloadctl import parse_wrk

    clean = (
        "Running 10s test @ http://127.0.0.1:1/\n"
        "  12345 requests in 10.00s, 4.00MB read\n"
        "RELOADREPORT requests=12345 connect=0 read=0 write=0 status=0 timeout=0\n"
        "RELOADSTATUSES 200=12345\n"
    )
    assert parse_wrk(clean).errors() == dict.fromkeys(
        ("connect", "read", "write", "timeout", "non2xx"), 0
    )
    dirty = (
        "Running 10s test @ http://127.0.0.1:1/\n"
        "  12345 requests in 10.00s, 4.00MB read\n"
        "  Socket errors: connect 0, read 3, write 0, timeout 0\n"
        "  Non-2xx or 3xx responses: 7\n"
        "RELOADREPORT requests=12345 connect=0 read=3 write=0 status=7 timeout=0\n"
        "RELOADSTATUSES 200=12338 503=7\n"
    )
    r = parse_wrk(dirty)
    assert (r.read, r.non2xx, r.statuses) == (3, 7, {200: 12338, 503: 7})
    with pytest.raises(AssertionError):
        r.assert_clean(min_requests=1)
    with pytest.raises(AssertionError):
        parse_wrk(clean.replace("status=0", "status=1"))
