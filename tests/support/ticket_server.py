"""A TLS server process for the session-ticket tests and bench, and a client for it.

Run as a script it is one server: its own SSLContext (PROTOCOL_TLS_SERVER, the
certificate bundle given), ticket keys from the secret given installed with
`proxy.worker.tickets.install` (unless --no-install), served by blocking sockets
(`stdlib`) or by uvloop (`uvloop`: loop.create_server(ssl=ctx); `accepted`:
loop.connect_accepted_socket(ssl=ctx)). Each connection: the client sends a line, the
server answers `pid=<pid> reused=<0|1> version=<TLS version>` and closes. It prints
`READY port=<port> installed=<0|1>`, then obeys lines on stdin: `clock <seconds>` (the
ticket keys' clock, when started with --clock) answers `ok`, `stats` answers `stats
failed=<handshakes that failed> cb_errors=<exceptions the ticket callback caught>`.
EOF on stdin ends it. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
IO_TIMEOUT = 10.0
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# -- the server (run as a script) ----------------------------------------------


def _reply(reused: bool, version: str | None) -> bytes:
    return f"pid={os.getpid()} reused={int(reused)} version={version}\n".encode()


class _Server:
    def __init__(self, args: argparse.Namespace) -> None:
        sys.path.insert(0, str(REPO))
        from proxy.worker import tickets

        self.failed = 0
        self.now = [float(args.clock) if args.clock is not None else 0.0]
        clock: Callable[[], float] = time.time
        if args.clock is not None:
            clock = self._fake_clock
        if args.clock_raises:
            clock = self._broken_clock
        self.keys = tickets.TicketKeys(bytes.fromhex(args.secret), args.period, clock)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert)
        if args.tls:
            ctx.minimum_version = ctx.maximum_version = VERSIONS[args.tls]
        self.installed = False
        if not args.no_install:
            self.installed = tickets.install(ctx, self.keys, legacy=args.legacy)
            if not self.installed:
                print(f"install failed: {tickets.last_failure()}", file=sys.stderr, flush=True)
        self.ctx = ctx
        self.listener = socket.create_server((HOST, 0), backlog=64)
        self.out = threading.Lock()

    def _fake_clock(self) -> float:
        return self.now[0]

    def _broken_clock(self) -> float:
        raise RuntimeError("a clock that fails")

    def say(self, line: str) -> None:
        with self.out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def control(self, on_eof: object) -> None:
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "clock":
                self.now[0] = float(arg)
                self.say("ok")
            elif cmd == "stats":
                self.say(f"stats failed={self.failed} cb_errors={self.keys.callback_errors}")
        on_eof()  # type: ignore[operator]

    def ready(self) -> None:
        port = self.listener.getsockname()[1]
        self.say(f"READY port={port} installed={int(self.installed)}")

    # blocking sockets, one connection at a time
    def serve_stdlib(self) -> None:
        threading.Thread(target=self._accept_loop, daemon=True).start()
        self.ready()
        self.control(lambda: None)

    def _accept_loop(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            conn.settimeout(IO_TIMEOUT)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as s:
                    buf = b""
                    while b"\n" not in buf:
                        data = s.recv(1024)
                        if not data:
                            break
                        buf += data
                    s.sendall(_reply(s.session_reused, s.version()))
            except (OSError, ValueError):
                self.failed += 1
                conn.close()

    # uvloop: create_server(ssl=ctx) or connect_accepted_socket(ssl=ctx)
    def serve_uvloop(self, accepted: bool) -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(lambda _loop, _ctx: self._count_failure())
        server = self

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                if b"\n" in self.buf:
                    so = self.t.get_extra_info("ssl_object")
                    self.t.write(_reply(so.session_reused, so.version()))  # type: ignore[attr-defined]
                    self.t.close()

        async def main() -> None:
            self.listener.setblocking(False)
            if not accepted:
                await loop.create_server(
                    Proto, sock=self.listener, ssl=self.ctx, ssl_handshake_timeout=IO_TIMEOUT
                )
            else:
                loop.create_task(accept_each())
            server.ready()
            await stopped

        async def accept_each() -> None:
            while True:
                conn, _ = await loop.sock_accept(self.listener)
                loop.create_task(one(conn))

        async def one(conn: socket.socket) -> None:
            try:
                await loop.connect_accepted_socket(
                    Proto, conn, ssl=self.ctx, ssl_handshake_timeout=IO_TIMEOUT
                )
            except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
                self._count_failure()
                conn.close()

        stopped = loop.create_future()
        threading.Thread(
            target=self.control,
            args=(lambda: loop.call_soon_threadsafe(stopped.set_result, None),),
            daemon=True,
        ).start()
        loop.run_until_complete(main())

    def _count_failure(self) -> None:
        self.failed += 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True, help="PEM bundle: chain then key")
    p.add_argument("--secret", required=True, help="hex")
    p.add_argument("--period", type=float, default=3600.0)
    p.add_argument("--loop", choices=("stdlib", "uvloop", "accepted"), default="stdlib")
    p.add_argument("--tls", choices=tuple(VERSIONS), default=None, help="only this version")
    p.add_argument("--clock", type=float, default=None, help="a clock set from stdin")
    p.add_argument("--clock-raises", action="store_true", help="a clock that raises")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--legacy", action="store_true", help="the pre-OpenSSL-3 callback")
    args = p.parse_args()
    server = _Server(args)
    if args.loop == "stdlib":
        server.serve_stdlib()
    else:
        server.serve_uvloop(accepted=args.loop == "accepted")


# -- the test side --------------------------------------------------------------


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


class TicketServer:
    """This file run as a server subprocess; `stop()` (or the with-block) ends it."""

    def __init__(self, cert: Path, secret: bytes, *args: str, period: float = 3600.0) -> None:
        from proxyctl import LineReader

        argv = [sys.executable, __file__, "--cert", str(cert), "--secret", secret.hex()]
        argv += ["--period", repr(period), *args]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(), cwd=REPO
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        line = self.reader.wait_for("READY", 20)
        if line is None:
            self.stop()
            raise RuntimeError(f"ticket server did not start (exit {self.proc.returncode})")
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        self.port = int(fields["port"])
        self.installed = fields["installed"] == "1"

    def _ask(self, line: str, prefix: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        answer = self.reader.wait_for(prefix, 10)
        if answer is None:
            raise RuntimeError(f"ticket server did not answer {line!r}")
        return answer

    def set_clock(self, t: float) -> None:
        self._ask(f"clock {t!r}", "ok")

    def stats(self) -> dict[str, int]:
        line = self._ask("stats", "stats")
        return {k: int(v) for k, v in (f.split("=", 1) for f in line.split()[1:])}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.reader.close()

    def __enter__(self) -> TicketServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Result:
    reused: bool  # the client's view: SSLSocket.session_reused
    session: ssl.SSLSession | None  # the session after the server's reply (its tickets read)
    reply: str  # the server's line


def client_context(ca_pem: Path, version: str) -> ssl.SSLContext:
    """A verifying client context speaking only TLS `version` ("1.2" or "1.3")."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_pem))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def talk(
    port: int,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    name: str = "a.test",
) -> Result:
    """One connection: handshake (offering `session`), a line each way, the server's close."""
    with (
        socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=name, session=session) as s,
    ):
        s.sendall(b"hello\n")
        buf = b""
        while True:
            data = s.recv(1024)
            if not data:
                break
            buf += data
        return Result(s.session_reused, s.session, buf.decode().strip())


if __name__ == "__main__":
    main()
