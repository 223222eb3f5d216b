"""TLS resumption rate across server processes and across a "reload", with and without
shared ticket keys (proxy/worker/tickets.py).

    python -m bench.tls_resumption [--n 200] [--openssl-n 40] [--loop uvloop]

Two server processes (tests/support/ticket_server.py: each its own SSLContext, keys
installed from one secret, uvloop create_server by default, as a worker serves) play
two SO_REUSEPORT workers; a client alternates between them, offering each time the
session of its previous connection (a returning browser landing on whichever worker
the kernel picks). Then two new processes with the same secret replace them (a reload:
the master hands its secret to the new generation) and the client goes on. The same
run with keys not installed (OpenSSL's per-process random keys) is the baseline.
Reported per TLS version: resumed / handshakes that offered a session, for Python's
ssl client and for `openssl s_client -sess_in/-sess_out`; and the servers' CPU
microseconds per handshake (from /proc/<pid>/task/*/schedstat), full vs resumed; and
the ticket callback's own cost, measured in one process without sockets (server thread
time per handshake: OpenSSL's own keys vs the EVP and the legacy callback). Written to
bench/results/tls-resumption-<UTC time>.md with the date, machine, load and command.
Traffic stays on 127.0.0.1; every loop is bounded by --n.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.targets import BENCH_DIR
from bench.wrk_compare import cpu_model, uptime

sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "support"))
from certgen import CA
from ticket_server import HOST, TicketServer, client_context, talk

from proxy.worker import tickets

VERSIONS = ("1.2", "1.3")
WARMUP = 5  # full handshakes per server before measuring


def warm(servers: list[TicketServer], ca: Path, version: str) -> None:
    """A few full handshakes on each server before it is measured (first-use costs)."""
    ctx = client_context(ca, version)
    for s in servers:
        for _ in range(WARMUP):
            talk(s.port, ctx)


def cpu_seconds(pid: int) -> float:
    """CPU time of all a process's threads, in seconds (schedstat: nanoseconds on a CPU)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass
class Phase:
    name: str
    offered: int = 0  # handshakes that offered a session
    resumed: int = 0
    total: int = 0
    cpu: float = 0.0  # the servers' CPU seconds over the phase

    def rate(self) -> str:
        if not self.offered:
            return "-"
        return f"{self.resumed}/{self.offered} ({100 * self.resumed / self.offered:.1f} %)"

    def us_per(self) -> str:
        return f"{1e6 * self.cpu / self.total:.0f}" if self.total else "-"


def python_run(
    pki: tuple[Path, Path], version: str, n: int, loop: str, install: bool
) -> list[Phase]:
    """Gen 1 (A, B) alternating, then gen 2 (C, D) with the same secret, one session chain."""
    bundle, ca = pki
    secret = os.urandom(32)
    extra = ("--loop", loop) + (() if install else ("--no-install",))
    ctx = client_context(ca, version)
    session = None
    phases = []
    gens: list[list[TicketServer]] = []
    try:
        for label in ("workers A, B", "after reload: C, D"):
            gens.append([TicketServer(bundle, secret, *extra) for _ in range(2)])
            if len(gens) > 1:
                for s in gens[-2]:  # new before old, as the master reloads
                    s.stop()
            gen = gens[-1]
            warm(gen, ca, version)
            phase = Phase(label)
            before = sum(cpu_seconds(s.proc.pid) for s in gen)
            for i in range(n):
                r = talk(gen[i % 2].port, ctx, session)
                phase.total += 1
                phase.offered += session is not None
                phase.resumed += r.reused
                session = r.session
            phase.cpu = sum(cpu_seconds(s.proc.pid) for s in gen) - before
            phases.append(phase)
    finally:
        for gen in gens:
            for s in gen:
                if s.alive():
                    s.stop()
    return phases


def full_handshake_cpu(pki: tuple[Path, Path], version: str, n: int, loop: str) -> list[Phase]:
    """Full handshakes only (no session offered), keys installed or not: the callback's cost
    when it encrypts the new tickets."""
    bundle, ca = pki
    out = []
    for install in (False, True):
        extra = ("--loop", loop) + (() if install else ("--no-install",))
        with TicketServer(bundle, os.urandom(32), *extra) as s:
            warm([s], ca, version)
            ctx = client_context(ca, version)
            keys = "installed" if install else "not installed"
            phase = Phase(f"one server, full handshakes only, keys {keys}")
            before = cpu_seconds(s.proc.pid)
            for _ in range(n):
                talk(s.port, ctx)
                phase.total += 1
            phase.cpu = cpu_seconds(s.proc.pid) - before
            out.append(phase)
    return out


def _handshake(
    sctx: ssl.SSLContext, cctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[float, bool]:
    """One handshake between two SSLObjects over memory BIOs, in this thread; the server
    side's CPU seconds (thread time around its do_handshake calls) and whether it resumed."""
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = cctx.wrap_bio(cin, cout, server_hostname="a.test", session=session)
    s = sctx.wrap_bio(sin, sout, server_side=True)
    server_done = client_done = False
    spent = 0.0
    for _ in range(20):  # a handshake is a few flights
        if not client_done:
            with contextlib.suppress(ssl.SSLWantReadError):
                c.do_handshake()
                client_done = True
        sin.write(cout.read())
        if not server_done:
            t = time.thread_time()
            with contextlib.suppress(ssl.SSLWantReadError):
                s.do_handshake()
                server_done = True
            spent += time.thread_time() - t
        cin.write(sout.read())
        if server_done and client_done:
            break
    s.write(b"x")  # the client reads the TLS 1.3 tickets with it
    cin.write(sout.read())
    c.read(1)
    return spent, c.session_reused


def callback_cost(pki: tuple[Path, Path], version: str, rounds: int, per: int) -> list[str]:
    """Server CPU per handshake in one process (no sockets, no event loop), OpenSSL's own
    ticket keys vs shared keys (OpenSSL 3 callback, legacy callback), full and resumed,
    measured in interleaved rounds; medians of the rounds."""
    bundle, ca = pki
    cost: dict[tuple[str, str], list[float]] = {}
    setups = {}
    for mode in ("OpenSSL's own keys", "shared keys (EVP callback)", "shared keys (legacy)"):
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(bundle)
        if mode != "OpenSSL's own keys":
            keys = tickets.TicketKeys(tickets.new_secret(), 3600)
            if not tickets.install(sctx, keys, legacy="legacy" in mode):
                raise RuntimeError(tickets.last_failure())
        cctx = client_context(ca, version)
        for _ in range(WARMUP * 4):
            _handshake(sctx, cctx, None)
        setups[mode] = (sctx, cctx, _session(sctx, cctx))
    for _ in range(rounds):
        for mode, (sctx, cctx, resume) in setups.items():
            for kind, session in (("full", None), ("resumed", resume)):
                spent = 0.0
                for _ in range(per):
                    t, reused = _handshake(sctx, cctx, session)
                    if reused != (session is not None):
                        raise RuntimeError(f"{mode} {kind}: resumed={reused}")
                    spent += t
                cost.setdefault((mode, kind), []).append(spent / per)
    return [
        f"| {version} | {mode} | {kind} | {1e6 * statistics.median(v):.0f} |"
        for (mode, kind), v in cost.items()
    ]


def _session(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> ssl.SSLSession:
    """A session (with its tickets read) from one full handshake."""
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = cctx.wrap_bio(cin, cout, server_hostname="a.test")
    s = sctx.wrap_bio(sin, sout, server_side=True)
    for _ in range(20):
        with contextlib.suppress(ssl.SSLWantReadError):
            c.do_handshake()
        sin.write(cout.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            s.do_handshake()
        cin.write(sout.read())
    s.write(b"x")
    cin.write(sout.read())
    c.read(1)
    if c.session is None:
        raise RuntimeError("no session")
    return c.session


def s_client(port: int, ca: Path, version: str, sess_in: Path | None, sess_out: Path) -> bool:
    """One `openssl s_client` exchange; whether it says Reused."""
    argv = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "a.test"]
    argv += ["-CAfile", str(ca), "-verify_return_error", "-ign_eof", f"-tls1_{version[-1]}"]
    argv += ["-sess_out", str(sess_out)]
    if sess_in is not None:
        argv += ["-sess_in", str(sess_in)]
    done = subprocess.run(argv, input=b"hello\n", capture_output=True, timeout=30, check=False)
    out = done.stdout.decode(errors="replace")
    if "pid=" not in out:
        raise RuntimeError(f"s_client got no answer: {done.stderr.decode(errors='replace')}")
    return "\nReused, " in out


def openssl_run(
    pki: tuple[Path, Path], version: str, n: int, loop: str, install: bool, tmp: Path
) -> Phase:
    """s_client alternating between two processes; the session file is the last one written
    (s_client writes it only when a ticket arrives)."""
    bundle, ca = pki
    secret = os.urandom(32)
    extra = ("--loop", loop) + (() if install else ("--no-install",))
    phase = Phase("workers A, B")
    sess = tmp / "sess.pem"
    sess.unlink(missing_ok=True)
    with TicketServer(bundle, secret, *extra) as a, TicketServer(bundle, secret, *extra) as b:
        for i in range(n):
            new = tmp / "new.pem"
            new.unlink(missing_ok=True)
            have = sess.exists()
            reused = s_client((a, b)[i % 2].port, ca, version, sess if have else None, new)
            phase.total += 1
            phase.offered += have
            phase.resumed += reused
            if new.exists():
                shutil.move(new, sess)
    return phase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="handshakes per phase (Python client)")
    p.add_argument("--openssl-n", type=int, default=40, help="s_client handshakes per run")
    p.add_argument("--rounds", type=int, default=10, help="in-process cost: rounds")
    p.add_argument("--per-round", type=int, default=50, help="in-process cost: per round")
    p.add_argument("--loop", choices=("stdlib", "uvloop", "accepted"), default="uvloop")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    n = max(2, min(args.n, 5000))
    on = max(2, min(args.openssl_n, 500))
    started = dt.datetime.now(dt.UTC)
    up_before = uptime()
    rows: list[str] = []
    cpu_rows: list[str] = []
    cost_rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tls-resumption-") as d:
        tmp = Path(d)
        ca = CA.new()
        bundle = ca.issue(("a.test",)).write(tmp / "a.test.pem")
        (tmp / "ca.pem").write_bytes(ca.pem())
        pki = (bundle, tmp / "ca.pem")
        for version in VERSIONS:
            for install in (True, False):
                keys = "shared keys" if install else "per-process keys (baseline)"
                for ph in python_run(pki, version, n, args.loop, install):
                    rows.append(f"| {version} | python ssl | {keys} | {ph.name} | {ph.rate()} |")
                    cpu_rows.append(
                        f"| {version} | {keys}, {ph.name} | {ph.total} | {ph.resumed} "
                        f"| {ph.us_per()} |"
                    )
            if shutil.which("openssl"):
                for install in (True, False):
                    keys = "shared keys" if install else "per-process keys (baseline)"
                    ph = openssl_run(pki, version, on, args.loop, install, tmp)
                    rows.append(
                        f"| {version} | openssl s_client | {keys} | {ph.name} | {ph.rate()} |"
                    )
            cost_rows += callback_cost(pki, version, args.rounds, args.per_round)
            for ph in full_handshake_cpu(pki, version, n, args.loop):
                cpu_rows.append(f"| {version} | {ph.name} | {ph.total} | 0 | {ph.us_per()} |")
    command = "python -m bench.tls_resumption " + shlex.join(sys.argv[1:])
    text = "\n".join(
        [
            "# TLS resumption across server processes and a reload",
            "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC",
            f"- machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs "
            "(shared with other jobs while measured: timings are noisy)",
            f"- OpenSSL: {__import__('ssl').OPENSSL_VERSION}; server loop: {args.loop}",
            f"- uptime before: `{up_before}`; after: `{uptime()}`",
            f"- command: {command}",
            "",
            "Each handshake offers the session of the client's previous connection; "
            "connections alternate between two server processes (own SSLContexts, one "
            "secret). `after reload`: two new processes with the same secret replace them; "
            "its first handshake offers a ticket from the old generation.",
            "",
            "| TLS | client | keys | servers | resumed / offered |",
            "|---|---|---|---|---:|",
            *rows,
            "",
            "Server CPU per handshake (all threads of the serving processes, from "
            "/proc/<pid>/task/*/schedstat; each server warmed up first). Compare rows of "
            "the same shape: alternating between two processes costs more per handshake "
            "than staying on one (caches), whatever the keys.",
            "",
            "| TLS | run | handshakes | resumed | server CPU µs / handshake |",
            "|---|---|---:|---:|---:|",
            *cpu_rows,
            "",
            "The ticket callback's own cost: server CPU per handshake in one process (two "
            "SSLObjects over memory BIOs, no sockets, no loop; thread time around the "
            "server's do_handshake), median of interleaved rounds "
            f"({args.rounds} x {args.per_round} handshakes per cell):",
            "",
            "| TLS | keys | handshake | server CPU µs |",
            "|---|---|---|---:|",
            *cost_rows,
            "",
        ]
    )
    out = args.out or BENCH_DIR / "results" / f"tls-resumption-{started:%Y%m%d-%H%M}.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
