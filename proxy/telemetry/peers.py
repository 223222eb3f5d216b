"""The fleet as /metrics shows it: peers by state, and each peer's RTT and loss as the
pinger last measured them, for at most [metrics] max_peers peers.

Owns those series and the cap on them: the first max_peers node ids in sorted order get
their own edgeproxy_peer_rtt_seconds / edgeproxy_peer_loss_ratio / edgeproxy_peer_up (a
stable choice: it moves only when nodes join or leave), every peer is counted in
edgeproxy_peers{state}. It formats what the master read from the table; it reads nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Peer:
    id: str
    rtt_us: int  # -1: not measured yet
    loss_permille: int
    up: bool


def render(peers: Iterable[Peer], me: str, max_peers: int) -> list[str]:
    """The peer series of every node but `me`, in the Prometheus text format."""
    others = sorted((p for p in peers if p.id != me), key=lambda p: p.id)
    up = sum(1 for p in others if p.up)
    out = [
        "# HELP edgeproxy_peers Peer nodes in the table, by whether the pinger hears them.",
        "# TYPE edgeproxy_peers gauge",
        f'edgeproxy_peers{{state="up"}} {up}',
        f'edgeproxy_peers{{state="down"}} {len(others) - up}',
    ]
    shown = others[:max_peers]
    for name, help_, kind in (
        ("peer_rtt_seconds", "Smoothed ping RTT to the peer (absent until measured).", "gauge"),
        ("peer_loss_ratio", "Share of the recent pings to the peer that were lost.", "gauge"),
        ("peer_up", "1 while the pinger hears the peer, else 0.", "gauge"),
    ):
        out.append(f"# HELP edgeproxy_{name} {help_} First [metrics] max_peers peers by id.")
        out.append(f"# TYPE edgeproxy_{name} {kind}")
        for p in shown:
            label = f'{{peer="{_esc(p.id)}"}}'
            if name == "peer_rtt_seconds":
                if p.rtt_us >= 0:
                    out.append(f"edgeproxy_{name}{label} {p.rtt_us / 1e6!r}")
            elif name == "peer_loss_ratio":
                out.append(f"edgeproxy_{name}{label} {p.loss_permille / 1000.0!r}")
            else:
                out.append(f"edgeproxy_{name}{label} {int(p.up)}")
    return out


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
