"""The master's control socket: status and reload, one JSON line each way.

Owns the wire format (a JSON object per line) and both ends of it: the
asyncio server inside the master and the blocking client used by the CLI.
It must not decide anything: it calls the master and relays its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

MAX_LINE = 65536


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
