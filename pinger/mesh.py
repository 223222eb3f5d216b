"""The ping mesh: who to probe when, matching replies, timeouts (sans-io core + UDP shell).

`Mesh` is the core: datagrams and times in, datagrams and peer updates out; it
owns probe scheduling (interval with jitter), sequence numbers and outstanding
probes. `MeshProtocol` is the asyncio shell: one UDP socket, one timer. Neither
writes the table or talks to the store: updates go to the callbacks.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, cast

from pinger import ping_codec
from pinger.ping_codec import PROBE, REPLY, Ping, PingDecodeError
from pinger.ping_state import LOSS_WINDOW, Estimator, Snapshot

Addr = tuple[str, int]
JITTER: Final = 0.1  # each interval is drawn from interval * [1 - JITTER, 1 + JITTER]
FIRST_PROBE_WITHIN: Final = 0.25  # seconds: a new peer is first probed this soon (at most)
TICK: Final = 0.05  # seconds: the shell wakes at most this often (probes sent in batches)


@dataclass(slots=True)
class Peer:
    """One node the mesh probes."""

    id: str
    addr: Addr
    est: Estimator
    epoch: int = 0  # highest boot epoch heard from it
    seq: int = 0
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> sent at


@dataclass(slots=True)
class Counters:
    sent: int = 0
    replies: int = 0
    probes_answered: int = 0
    bad_datagrams: int = 0  # failed to decode
    misdirected: int = 0  # a probe for another node id, or a reply we did not ask for
    late: int = 0  # a reply after its probe was counted lost
    send_errors: int = 0


class Mesh:
    """Probe schedule and reply matching for every peer of one node."""

    def __init__(
        self,
        me: str,
        epoch: int,
        *,
        interval: float,
        up_after: int,
        down_after: int,
        rng: random.Random,
        window: int = LOSS_WINDOW,
    ) -> None:
        self.me = me
        self.epoch = epoch
        self.interval = interval
        self.up_after = up_after
        self.down_after = down_after
        self.window = window
        self.rng = rng
        self.peers: dict[str, Peer] = {}
        self.counters = Counters()
        self.local_loads: Mapping[str, int] | None = None  # sent with every probe and reply
        self.local_loads_at: float | None = None  # wall time local_loads was read (sent too)
        self._due: list[tuple[float, int, str]] = []  # (when, tiebreak, peer id): next probe
        self._deadlines: list[tuple[float, str, int]] = []  # (when, peer id, seq): timeouts
        self._tick = 0
        self.changed: set[str] = set()  # peers whose snapshot may have changed
        # (node, epoch, loads, the sender's wall time of the loads or None from older pingers)
        self.learned: list[tuple[str, int, Mapping[str, int], float | None]] = []

    # --- membership ---------------------------------------------------------------------
    def set_peers(self, peers: Mapping[str, Addr], now: float) -> None:
        """Probe exactly these peers (id -> ping address); keeps the state of known ones."""
        for pid in [p for p in self.peers if p not in peers]:
            del self.peers[pid]  # its heap entries are dropped lazily
            self.changed.discard(pid)
        for pid, addr in peers.items():
            if pid == self.me:
                continue
            p = self.peers.get(pid)
            if p is None:
                est = Estimator(self.up_after, self.down_after, self.window)
                self.peers[pid] = Peer(pid, addr, est)
                first = now + self.rng.uniform(0, min(self.interval, FIRST_PROBE_WITHIN))
                self._schedule(first, pid)
            elif p.addr != addr:
                p.addr = addr

    def snapshot(self, pid: str) -> Snapshot:
        return self.peers[pid].est.snapshot()

    # --- time ----------------------------------------------------------------------------
    def next_wakeup(self) -> float | None:
        """When `due` next has something to do (caller's clock), or None."""
        a = self._due[0][0] if self._due else None
        b = self._deadlines[0][0] if self._deadlines else None
        if a is None:
            return b
        return a if b is None else min(a, b)

    def due(self, now: float) -> list[tuple[Addr, bytes]]:
        """Resolve timed-out probes and return the probes to send at `now`."""
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, pid, seq = heapq.heappop(dl)
            p = self.peers.get(pid)
            if p is not None and p.outstanding.pop(seq, None) is not None:
                p.est.missed()
                self.changed.add(pid)
        out: list[tuple[Addr, bytes]] = []
        q = self._due
        while q and q[0][0] <= now:
            _, _, pid = heapq.heappop(q)
            p = self.peers.get(pid)
            if p is None:
                continue
            p.seq += 1
            sent_ns = int(now * 1e9)
            loads, at = self.local_loads, self.local_loads_at
            probe = Ping(PROBE, self.me, self.epoch, pid, p.seq, sent_ns, loads, at)
            out.append((p.addr, ping_codec.encode(probe)))
            p.outstanding[p.seq] = now
            heapq.heappush(dl, (now + p.est.timeout(), pid, p.seq))
            self.counters.sent += 1
            nxt = now + self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
            self._schedule(nxt, pid)
        return out

    def _schedule(self, when: float, pid: str) -> None:
        self._tick += 1
        heapq.heappush(self._due, (when, self._tick, pid))

    # --- datagrams -----------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> bytes | None:
        """One datagram in at `now`; returns the reply to send back, if any."""
        try:
            msg = ping_codec.decode(data)
        except PingDecodeError:
            self.counters.bad_datagrams += 1
            return None
        if msg.target != self.me or msg.sender == self.me:
            self.counters.misdirected += 1
            return None
        if msg.kind == PROBE:
            self._heard(msg)
            self.counters.probes_answered += 1
            return ping_codec.encode(
                ping_codec.reply_to(msg, self.me, self.epoch, self.local_loads, self.local_loads_at)
            )
        assert msg.kind == REPLY
        p = self.peers.get(msg.sender)
        if p is None:
            self.counters.misdirected += 1
            return None
        sent = p.outstanding.pop(msg.seq, None)
        if sent is None:
            if 0 < msg.seq <= p.seq:
                self.counters.late += 1
            else:
                self.counters.misdirected += 1
            return None
        self.counters.replies += 1
        p.est.answered(now - sent, now)
        self.changed.add(p.id)
        self._heard(msg)
        return None

    def _heard(self, msg: Ping) -> None:
        p = self.peers.get(msg.sender)
        if p is not None:
            if msg.epoch < p.epoch:
                return  # a datagram from an older life of that node
            p.epoch = msg.epoch
        if msg.loads is not None:
            self.learned.append((msg.sender, msg.epoch, msg.loads, msg.loads_at))


class MeshProtocol(asyncio.DatagramProtocol):
    """The UDP shell around a Mesh: one socket, one timer, callbacks after each change."""

    def __init__(
        self,
        mesh: Mesh,
        clock: Callable[[], float],
        on_change: Callable[[], None],
    ) -> None:
        self.mesh = mesh
        self.clock = clock
        self.on_change = on_change
        self.transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._flush_soon = False
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass
        self.rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        out = self.mesh.receive(data, self.clock())
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)
        if not self._flush_soon and (self.mesh.changed or self.mesh.learned):
            self._flush_soon = True  # one flush for every datagram read in this loop pass
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        self.on_change()

    def error_received(self, exc: Exception) -> None:
        self.mesh.counters.send_errors += 1  # ICMP port unreachable and friends: a miss later

    def rearm(self) -> None:
        """Set the timer to the mesh's next wakeup (call after changing the peer set)."""
        when = self.mesh.next_wakeup()
        if when is None or self.transport is None:
            return
        when = max(when, self.clock() + TICK)
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        loop_when = self._loop.time() + (when - self.clock())
        self._timer = self._loop.call_at(loop_when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        t = self.transport
        if t is None:
            return
        for addr, data in self.mesh.due(self.clock()):
            try:
                t.sendto(data, addr)
            except OSError:
                self.mesh.counters.send_errors += 1
        if self.mesh.changed:
            self.on_change()
        self.rearm()
