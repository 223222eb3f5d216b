"""The master (arbiter): owns the listeners, spawns and watches the workers.

Signal handlers only enqueue; one loop dispatches `handle_<name>`. A reload
starts the new generation on the same sockets, waits until every new worker is
ready, then tells the old one to drain (new before old). The master must not
serve client traffic itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import orjson

from proxy.config import Config, ConfigError, load, parse_address
from proxy.config_table import inflight_name
from proxy.fleettls import insecure_warning
from proxy.fleettls import load as check_backhaul_tls
from proxy.master.admin import start_admin
from proxy.master.control import ControlDirError, prepare_control_dir, serve_control
from proxy.master.handover import (
    Handover,
    ListenerFd,
    WorkerFd,
    code_fingerprint,
    exec_self,
    from_env,
    preflight,
    receive,
    send,
)
from proxy.master.listeners import ListenerSet, ListenKey, wanted_keys
from proxy.master.notify import sd_notify
from proxy.master.static_table import SharedState
from proxy.master.views import MasterViews
from proxy.master.worker_proc import WorkerProc
from proxy.telemetry.aggregate import Aggregator
from proxy.telemetry.metrics import app_labels, block_size_for
from proxy.telemetry.statsblock import StatsBlock
from shm.errors import ShmError
from shm.reader import TableReader

log = logging.getLogger("edgeproxy.master")


def load_checked(path: str) -> Config:
    """The config at `path`, its [backhaul] certificate files read and checked too (a
    generation would not start on them: better refused now, with the file named)."""
    config = load(path)
    check_backhaul_tls(config)
    return config


def warn_insecure(config: Config) -> None:
    """At every start and reload of a plaintext backhaul: say so."""
    warning = insecure_warning(config)
    if warning is not None:
        log.warning("WARNING: %s", warning)


READY_TIMEOUT = 30.0
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class Master(MasterViews):
    def __init__(
        self,
        config: Config,
        config_path: str,
        handover: Handover | None = None,
        takeover: socket.socket | None = None,
    ) -> None:
        self.handover = handover  # what a previous image (re-exec) or master (takeover) left
        # The secret every worker derives its TLS session-ticket keys from, for this
        # master's life and the lives it hands over to (a ticket resumes on any worker of
        # any generation): carried by re-exec and takeover, new otherwise.
        secret = handover.extra.get("ticket_secret") if handover is not None else None
        self.ticket_secret = secret if isinstance(secret, str) else os.urandom(32).hex()
        self.takeover_sock = takeover  # takeover: the old master, told to retire once we serve
        self.fingerprint = code_fingerprint()
        self.config = config
        self.config_path = config_path
        self.config_text = open(config_path, encoding="utf-8").read()  # noqa: SIM115 - read once at start
        self.listeners = ListenerSet()
        self.workers: dict[int, WorkerProc] = {}  # pid -> worker
        self.generation = 0
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.stopping = False
        self.fast = False
        self.aggregator = Aggregator(
            [a.name for a in config.apps], max_apps=config.metrics.max_apps
        )
        self.crashes: dict[int, list[float]] = {}  # slot -> recent crash times
        self.reload_lock = asyncio.Lock()
        self.servers: list[asyncio.AbstractServer] = []
        self.started = time.time()
        self.shared: SharedState | None = None
        self.handed_over = False  # a takeover got our sockets: leave shared memory alone
        self.control_server: asyncio.Server | None = None
        self.table_reader: TableReader | None = None

    # bookkeeping ---------------------------------------------------------------
    def kinds(self, config: Config) -> dict[str, tuple[Any, ...]]:
        kinds: dict[str, tuple[Any, ...]] = {"http": config.listen.http}
        if config.listen.https:
            kinds["https"] = config.listen.https
        if config.listen.backhaul is not None:
            kinds["backhaul"] = (config.listen.backhaul,)
        return kinds

    def current(self) -> list[WorkerProc]:
        return [w for w in self.workers.values() if w.generation == self.generation]

    # spawning ------------------------------------------------------------------
    def spawn(self, slot: int, generation: int, config: Config, text: str) -> WorkerProc:
        loop = asyncio.get_running_loop()
        fds = self.listeners.fds_for_slot(self.kinds(config), slot)
        assert self.shared is not None
        cell = self.shared.take_cell()
        labels = app_labels([a.name for a in config.apps], config.metrics.max_apps)
        block = StatsBlock.create(block_size_for(len(labels)))
        r, w = os.pipe()
        boot = {
            "config_text": text,
            "config_path": self.config_path,
            "slot": slot,
            "generation": generation,
            "master_pid": os.getpid(),
            "listeners": [{"kind": k.kind, "address": str(k.address), "fd": fd} for k, fd in fds],
            "notify_fd": w,
            "stats_fd": block.fd,
            "cell": cell,
            "inflight": inflight_name(config.table),
            "ticket_secret": self.ticket_secret,
        }
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.worker"],
            stdin=subprocess.PIPE,
            pass_fds=[fd for _, fd in fds] + [w, block.fd],
            env=env,
            start_new_session=False,
        )
        os.close(w)
        assert proc.stdin is not None
        proc.stdin.write(orjson.dumps(boot))
        proc.stdin.close()
        wp = WorkerProc(slot, generation, proc.pid, block, cell, loop.time(), popen=proc)
        self.workers[proc.pid] = wp

        def on_ready() -> None:
            try:
                data = os.read(r, 256)
            except OSError:
                data = b""
            loop.remove_reader(r)
            os.close(r)
            if not wp.ready.done():
                wp.ready.set_result(data.startswith(b"READY"))
            if data.startswith(b"READY") and wp.state == "starting":
                wp.state = "serving"

        loop.add_reader(r, on_ready)
        return wp

    async def start_generation(self, config: Config, text: str) -> list[WorkerProc]:
        """Spawn a full generation; return it once every worker is ready, or raise."""
        self.listeners.ensure(wanted_keys(self.kinds(config), config.workers.count))
        generation = self.generation + 1
        new = [self.spawn(slot, generation, config, text) for slot in range(config.workers.count)]
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                results = await asyncio.gather(*(w.ready for w in new))
        except TimeoutError:
            results = [False]
        if not all(results):
            for w in new:
                self.signal_worker(w, signal.SIGKILL)
            raise RuntimeError("the new generation's workers did not become ready")
        self.generation = generation
        return new

    def signal_worker(self, w: WorkerProc, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, sig)

    # the loop ------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.queue.put_nowait, sig)
        h = self.handover
        try:
            self.shared = SharedState(self.config, [w.cell for w in h.workers] if h else [])
        except ShmError as e:
            log.error("edgeproxy: shared memory: %s", e)
            return 1
        old = self.adopt(h) if h is not None else []
        try:
            await self.start_generation(self.config, self.config_text)
        except (OSError, RuntimeError) as e:
            log.error("edgeproxy: %s", e)
            if old:  # the previous generation keeps serving; it has nobody else
                self.reply(h, {"ok": False, "error": str(e)})
                return await self.serve_on(None)
            self.shutdown_now()
            self.shared.close(unlink=True)
            return 1
        for w in old:
            w.state = "draining"
            self.signal_worker(w, signal.SIGTERM)
        self.reply(h, {"ok": True, "generation": self.generation})
        return await self.serve_on(h)

    async def serve_on(self, h: Handover | None) -> int:
        """Serve control and admin, dispatch signals until stopped."""
        assert self.shared is not None
        self.publish_tick()
        if h is not None and h.control_fd >= 0:
            sock = socket.socket(fileno=h.control_fd)
            self.control_server = await serve_control(self.config.listen.control, self, sock)
        else:
            self.control_server = await serve_control(self.config.listen.control, self)
        self.servers.append(self.control_server)
        control_ino = os.stat(self.config.listen.control).st_ino
        if self.config.listen.admin is not None:
            a = self.config.listen.admin
            self.servers.append(await start_admin(a.host, a.port, self.metrics_text, self.health))
        if self.takeover_sock is not None:
            retire_old(self.takeover_sock)  # only now: everything of ours is bound
            self.takeover_sock = None
        print(
            f"READY pid={os.getpid()} generation={self.generation} workers={len(self.current())}",
            flush=True,
        )
        sd_notify(b"READY=1\nMAINPID=%d" % os.getpid())
        while True:
            signum = await self.queue.get()
            name = signal.Signals(signum).name[3:].lower()
            await getattr(self, f"handle_{name}")()
            if self.stopping and not self.workers:
                break
        for srv in self.servers:
            srv.close()
        self.listeners.close_all()
        self.shared.close(unlink=not self.handed_over)
        with contextlib.suppress(OSError):
            # A successor may already listen there: remove only our own socket file.
            if os.stat(self.config.listen.control).st_ino == control_ino:
                os.unlink(self.config.listen.control)
        return 0

    async def handle_chld(self) -> None:
        # Reap only our workers: other children (the preflight of new code) belong to
        # asyncio's child watcher, which must see their exit status itself.
        for pid in list(self.workers):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got == 0:
                continue
            w = self.workers.pop(pid)
            if w.popen is not None:
                w.popen.returncode = os.waitstatus_to_exitcode(status)  # reaped: by us
            self.aggregator.retire(pid, w.block.read())
            w.block.close()
            assert self.shared is not None
            if not self.handed_over:
                self.shared.give_cell(w.cell)
            if not w.ready.done():
                w.ready.set_result(False)
            if self.stopping:
                continue
            if w.generation == self.generation and w.state != "draining":
                code = os.waitstatus_to_exitcode(status)
                log.warning("worker %d (slot %d) exited with %d; respawning", pid, w.slot, code)
                self.respawn_later(w.slot)

    def respawn_later(self, slot: int) -> None:
        now = time.monotonic()
        recent = [t for t in self.crashes.get(slot, []) if now - t < 60]
        recent.append(now)
        self.crashes[slot] = recent
        delay = 0.0 if len(recent) <= 2 else min(10.0, 0.1 * 2 ** (len(recent) - 2))
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self.respawn, slot, self.generation)

    def respawn(self, slot: int, generation: int) -> None:
        if self.stopping or generation != self.generation:
            return
        if any(w.slot == slot and w.generation == generation for w in self.workers.values()):
            return
        self.spawn(slot, generation, self.config, self.config_text)

    async def handle_hup(self) -> None:
        await self.reload()

    async def reload(self, requester: int | None = None) -> dict[str, Any]:
        """Validate, start the new generation, drain the old. Returns the outcome.

        When the code on disk changed (a package upgrade), the master re-executes
        itself in place instead (same PID, same sockets), after checking that the
        new code imports; `requester` then gets its answer from the new image.
        """
        async with self.reload_lock:
            if self.stopping:
                return {"ok": False, "error": "the master is stopping"}
            sd_notify(b"RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
            try:
                text = open(self.config_path, encoding="utf-8").read()  # noqa: SIM115
                config = load_checked(self.config_path)
            except (OSError, ConfigError) as e:
                log.error("reload refused, keeping the running config: %s", e)
                sd_notify(b"READY=1")
                return {"ok": False, "error": str(e)}
            if code_fingerprint() != self.fingerprint:
                problem = await preflight()
                if problem is not None:
                    log.error("reload refused, keeping the running code: %s", problem)
                    sd_notify(b"READY=1")
                    return {"ok": False, "error": problem}
                self.reexec(requester)  # returns only if exec failed
                return {"ok": False, "error": "re-exec failed"}
            old = [w for w in self.workers.values() if w.state != "draining"]
            assert self.shared is not None
            self.shared.apply(config)  # slots of staying instances never move
            try:
                await self.start_generation(config, text)
            except (OSError, RuntimeError) as e:
                log.error("reload failed, keeping the running generation: %s", e)
                self.shared.apply(self.config)
                sd_notify(b"READY=1")
                return {"ok": False, "error": str(e)}
            self.config, self.config_text = config, text
            warn_insecure(config)
            self.aggregator.set_apps([a.name for a in config.apps], config.metrics.max_apps)
            for w in old:
                w.state = "draining"
                self.signal_worker(w, signal.SIGTERM)
            asyncio.get_running_loop().create_task(self.close_stale_listeners())
            sd_notify(b"READY=1")
            log.info("reloaded: generation %d serves", self.generation)
            return {"ok": True, "generation": self.generation}

    async def close_stale_listeners(self) -> None:
        """Close sockets of removed listeners once nothing uses them."""
        while any(w.state == "draining" for w in self.workers.values()):
            await asyncio.sleep(0.5)
        wanted = set(wanted_keys(self.kinds(self.config), self.config.workers.count))
        for k in self.listeners.close_unused(wanted):
            log.info("closed listener %s", k.label())

    async def handle_term(self) -> None:
        if self.stopping:
            await self.handle_int()
            return
        self.stopping = True
        for w in list(self.workers.values()):
            w.state = "draining"
            self.signal_worker(w, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.workers.drain_timeout + 5, self.queue.put_nowait, signal.SIGINT)

    async def handle_int(self) -> None:
        self.stopping = True
        self.fast = True
        for w in list(self.workers.values()):
            self.signal_worker(w, signal.SIGINT)
        loop = asyncio.get_running_loop()
        loop.call_later(5.0, self.kill_all)

    async def handle_quit(self) -> None:
        await self.handle_int()

    def publish_tick(self) -> None:
        """Heartbeat and local load into the table (when the master writes it)."""
        if self.shared is not None and not self.stopping:
            self.shared.tick(time.time())
        period = self.config.pinger.load_publish_ms / 1000
        asyncio.get_running_loop().call_later(period, self.publish_tick)

    def kill_all(self) -> None:
        for w in list(self.workers.values()):
            self.signal_worker(w, signal.SIGKILL)

    def shutdown_now(self) -> None:
        for w in list(self.workers.values()):
            self.signal_worker(w, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
        self.listeners.close_all()

    # handing over ------------------------------------------------------------------
    def state(self, with_blocks: bool) -> Handover:
        """This master's sockets and workers, for a re-exec or a takeover."""
        listeners = [
            ListenerFd(k.kind, str(k.address), k.slot, sock.fileno())
            for k, sock in self.listeners.socks.items()
        ]
        workers = [
            WorkerFd(
                w.pid, w.slot, w.generation, w.cell, w.block.fd if with_blocks else -1, w.state
            )
            for w in self.workers.values()
        ]
        return Handover(
            self.generation,
            listeners,
            workers,
            started=self.started,
            extra={"ticket_secret": self.ticket_secret},
        )

    def adopt(self, h: Handover) -> list[WorkerProc]:
        """Take the listeners (and, after a re-exec, the workers) a handover brought."""
        self.generation = h.generation
        if h.started:
            self.started = h.started
        for lst in h.listeners:
            self.listeners.adopt(ListenKey(lst.kind, parse_address(lst.address), lst.slot), lst.fd)
        out = []
        loop = asyncio.get_running_loop()
        for w in h.workers:
            if w.stats_fd < 0:
                continue  # takeover: the old master's children stay the old master's
            wp = WorkerProc(w.slot, w.generation, w.pid, StatsBlock.attach(w.stats_fd), w.cell, 0.0)
            wp.state = w.state if w.state == "draining" else "serving"
            wp.ready.set_result(True)
            self.workers[w.pid] = wp
            if w.state != "draining":
                out.append(wp)
        loop.call_soon(self.queue.put_nowait, signal.SIGCHLD)  # reap what died during exec
        return out

    def reply(self, h: Handover | None, outcome: dict[str, Any]) -> None:
        """Answer the `edgeproxy reload` that asked for the re-exec."""
        if h is None or h.reply_fd < 0:
            return
        with contextlib.suppress(OSError), socket.socket(fileno=h.reply_fd) as s:
            s.setblocking(True)
            s.settimeout(5)
            s.sendall(orjson.dumps(outcome) + b"\n")
        h.reply_fd = -1

    def reexec(self, requester: int | None) -> None:
        """Become the code on disk: same PID, same sockets, same workers (then reload)."""
        assert self.shared is not None
        state = self.state(with_blocks=True)
        control = self.control_server
        if control is not None and control.sockets:
            state.control_fd = os.dup(control.sockets[0].fileno())
        if requester is not None:
            state.reply_fd = os.dup(requester)
        self.shared.close(unlink=False)
        log.info("re-executing the master for new code (pid %d stays)", os.getpid())
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            exec_self(state, ["-m", "proxy.cli", "run", "-c", self.config_path])
        except OSError as e:
            log.error("re-exec failed, keeping the running code: %s", e)
            self.shared = SharedState(self.config, [w.cell for w in self.workers.values()])

    async def give_away(self, sock: socket.socket) -> dict[str, Any]:
        """Takeover, old side: hand our sockets over; drain once the new master serves."""
        assert self.shared is not None
        state = self.state(with_blocks=False)
        self.shared.close(unlink=False)  # the new master takes the segments over
        self.handed_over = True
        send(sock, state)
        return {"ok": True}

    def retire(self) -> None:
        """Takeover, old side: the new master serves; drain and leave."""
        log.info("taken over: draining generation %d", self.generation)
        self.queue.put_nowait(signal.SIGTERM)

    def take_back(self) -> None:
        """Takeover, old side: the new master never said it serves; carry on."""
        if not self.handed_over:
            return
        log.error("takeover did not complete: serving on")
        self.handed_over = False
        try:
            self.shared = SharedState(self.config, [w.cell for w in self.workers.values()])
        except ShmError as e:
            log.error("shared memory after a failed takeover: %s", e)


def retire_old(sock: socket.socket) -> None:
    """Takeover, new side: we serve; tell the old master to drain and leave."""
    with contextlib.suppress(OSError), sock:
        sock.settimeout(5)
        sock.sendall(b'{"cmd": "retire"}\n')
        sock.recv(4096)


def run(config_path: str, takeover: str | None = None) -> int:
    """`edgeproxy run -c FILE [--takeover SOCKET]`: exit 2 on a bad config."""
    try:
        config = load_checked(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if config.log.format == "json":
        from proxy.master.logfmt import json_handler

        logging.basicConfig(level=logging.INFO, handlers=[json_handler(config.node.id)])
    else:
        logging.basicConfig(level=logging.INFO, format="edgeproxy[%(process)d]: %(message)s")
    warn_insecure(config)
    try:
        prepare_control_dir(config.listen.control)
    except ControlDirError as e:
        print(f"edgeproxy: {e}", file=sys.stderr)
        return 1
    handover = from_env()
    sock = None
    if handover is None and takeover is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(30)
            sock.connect(takeover)
            sock.sendall(b'{"cmd": "takeover"}\n')
            handover = receive(sock)
        except OSError as e:
            sock.close()
            print(f"edgeproxy: takeover from {takeover} failed: {e}", file=sys.stderr)
            return 1
    master = Master(config, config_path, handover, sock)
    return asyncio.run(master.run())
