"""Resilience mechanisms, one of each, shared by every part of the framework that waits or sheds.

    Backoff          exponential delays, capped, with jitter (`framework.resilience.backoff`)
    CircuitBreaker   closed -> open -> half-open, per upstream (`framework.resilience.breaker`)
    TokenBucket      a rate with a burst, per client or per backend (`.token_bucket`)
    AdaptiveLimit    a concurrency limit that follows an upstream's latency (`.adaptive`)
    UpstreamPool     HTTP instances balanced, health-checked, retried within a budget, behind a
                     breaker and an adaptive bulkhead with a bounded queue
                     (`framework.resilience.upstreams`); the gateway's upstreams and a service's
                     `framework.client.ResilientClient` are such pools

Every retry loop in the framework (consumer fetches and dead-letter publishes, outbox and saga
relays, the event feed, queue-and-drain, the gateway's upstream retries) takes its delays from a
`Backoff`, so the constants are named once per loop and every loop jitters: a fleet of replicas
that lost the same broker does not come back in lock-step.

The upstream names resolve on first use, so importing this package (the bus does, for `Backoff`)
does not import aiohttp.
"""

from typing import TYPE_CHECKING, Any

from framework.resilience.adaptive import AdaptiveConfig, AdaptiveLimit
from framework.resilience.backoff import Backoff
from framework.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from framework.resilience.token_bucket import TokenBucket

if TYPE_CHECKING:
    from framework.resilience.upstreams import (
        EjectionConfig,
        HealthCheckConfig,
        RetryConfig,
        UpstreamConfig,
        UpstreamPool,
        UpstreamResponse,
    )

__all__ = [
    "AdaptiveConfig",
    "AdaptiveLimit",
    "Backoff",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "EjectionConfig",
    "HealthCheckConfig",
    "RetryConfig",
    "TokenBucket",
    "UpstreamConfig",
    "UpstreamPool",
    "UpstreamResponse",
]

_UPSTREAMS = frozenset(
    {
        "EjectionConfig",
        "HealthCheckConfig",
        "RetryConfig",
        "UpstreamConfig",
        "UpstreamPool",
        "UpstreamResponse",
    }
)


def __getattr__(name: str) -> Any:
    if name in _UPSTREAMS:
        from framework.resilience import upstreams

        return getattr(upstreams, name)
    raise AttributeError(f"module 'framework.resilience' has no attribute {name!r}")
