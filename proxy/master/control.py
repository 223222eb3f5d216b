"""The master's control socket: status and reload, one JSON line each way.

Owns the wire format (a JSON object per line), both ends of it (the asyncio
server inside the master, the blocking client used by the CLI) and who may
speak: the peer's SO_PEERCRED uid, and the private directory of the default
socket path. It must not decide anything else: it calls the master and relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from proxy.config import default_control_dir

MAX_LINE = 65536
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)


class ControlDirError(OSError):
    """The control socket's private directory exists but is not private to us."""


def ensure_private_dir(path: str) -> None:
    """Create `path` (mode 0700) if missing; refuse it unless it is a real directory owned
    by our effective uid that grants nothing to group or other.

    Whoever can write the directory can replace the socket with one of their own, and
    the CLI would hand them its reload and takeover requests.
    """
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, 0o700)
    st = os.lstat(path)
    euid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlDirError(f"control socket directory {path} is not a directory")
    if st.st_uid != euid or mode & 0o077:
        raise ControlDirError(
            f"control socket directory {path} is owned by uid {st.st_uid} with mode "
            f"{mode:04o}: it must be ours (uid {euid}) and 0700; fix or remove it"
        )


def prepare_control_dir(path: str) -> None:
    """Before binding `path`: when it lies in the default private directory, create or
    check that directory (ControlDirError). A path set in the config is the operator's."""
    parent = os.path.dirname(os.path.abspath(path))
    if parent == os.path.abspath(default_control_dir()):
        ensure_private_dir(parent)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket, from the kernel."""
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


def peer_allowed(uid: int) -> bool:
    """Root and the master's own uid may use the socket, for every command (status too:
    it names pids, paths and listeners). The socket's 0600 mode says the same; this
    holds even if the file's mode or directory is widened."""
    return uid in (0, os.geteuid())


class Controlled(Protocol):
    def status(self) -> dict[str, Any]: ...
    async def reload(self, requester: int | None = None) -> dict[str, Any]: ...
    async def give_away(self, sock: socket.socket) -> dict[str, Any]: ...
    def retire(self) -> None: ...
    def take_back(self) -> None: ...


RETIRE_WAIT = 120.0  # seconds a taking-over master may take to serve


async def _takeover(
    master: Controlled, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Hand the sockets over, then wait for "retire" (or take them back)."""
    raw = writer.get_extra_info("socket")
    with socket.socket(fileno=os.dup(raw.fileno())) as sock:
        sock.setblocking(True)
        await master.give_away(sock)
    try:
        line = await asyncio.wait_for(reader.readline(), RETIRE_WAIT)
    except TimeoutError:
        line = b""
    if b"retire" in line:
        writer.write(b'{"ok": true}\n')
        await writer.drain()
        master.retire()
    else:
        master.take_back()


async def serve_control(
    path: str, master: Controlled, sock: socket.socket | None = None
) -> asyncio.Server:
    """Listen on the unix socket `path` (mode 0600), or on `sock` inherited across exec."""
    if sock is not None:
        return await asyncio.start_unix_server(_handler(master), sock=sock, limit=MAX_LINE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(_handler(master), path, limit=MAX_LINE)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def _handler(
    master: Controlled,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            uid = peer_uid(writer.get_extra_info("socket"))
            if not peer_allowed(uid):
                refusal = f"uid {uid} may not use this control socket (root or uid {os.geteuid()})"
                writer.write(orjson.dumps({"ok": False, "error": refusal}) + b"\n")
                await writer.drain()
                return
            try:
                req = orjson.loads(line)
                cmd = req.get("cmd") if isinstance(req, dict) else None
            except orjson.JSONDecodeError:
                cmd = None
            if cmd == "status":
                out: dict[str, Any] = master.status()
            elif cmd == "reload":
                out = await master.reload(writer.get_extra_info("socket").fileno())
            elif cmd == "takeover":
                await _takeover(master, reader, writer)
                return
            else:
                out = {"ok": False, "error": "unknown command (status | reload | takeover)"}
            writer.write(orjson.dumps(out) + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return handle


def call(path: str, cmd: str, timeout: float = 60.0) -> dict[str, Any]:
    """Send one command to the master at `path`; raises OSError if it is not there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(orjson.dumps({"cmd": cmd}) + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(65536)
            if not data:
                break
            buf += data
    out = orjson.loads(buf)
    if not isinstance(out, dict):
        raise OSError("the master sent something that is not a JSON object")
    return out
