"""The process side of the request path: two workers, a killed worker, signals, bad config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from ports import free_port
from proxyctl import REPO, Client, Proxy, Upstream, env, request_bytes, wait_until

pytestmark = [pytest.mark.request_path, pytest.mark.timeout(60)]

Factory = Callable[..., Proxy]


def test_status_lists_two_serving_workers(proxy_factory: Factory) -> None:
    """status --json names the master and two distinct serving workers of one generation."""
    p = proxy_factory()
    st = p.status()
    assert st["master"]["pid"] == p.proc.pid, st
    ws = st["workers"]
    assert len(ws) == 2, st
    assert len({w["pid"] for w in ws}) == 2, st
    assert {w["state"] for w in ws} == {"serving"}, st
    assert {w["generation"] for w in ws} == {st["master"]["generation"]}, st
    assert sorted(w["slot"] for w in ws) == [0, 1], st
    assert st["listeners"], st


def test_both_workers_serve(proxy_factory: Factory) -> None:
    """Over many fresh connections both workers answer (per-worker "requests" in status)."""
    p = proxy_factory()
    for i in range(200):
        r = p.get(f"/spread/{i}")
        assert r.status == 200, r
    counts: dict[int, int] = {}
    deadline = time.monotonic() + 5  # workers publish their counters about once a second
    while time.monotonic() < deadline:
        ws = p.workers()
        assert all("requests" in w for w in ws), f"status has no per-worker requests: {ws}"
        counts = {w["pid"]: w["requests"] for w in ws}
        if sum(counts.values()) >= 200 and all(counts.values()):
            break
        time.sleep(0.2)
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts
    assert sum(counts.values()) >= 200, counts


def test_killed_worker_is_replaced_within_a_second(proxy_factory: Factory) -> None:
    """kill -9 of a worker: a new worker serves in its slot within 1 s; the other is untouched."""
    p = proxy_factory()
    # The cost of asking (a fresh interpreter per status call) is not the master's delay.
    t0 = time.monotonic()
    before = p.workers()
    ask_cost = time.monotonic() - t0
    victim, other = before[0], before[1]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    replaced_after = None
    seen: list = []
    for _ in range(50):
        ws = p.workers()
        seen = ws
        serving = [w for w in ws if w["state"] == "serving"]
        pids = {w["pid"] for w in serving}
        if len(serving) == 2 and victim["pid"] not in pids:
            replaced_after = time.monotonic() - killed_at
            break
        if time.monotonic() - killed_at > 5:
            break
    assert replaced_after is not None, f"no replacement serving within 5s: {seen}"
    assert replaced_after <= 1.0 + ask_cost, (
        f"replacement serving only after {replaced_after:.2f}s (ask cost {ask_cost:.2f}s)"
    )
    assert other["pid"] in {w["pid"] for w in seen}, "the other worker was restarted too"
    new = next(w for w in seen if w["pid"] not in (victim["pid"], other["pid"]))
    assert new["slot"] == victim["slot"], (victim, new)
    for i in range(40):
        assert p.get(f"/after-kill/{i}").status == 200


def test_sigterm_finishes_in_flight_request_then_exits_0(
    proxy_factory: Factory, upstream: Upstream
) -> None:
    """SIGTERM is a graceful stop: an in-flight request completes, then the master exits 0.

    The instance holds the request (tests/support/upstream.py /hold) until the master
    says it is stopping; only then is it let go."""
    p = proxy_factory()
    tag = f"term{time.monotonic_ns()}"
    with Client(p.port, timeout=20) as c:
        c.send(request_bytes("GET", f"/hold?tag={tag}"))
        assert wait_until(lambda: upstream.stats()["tags"].get(tag, {}).get("held"), 10), (
            "the request never reached the instance"
        )
        os.kill(p.proc.pid, signal.SIGTERM)
        assert wait_until(lambda: p.status()["master"]["stopping"], 10), p.status()
        assert upstream.stats()["tags"][tag].get("answered") is None, "answered before the stop"
        upstream.release(tag)
        r = c.response(timeout=10)
        assert r.status == 200, r
        assert r.json() == {"tag": tag, "released": True}
    rc = p.proc.wait(timeout=10)
    assert rc == 0, f"exit status {rc} after SIGTERM"


def test_sigterm_stops_accepting(proxy_factory: Factory) -> None:
    """After a graceful stop the listening port refuses new connections."""
    p = proxy_factory()
    assert p.get("/").status == 200
    os.kill(p.proc.pid, signal.SIGTERM)
    assert p.proc.wait(timeout=10) == 0
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(2)
        s.connect(("127.0.0.1", p.port))


def test_sigint_is_a_fast_stop(proxy_factory: Factory, upstream: Upstream) -> None:
    """SIGINT stops the master and its workers promptly even with a request hanging."""
    p = proxy_factory(timeouts={"upstream_response": 30})
    pids = [w["pid"] for w in p.workers()]
    tag = f"sigint{time.monotonic_ns()}"
    with Client(p.port, timeout=10) as c:
        c.send(request_bytes("GET", f"/hang?hold=20&tag={tag}"))
        assert wait_until(lambda: tag in upstream.stats()["tags"], timeout=5), (
            "the request never reached the instance"
        )
        t0 = time.monotonic()
        os.kill(p.proc.pid, signal.SIGINT)
        p.proc.wait(timeout=5)
        took = time.monotonic() - t0
        assert took < 3, f"SIGINT took {took:.2f}s"
    deadline = time.monotonic() + 3
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        time.sleep(0.05)
    assert not alive, f"workers outlived the master: {alive}"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


# Each config names a listener port (the test holds it) before or beside its mistake.
LISTEN = '[listen]\nhttp = ["127.0.0.1:{port}"]\ncontrol = "{sock}"\n'
BAD_CONFIGS = {
    "hard-below-soft": (
        LISTEN + '[[app]]\nname = "hello"\nhosts = ["hello.test"]\nsoft_limit = 20\n'
        "hard_limit = 5\n",
        "app[0].hard_limit: must be >= soft_limit (20)",
    ),
    "syntax": (LISTEN + "[workers\ncount = 2\n", "(syntax): "),
    "unknown-key": (LISTEN + "[workers]\ncount = 2\nbogus = 1\n", "workers.bogus: unknown key"),
    "bad-address": (
        '[listen]\nhttp = ["127.0.0.1:{port}", "127.0.0.1"]\ncontrol = "{sock}"\n',
        "listen.http[1]: ",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_invalid_config_exits_2_with_file_key_problem(tmp_path: Path, name: str) -> None:
    """`run -c bad.toml` exits 2 with `bad.toml: key: problem` on stderr and binds nothing:
    the listener port it names is held by the test, so a bind would fail with EADDRINUSE
    instead of the config error."""
    text, expected = BAD_CONFIGS[name]
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nid = "bad"\n' + text.format(port=port, sock=tmp_path / "bad.sock"))
    with socket.create_server(("127.0.0.1", port)):
        r = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "run", "-c", str(path)],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert f"bad.toml: {expected}" in r.stderr, r.stderr
    assert "READY" not in r.stdout
    assert "Traceback" not in r.stderr, r.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """`run -c` of a file that does not exist exits 2 naming the file."""
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(tmp_path / "nope.toml")],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "nope.toml: (file): " in r.stderr, r.stderr


def test_status_answers_while_the_config_file_is_broken(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """`edgeproxy status` still reaches the master after a bad edit of its config file."""
    p = proxy_factory(workers=1)
    good = p.path.read_text()
    try:
        p.path.write_text(good.replace("count = 1", "count = -1"))
        r = p.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["master"]["generation"] == 1
    finally:
        p.path.write_text(good)
