"""The invariants every outcome of the ClientHello parser keeps, whatever the bytes.

Owns the judging for the hypothesis tests and the fuzz bench (bench/fuzz_clienthello.py):
one parse of the bytes and one of a prefix, and a list of what they broke. The SNI rules
are written again here, apart from the parser's code, so one cannot hide the other's bug.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from proxy.core import clienthello as ch
from proxy.core.clienthello import MAX_HELLO, REASONS, Hello, HelloError, parse_client_hello

ALERTS = frozenset(v for k, v in vars(ch).items() if k.startswith("ALERT_"))
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

Outcome = Hello | int | HelloError | Exception


class Violation(NamedTuple):
    invariant: str
    detail: str


def valid_dns_name(name: str) -> bool:
    """LDH labels of 1..63, lower case, <= 253 bytes, the last label not all digits."""
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and all(_LABEL.match(lab) for lab in labels)
        and not labels[-1].isdigit()
    )


def outcome(data: bytes) -> Outcome:
    """What the parser made of `data`: a Hello, a byte count, or what it raised."""
    try:
        return parse_client_hello(data)
    except Exception as e:  # the point: anything but HelloError is a finding
        return e


def violations(data: bytes, cut: int) -> tuple[Outcome, list[Violation]]:
    """Parse `data` and data[:cut]; the invariants the two outcomes broke."""
    whole = outcome(data)
    out = judge(data, whole)
    if isinstance(whole, Hello):
        again = outcome(data[: whole.size])
        if again != whole:
            out.append(Violation("stable", f"data[:size] gave {again!r}, not {whole!r}"))
    cut = max(0, min(cut, len(data)))
    part = outcome(data[:cut])
    out += judge(data[:cut], part)
    if isinstance(part, HelloError) and not (
        isinstance(whole, HelloError) and whole.reason == part.reason
    ):
        out.append(Violation("final", f"prefix {cut} refused ({part.reason}), whole {whole!r}"))
    if (
        isinstance(whole, Hello)
        and cut < whole.size
        and (not isinstance(part, int) or part > whole.size)
    ):
        out.append(Violation("wait", f"prefix {cut} of a {whole.size}-byte hello: {part!r}"))
    return whole, out


def judge(data: bytes, got: Outcome) -> list[Violation]:
    if isinstance(got, HelloError):
        if got.reason not in REASONS or got.alert not in ALERTS:
            return [Violation("reason", f"{got.reason!r} alert {got.alert}")]
        return []
    if isinstance(got, Exception):
        return [Violation("exception", f"{type(got).__name__}: {got}")]
    if isinstance(got, int):
        if not len(data) < got <= MAX_HELLO:
            return [Violation("needed", f"{got} for {len(data)} bytes")]
        return []
    out = []
    if not got.size <= min(len(data), MAX_HELLO):
        out.append(Violation("size", f"size {got.size} of {len(data)} bytes"))
    if got.sni is not None and not valid_dns_name(got.sni):
        out.append(Violation("sni", repr(got.sni)))
    if got.alpn is not None and (not got.alpn or not all(0 < len(p) < 256 for p in got.alpn)):
        out.append(Violation("alpn", repr(got.alpn)))
    return out
