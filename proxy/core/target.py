"""Where a request goes: one instance as an address, a pool key and the lines it adds.

A record built by routing (proxy.worker.routing) and carried by the request; no
behaviour, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Target:
    """One instance as a place to send a request."""

    key: str  # pool key: one keep-alive pool per key
    instance: str
    app: str
    node: str
    host: str
    port: int
    local: bool
    slot: int  # in-flight counter slot of a local instance, else -1
    connect_timeout: float
    extra: bytes  # request header lines added for this target (backhaul: which instance)
