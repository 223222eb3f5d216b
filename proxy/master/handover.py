"""Handing a running master's sockets and workers to new code: re-exec and takeover.

Owns the wire and env formats of a handover (listening fds keyed by kind,
address and slot; adopted workers), passing fds (SCM_RIGHTS, or inheritance
across exec), and telling whether the code on disk changed. It must not start
or stop workers: the master does, from what this module hands it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

ENV = "EDGEPROXY_REEXEC"
PACKAGES = ("proxy", "shm", "pinger")
MAX_FDS = 1024


@dataclass(frozen=True, slots=True)
class ListenerFd:
    kind: str
    address: str
    slot: int
    fd: int


@dataclass(frozen=True, slots=True)
class WorkerFd:
    pid: int
    slot: int
    generation: int
    cell: int
    stats_fd: int  # -1 when not handed over
    state: str


@dataclass(slots=True)
class Handover:
    """What a new master adopts from the one before it."""

    generation: int
    listeners: list[ListenerFd]
    workers: list[WorkerFd]
    control_fd: int = -1  # re-exec: the control socket, so it never stops answering
    reply_fd: int = -1  # re-exec: the `edgeproxy reload` waiting for the outcome
    started: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def fds(self) -> list[int]:
        out = [lst.fd for lst in self.listeners]
        out += [w.stats_fd for w in self.workers if w.stats_fd >= 0]
        out += [fd for fd in (self.control_fd, self.reply_fd) if fd >= 0]
        return out

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> Handover:
        d = orjson.loads(raw)
        return cls(
            generation=int(d["generation"]),
            listeners=[ListenerFd(**x) for x in d["listeners"]],
            workers=[WorkerFd(**x) for x in d["workers"]],
            control_fd=int(d.get("control_fd", -1)),
            reply_fd=int(d.get("reply_fd", -1)),
            started=float(d.get("started", 0.0)),
            extra=dict(d.get("extra", {})),
        )


def code_fingerprint() -> str:
    """A digest of the installed code (file names, sizes, mtimes: sources and the
    compiled request path) and the interpreter."""
    h = hashlib.sha256(sys.executable.encode())
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for pkg in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(here, pkg)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            rel = os.path.relpath(root, here)
            for name in sorted(files):
                if name.endswith((".py", ".so")):
                    try:
                        st = os.stat(os.path.join(root, name))
                    except OSError:
                        continue
                    h.update(f"{rel}/{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


async def preflight(timeout: float = 60.0) -> str | None:
    """Does the code on disk import? None when it does, else why not."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import proxy.master.master, proxy.worker.worker, proxy.cli",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "the new code did not import in time"
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        return "the new code does not import: " + (
            lines[-1] if lines else f"exit {proc.returncode}"
        )
    return None


def exec_self(state: Handover, argv: list[str]) -> None:
    """Replace this process with `argv`, keeping the PID and the fds `state` names."""
    for fd in state.fds():
        os.set_inheritable(fd, True)
    env = dict(os.environ)
    env[ENV] = state.encode().decode()
    os.execve(sys.executable, [sys.executable, *argv], env)


def from_env() -> Handover | None:
    """The state a previous image of this master left, if this is a re-exec."""
    raw = os.environ.pop(ENV, None)
    if not raw:
        return None
    state = Handover.decode(raw)
    for fd in state.fds():
        os.set_inheritable(fd, False)
    return state


def send(sock: socket.socket, state: Handover) -> None:
    """Takeover, old side: the state line and every fd in one message."""
    payload = state.encode() + b"\n"
    socket.send_fds(sock, [payload], state.fds())


def receive(sock: socket.socket) -> Handover:
    """Takeover, new side: the state and its fds (renumbered into this process)."""
    buf = b""
    fds: list[int] = []
    while not buf.endswith(b"\n"):
        data, got, _, _ = socket.recv_fds(sock, 1 << 20, MAX_FDS)
        fds += got
        if not data:
            break
        buf += data
    if not buf.endswith(b"\n"):
        raise OSError("the running master closed the takeover without handing anything over")
    d = orjson.loads(buf)
    if not d.get("ok", True):
        raise OSError(f"takeover refused: {d.get('error')}")
    state = Handover.decode(buf)
    # Fds arrive in the order they were sent: listeners, then stats blocks.
    it = iter(fds)
    state.listeners = [ListenerFd(x.kind, x.address, x.slot, next(it)) for x in state.listeners]
    state.workers = [
        WorkerFd(w.pid, w.slot, w.generation, w.cell, next(it) if w.stats_fd >= 0 else -1, w.state)
        for w in state.workers
    ]
    for fd in it:
        os.close(fd)
    return state
