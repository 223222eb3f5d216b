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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy import __version__
from proxy.admin import start_admin
from proxy.config import Config, ConfigError, load
from proxy.control import serve_control
from proxy.listeners import ListenerSet, wanted_keys
from proxy.metrics import Aggregator, Snapshot, SnapshotError, block_size_for
from proxy.notify import sd_notify
from proxy.static_table import SharedState, inflight_name
from proxy.statsblock import StatsBlock
from shm.errors import ShmError

log = logging.getLogger("edgeproxy.master")

READY_TIMEOUT = 30.0
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


@dataclass(eq=False)
class WorkerProc:
    slot: int
    generation: int
    proc: subprocess.Popen[bytes]
    block: StatsBlock
    cell: int
    started: float
    state: str = "starting"  # starting | serving | draining
    ready: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def pid(self) -> int:
        return self.proc.pid


class Master:
    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.config_text = open(config_path, encoding="utf-8").read()  # noqa: SIM115 - read once at start
        self.listeners = ListenerSet()
        self.workers: dict[int, WorkerProc] = {}  # pid -> worker
        self.generation = 0
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.stopping = False
        self.fast = False
        self.aggregator = Aggregator([a.name for a in config.apps])
        self.crashes: dict[int, list[float]] = {}  # slot -> recent crash times
        self.reload_lock = asyncio.Lock()
        self.servers: list[asyncio.AbstractServer] = []
        self.started = time.time()
        self.shared: SharedState | None = None

    # bookkeeping ---------------------------------------------------------------
    def kinds(self, config: Config) -> dict[str, tuple[Any, ...]]:
        kinds: dict[str, tuple[Any, ...]] = {"http": config.listen.http}
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
        block = StatsBlock.create(block_size_for(len(config.apps)))
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
            "inflight": inflight_name(config),
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
        wp = WorkerProc(slot, generation, proc, block, cell, loop.time())
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
        try:
            self.shared = SharedState(self.config)
        except ShmError as e:
            log.error("edgeproxy: shared memory: %s", e)
            return 1
        try:
            await self.start_generation(self.config, self.config_text)
        except (OSError, RuntimeError) as e:
            log.error("edgeproxy: %s", e)
            self.shutdown_now()
            self.shared.close(unlink=True)
            return 1
        self.publish_tick()
        self.servers.append(await serve_control(self.config.listen.control, self))
        control_ino = os.stat(self.config.listen.control).st_ino
        if self.config.listen.admin is not None:
            a = self.config.listen.admin
            self.servers.append(await start_admin(a.host, a.port, self.metrics_text, self.health))
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
        self.shared.close(unlink=True)
        with contextlib.suppress(OSError):
            # A successor may already listen there: remove only our own socket file.
            if os.stat(self.config.listen.control).st_ino == control_ino:
                os.unlink(self.config.listen.control)
        return 0

    async def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self.aggregator.retire(pid, w.block.read())
            w.block.close()
            assert self.shared is not None
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

    async def reload(self) -> dict[str, Any]:
        """Validate, start the new generation, drain the old. Returns the outcome."""
        async with self.reload_lock:
            if self.stopping:
                return {"ok": False, "error": "the master is stopping"}
            sd_notify(b"RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
            try:
                text = open(self.config_path, encoding="utf-8").read()  # noqa: SIM115
                config = load(self.config_path)
            except (OSError, ConfigError) as e:
                log.error("reload refused, keeping the running config: %s", e)
                sd_notify(b"READY=1")
                return {"ok": False, "error": str(e)}
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
            self.aggregator.set_apps([a.name for a in config.apps])
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
            w.proc.wait()
        self.listeners.close_all()

    # status and metrics ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot)):
            info: dict[str, Any] = {
                "pid": w.pid,
                "slot": w.slot,
                "generation": w.generation,
                "state": w.state,
            }
            snap = self.read_block(w)
            if snap is not None:
                info["open_connections"] = snap.open_connections
                info["inflight"] = snap.inflight
                info["requests"] = sum(snap.requests)
                info["accepted"] = snap.accepted
            workers.append(info)
        return {
            "master": {
                "pid": os.getpid(),
                "generation": self.generation,
                "version": __version__,
                "config": self.config_path,
                "uptime": round(time.time() - self.started, 1),
                "stopping": self.stopping,
            },
            "workers": workers,
            "listeners": self.listeners.describe(),
        }

    def read_block(self, w: WorkerProc) -> Snapshot | None:
        data = w.block.read()
        if data is None:
            return None
        try:
            return self.aggregator.update(data)
        except SnapshotError:
            return None

    def metrics_text(self) -> str:
        for w in self.workers.values():
            self.read_block(w)
        return self.aggregator.render()

    def health(self) -> tuple[int, str]:
        if self.stopping:
            return 503, "stopping\n"
        if not any(w.state == "serving" for w in self.current()):
            return 503, "no worker serves\n"
        return 200, "ok\n"


def run(config_path: str) -> int:
    """`edgeproxy run -c FILE`: exit 2 on a bad config."""
    try:
        config = load(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="edgeproxy[%(process)d]: %(message)s")
    master = Master(config, config_path)
    return asyncio.run(master.run())
