"""Jittered exponential backoff between resume attempts.

When a License Server restarts, every client's stream breaks at the same instant. Each
client waits a random time before its first resume ("full jitter": uniform between 0 and
a ceiling that doubles per attempt), so the restarted server is not hit by all of them at
once, and retries spread out further while it stays down.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays between resume attempts: attempt ``n`` waits uniformly between 0 and
    ``min(maximum, initial * multiplier**n)`` seconds."""

    initial: float = 0.5
    maximum: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum and self.multiplier >= 1):
            raise ValueError("Backoff needs 0 < initial <= maximum and multiplier >= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest delay before attempt ``attempt`` (0 is the first)."""
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A random delay before attempt ``attempt``."""
        return (rng or random).uniform(0, self.ceiling(attempt))
