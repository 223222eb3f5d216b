"""The ping wire format: probes and replies as msgpack arrays (sans-io).

Owns encoding and strict decoding of the two datagram kinds; a datagram that
is not exactly one well-formed message raises PingDecodeError. It must not
read clocks or touch sockets: times are whatever the caller put in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgpack

PROBE: Final = 1
REPLY: Final = 2
MAX_DATAGRAM: Final = 8192  # a load vector larger than this is left out of the probe
_MAX_ID: Final = 64
_MAX_LOAD: Final = (1 << 31) - 1
_MAX_TIME: Final = 1e11  # wall seconds (year 5138): above it, or not finite, is garbage


class PingDecodeError(ValueError):
    """A datagram that is not a ping message (the remote sent it: count and drop)."""


@dataclass(frozen=True, slots=True)
class Ping:
    """One probe or reply.

    A probe goes from `sender` to `target`; the reply swaps them and echoes `seq`
    and `sent_ns` (the prober's own clock, meaningless to anyone else). `epoch`
    is the boot epoch of `sender`. `loads` is the sender's load vector, if any, and
    `loads_at` the sender's wall time (seconds) at which the vector was read: the clock
    its store records carry too, so a receiver orders loads from both paths on the
    publisher's clock. A datagram's arrival time would not do: a ping sent before a
    change can arrive after the store already brought the changed value.
    """

    kind: int
    sender: str
    epoch: int
    target: str
    seq: int
    sent_ns: int
    loads: Mapping[str, int] | None = None
    loads_at: float | None = None


def encode(p: Ping) -> bytes:
    """Ping -> datagram; drops the load vector if it would not fit one datagram.

    6 items without loads; 7 with loads and no time (what pingers before `loads_at`
    sent); 8 with loads and their time.
    """
    head = [p.kind, p.sender, p.epoch, p.target, p.seq, p.sent_ns]
    if p.loads:
        tail: list[object] = [dict(p.loads)]
        if p.loads_at is not None:
            tail.append(float(p.loads_at))
        out: bytes = msgpack.packb([*head, *tail])
        if len(out) <= MAX_DATAGRAM:
            return out
    return bytes(msgpack.packb(head))


def reply_to(
    probe: Ping,
    me: str,
    epoch: int,
    loads: Mapping[str, int] | None,
    loads_at: float | None = None,
) -> Ping:
    """The reply this node sends to `probe`."""
    return Ping(REPLY, me, epoch, probe.sender, probe.seq, probe.sent_ns, loads, loads_at)


def _id(v: object, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= _MAX_ID:
        raise PingDecodeError(f"{what}: not an id: {v!r}")
    return v


def _uint(v: object, what: str, top: int = (1 << 63) - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
        raise PingDecodeError(f"{what}: not an integer in range: {v!r}")
    return v


def _time(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < _MAX_TIME:
        raise PingDecodeError(f"{what}: not a time: {v!r}")  # NaN fails the range too
    return float(v)


def decode(data: bytes) -> Ping:
    """Datagram -> Ping; PingDecodeError for anything else."""
    if len(data) > MAX_DATAGRAM:
        raise PingDecodeError(f"{len(data)} bytes: too large")
    try:
        msg = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise PingDecodeError(f"not msgpack: {e}") from None
    if not isinstance(msg, list) or len(msg) not in (6, 7, 8):
        raise PingDecodeError("not an array of 6 to 8 items")
    kind = msg[0]
    if kind not in (PROBE, REPLY) or isinstance(kind, bool):
        raise PingDecodeError(f"unknown kind {kind!r}")
    loads: dict[str, int] | None = None
    loads_at: float | None = None
    if len(msg) >= 7:
        raw = msg[6]
        if not isinstance(raw, dict):
            raise PingDecodeError("load vector is not a map")
        loads = {_id(k, "load id"): _uint(v, "load", _MAX_LOAD) for k, v in raw.items()}
    if len(msg) == 8:
        loads_at = _time(msg[7], "loads_at")
    return Ping(
        kind=int(kind),
        sender=_id(msg[1], "sender"),
        epoch=_uint(msg[2], "epoch"),
        target=_id(msg[3], "target"),
        seq=_uint(msg[4], "seq"),
        sent_ns=_uint(msg[5], "sent_ns"),
        loads=loads,
        loads_at=loads_at,
    )
