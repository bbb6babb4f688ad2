"""Resilience mechanisms, one of each, shared by every part of the framework that waits or sheds.

    Backoff        exponential delays, capped, with jitter (`framework.resilience.backoff`)

Every retry loop in the framework (consumer fetches and dead-letter publishes, outbox and saga
relays, the event feed, queue-and-drain, the gateway's upstream retries) takes its delays from a
`Backoff`, so the constants are named once per loop and every loop jitters: a fleet of replicas
that lost the same broker does not come back in lock-step.
"""

from framework.resilience.backoff import Backoff

__all__ = ["Backoff"]
