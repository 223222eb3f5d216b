"""A source-aware UDP relay for store fleets: one address per node, delays per sender.

With a cluster store every node advertises ONE ping address to everybody, so the
per-pair routes of pinger.relay (one listen address per (from, to) pair) can not be
used. Here each node's advertised ping address is a relay route whose delay (and loss)
depend on the sender's IP (each pinger sends from its own 127.0.0.x). Reuses the
delivery machinery of pinger.relay; only touches 127.0.0.0/8.

    python tests/support/fleet_relay.py --route LISTEN,TARGET,SRC_IP=DELAY_MS/BACK_MS[/LOSS];...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pinger.relay import (
    _ANC_SIZE,
    CHUNK,
    Relay,
    Route,
    _addr,
    _arrival,
    _Delivery,
    _UdpRoute,
    serve,
)

PerSource = Mapping[str, tuple[float, float, float]]  # src ip -> (delay s, back s, loss)


class SourceUdpRoute(_UdpRoute):
    """A UDP route whose one-way delays and loss are chosen by the sender's IP."""

    def __init__(self, route: Route, per_source: PerSource, *args: object) -> None:
        super().__init__(route, *args)  # type: ignore[arg-type]
        self.per_source = dict(per_source)

    def readable(self, sock, client, out: _Delivery) -> None:  # type: ignore[no-untyped-def]
        for _ in range(64):
            try:
                data, anc, _, src = sock.recvmsg(CHUNK, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            now = _arrival(anc)
            who = src[0] if client is None else client[0]
            delay, back, loss = self.per_source.get(who, (0.0, 0.0, 0.0))
            if client is None:
                if loss and self.rng.random() < loss:
                    self.lost += 1
                    continue
                out.push(now + delay, self.upstream(src), data, self.route.target)
            else:
                out.push(now + back, self.sock, data, client)


def parse(spec: str) -> tuple[Route, PerSource]:
    listen, target, *rest = spec.split(",")
    per: dict[str, tuple[float, float, float]] = {}
    for item in ";".join(rest).split(";"):
        if not item:
            continue
        ip, _, vals = item.partition("=")
        parts = [float(x) for x in vals.split("/")] + [0.0]
        per[_addr(ip + ":0")[0]] = (parts[0] / 1000, parts[1] / 1000, parts[2])
    return Route("udp", _addr(listen), _addr(target), 0.0, 0.0), per


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--route", action="append", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    specs = [parse(s) for s in args.route]
    relay = Relay([], args.seed)
    for route, per in specs:
        relay.udp.append(SourceUdpRoute(route, per, relay.sel, relay.rng))
    return serve(relay)


if __name__ == "__main__":
    sys.exit(main())
