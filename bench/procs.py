"""Process plumbing for the wrk comparison: free ports, readiness, CPU, cleanup.

Every process the harness starts is a `Managed` process in its own session
(process group), so stopping it also stops whatever it forked. Readiness is a
bounded loop of TCP connects, or a bounded wait for a `READY` line on stdout.
CPU time is read from /proc/<pid>/stat for every process of a tree.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A process under test did not start or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read_stat(int(name))
        if stat is None:
            continue
        children.setdefault(int(stat[1]), []).append(int(name))
    return children


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from `state` on (index 0 = state, 1 = ppid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_split(root: int) -> tuple[float, float]:
    """(user, system) seconds of every live process of the tree, each with the time
    of the children they already reaped (cutime, cstime)."""
    user = system = 0
    for pid in process_tree(root):
        stat = _read_stat(pid)
        if stat is None:
            continue
        # After `state` (index 0): utime=11, stime=12, cutime=13, cstime=14.
        user += int(stat[11]) + int(stat[13])
        system += int(stat[12]) + int(stat[14])
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of every live process of the tree, plus the time of the
    children they already reaped (cutime+cstime), in seconds."""
    return sum(tree_cpu_split(root))


@dataclass
class Managed:
    """A process the harness started, in its own process group."""

    name: str
    argv: Sequence[str]
    log_path: str
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _stdout_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, capture_stdout: bool = False) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(self.argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else self._log,
            stderr=self._log,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Poll host:port with connects until it accepts (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(f"{self.name} exited (rc={self._rc()}); see {self.log_path}")
            if port_accepts(host, port):
                return
            time.sleep(0.05)
        raise StartError(f"{self.name} did not accept on {host}:{port} in {timeout}s")

    def wait_ready_line(self, prefix: str = "READY", timeout: float = 20.0) -> str:
        """Wait for a stdout line starting with `prefix` (bounded); keep draining
        stdout into the log afterwards so the process never blocks on it."""
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        fd = out.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select(): the caller may hold more than 1024 fds
        poller.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"{self.name}: no {prefix!r} line on stdout in {timeout}s")
            ready = poller.poll(min(left, 0.2) * 1000)
            if not ready:
                if not self.alive():
                    raise StartError(f"{self.name} exited (rc={self._rc()}); see {self.log_path}")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise StartError(
                    f"{self.name} closed stdout (rc={self._rc()}); see {self.log_path}"
                )
            self._write_log(chunk)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                self._stdout_lines.append(text)
                if text.startswith(prefix):
                    self._reader = threading.Thread(target=self._drain, args=(fd,), daemon=True)
                    self._reader.start()
                    return text

    def _drain(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 65536):
                self._write_log(chunk)

    def _write_log(self, chunk: bytes) -> None:
        if self._log is not None and not self._log.closed:
            with contextlib.suppress(ValueError, OSError):
                self._log.write(chunk)
                self._log.flush()

    def _rc(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid) if self.alive() else 0.0

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) seconds of the process tree."""
        return tree_cpu_split(self.pid) if self.alive() else (0.0, 0.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop signal to the leader, then SIGKILL to the whole group if needed."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Anything left in the group (workers of a dead master, reload leftovers).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        if self._reader is not None:
            self._reader.join(2.0)  # EOF once every writer of the pipe is gone
        if self.proc.stdout is not None and (self._reader is None or not self._reader.is_alive()):
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
