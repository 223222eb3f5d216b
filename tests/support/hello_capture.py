"""Real ClientHellos as bytes: what Python's ssl, `openssl s_client` and curl send first.

Owns getting the bytes: an in-memory SSLObject client, or a real client process pointed
at a one-shot listener on 127.0.0.1 that records the hello and hangs up. The records are
framed here by their own lengths, independently of the parser under test.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Callable

MAX_CAPTURE = 1 << 16


def python_hello(
    host: str | None,
    alpn: list[str] | None = None,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> bytes:
    """The first flight of a Python ssl client (MemoryBIO: no socket involved)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def read_hello(conn: socket.socket) -> bytes:
    """The records that carry the first handshake message, read by their own lengths."""
    buf = b""
    pos = 0
    hs = b""
    while True:
        while len(buf) < pos + 5:
            buf += _recv(conn)
        end = pos + 5 + int.from_bytes(buf[pos + 3 : pos + 5], "big")
        while len(buf) < end:
            buf += _recv(conn)
        hs += buf[pos + 5 : end]
        pos = end
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            return buf[:pos]
        if pos > MAX_CAPTURE:
            raise AssertionError(f"no complete hello in {pos} bytes")


def _recv(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise AssertionError("the client hung up before its hello was complete")
    return chunk


def client_hello(argv: Callable[[int], list[str]], timeout: float = 20.0) -> bytes:
    """Start the client argv(port) against a listener on 127.0.0.1 and return its hello."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(timeout)
        port = srv.getsockname()[1]
        proc = subprocess.Popen(
            argv(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout)
                return read_hello(conn)
        finally:
            proc.kill()
            proc.wait(timeout)
