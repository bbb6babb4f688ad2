"""The adaptive concurrency limit, on a fake clock: each test moves time instead of waiting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from framework.resilience import AdaptiveConfig, AdaptiveLimit
from tests.framework.gateway.conftest import Clock

FAST, SLOW = 0.010, 0.100
"""Seconds: an upstream answering promptly, and the same one with queues built up."""

ONE_SAMPLE_WINDOWS = AdaptiveConfig(window=1.0, min_samples=1)


def make(
    config: AdaptiveConfig = ONE_SAMPLE_WINDOWS, maximum: int = 100
) -> tuple[AdaptiveLimit, Clock]:
    clock = Clock()
    return AdaptiveLimit(config, maximum=maximum, clock=clock), clock


def windows(
    limit: AdaptiveLimit, clock: Clock, latency: float, count: int, *, in_flight: int | None = None
) -> list[int]:
    """`count` one-sample windows of `latency`, with the limit fully used unless `in_flight` is
    given; the limit after each."""
    seen = []
    for _ in range(count):
        clock.advance(limit.config.window)
        limit.record(latency, limit.limit if in_flight is None else in_flight)
        seen.append(limit.limit)
    return seen


def test_it_starts_at_the_maximum_and_holds_it_under_ordinary_traffic() -> None:
    limit, clock = make()
    assert limit.limit == 100

    # Far from the limit in flight: the latency, however it moves, says nothing about capacity.
    windows(limit, clock, FAST, 5, in_flight=3)
    windows(limit, clock, SLOW, 20, in_flight=3)

    assert limit.limit == 100
    assert limit.snapshot()["latency_ms"] == pytest.approx(100)


def test_the_limit_falls_when_latency_rises_but_never_below_min_limit() -> None:
    limit, clock = make()
    windows(limit, clock, FAST, 5)  # saturated, prompt: the baseline; the limit cannot rise
    assert limit.limit == 100
    assert limit.baseline == pytest.approx(FAST)

    falling = windows(limit, clock, SLOW, 40)

    assert falling[0] < 100
    assert falling == sorted(falling, reverse=True)
    assert falling[-1] == 4  # min_limit, the default
    assert limit.baseline is not None
    assert limit.baseline < 2 * FAST, "a rising latency moves the baseline only slowly"
    assert windows(limit, clock, 1.0, 10) == [4] * 10


def test_the_limit_recovers_when_latency_falls_but_never_above_the_maximum() -> None:
    limit, clock = make()
    windows(limit, clock, FAST, 5)
    windows(limit, clock, SLOW, 40)
    assert limit.limit == 4

    rising = windows(limit, clock, FAST, 30)

    assert rising == sorted(rising)
    assert rising[0] > 4
    assert rising[-1] == 100
    assert max(rising) == 100


def test_a_window_with_a_timeout_cuts_the_limit_by_backoff() -> None:
    limit, clock = make(AdaptiveConfig(window=1.0, min_samples=1, backoff=0.5, min_limit=10))

    clock.advance(1)
    limit.record_drop(in_flight=1)  # even far from the limit: a timeout is evidence enough
    assert limit.limit == 50
    for _ in range(5):
        clock.advance(1)
        limit.record_drop(in_flight=1)
    assert limit.limit == 10
    assert limit.latency is None, "a timeout's latency is not a latency sample"


def test_a_window_closes_only_after_its_time_and_its_samples() -> None:
    limit, clock = make(AdaptiveConfig(window=1.0, min_samples=3))

    for _ in range(5):
        limit.record(FAST, in_flight=100)  # many samples, no time
    assert limit.latency is None
    clock.advance(1)
    limit.record(SLOW, in_flight=100)
    assert limit.latency == pytest.approx((5 * FAST + SLOW) / 6)

    clock.advance(5)
    limit.record(FAST, in_flight=100)
    limit.record(FAST, in_flight=100)  # time enough, samples not yet
    assert limit.latency == pytest.approx((5 * FAST + SLOW) / 6)
    limit.record(FAST, in_flight=100)
    assert limit.latency == pytest.approx(FAST)


def test_the_baseline_follows_a_falling_latency_quickly() -> None:
    limit, clock = make()
    windows(limit, clock, SLOW, 1, in_flight=1)
    assert limit.baseline == pytest.approx(SLOW)

    windows(limit, clock, FAST, 30, in_flight=1)

    assert limit.baseline == pytest.approx(FAST, rel=0.05)


def test_limits_are_clamped_and_checked() -> None:
    assert make(AdaptiveConfig(initial_limit=500), maximum=100)[0].limit == 100
    assert make(AdaptiveConfig(initial_limit=20))[0].limit == 20
    small = make(AdaptiveConfig(min_limit=8), maximum=2)[0]
    assert (small.limit, small.minimum) == (2, 2)
    assert make(maximum=1)[0].snapshot() == {
        "limit": 1,
        "min": 1,
        "max": 1,
        "baseline_ms": None,
        "latency_ms": None,
    }
    with pytest.raises(ValueError, match="maximum"):
        AdaptiveLimit(AdaptiveConfig(), maximum=0)
    with pytest.raises(ValidationError):
        AdaptiveConfig(tolerance=0.5)
