"""End-to-end pinger tests: real pingers (and proxies) on 127.0.0.x behind latency relays."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, fleet, poll
from proxyctl import REPO, env

pytestmark = pytest.mark.request_path

THREE = [("nrt", "nrt"), ("hkg", "hkg"), ("sin", "sin")]
ONE_WAY = {("nrt", "hkg"): 25.0, ("nrt", "sin"): 35.0, ("hkg", "sin"): 17.0}


def _rtts(f: Fleet) -> dict[tuple[str, str], float | None]:
    out: dict[tuple[str, str], float | None] = {}
    for n in f.nodes.values():
        t = n.table() or {"nodes": []}
        for row in t["nodes"]:
            if row["id"] != n.id:
                out[(n.id, row["id"])] = row["rtt_ms"]
    return out


def _within(f: Fleet, tol: float) -> dict[tuple[str, str], float | None] | None:
    got = _rtts(f)
    want = {(a, b): 2 * (f.delay(a, b) or 0) for a in f.nodes for b in f.nodes if a != b}
    ok = set(got) == set(want) and all(
        got[k] is not None and abs(got[k] - v) <= tol  # type: ignore[operator]
        for k, v in want.items()
    )
    return got if ok else None


@pytest.mark.slow
def test_rtts_match_injected_delays_within_5s(tmp_path: Path) -> None:
    """With one-way delays of 25/35/17 ms, every node's table shows 50/70/34 ms +-2 within 5 s."""
    with fleet(tmp_path, THREE, delays=ONE_WAY, interval=0.25, proxies=False, upstreams=False) as f:
        start = time.monotonic()
        got = poll(lambda: _within(f, 2.0), timeout=5.0, step=0.2)
        took = time.monotonic() - start
        assert got is not None, f"RTTs not within 2 ms of injected after 5 s: {_rtts(f)}"
        print(f"RTTs after {took:.2f} s: {got}")
        errors = {k: round(v - 2 * (f.delay(*k) or 0), 3) for k, v in got.items() if v}
        print(f"errors (ms): {errors}")
    codes = f.stop()
    assert all(rc == 0 for name, rc in codes.items() if name.startswith("pinger")), codes


@pytest.mark.slow
def test_injected_loss_shows_in_the_table(tmp_path: Path) -> None:
    """20 % of nrt's probes to hkg dropped shows as 15-25 % loss at nrt, ~0 at hkg."""
    window, interval = 400, 0.02
    with fleet(
        tmp_path,
        THREE[:2],
        delays={("nrt", "hkg"): 5.0},
        loss={("nrt", "hkg"): 0.2},
        interval=interval,
        proxies=False,
        upstreams=False,
        pinger_args=["--loss-window", str(window)],
        seed=3,
    ) as f:
        fill = window * interval * 1.1 + 1.0  # the window is full, the last timeouts resolved
        start = time.monotonic()
        poll(lambda: True if time.monotonic() - start >= fill else None, timeout=fill + 1)
        nrt = {r["id"]: r for r in f.nodes["nrt"].table()["nodes"]}  # type: ignore[index]
        hkg = {r["id"]: r for r in f.nodes["hkg"].table()["nodes"]}  # type: ignore[index]
        print(f"loss nrt->hkg {nrt['hkg']['loss']}, hkg->nrt {hkg['nrt']['loss']}")
        assert 0.15 <= nrt["hkg"]["loss"] <= 0.25, nrt["hkg"]
        assert hkg["nrt"]["loss"] <= 0.01, hkg["nrt"]
        assert nrt["hkg"]["up"], "20 % loss must not flap the peer down"


def _get(ip: str, port: int, host: str = "hello.test") -> int:
    """Status of one GET through a node's proxy (0 if the connection failed)."""
    try:
        with socket.create_connection((ip, port), timeout=5) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return 0
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _table(f: Fleet, nid: str) -> dict[str, Any]:
    t = f.nodes[nid].table()
    assert t is not None, f"table --json failed on {nid}"
    return t


@pytest.mark.slow
def test_kill9_pinger_goes_stale_proxy_routes_new_pinger_takes_over(tmp_path: Path) -> None:
    """kill -9 of a pinger: the proxy keeps serving, the table goes stale; a new one takes over."""
    with fleet(tmp_path, THREE[:2], delays={("nrt", "hkg"): 10.0}, stale_after=1.0) as f:
        nrt = f.nodes["nrt"]
        assert poll(lambda: _within(f, 2.0), timeout=10.0, step=0.2) is not None, _rtts(f)
        before = _table(f, "nrt")
        assert not before["stale"]
        assert _get(nrt.ip, nrt.http) == 200
        old = nrt.pinger
        assert old is not None
        old.signal(signal.SIGKILL)
        old.proc.wait(timeout=5)
        t_kill = time.monotonic()
        stale = poll(lambda: True if _table(f, "nrt")["stale"] else None, timeout=3.0, step=0.1)
        assert stale, "table not flagged stale after the pinger died"
        assert time.monotonic() - t_kill <= f.stale_after + 1.0
        assert all(_get(nrt.ip, nrt.http) == 200 for _ in range(5)), "proxy stopped routing"
        after_kill = _table(f, "nrt")
        assert {r["id"] for r in after_kill["nodes"]} == {"nrt", "hkg"}, "rows were lost"
        new = f.restart_pinger("nrt")
        fresh = poll(
            lambda: t if not (t := _table(f, "nrt"))["stale"] else None, timeout=3.0, step=0.1
        )
        assert fresh is not None
        assert fresh["writer"]["pid"] == new.proc.pid
        assert fresh["writer"]["boot_epoch"] > before["writer"]["boot_epoch"]
        epochs = {r["id"]: r["boot_epoch"] for r in fresh["nodes"]}
        assert epochs["nrt"] > {r["id"]: r["boot_epoch"] for r in before["nodes"]}["nrt"]
        assert _get(nrt.ip, nrt.http) == 200


def test_second_pinger_on_a_held_table_exits_1(tmp_path: Path) -> None:
    """A second pinger for the same table fails with a clear message and exit status 1."""
    with fleet(tmp_path, THREE[:1], proxies=False, upstreams=False) as f:
        n = f.nodes["nrt"]
        r = subprocess.run(
            [sys.executable, "-m", "pinger", "-c", str(n.config_path)],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert r.returncode == 1, r
        assert "already held by a writer" in r.stderr and "another pinger" in r.stderr
        assert "READY" not in r.stdout
