"""A token bucket: at most `rate` takes a second on average, `burst` at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """At most `rate` takes per second on average, `burst` at once; `take()` waits its turn.

    Tokens accrue by `clock`, a monotonic time in seconds (`time.monotonic` unless given); a
    test passes a clock it moves itself and asks `try_take()`:

        now = 0.0
        bucket = TokenBucket(rate=4, clock=lambda: now)
        bucket.try_take()   # 0.0: the burst's token
        bucket.try_take()   # 0.25: the seconds until the next one
        now = 0.25
        bucket.try_take()   # 0.0

    One per client in the gateway's rate limiter (so it is small: slots, a lock only once
    someone waits), one per backend in queue-and-drain.
    """

    __slots__ = ("_clock", "_lock", "_updated", "burst", "rate", "tokens")

    def __init__(
        self, rate: float, burst: int = 1, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self.tokens = float(burst)
        """Tokens as of the last refill (a float: part of the next one accrues)."""
        self._updated = clock()
        self._lock: asyncio.Lock | None = None

    def refill(self) -> float:
        """Add what accrued since the last call (at the current `rate`, capped at `burst`);
        the tokens there are now."""
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        self._updated = now
        return self.tokens

    def try_take(self) -> float:
        """Take a token now and return 0, or return the seconds until one is there."""
        if self.refill() >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    async def take(self) -> None:
        """Take a token, waiting for it to accrue; waiters are served first come, first served."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            wait = self.try_take()
            while wait > 0:  # a timed wait for tokens to accrue: there is no event to await
                await asyncio.sleep(wait)
                wait = self.try_take()
