"""Quality of service at the gateway's door: rate limits, daily quotas, load shedding, body caps.

Three independent layers, each a `GatewayMiddleware`; auth runs before them, so
`exchange.client` is known (None: an anonymous caller, keyed by its address):

    limiter = RateLimiter(config.tiers, default_tier=config.default_tier,
                          anonymous_tier=config.anonymous_tier)
    stack = [
        ...,                                           # access log, CORS, auth
        ConcurrencyLimiter(config.gateway.max_concurrency).middleware,
        rate_limit_middleware(limiter),
        body_limit_middleware(config.gateway.max_body),
        ...,                                           # cache, proxy
    ]

`RateLimiter`
    A token bucket per client (`rate` tokens a second, at most `burst` at once, from the
    client's tier) and, when the tier has `daily_quota`, a count per client per UTC day that
    starts again at 00:00 UTC. Client state lives in an LRU bounded by `max_clients`: the least
    recently seen client is forgotten first, and one that comes back starts with a full bucket
    and a fresh quota count, so size it well above the clients active in a day when quotas are
    used for charging. A request that is refused costs nothing: neither a token nor a quota
    unit. Answers 429 with `Retry-After` (whole seconds, at least 1) and, on every response of
    a limited client, `RateLimit-Limit` (the burst) and `RateLimit-Remaining` (whole tokens
    left), the names of the IETF httpapi RateLimit header draft.

`ConcurrencyLimiter`
    At most `max_concurrency` requests inside at once; the next one is shed at once with 503
    and `Retry-After: 1`, never queued: a queue in front of a saturated gateway only turns
    overload into timeouts.

`body_limit_middleware`
    Refuses a declared `Content-Length` above the route's `max_body` (else the gateway's) with
    413 before reading a byte; otherwise reads the body, chunked or not, and stops with 413 as
    soon as it grows past the limit, so no more than limit + 1 bytes are ever buffered. The body
    is left in `exchange.body` (and its size in `exchange.bytes_in`) for the layers after it.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from framework.errors import ConfigurationError
from framework.gateway.config import LimitsConfig, TierConfig
from framework.gateway.types import Exchange, GatewayError, GatewayHandler, GatewayMiddleware
from framework.resilience import TokenBucket

__all__ = [
    "ConcurrencyLimiter",
    "Decision",
    "RateLimiter",
    "body_limit_middleware",
    "limit_rate",
    "rate_limit_middleware",
    "read_body",
]

_DAY = 86_400


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What `RateLimiter.check` decided for one request."""

    allowed: bool
    retry_after: float = 0.0
    """Seconds until a retry can succeed (0 when allowed): the next token, or UTC midnight."""
    limit: int | None = None
    """The bucket's capacity (the tier's burst); None: the client is not limited."""
    remaining: int | None = None
    """Whole tokens left after this request; None: not limited."""
    quota: int | None = None
    """The tier's daily quota; None: no quota."""
    quota_remaining: int | None = None
    """Requests left today after this one; None: no quota."""
    quota_exhausted: bool = False
    """Refused for the daily quota (not the rate)."""


_UNLIMITED = Decision(allowed=True)


def _part(tier: TierConfig, share: int) -> TierConfig:
    """`tier` with its rate, burst and daily quota divided by `share` (at least 1 each)."""
    if share == 1:
        return tier
    quota = tier.daily_quota
    return TierConfig(
        rate=tier.rate / share,
        burst=max(1, tier.burst // share),
        daily_quota=None if quota is None else max(1, quota // share),
    )


class _ClientState:
    __slots__ = ("bucket", "day", "used")

    def __init__(self, bucket: TokenBucket, day: int) -> None:
        self.bucket = bucket
        self.day = day
        self.used = 0


class RateLimiter:
    """Token buckets and daily quotas per client, by tier.

    `tiers` maps tier names to `TierConfig(rate, burst, daily_quota)`. A client's tier is the
    one `check` is given, or `default_tier` when that is None or unknown (an unexpected tier
    claim never escapes the limits); no tier at all means not limited. `time_fn` is the
    monotonic clock of the buckets, `day_fn` the wall clock in UTC epoch seconds that sets the
    quota day; both can be replaced in tests:

        >>> now = [0.0]
        >>> limiter = RateLimiter(
        ...     {"free": TierConfig(rate=1, burst=2)}, default_tier="free",
        ...     time_fn=lambda: now[0], day_fn=lambda: now[0],
        ... )
        >>> [limiter.check("alice", None).allowed for _ in range(3)]
        [True, True, False]
        >>> now[0] += 1.0  # one second refills one token
        >>> limiter.check("alice", None).allowed
        True
    """

    def __init__(
        self,
        tiers: Mapping[str, TierConfig],
        *,
        default_tier: str | None,
        anonymous_tier: str | None = None,
        max_clients: int = 100_000,
        share: int = 1,
        time_fn: Callable[[], float] = time.monotonic,
        day_fn: Callable[[], float] = time.time,
    ) -> None:
        for name in (default_tier, anonymous_tier):
            if name is not None and name not in tiers:
                raise ConfigurationError(f"no tier named {name!r} in tiers")
        if max_clients < 1:
            raise ConfigurationError(f"max_clients must be at least 1, not {max_clients}")
        if share < 1:
            raise ConfigurationError(f"share must be at least 1, not {share}")
        self.share = share
        """This process's part of every limit is 1/`share` (`msa gateway --workers N`: N)."""
        self.tiers = {name: _part(tier, share) for name, tier in tiers.items()}
        self.default_tier = default_tier
        self.anonymous_tier = anonymous_tier
        self.max_clients = max_clients
        self._time = time_fn
        self._day = day_fn
        self._clients: OrderedDict[str, _ClientState] = OrderedDict()

    def __len__(self) -> int:
        """Clients currently remembered (at most `max_clients`)."""
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def tier_of(self, tier: str | None) -> str | None:
        """The tier that applies: `tier` when it is configured, else the default tier."""
        return tier if tier is not None and tier in self.tiers else self.default_tier

    def check(self, client_id: str, tier: str | None) -> Decision:
        """Count one request of `client_id` (of `tier`) if its bucket and quota allow it."""
        name = self.tier_of(tier)
        if name is None:
            return _UNLIMITED
        config = self.tiers[name]
        wall = self._day()
        day = int(wall // _DAY)
        state = self._clients.get(client_id)
        if state is None:
            state = _ClientState(TokenBucket(config.rate, config.burst, clock=self._time), day)
            self._clients[client_id] = state
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client_id)
            if state.day != day:
                state.day = day
                state.used = 0
        bucket = state.bucket
        # A client whose tier changed is refilled (and capped) by its new tier from now on.
        bucket.rate, bucket.burst = config.rate, config.burst
        tokens = bucket.refill()

        quota = config.daily_quota
        if quota is not None and state.used >= quota:
            return Decision(
                allowed=False,
                retry_after=_DAY - (wall % _DAY),
                limit=config.burst,
                remaining=int(tokens),
                quota=quota,
                quota_remaining=0,
                quota_exhausted=True,
            )
        wait = bucket.try_take()
        if wait > 0:
            return Decision(
                allowed=False,
                retry_after=wait,
                limit=config.burst,
                remaining=0,
                quota=quota,
                quota_remaining=None if quota is None else quota - state.used,
            )
        state.used += 1
        return Decision(
            allowed=True,
            limit=config.burst,
            remaining=int(bucket.tokens),
            quota=quota,
            quota_remaining=None if quota is None else quota - state.used,
        )


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _rate_headers(decision: Decision) -> dict[str, str]:
    if decision.limit is None or decision.remaining is None:
        return {}
    return {"RateLimit-Limit": str(decision.limit), "RateLimit-Remaining": str(decision.remaining)}


def limit_rate(limiter: RateLimiter, exchange: Exchange) -> dict[str, str]:
    """Count `exchange` against `limiter`: its `RateLimit-*` headers when allowed, else
    `GatewayError` 429 with them and `Retry-After` (`rate_limit_middleware` is this around the
    layers inside it; the gateway's compiled routes call it directly)."""
    client = exchange.client
    if client is None:
        client_id = f"anon:{exchange.request.remote or 'unknown'}"
        tier = limiter.anonymous_tier
    elif client.method == "anonymous":
        client_id, tier = client.id, client.tier or limiter.anonymous_tier
    else:
        client_id, tier = client.id, client.tier
    decision = limiter.check(client_id, tier)
    headers = _rate_headers(decision)
    if not decision.allowed:
        headers["Retry-After"] = _retry_after(decision.retry_after)
        if decision.quota_exhausted:
            detail = (
                f"the daily quota of {decision.quota} requests is used up; "
                "it starts again at 00:00 UTC"
            )
        else:
            detail = (
                f"the rate limit is exceeded (bursts of at most {decision.limit} requests); "
                f"retry in {headers['Retry-After']} s"
            )
        exchange.notes["rate_limited"] = "quota" if decision.quota_exhausted else "rate"
        raise GatewayError(429, "Too Many Requests", detail, headers=headers)
    return headers


def rate_limit_middleware(limiter: RateLimiter) -> GatewayMiddleware:
    """Apply `limiter` to each request: 429 when refused, `RateLimit-*` headers when allowed.

    The client is `exchange.client.id` with its tier; an anonymous caller (no identity, or the
    `anonymous` method) is `anon:<address>` of the limiter's `anonymous_tier`, else the default
    tier. The headers are also added to a `GatewayError` an inner layer raises, and left off a
    response that is already streaming (its headers are sent).
    """

    async def rate_limit(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        headers = limit_rate(limiter, exchange)
        try:
            response = await call_next(exchange)
        except GatewayError as exc:
            for name, value in headers.items():
                exc.headers.setdefault(name, value)
            raise
        if headers and not response.prepared:
            response.headers.update(headers)
        return response

    return rate_limit


class ConcurrencyLimiter:
    """Load shedding: at most `max_concurrency` requests at once, the rest 503 immediately.

    Its `middleware` method is the layer. `in_flight` is the number inside now, `shed` the
    number refused since it was made (for the admin API and metrics).
    """

    def __init__(self, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be at least 1, not {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        self.shed = 0

    def enter(self, exchange: Exchange) -> None:
        """Take a slot for `exchange`, or shed it (`GatewayError` 503); `leave()` gives it back."""
        if self.in_flight >= self.max_concurrency:
            self.shed += 1
            exchange.notes["shed"] = True
            raise GatewayError(
                503,
                "Service Unavailable",
                "the gateway is at capacity; retry shortly",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def middleware(self, exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        """The `GatewayMiddleware`: pass the request on, or shed it when the gateway is full."""
        self.enter(exchange)
        try:
            return await call_next(exchange)
        finally:
            self.in_flight -= 1


_DIGITS = re.compile(r"[0-9]+")
_CHUNK = 64 * 1024


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, "Content Too Large", f"the request body exceeds {limit} bytes")


def body_limit_middleware(
    default_max: int, limits: LimitsConfig | None = None
) -> GatewayMiddleware:
    """Cap request bodies at the route's `max_body` (else `default_max`) and read them.

    413 for a `Content-Length` over the limit (before reading) or a body that turns out longer
    (chunked, or lying about its length); 400 for a `Content-Length` that is not one decimal
    number, or that comes together with `Transfer-Encoding` (a request-smuggling shape).

    With `limits`, the body must keep coming: 408 when it pauses for more than
    `limits.body_timeout` seconds, or when, after that long, it has averaged less than
    `limits.body_min_rate` bytes a second. A client that hangs up mid-body gets a 400 nobody
    reads (one access-log line, no traceback).
    """
    if default_max < 0:
        raise ConfigurationError(f"default_max must not be negative, not {default_max}")
    pause = limits.body_timeout if limits is not None else None
    min_rate = limits.body_min_rate if limits is not None else 0

    async def body_limit(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        await read_body(exchange, default_max, pause, min_rate)
        return await call_next(exchange)

    return body_limit


async def read_body(
    exchange: Exchange, default_max: int, pause: float | None, min_rate: int
) -> None:
    """Check the declared length and read the body into `exchange.body` within the route's
    limit (else `default_max`), pausing at most `pause` s and averaging `min_rate` bytes/s:
    what `body_limit_middleware` does before the layers inside it."""
    request = exchange.request
    limit = exchange.route.max_body if exchange.route.max_body is not None else default_max
    declared = request.headers.getall("Content-Length", ())
    if declared:
        if len(declared) > 1 or not _DIGITS.fullmatch(declared[0].strip()):
            raise GatewayError(
                400, "Bad Request", "Content-Length must be one non-negative decimal number"
            )
        if "Transfer-Encoding" in request.headers:
            raise GatewayError(
                400, "Bad Request", "Content-Length and Transfer-Encoding cannot both be sent"
            )
        if int(declared[0]) > limit:
            raise _too_large(limit)
    if exchange.body is None:
        exchange.body = await _read_body(request, limit, pause, min_rate)
    elif len(exchange.body) > limit:
        raise _too_large(limit)
    exchange.bytes_in = len(exchange.body)


async def _read_body(request: web.Request, limit: int, pause: float | None, min_rate: int) -> bytes:
    if not request.body_exists:
        return b""
    loop = asyncio.get_running_loop()
    started = loop.time()
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(pause):
                # Never ask for more than one byte past the limit: that byte is the proof.
                chunk = await request.content.read(min(_CHUNK, limit + 1 - size))
        except TimeoutError:
            raise _stalled(f"the request body paused for more than {pause:g} s") from None
        except (ConnectionError, ClientPayloadError, HttpProcessingError):
            # The client hung up mid-body: nobody will read the answer, but the access log
            # gets its one line, and no traceback is written for a client's choice.
            raise GatewayError(
                400, "Bad Request", "the client closed the connection before the body ended"
            ) from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if pause is not None and min_rate:
            elapsed = loop.time() - started
            if elapsed > pause and size < min_rate * elapsed:
                raise _stalled(f"the request body arrives slower than {min_rate} bytes/s")
    return b"".join(parts)


def _stalled(detail: str) -> GatewayError:
    return GatewayError(408, "Request Timeout", detail, headers={"Connection": "close"})
