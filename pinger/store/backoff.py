"""Reconnect delays of the store session: exponential, bounded, jittered."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    """Exponential, bounded, with jitter (each delay is 50-100 % of the nominal one)."""

    base: float
    cap: float
    attempt: int = 0

    def next(self) -> float:
        nominal = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return float(nominal * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0
