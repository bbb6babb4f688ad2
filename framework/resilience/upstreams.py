"""Upstream pools: where a service's HTTP client and the gateway send HTTP requests.

An `UpstreamPool` is one named upstream of the config: a set of instances (fixed `targets`, or
every address a `dns` name resolves to) reached over keep-alive connections, with everything that
keeps one slow or broken instance from becoming everyone's problem:

    pool = UpstreamPool("catalog", UpstreamConfig(targets=("http://10.0.0.5:8080",
                                                           "http://10.0.0.6:8080")))
    await pool.start()
    response = await pool.send("GET", "/products/42?full=1", headers={"accept": "application/json"},
                               body=None, timeout=2.0)
    response.status, response.headers["content-type"], response.json(), response.instance
    await pool.stop()

What `send` does, in order:

1. **Circuit breaker** (one per pool, a `framework.resilience.CircuitBreaker`):
   `breaker.failures` failed calls within `breaker.window` seconds open it; while open every
   call fails fast with 503 and `Retry-After`; after `open_for` seconds it is half-open and
   admits `half_open_requests` trial calls: their success closes it, a failure opens it again.
   A failure is a connect error, a timeout or a 5xx.
2. **Admission** (a bulkhead with a bounded queue): at most `limit` calls in flight, where
   `limit` is `max_connections` (the pool's own connector has the same limit) or, with
   `adaptive` (the default), a `framework.resilience.AdaptiveLimit` at most that large that
   follows the upstream's latency. A call over the limit waits its turn (first come, first
   served) for at most `queue_timeout` seconds (0.25 by default; never beyond the call's own
   timeout), then fails at once with 503 and `Retry-After` (`UpstreamUnavailable`, counted as
   `shed`): under overload the pool refuses early instead of queueing into timeouts, and what
   waits at any time is bounded by the arrival rate x `queue_timeout`. Waiting for capacity is
   not held against any instance or the breaker. The adaptive limit learns from every answer's
   latency (a 4xx included); a timeout or the upstream's own 503 pushes it down; connect errors
   and calls that reached no instance teach it nothing.
3. **Choosing an instance**: among instances that pass their active health checks and are not
   ejected, `round_robin` or `least_outstanding` (fewest calls in flight, ties in turn).
4. **Retries**: idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) after a connect error, a
   timeout or a status in `retry.on_status`; any method after a 503 that says its request was
   not processed (`X-MSA-Not-Processed: 1`, a draining framework service's refusal, see
   `framework.types.NOT_PROCESSED`; the `http1` client then also closes its idle connections to
   that instance, which all lead to the same terminating pod when the instance is a Kubernetes
   Service); up to `retry.attempts` tries in all, each
   on another instance while there is one, after `retry.backoff * 2**n` seconds (+-20% jitter). A
   retry budget keeps retries from multiplying an outage: retries in the last 10 s may be at most
   `retry.budget` x the calls in those 10 s (but at least one, so a quiet pool still retries).
5. **Timeout**: `timeout` (else `config.timeout`, else `default_timeout`) bounds the whole call,
   retries included; each try's TCP connect gets a share of what remains, so a black-holed
   instance leaves time to try another.
6. **Passive ejection**: `eject.consecutive_failures` failures in a row on live traffic, or (with
   `eject.slow_ms`) a moving average latency above it, take an instance out for `eject_for`
   seconds, but never more than `max_ejected_percent` of the instances, and never the last one.

The HTTP client is `config.client`: `http1` (the default), the lean keep-alive client of
`framework.resilience.http1` (httptools on asyncio protocols), or `aiohttp`'s `ClientSession`;
every pool test runs on both. Errors are the framework's `UpstreamError`s, mapped from the
clients' exceptions here and nowhere else: `UpstreamTimeout` (a gateway answers 504) when the
timeout passes, `UpstreamUnreachable` (502) when the instances cannot be reached (after any
retries), `UpstreamUnavailable` (503) when the breaker is open, no instance is available, or the
pool is at capacity. A 5xx answer from the upstream is not an error: it is returned (after any
retries) for the caller to pass on. The gateway's pool (`framework.gateway.upstreams.
UpstreamPool`) raises them as `GatewayError`s.

Hop-by-hop headers (`HOP_BY_HOP`, any `Proxy-*`, and every header the `Connection` header names)
are dropped in both directions by `clean_headers`, which the gateway uses too. `send` also drops
the caller's `Host` and `Content-Length` (the instance's authority and the body's real length are
sent), and the response's `Content-Length` and, when the client decoded a gzip or deflate body,
its `Content-Encoding`: `UpstreamResponse.body` is the whole decoded entity.

Neither client keeps cookies (aiohttp's session has a `DummyCookieJar`): a gateway must never
keep one client's cookies and send them on another client's behalf. Active health checks use a
separate small aiohttp session, so a pool saturated by live traffic still gets its probes
through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel, ConfigDict, Field, model_validator
from yarl import URL

from framework.errors import (
    ConfigurationError,
    NotStartedError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from framework.resilience.adaptive import AdaptiveConfig, AdaptiveLimit
from framework.resilience.backoff import Backoff
from framework.resilience.breaker import BreakerConfig, CircuitBreaker
from framework.resilience.http1 import HOP_BY_HOP, Http1Client, UpstreamConnectionError
from framework.types import NOT_PROCESSED

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "EjectionConfig",
    "HealthCheckConfig",
    "RetryConfig",
    "UpstreamConfig",
    "UpstreamPool",
    "UpstreamResponse",
    "clean_headers",
    "connection_named",
]

log = logging.getLogger("framework.resilience.upstreams")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""The methods `send` retries: sending them twice has the effect of sending them once."""

_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
"""The content codings aiohttp decodes when the session's `auto_decompress` is on."""

_BUDGET_WINDOW = 10
"""Seconds of history the retry budget looks at."""
_LATENCY_ALPHA = 0.3
"""Weight of the newest sample in the moving average latency."""
_SLOW_MIN_SAMPLES = 3
"""Samples an instance needs (since it last came back) before its latency is judged."""

_Failure: TypeAlias = Literal["timeout", "connect"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheckConfig(_Strict):
    path: str = "/ready"
    interval: float = Field(default=5.0, gt=0)
    """Seconds between two checks of a healthy instance."""
    unhealthy_interval: float = Field(default=0.25, gt=0)
    """Seconds between two checks of an unhealthy instance (Envoy's `unhealthy_interval`): one
    that comes back is routed to again within `healthy_after` x this, not x `interval`."""
    timeout: float = Field(default=1.0, gt=0)
    healthy_after: int = Field(default=2, ge=1)
    unhealthy_after: int = Field(default=2, ge=1)


class EjectionConfig(_Strict):
    """Passive ejection: an instance failing or slow on live traffic is taken out for a while."""

    consecutive_failures: int = Field(default=5, ge=1)
    slow_ms: float | None = Field(default=None, gt=0)
    """Eject when the moving average latency exceeds this (None: latency is not judged)."""
    eject_for: float = Field(default=30.0, gt=0)
    max_ejected_percent: int = Field(default=50, ge=0, le=100)


class RetryConfig(_Strict):
    attempts: int = Field(default=2, ge=1)
    """Tries in all, on another instance each time; idempotent methods are retried, any method
    after a 503 whose request was not processed (`framework.types.NOT_PROCESSED`)."""
    budget: float = Field(default=0.2, ge=0, le=1)
    """Retries may add at most this share of the pool's recent requests."""
    on_status: tuple[int, ...] = (502, 503, 504)
    backoff: float = Field(default=0.025, ge=0)


class UpstreamConfig(_Strict):
    """One pool: its instances (fixed `targets` or a `dns` name), how calls are spread over
    them, and what guards them. The gateway's `upstreams` section holds one per name."""

    targets: tuple[str, ...] = ()
    """Base URLs (`http://10.0.0.5:8080`)."""
    dns: str | None = None
    """`host:port` resolved to every address (a Kubernetes headless Service), re-resolved every
    `dns_refresh` seconds."""
    dns_refresh: float = Field(default=10.0, gt=0)
    scheme: Literal["http", "https"] = "http"
    balance: Literal["round_robin", "least_outstanding"] = "round_robin"
    health: HealthCheckConfig | None = None
    eject: EjectionConfig = EjectionConfig()
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    timeout: float | None = Field(default=None, gt=0)
    max_connections: int = Field(default=100, ge=1)
    """Bulkhead: connections (and so concurrent requests) to this pool."""
    client: Literal["http1", "aiohttp"] = "http1"
    """The HTTP client: `http1`, the lean keep-alive client on asyncio protocols and httptools
    (`framework.resilience.http1`; CPU per request is 2-3x lower, see benchmarks/gateway.py), or
    aiohttp's `ClientSession`. Both pass the same pool tests."""
    queue_timeout: float = Field(default=0.25, ge=0)
    """Seconds a call over the limit waits for a slot (within its own timeout), then 503;
    0: refused at once."""
    adaptive: AdaptiveConfig | None = AdaptiveConfig()
    """The adaptive concurrency limit (None: `max_connections` is the limit). On by default:
    it starts at `max_connections` and only moves once calls fill half of it and the latency
    rises, so ordinary traffic meets the same fixed bulkhead as without it."""

    @model_validator(mode="after")
    def _one_source(self) -> UpstreamConfig:
        if bool(self.targets) == bool(self.dns):
            raise ValueError("give either targets or dns")
        return self


def connection_named(headers: Mapping[str, str]) -> frozenset[str]:
    """The header names (lowercase) the `Connection` headers of `headers` name: hop-by-hop."""
    values = (
        headers.getall("Connection", ())
        if isinstance(headers, CIMultiDict | CIMultiDictProxy)
        else [value for name, value in headers.items() if name.lower() == "connection"]
    )
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(","))


def clean_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop headers, keeping repeated ones (`Set-Cookie`).

    >>> dict(clean_headers({"Connection": "x-trace", "X-Trace": "1", "TE": "trailers",
    ...                     "Proxy-Authorization": "Basic eA==", "Accept": "*/*"}))
    {'Accept': '*/*'}
    """
    named = connection_named(headers)
    cleaned: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower.startswith("proxy-"):
            continue
        cleaned.add(name, value)
    return cleaned


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamResponse:
    """An upstream's complete answer (the body is read in full and decoded)."""

    status: int
    headers: CIMultiDictProxy[str]
    """The response headers, hop-by-hop headers removed."""
    body: bytes
    instance: str
    """The base URL of the instance that answered (`http://10.0.0.5:8080`)."""
    attempts: int = 1
    """Tries it took, this one included."""

    @property
    def ok(self) -> bool:
        return self.status < 400

    def json(self) -> Any:
        """The body parsed as JSON (orjson); raises `ValueError` when it is not JSON."""
        return orjson.loads(self.body)

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding, errors="replace")


class _Instance:
    """One instance and what the pool knows of it."""

    __slots__ = (
        "avg_latency_ms",
        "checks_failed",
        "checks_ok",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "host",
        "in_flight",
        "latency_samples",
        "requests",
        "server_hostname",
        "url",
    )

    def __init__(
        self, url: str, *, host: str | None = None, server_hostname: str | None = None
    ) -> None:
        self.url = url
        self.host = host
        """The `Host` header to send (DNS pools: the service's name, not the address)."""
        self.server_hostname = server_hostname
        """The TLS name to verify (DNS pools over https)."""
        self.healthy = True
        self.checks_ok = 0
        self.checks_failed = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.avg_latency_ms: float | None = None
        self.latency_samples = 0

    def is_ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def restore(self) -> None:
        """Back from ejection with a clean slate, so old samples do not eject it again."""
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        self.avg_latency_ms = None
        self.latency_samples = 0


class _RecentCount:
    """Events in the last `span` seconds, in one-second buckets (constant memory at any rate)."""

    def __init__(self, span: int = _BUDGET_WINDOW) -> None:
        self._span = span
        self._seconds = [-1] * span
        self._counts = [0] * span

    def add(self, now: float) -> None:
        second = int(now)
        index = second % self._span
        if self._seconds[index] != second:
            self._seconds[index] = second
            self._counts[index] = 0
        self._counts[index] += 1

    def total(self, now: float) -> int:
        second = int(now)
        return sum(
            count
            for seen, count in zip(self._seconds, self._counts, strict=True)
            if second - seen < self._span
        )


class _Admission:
    """At most `limit()` calls in flight; the next ones wait their turn (first come, first
    served) until a given time. Everything it holds is bounded: the waiters are removed when they
    are admitted, time out or are cancelled."""

    __slots__ = ("_limit", "_waiters", "in_flight")

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self.in_flight = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """Take a free slot now, if one is free and nobody waits for one."""
        if not self._waiters and self.in_flight < self._limit():
            self.in_flight += 1
            return True
        return False

    async def enter(self, until: float) -> bool:
        """Take a slot, waiting at most until `until` (the loop's clock); False: none came."""
        if self.try_enter():
            return True
        loop = asyncio.get_running_loop()
        if until <= loop.time():
            return False
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        # A timer resolves the waiter, not a cancellation: a slot handed over as the wait ends
        # is then either taken or given back, never lost.
        timer = loop.call_at(until, self._expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.leave()  # admitted just as the caller was cancelled
            raise
        finally:
            timer.cancel()
            if not waiter.done() or waiter.cancelled():
                self._discard(waiter)

    def leave(self) -> None:
        self.in_flight -= 1
        self.admit_waiting()

    def admit_waiting(self) -> None:
        """Hand free slots to the waiters in turn (after a call left or the limit rose)."""
        while self._waiters and self.in_flight < self._limit():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(True)

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(False)
            self._discard(waiter)

    def _discard(self, waiter: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


@dataclass(slots=True)
class _Result:
    """What one call came to: a response, or the error to raise (and its cause)."""

    response: UpstreamResponse | None = None
    error: UpstreamError | None = None
    cause: BaseException | None = None
    failed: bool = False
    """The upstream failed (connect error, timeout, 5xx): the breaker counts it."""
    judged: bool = True
    """False when no instance was tried, so the breaker learns nothing."""


class UpstreamPool:
    """One upstream's instances, balanced, health-checked and guarded; see the module docstring.

    Lifecycle: `start()` opens the session (unless one was given), resolves `dns` once, and
    starts the health-check and DNS-refresh tasks; `stop()` cancels them and closes what the pool
    opened. `send` before `start` (or after `stop`) raises `NotStartedError`.

    `time_fn` is the monotonic clock (seconds) of the breaker, the retry budget, ejections, the
    adaptive limit and the latencies that judge slow instances and move that limit; it can be
    replaced in tests. Timeouts, waits for a slot, backoff and health-check intervals run on the
    event loop's clock.
    """

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        default_timeout: float = 30,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.default_timeout = default_timeout
        self._time = time_fn
        self._given_session = session
        self._session: aiohttp.ClientSession | None = None
        self._client: Http1Client | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._instances: list[_Instance] = []
        self._cursor = 0
        self._breaker = CircuitBreaker(config.breaker)
        self._adaptive = (
            None
            if config.adaptive is None
            else AdaptiveLimit(config.adaptive, maximum=config.max_connections, clock=time_fn)
        )
        # Admission, not the connector, is what makes calls wait: a wait for a connection
        # inside aiohttp would end as a timeout indistinguishable from a slow instance.
        self._admission = _Admission(self._limit)
        self._recent_requests = _RecentCount()
        self._recent_retries = _RecentCount()
        self.requests = 0
        self.failures = 0
        """Calls that ended in a connect error, a timeout or a 5xx."""
        self.retries = 0
        self.budget_exhausted = 0
        """Retries the retry budget refused."""
        self.rejected = 0
        """Calls refused without trying an instance (breaker open, none available, capacity)."""
        self.shed = 0
        """Calls refused at capacity: no slot within `queue_timeout` (also in `rejected`)."""
        self._dns: tuple[str, int] | None = None
        if config.dns:
            self._dns = _parse_host_port(config.dns)
        else:
            self._instances = [_Instance(url.rstrip("/")) for url in dict.fromkeys(config.targets)]

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._session is not None or self._client is not None

    async def start(self) -> None:
        if self.started:
            return
        if self._given_session is not None:
            self._session = self._given_session
        elif self.config.client == "http1":
            self._client = Http1Client(max_idle=self.config.max_connections)
        else:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.config.max_connections, limit_per_host=0, keepalive_timeout=30
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        if self._dns is not None:
            await self._resolve()
            self._tasks.append(asyncio.create_task(self._dns_loop(), name=f"dns:{self.name}"))
        if self.config.health is not None:
            self._health_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=16, limit_per_host=2),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._tasks.append(asyncio.create_task(self._health_loop(), name=f"health:{self.name}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._health_session is not None:
            await self._health_session.close()
            self._health_session = None
        if self._session is not None and self._session is not self._given_session:
            await self._session.close()
        self._session = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- sending --------------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        path_qs: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float | None = None,
        clean: bool = True,
    ) -> UpstreamResponse:
        """Send one request to an instance (retrying as configured) and read the whole answer.

        `path_qs` is the already-encoded path and query (`/products/42?full=1`), appended to the
        instance's base URL as it is. `clean=False` says `headers` (a `CIMultiDict`) already
        hold only what may go upstream - no hop-by-hop headers, no `Host` or `Content-Length`,
        as the gateway's `forwardable_headers` makes them - so they are sent without another
        copy. Raises `UpstreamUnreachable`, `UpstreamUnavailable` or `UpstreamTimeout`; see the
        module docstring.
        """
        if not self.started:
            raise NotStartedError(f"upstream pool {self.name!r} is not started")
        method = method.upper()
        budget = timeout if timeout is not None else self.config.timeout or self.default_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        now = self._time()
        self.requests += 1
        self._recent_requests.add(now)

        trial = self._breaker.admit(now)
        if trial is None:
            self.rejected += 1
            raise UpstreamUnavailable(
                f"circuit open for upstream {self.name}",
                headers={"Retry-After": str(self._breaker.retry_after(now))},
            )
        result: _Result | None = None
        try:
            if not self._admission.try_enter():  # the common case needs no waiting coroutine
                await self._admit(deadline)
            admitted = self._time()
            try:
                outgoing = (
                    self._outgoing_headers(headers)
                    if clean or not isinstance(headers, CIMultiDict)
                    else headers
                )
                result = await self._try_instances(
                    method, path_qs, outgoing, body, deadline, budget
                )
            finally:
                if result is not None:
                    self._learn(result, self._time() - admitted)
                self._admission.leave()
        finally:
            if result is None or not result.judged:
                self._breaker.release(trial)
            else:
                before = self._breaker.state
                after = self._breaker.record(trial, failed=result.failed, now=self._time())
                if after != before:
                    log.warning("upstream %s: circuit %s", self.name, after.replace("_", "-"))
        if result.failed:
            self.failures += 1
        if not result.judged:
            self.rejected += 1
        if result.error is not None:
            raise result.error from result.cause
        assert result.response is not None
        return result.response

    def _limit(self) -> int:
        return self.config.max_connections if self._adaptive is None else self._adaptive.limit

    async def _admit(self, deadline: float) -> None:
        """A slot for a call that found none free at once (`_Admission.try_enter`)."""
        until = min(deadline, asyncio.get_running_loop().time() + self.config.queue_timeout)
        if await self._admission.enter(until):
            return
        self.rejected += 1
        self.shed += 1
        raise UpstreamUnavailable(
            f"upstream {self.name} is at capacity", headers={"Retry-After": "1"}
        )

    def _learn(self, result: _Result, latency: float) -> None:
        """Tell the adaptive limit how an admitted call went (while it still counts in flight)."""
        if self._adaptive is None:
            return
        in_flight = self._admission.in_flight
        if result.response is not None:
            if result.response.status == 503:  # the upstream sheds load itself
                self._adaptive.record_drop(in_flight)
            else:
                self._adaptive.record(latency, in_flight)
        elif result.judged and isinstance(result.error, UpstreamTimeout):
            self._adaptive.record_drop(in_flight)

    def _outgoing_headers(self, headers: Mapping[str, str]) -> CIMultiDict[str]:
        outgoing = clean_headers(headers)
        outgoing.popall("host", None)
        outgoing.popall("content-length", None)
        return outgoing

    async def _try_instances(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        deadline: float,
        budget: float,
    ) -> _Result:
        loop = asyncio.get_running_loop()
        retry = self.config.retry
        tries = retry.attempts
        tried: set[str] = set()
        result: _Result | None = None
        attempt = 0
        while True:
            instance = self._pick(exclude=tried)
            if instance is None:
                if result is not None:
                    return result
                return _Result(
                    error=UpstreamUnavailable(
                        f"no available instance of upstream {self.name}",
                        headers={"Retry-After": "1"},
                    ),
                    judged=False,
                )
            attempt += 1
            tried.add(instance.url)
            result = await self._attempt(
                instance, method, path_qs, headers, body, deadline, budget, attempt, tries
            )
            if attempt >= tries or not self._should_retry(method, result):
                return result
            # Only on a retry (rare): jittered, so instances that failed together are not
            # retried in lock-step by every gateway replica.
            delay = Backoff(
                initial=retry.backoff, maximum=retry.backoff * 2 ** max(0, tries - 1)
            ).delay(attempt)
            if deadline - loop.time() <= delay:
                return result
            now = self._time()
            allowed = max(1.0, retry.budget * self._recent_requests.total(now))
            if self._recent_retries.total(now) >= allowed:
                self.budget_exhausted += 1
                return result
            self.retries += 1
            self._recent_retries.add(now)
            if delay:
                await asyncio.sleep(delay)

    def _should_retry(self, method: str, result: _Result) -> bool:
        response = result.response
        if response is not None:
            if response.status not in self.config.retry.on_status:
                return False
            return method in IDEMPOTENT_METHODS or refused_unprocessed(
                response.status, response.headers
            )
        return result.error is not None and method in IDEMPOTENT_METHODS

    async def _attempt(
        self,
        instance: _Instance,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        deadline: float,
        budget: float,
        attempt: int,
        tries: int,
    ) -> _Result:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:  # the wait for a slot took it all: not this instance's fault
            return _Result(error=self._timeout_error(budget), judged=False)
        if instance.host is not None:
            headers = headers.copy()
            headers["Host"] = instance.host
        instance.requests += 1
        instance.in_flight += 1
        started = self._time()
        failure: _Failure | None = None
        cause: BaseException | None = None
        connect_timeout = remaining / (tries - attempt + 1)
        try:
            if self._client is not None:
                raw = await self._client.request(
                    instance.url,
                    method,
                    path_qs,
                    headers,
                    body,
                    timeout=remaining,
                    connect_timeout=connect_timeout,
                    server_hostname=instance.server_hostname,
                )
                status, response_headers, payload = raw.status, raw.headers, raw.body
            else:
                status, response_headers, payload = await self._aiohttp_request(
                    instance, method, path_qs, headers, body, remaining, connect_timeout
                )
        # The one place the clients' exceptions are translated (both time out as TimeoutError).
        except TimeoutError as exc:
            failure, cause = "timeout", exc
        except (aiohttp.ClientError, UpstreamConnectionError) as exc:
            failure, cause = "connect", exc
        finally:
            instance.in_flight -= 1
        latency_ms = (self._time() - started) * 1000

        if failure is not None:
            self._judge(instance, failed=True, latency_ms=None)
            if failure == "timeout":
                error: UpstreamError = self._timeout_error(budget)
            else:
                error = UpstreamUnreachable(f"upstream {self.name} could not be reached")
            return _Result(error=error, cause=cause, failed=True)

        failed = status >= 500
        if self._client is not None and refused_unprocessed(status, response_headers):
            # The instance is draining: its other kept-alive connections lead there too.
            self._client.close_idle(instance.url)
        self._judge(instance, failed=failed, latency_ms=latency_ms)
        response = UpstreamResponse(
            status=status,
            headers=CIMultiDictProxy(response_headers),
            body=payload,
            instance=instance.url,
            attempts=attempt,
        )
        return _Result(response=response, failed=failed)

    async def _aiohttp_request(
        self,
        instance: _Instance,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        remaining: float,
        connect_timeout: float,
    ) -> tuple[int, CIMultiDict[str], bytes]:
        """One try through aiohttp's client (`client: aiohttp`): the status, the headers as
        the http1 client gives them (no hop-by-hop, no `Content-Length`, no `Content-Encoding`
        of a body aiohttp decoded), the whole body."""
        session = self._session
        assert session is not None
        async with session.request(
            method,
            URL(instance.url + path_qs, encoded=True),
            headers=headers,
            data=body,
            timeout=aiohttp.ClientTimeout(total=remaining, sock_connect=connect_timeout),
            allow_redirects=False,
            server_hostname=instance.server_hostname,
        ) as raw:
            payload = await raw.read()
            response_headers = clean_headers(raw.headers)
        response_headers.popall("content-length", None)
        encoding = response_headers.get("content-encoding", "").lower()
        if session.auto_decompress and encoding in _DECODED_ENCODINGS:
            response_headers.popall("content-encoding", None)
        return raw.status, response_headers, payload

    def _timeout_error(self, budget: float) -> UpstreamTimeout:
        return UpstreamTimeout(f"upstream {self.name} did not answer within {budget:g} s")

    # -- choosing, judging and ejecting instances -----------------------------------------------

    def _available(self, now: float) -> list[_Instance]:
        available = []
        for instance in self._instances:
            if instance.ejected_until and not instance.is_ejected(now):
                instance.restore()
                log.info("upstream %s: %s is back from ejection", self.name, instance.url)
            if instance.healthy and not instance.is_ejected(now):
                available.append(instance)
        return available

    def _pick(self, *, exclude: set[str]) -> _Instance | None:
        available = self._available(self._time())
        candidates = (
            [i for i in available if i.url not in exclude] or available if exclude else available
        )
        if not candidates:
            return None
        if self.config.balance == "least_outstanding":
            fewest = min(i.in_flight for i in candidates)
            candidates = [i for i in candidates if i.in_flight == fewest]
        instance = candidates[self._cursor % len(candidates)]
        if not exclude:  # retries do not move the turn, so first tries stay evenly spread
            self._cursor += 1
        return instance

    def _judge(self, instance: _Instance, *, failed: bool, latency_ms: float | None) -> None:
        eject = self.config.eject
        if failed:
            instance.failures += 1
            instance.consecutive_failures += 1
        else:
            instance.consecutive_failures = 0
        if latency_ms is not None:
            instance.latency_samples += 1
            previous = instance.avg_latency_ms
            instance.avg_latency_ms = (
                latency_ms
                if previous is None
                else _LATENCY_ALPHA * latency_ms + (1 - _LATENCY_ALPHA) * previous
            )
        if instance.consecutive_failures >= eject.consecutive_failures:
            self._eject(instance, f"{instance.consecutive_failures} failures in a row")
        elif (
            eject.slow_ms is not None
            and instance.avg_latency_ms is not None
            and instance.latency_samples >= _SLOW_MIN_SAMPLES
            and instance.avg_latency_ms > eject.slow_ms
        ):
            self._eject(
                instance, f"average latency {instance.avg_latency_ms:.0f} ms > {eject.slow_ms:g}"
            )

    def _eject(self, instance: _Instance, reason: str) -> None:
        now = self._time()
        if instance.is_ejected(now):
            return
        total = len(self._instances)
        limit = min(total * self.config.eject.max_ejected_percent // 100, total - 1)
        if sum(1 for i in self._instances if i.is_ejected(now)) >= limit:
            return
        if not any(
            i.healthy and not i.is_ejected(now) for i in self._instances if i is not instance
        ):
            return  # the last instance available stays in, whatever the percentage allows
        instance.ejected_until = now + self.config.eject.eject_for
        instance.ejections += 1
        log.warning(
            "upstream %s: ejected %s for %g s (%s)",
            self.name,
            instance.url,
            self.config.eject.eject_for,
            reason,
        )

    # -- active health checks -------------------------------------------------------------------

    async def _health_loop(self) -> None:
        """Check every instance when it is due: a healthy one every `interval`, an unhealthy
        one every `unhealthy_interval`, so a recovered instance is back within a second."""
        health = self.config.health
        assert health is not None
        loop = asyncio.get_running_loop()
        due: dict[str, float] = {}
        while True:
            now = loop.time()
            instances = list(self._instances)
            checked = [i for i in instances if due.get(i.url, 0.0) <= now]
            try:
                await asyncio.gather(*(self._check(i) for i in checked))
            except Exception:  # never let one bad round end health checking
                log.exception("upstream %s: health check round failed", self.name)
            now = loop.time()
            for instance in checked:
                pause = health.interval if instance.healthy else health.unhealthy_interval
                due[instance.url] = now + pause
            due = {i.url: due.get(i.url, now) for i in instances}  # forget departed instances
            await asyncio.sleep(max(0.0, min(due.values(), default=now + health.interval) - now))

    async def _check(self, instance: _Instance) -> None:
        health = self.config.health
        assert health is not None
        assert self._health_session is not None
        headers = {"Host": instance.host} if instance.host is not None else None
        try:
            async with self._health_session.get(
                URL(instance.url + health.path, encoded=True),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=health.timeout),
                allow_redirects=False,
                server_hostname=instance.server_hostname,
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            instance.checks_ok += 1
            instance.checks_failed = 0
            if not instance.healthy and instance.checks_ok >= health.healthy_after:
                instance.healthy = True
                log.info("upstream %s: %s is healthy again", self.name, instance.url)
        else:
            instance.checks_failed += 1
            instance.checks_ok = 0
            if instance.healthy and instance.checks_failed >= health.unhealthy_after:
                instance.healthy = False
                log.warning("upstream %s: %s failed its health checks", self.name, instance.url)

    # -- DNS discovery --------------------------------------------------------------------------

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_refresh)
            try:
                await self._resolve()
            except Exception:
                log.exception("upstream %s: DNS refresh failed", self.name)

    async def _resolve(self) -> None:
        """Re-resolve the DNS name; on failure (or no address) the last good set stays."""
        assert self._dns is not None
        host, port = self._dns
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except OSError as exc:
            log.warning(
                "upstream %s: cannot resolve %s (keeping %d instances): %s",
                self.name,
                host,
                len(self._instances),
                exc,
            )
            return
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            return
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        https = self.config.scheme == "https"
        self._set_instances(
            _Instance(
                f"{self.config.scheme}://{_url_host(address)}:{port}",
                host=authority,
                server_hostname=host if https else None,
            )
            for address in addresses
        )

    def _set_instances(self, fresh: Iterable[_Instance]) -> None:
        known = {i.url: i for i in self._instances}
        instances = [known.get(i.url, i) for i in fresh]
        if [i.url for i in instances] != list(known):
            log.info(
                "upstream %s: instances are now %s", self.name, ", ".join(i.url for i in instances)
            )
        self._instances = instances

    # -- the admin view -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The pool's state for the admin API (JSON-able)."""
        now = self._time()
        return {
            "name": self.name,
            "balance": self.config.balance,
            "source": {"dns": self.config.dns} if self.config.dns else {"targets": "static"},
            "breaker": {
                "state": self._breaker.state,
                "recent_failures": self._breaker.recent_failures(now),
                "retry_after": (
                    self._breaker.retry_after(now) if self._breaker.state == "open" else None
                ),
            },
            "counters": {
                "requests": self.requests,
                "failures": self.failures,
                "retries": self.retries,
                "budget_exhausted": self.budget_exhausted,
                "rejected": self.rejected,
                "shed": self.shed,
            },
            "concurrency": {
                "limit": self._limit(),
                "max": self.config.max_connections,
                "in_flight": self._admission.in_flight,
                "queued": self._admission.queued,
                "adaptive": None if self._adaptive is None else self._adaptive.snapshot(),
            },
            "instances": [
                {
                    "url": i.url,
                    "healthy": i.healthy,
                    "ejected": i.is_ejected(now),
                    "ejected_for": round(max(0.0, i.ejected_until - now), 3),
                    "ejections": i.ejections,
                    "in_flight": i.in_flight,
                    "avg_latency_ms": (
                        None if i.avg_latency_ms is None else round(i.avg_latency_ms, 3)
                    ),
                    "requests": i.requests,
                    "failures": i.failures,
                    "consecutive_failures": i.consecutive_failures,
                }
                for i in self._instances
            ],
        }


def refused_unprocessed(status: int, headers: Mapping[str, str]) -> bool:
    """A draining framework service's refusal: 503 with `X-MSA-Not-Processed: 1` (no handler
    saw the request, so any method may be sent again)."""
    return status == 503 and headers.get(NOT_PROCESSED) == "1"


def _parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"upstream dns must be 'host:port', not {value!r}")
    return host, int(port)


def _url_host(address: str) -> str:
    if ":" in address:  # IPv6; a zone (`fe80::1%eth0`) is written `%25` in a URL
        return "[" + address.replace("%", "%25") + "]"
    return address
