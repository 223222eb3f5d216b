"""A real etcd (Debian's etcd-server) for tests: one member or a three-member cluster.

Members listen on free 127.0.0.1 ports with data under a temporary directory; `start()`
waits until every running member answers /health; members can be stopped and started
again one by one (outage tests). Its pytest fixtures, `etcd1` and `etcd3`, are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ci_policy import skip_or_fail
from ports import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def require_etcd() -> None:
    """Skip without the binary, except in CI where it must be installed."""
    if not os.path.exists(ETCD):
        skip_or_fail(f"etcd-server is not installed ({ETCD})")


class Member:
    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = base / name
        self.log_path = base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str) -> None:
        cmd = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", "edgeproxy-test",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115  (owned by the child)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=0.5) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, nothing is answered."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """`size` members on loopback; `endpoints` lists every member's client URL."""

    def __init__(self, size: int = 1, base: Path | None = None) -> None:
        self._tmp = None if base else tempfile.mkdtemp(prefix="etcd-test-")
        self.base = base or Path(self._tmp or ".")
        self.base.mkdir(parents=True, exist_ok=True)
        self.members = [Member(f"m{i}", self.base) for i in range(size)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout: float = 20.0) -> None:
        for m in self.members:
            if not m.running:
                m.start(self.initial_cluster)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [
                m.name for m in self.members if m.proc is not None and m.proc.poll() is not None
            ]
            if dead:
                raise RuntimeError(f"etcd member(s) {dead} exited: {self.logs()}")
            if all(m.healthy() for m in self.members if m.running):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy after {timeout}s: {self.logs()}")
            time.sleep(0.05)

    def stop_member(self, i: int, sig: int = signal.SIGTERM) -> None:
        self.members[i].stop(sig)

    def start_member(self, i: int, timeout: float = 20.0) -> None:
        self.members[i].start(self.initial_cluster)
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for m in self.members:
            m.thaw()  # a frozen member would not see SIGTERM
        for m in self.members:
            m.stop()

    def close(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                out.append(f"--- {m.name}:\n" + m.log_path.read_text(errors="replace")[-3000:])
        return "\n".join(out)
