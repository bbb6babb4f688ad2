"""An adaptive concurrency limit: how many calls an upstream gets at once follows its latency.

A fixed bulkhead (`max_connections`) is sized for a good day. When the upstream slows down, every
one of those slots fills, the calls behind them queue, and latency explodes for everybody. An
`AdaptiveLimit` keeps the number of calls in flight near what the upstream answers promptly,
so the excess is refused early (a fast 503 with `Retry-After`) instead of queueing. It is in the
spirit of Netflix's concurrency-limits (Gradient2) and Envoy's adaptive concurrency filter:

    limit = AdaptiveLimit(AdaptiveConfig(), maximum=100, clock=time.monotonic)
    if in_flight < limit.limit:        # admit the call
        ...
    limit.record(0.012, in_flight)     # it was answered in 12 ms (any status: a 404 is a sample)
    limit.record_drop(in_flight)       # or it timed out, or the upstream shed it (503)

How the limit moves:

- Samples are gathered in windows of at least `window` seconds and `min_samples` calls; a
  closed window's average latency is the short-term latency.
- The baseline is the long-term latency: it follows a falling short-term latency within a few
  windows and a rising one only over about `baseline_windows` windows, so it stays near what the
  upstream answers in when nothing queues.
- gradient = tolerance x baseline / latency, within [0.5, 1]: 1 while the latency stays within
  `tolerance` times the baseline, less as queues build up.
- new = limit x gradient + sqrt(limit): the square root is the headroom that lets the limit grow
  (and so measure whether more would still be answered promptly). A larger value is taken at
  once; a smaller one is smoothed, limit -> limit + `smoothing` x (new - limit), so one slow
  window does not halve the limit.
- A window with a drop (a timeout, the upstream's own 503) multiplies the limit by `backoff`
  instead: a timeout's latency says nothing about the upstream but that it is too slow.
- A window in which less than half the limit was ever in flight leaves the limit as it is (unless
  it saw a drop): an upstream that is not pushed says nothing about how much it can take. This is
  also why the limit does not move under ordinary traffic, far below the limit.
- The limit stays within [`min_limit`, maximum].

Time comes from `clock` (monotonic seconds), so a test moves a fake clock instead of waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdaptiveConfig", "AdaptiveLimit"]

_MIN_GRADIENT = 0.5
"""The most one window can cut the limit by latency (before smoothing): by half."""
_BASELINE_FALL = 0.2
"""Weight of a window faster than the baseline: the baseline follows a falling latency quickly."""


class AdaptiveConfig(BaseModel):
    """An upstream pool's adaptive concurrency limit (`UpstreamConfig.adaptive`).

    The limit starts at `initial_limit` (by default the pool's `max_connections`) and never
    exceeds `max_connections`: with the defaults a pool behaves as a fixed bulkhead until its
    upstream slows down under calls that fill at least half the limit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_limit: int | None = Field(default=None, ge=1)
    """Calls admitted at once before anything is measured (None: `max_connections`)."""
    min_limit: int = Field(default=4, ge=1)
    """The limit never falls below this (nor above `max_connections`)."""
    tolerance: float = Field(default=1.5, ge=1)
    """Latency up to this many times the baseline is not taken as queueing."""
    smoothing: float = Field(default=0.5, gt=0, le=1)
    """Share of a lower computed limit taken per window (1: at once)."""
    backoff: float = Field(default=0.9, gt=0, lt=1)
    """The limit is multiplied by this after a window with a timeout or an upstream's 503."""
    window: float = Field(default=0.1, gt=0)
    """Seconds a window lasts at least."""
    min_samples: int = Field(default=10, ge=1)
    """Calls a window needs before it is judged."""
    baseline_windows: int = Field(default=600, ge=1)
    """Windows over which the baseline follows a rising latency."""


class AdaptiveLimit:
    """The concurrency limit of one upstream, moved by the latencies of its calls.

    `limit` is the number of calls to admit at once. The caller counts the calls in flight and
    reports each finished one, with that count (the call included): `record(latency, in_flight)`
    for an answer, `record_drop(in_flight)` for a timeout or an upstream's refusal; connect
    errors and calls that never reached the upstream are not reported. See the module docstring.
    """

    __slots__ = (
        "_clock",
        "_drops",
        "_estimate",
        "_peak",
        "_samples",
        "_started",
        "_total",
        "baseline",
        "config",
        "latency",
        "maximum",
        "minimum",
    )

    def __init__(
        self,
        config: AdaptiveConfig,
        *,
        maximum: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if maximum < 1:
            raise ValueError(f"an adaptive limit needs a maximum of at least 1, not {maximum}")
        self.config = config
        self.maximum = maximum
        self.minimum = min(config.min_limit, maximum)
        initial = config.initial_limit if config.initial_limit is not None else maximum
        self._estimate = float(self._clamp(initial))
        self.baseline: float | None = None
        """The long-term latency in seconds (None until a window closed)."""
        self.latency: float | None = None
        """The last closed window's average latency in seconds."""
        self._clock = clock
        self._started = clock()
        self._total = 0.0
        self._samples = 0
        self._drops = 0
        self._peak = 0

    @property
    def limit(self) -> int:
        """Calls to admit at once now."""
        return int(self._estimate)

    def record(self, latency: float, in_flight: int) -> None:
        """An answered call took `latency` seconds, with `in_flight` calls (it included) out."""
        self._total += max(0.0, latency)
        self._samples += 1
        self._peak = max(self._peak, in_flight)
        self._close_window()

    def record_drop(self, in_flight: int) -> None:
        """A call timed out or the upstream refused it for overload."""
        self._drops += 1
        self._peak = max(self._peak, in_flight)
        self._close_window()

    def snapshot(self) -> dict[str, Any]:
        """The limit and what moves it, for the admin API (JSON-able; latencies in ms)."""
        return {
            "limit": self.limit,
            "min": self.minimum,
            "max": self.maximum,
            "baseline_ms": None if self.baseline is None else round(self.baseline * 1000, 3),
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
        }

    def _close_window(self) -> None:
        now = self._clock()
        if (
            now - self._started < self.config.window
            or self._samples + self._drops < self.config.min_samples
        ):
            return
        samples, total, drops, peak = self._samples, self._total, self._drops, self._peak
        self._started, self._total, self._samples, self._drops, self._peak = now, 0.0, 0, 0, 0
        if drops:
            self._estimate = self._clamp(self._estimate * self.config.backoff)
            return
        latency = total / samples
        self.latency = latency
        if self.baseline is None:
            self.baseline = latency
            return
        weight = _BASELINE_FALL if latency < self.baseline else 1 / self.config.baseline_windows
        self.baseline += weight * (latency - self.baseline)
        if peak * 2 < self._estimate:
            return  # not pushed: no evidence either way
        gradient = 1.0 if latency <= 0 else self.config.tolerance * self.baseline / latency
        gradient = min(1.0, max(_MIN_GRADIENT, gradient))
        new = self._estimate * gradient + math.sqrt(self._estimate)
        if new < self._estimate:
            new = self._estimate + self.config.smoothing * (new - self._estimate)
        self._estimate = self._clamp(new)

    def _clamp(self, value: float) -> float:
        return float(min(self.maximum, max(self.minimum, value)))
