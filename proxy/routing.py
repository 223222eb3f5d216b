"""Where a request goes: app -> target instance, and the next one on a retry.

Owns the worker's view of targets (from the config until the table serves)
and the bookkeeping of tries per request. It must not do I/O: it answers
`pick`/`retry` from data it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config import Config


@dataclass(slots=True)
class Target:
    """One instance as a place to send a request."""

    key: str  # pool key: one keep-alive pool per key
    instance: str
    app: str
    host: str
    port: int
    local: bool
    connect_timeout: float


class Tried(Protocol):
    """What the router needs to know of a request."""

    target: Target | None
    tries: int
    force: bytes


class Router:
    """Round-robin over an app's instances (the static view of the config)."""

    def __init__(self, config: Config) -> None:
        self.apps = [a.name for a in config.apps]
        self.targets: list[list[Target]] = [[] for _ in config.apps]
        index = {a.name: i for i, a in enumerate(config.apps)}
        for inst in config.instances:
            local = inst.node == config.node.id
            if not local:
                continue  # remote instances need the backhaul (routing across nodes)
            self.targets[index[inst.app]].append(
                Target(
                    key=f"{inst.address.host}:{inst.address.port}",
                    instance=inst.id,
                    app=inst.app,
                    host=inst.address.host,
                    port=inst.address.port,
                    local=local,
                    connect_timeout=config.timeouts.connect,
                )
            )
        self.next = [0] * len(self.targets)

    def pick(self, app: int, r: Tried) -> tuple[Target | None, int, str]:
        """(target, status, reason): status and reason explain a None target."""
        ts = self.targets[app]
        if r.force:
            name = r.force.decode("latin-1")
            for t in ts:
                if t.instance == name:
                    return t, 0, ""
            return None, 404, f"edgeproxy: app {self.apps[app]!r} has no instance {name!r}\n"
        if not ts:
            return None, 503, f"edgeproxy: app {self.apps[app]!r} has no instance\n"
        i = self.next[app]
        self.next[app] = (i + 1) % len(ts)
        return ts[i % len(ts)], 0, ""

    def retry(self, r: Tried, why: str) -> tuple[Target | None, int, str]:
        """The next target after a failure that reached no app, or None."""
        if r.force or r.target is None or r.tries >= 3:
            return None, 502, ""
        app = self.apps.index(r.target.app)
        ts = [t for t in self.targets[app] if t is not r.target]
        if not ts:
            return None, 502, ""
        return ts[r.tries % len(ts)], 0, ""

    def failed(self, r: Tried, why: str) -> None:
        """A target failed before the request reached it."""
