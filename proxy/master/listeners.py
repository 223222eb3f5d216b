"""Listening sockets, one SO_REUSEPORT socket per (kind, address, worker slot).

Owns binding and the key under which a socket travels to a worker or across
an exec. It must never close a socket that still has a successor waiting:
closing a SO_REUSEPORT socket drops the connections in its accept queue.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from proxy.config import Address

BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class ListenKey:
    kind: str  # "http" | "https" | "backhaul"
    address: Address
    slot: int

    def label(self) -> str:
        return f"{self.kind}:{self.address}#{self.slot}"


def bind(address: Address, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT; raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {address}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


class ListenerSet:
    """The master's sockets, keyed; the same key always maps to the same socket."""

    def __init__(self) -> None:
        self.socks: dict[ListenKey, socket.socket] = {}

    def ensure(self, wanted: list[ListenKey]) -> None:
        """Bind every wanted key that is not bound yet (all or nothing)."""
        new: dict[ListenKey, socket.socket] = {}
        try:
            for key in wanted:
                if key not in self.socks and key not in new:
                    new[key] = bind(key.address)
        except OSError:
            for s in new.values():
                s.close()
            raise
        self.socks.update(new)

    def adopt(self, key: ListenKey, fd: int) -> None:
        """Take over an inherited listening fd (re-exec or takeover)."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self.socks[key] = sock

    def fds_for_slot(
        self, kinds: dict[str, tuple[Address, ...]], slot: int
    ) -> list[tuple[ListenKey, int]]:
        out = []
        for kind, addrs in kinds.items():
            for a in addrs:
                key = ListenKey(kind, a, slot)
                out.append((key, self.socks[key].fileno()))
        return out

    def close_unused(self, wanted: set[ListenKey]) -> list[ListenKey]:
        """Close sockets no generation needs any more."""
        gone = [k for k in self.socks if k not in wanted]
        for k in gone:
            self.socks.pop(k).close()
        return gone

    def describe(self) -> list[dict[str, object]]:
        return [
            {"kind": k.kind, "address": str(k.address), "slot": k.slot, "fd": s.fileno()}
            for k, s in sorted(self.socks.items(), key=lambda kv: kv[0].label())
        ]

    def close_all(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()


def wanted_keys(kinds: dict[str, tuple[Address, ...]], count: int) -> list[ListenKey]:
    return [
        ListenKey(kind, a, slot)
        for kind, addrs in kinds.items()
        for a in addrs
        for slot in range(count)
    ]
