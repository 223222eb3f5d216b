"""One instance of an app as the router sees it: the only candidate type.

The table reader fills these from the segment (and reuses them); a worker without a
table builds them from its config. It holds values only: no reading, no routing.
"""

from __future__ import annotations


class Candidate:
    """An instance: limits, load and RTT (hot fields, refreshed by the reader per call).

    `rtt_us` is ignored for a local instance (it counts as 0); a negative one is unknown
    (-1 with `node_up` False when the instance's node has no row). `load_time_us` is when
    `load` was measured, in µs. `index` is the reader's slot for the instance (e.g. its
    in-flight counter); `load_at` and `node_at` are the offsets of its load and its node's
    hot block in the segment (0: not read from a table, or no node row). `group` is its
    group's number in the table's layout (-1: none), `cell` its in-flight counter slot
    when it is local and the worker counts it (-1: none; its published load is used),
    `target` what the worker's routing made of it (where to send a request; its own
    type, opaque here).
    """

    __slots__ = (
        "address",
        "app",
        "cell",
        "group",
        "hard_limit",
        "id",
        "index",
        "jitter_us",
        "last_heard_us",
        "load",
        "load_at",
        "load_time_us",
        "local",
        "loss_permille",
        "node",
        "node_at",
        "node_up",
        "publisher_epoch",
        "rtt_us",
        "soft_limit",
        "target",
    )

    def __init__(
        self,
        id: str,
        node: str,
        local: bool,
        load: int,
        soft_limit: int,
        hard_limit: int,
        rtt_us: int,
        address: str = "",
        index: int = 0,
        load_time_us: int = 0,
        app: str = "",
        node_up: bool = True,
        load_at: int = 0,
        node_at: int = 0,
    ) -> None:
        # What a pick reads of a probed candidate first: compiled, attributes are laid out
        # in this order, so these share a cache line or two (a fleet's candidates do not
        # stay in cache).
        self.load_at = load_at
        self.local = local
        self.load = load
        self.load_time_us = load_time_us
        self.publisher_epoch = 0
        self.hard_limit = hard_limit
        self.soft_limit = soft_limit
        self.group = -1
        self.cell = -1
        self.id = id
        self.target: object = None
        self.node = node
        self.rtt_us = rtt_us
        self.address = address  # "host:port"
        self.index = index
        self.app = app
        self.node_up = node_up
        self.node_at = node_at
        self.jitter_us = 0
        self.loss_permille = 0
        self.last_heard_us = 0

    def __repr__(self) -> str:
        return (
            f"Candidate({self.id!r}, app={self.app!r}, node={self.node!r}, local={self.local}, "
            f"load={self.load}, soft={self.soft_limit}, hard={self.hard_limit}, "
            f"rtt_us={self.rtt_us}, up={self.node_up})"
        )
