"""Exponential backoff with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delays for attempt 1, 2, 3, ...: `initial * multiplier**(attempt-1)`, capped at `maximum`,
    then spread by +-`jitter` (a fraction), so replicas that failed together retry apart.

        RELAY = Backoff(initial=0.2, maximum=5.0)
        failures += 1
        await pause(RELAY.delay(failures))

    `random` is the jitter's source (a seeded `random.Random().uniform` in tests).
    """

    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.2
    random: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def __post_init__(self) -> None:
        if self.initial < 0 or self.multiplier < 1 or self.maximum < self.initial:
            raise ValueError("a backoff needs initial >= 0, multiplier >= 1, maximum >= initial")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter is a fraction from 0 to below 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1`, after `attempt` failures (from 1)."""
        exponent = max(0, attempt - 1)
        base = self.maximum if exponent > 64 else self.initial * self.multiplier**exponent
        base = min(self.maximum, base)
        if self.jitter:
            base *= 1 + self.random(-self.jitter, self.jitter)
        return max(0.0, base)
