"""W3C Trace Context (https://www.w3.org/TR/trace-context/): a request's trace and span ids.

Owns the strict reading of `traceparent` and `tracestate` (a client's are hostile: a
value that is not exactly what the spec allows is ignored, never repaired), the ids of
this proxy's span (random, drawn in blocks: no syscall per request), the head sampling
decision at the request's start, and the lines the instance (or the next node) receives.
Sans-io: no clock, no socket; the randomness is injected (an entropy source and a draw).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.core.request import Request

# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex only (spec 3.2.2).
_TRACEPARENT: Final = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_PARENT: Final = b"0" * 16
LENGTH_00: Final = 55  # a version 00 value is exactly this long

# tracestate (spec 3.3.1): key "=" value, keys simple or tenant@system.
_MEMBER: Final = re.compile(
    rb"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_MEMBERS: Final = 32  # spec 3.3.1.1: at most 32 list-members
MAX_TRACESTATE: Final = 512  # bytes passed on; a longer tracestate is dropped whole

SAMPLED: Final = 1  # trace-flags bit 0
ID_BLOCK: Final = 4096  # random bytes drawn at once: 256 span ids of 16 hex characters


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, int] | None:
    """(trace-id, parent-id, trace-flags) of a valid traceparent value, else None.

    The ids stay as their 32 and 16 lowercase hex characters. Version ff is invalid;
    version 00 is exactly 55 characters; a later version is read as 00 when its first
    55 characters are that and what follows starts with "-" (spec 4.3, versioning)."""
    n = len(value)
    if n < LENGTH_00:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version = m.group(1)
    if version == b"00":
        if n != LENGTH_00:
            return None
    elif version == b"ff" or (n > LENGTH_00 and value[LENGTH_00] != 0x2D):  # "-"
        return None
    trace = m.group(2)
    parent = m.group(3)
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return trace, parent, int(m.group(4), 16)


def clean_tracestate(value: bytes) -> bytes:
    """The tracestate to pass on (members joined by ","), or b"" to drop it: more than 32
    members, a member outside the spec's grammar, a key twice, or over 512 bytes."""
    if len(value) > MAX_TRACESTATE * 2:  # bounded work before splitting
        return b""
    members: list[bytes] = []
    keys: set[bytes] = set()
    for part in value.split(b","):
        m = part.strip(b" \t")
        if not m:
            continue  # empty list-members are allowed (spec 3.3.1.1)
        if _MEMBER.fullmatch(m) is None:
            return b""
        key = m[: m.find(b"=")]
        if key in keys:
            return b""
        keys.add(key)
        members.append(m)
        if len(members) > MAX_MEMBERS:
            return b""
    out = b",".join(members)
    return out if len(out) <= MAX_TRACESTATE else b""


class TraceContext:
    """One worker's side of Trace Context: ids, the sampling draw, what goes on.

    Ids are random (as the spec recommends), taken 16 hex characters at a time from a
    block of `entropy` (os.urandom) drawn every 256 requests, so a request pays a slice,
    not a syscall and a formatting. A new trace's id is two such slices."""

    __slots__ = ("at", "draw", "entropy", "pool", "rate")

    def __init__(
        self, entropy: Callable[[int], bytes], rate: float, draw: Callable[[], float]
    ) -> None:
        """`entropy(n)`: n random bytes (os.urandom); `rate`: [tracing] sample_rate;
        `draw`: a uniform draw in [0, 1)."""
        self.entropy = entropy
        self.pool = b""
        self.at = 0
        self.rate = rate
        self.draw = draw

    def span_id(self) -> bytes:
        """A new random id: 16 lowercase hex characters, never all zero."""
        while True:
            at = self.at
            if at >= len(self.pool):
                self.pool = self.entropy(ID_BLOCK // 2).hex().encode()
                at = 0
            self.at = at + 16
            got = self.pool[at : at + 16]
            if got != _ZERO_PARENT:
                return got

    def begin(self, r: Request, trusted: bool) -> None:
        """The request starts: its ids, whether it is sampled, the lines sent on with it.

        A valid traceparent continues its trace (its parent-id is our span's parent); an
        absent, invalid or repeated one starts a new trace. Only a trusted sender's
        (a peer on the backhaul) sampled flag is followed; a client's is not (it would
        choose what this proxy exports), so the draw decides."""
        span = self.span_id()
        r.span_id = span
        parsed = None
        tp = r.traceparent
        if tp and r.tp_count == 1:
            parsed = parse_traceparent(tp)
        state = b""
        if parsed is None:
            trace = self.span_id() + span
            r.parent_id = b""
            sampled = self.rate > 0.0 and self.draw() < self.rate
        else:
            trace, r.parent_id, flags = parsed
            if trusted:
                sampled = bool(flags & SAMPLED)
            else:
                sampled = self.rate > 0.0 and self.draw() < self.rate
            if r.tracestate:
                state = clean_tracestate(r.tracestate)
        r.trace_id = trace
        r.sampled = sampled
        line = b"".join(
            (b"traceparent: 00-", trace, b"-", span, b"-01\r\n" if sampled else b"-00\r\n")
        )
        if state:
            line = line + b"tracestate: " + state + b"\r\n"
        r.trace_line = line


def pass_on(r: Request) -> None:
    """Tracing off: this proxy takes no part in the trace; a valid traceparent (one field)
    and its tracestate go on as they came, anything else is dropped."""
    tp = r.traceparent
    if r.tp_count != 1 or parse_traceparent(tp) is None:
        return
    line = b"traceparent: " + tp + b"\r\n"
    if r.tracestate:
        state = clean_tracestate(r.tracestate)
        if state:
            line = line + b"tracestate: " + state + b"\r\n"
    r.trace_line = line
