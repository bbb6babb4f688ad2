"""A circuit breaker: stop calling what keeps failing, then try it again carefully.

    breaker = CircuitBreaker(BreakerConfig(failures=5, window=10, open_for=10))
    trial = breaker.admit(now)          # None: refused (open); True: a half-open trial
    if trial is None:
        raise UpstreamUnavailable("circuit open", headers={"Retry-After": ...})
    ...                                 # make the call
    breaker.record(trial, failed=call_failed, now=clock())

closed -> open (`failures` failures within `window` seconds) -> half_open (after `open_for`
seconds it admits `half_open_requests` trial calls) -> closed (the trials succeeded) or open
again (a trial failed). Calls admitted before the breaker last changed state do not judge the new
state. The caller owns the clock (`now`), so tests move time instead of waiting for it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker"]

log = logging.getLogger("framework.resilience.breaker")

BreakerState: TypeAlias = Literal["closed", "open", "half_open"]


class BreakerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(default=5, ge=1)
    """Failures in `window` seconds that open the breaker."""
    window: float = Field(default=10.0, gt=0)
    open_for: float = Field(default=10.0, gt=0)
    half_open_requests: int = Field(default=1, ge=1)


class CircuitBreaker:
    """closed -> open (too many failures in the window) -> half_open (after open_for) -> ..."""

    def __init__(self, config: BreakerConfig) -> None:
        self._config = config
        self.state: BreakerState = "closed"
        self._failures: deque[float] = deque(maxlen=config.failures)
        self._opened_at = 0.0
        self._trials = 0
        self._trial_successes = 0

    def admit(self, now: float) -> bool | None:
        """None: refused. True: admitted as a half-open trial. False: admitted while closed."""
        if self.state == "open":
            if now - self._opened_at < self._config.open_for:
                return None
            self.state, self._trials, self._trial_successes = "half_open", 0, 0
            log.info("circuit half-open: admitting %d trial(s)", self._config.half_open_requests)
        if self.state == "half_open":
            if self._trials + self._trial_successes >= self._config.half_open_requests:
                return None
            self._trials += 1
            return True
        return False

    def retry_after(self, now: float) -> int:
        """Whole seconds until an open breaker admits a trial (1 when it is not open)."""
        if self.state == "open":
            return max(1, math.ceil(self._config.open_for - (now - self._opened_at)))
        return 1

    def recent_failures(self, now: float) -> int:
        return sum(1 for at in self._failures if now - at <= self._config.window)

    def release(self, trial: bool | None) -> None:
        """The call ended without judging the upstream (cancelled, nothing to try)."""
        if trial and self.state == "half_open":
            self._trials -= 1

    def record(self, trial: bool | None, *, failed: bool, now: float) -> BreakerState:
        """Judge an admitted call (`trial` as `admit` returned it); the state after it."""
        if self.state == "closed" and not trial:
            if failed:
                self._failures.append(now)
                if (
                    len(self._failures) == self._config.failures
                    and now - self._failures[0] <= self._config.window
                ):
                    self._open(now)
        elif self.state == "half_open" and trial:
            self._trials -= 1
            if failed:
                self._open(now)
            else:
                self._trial_successes += 1
                if self._trial_successes >= self._config.half_open_requests:
                    self.state = "closed"
                    self._failures.clear()
        # Calls admitted before the breaker last changed state do not judge the new state.
        return self.state

    def _open(self, now: float) -> None:
        self.state = "open"
        self._opened_at = now
        self._failures.clear()
