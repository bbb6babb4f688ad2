"""Rate limits and quotas per tier, load shedding, request body limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from framework.errors import ConfigurationError
from framework.gateway.config import MatchConfig, RouteConfig, TierConfig
from framework.gateway.qos import (
    ConcurrencyLimiter,
    RateLimiter,
    body_limit_middleware,
    rate_limit_middleware,
)
from framework.gateway.types import (
    ClientIdentity,
    Exchange,
    GatewayError,
    GatewayHandler,
    GatewayMiddleware,
)

ROUTE = RouteConfig(name="r", match=MatchConfig(path="/x"), upstream="u")
DAY = 86_400.0

TIERS = {
    "free": TierConfig(rate=1, burst=2),
    "premium": TierConfig(rate=10, burst=5),
    "metered": TierConfig(rate=100, burst=10, daily_quota=2),
    "slow": TierConfig(rate=0.4, burst=1),
}


class Clock:
    """Both clocks of a RateLimiter: `now` monotonic seconds, `wall` UTC epoch seconds."""

    def __init__(self, wall: float = 100 * DAY) -> None:
        self.now = 0.0
        self.wall = wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def limiter(clock: Clock, **options: Any) -> RateLimiter:
    options.setdefault("default_tier", "free")
    return RateLimiter(TIERS, time_fn=lambda: clock.now, day_fn=lambda: clock.wall, **options)


def chain(handler: GatewayHandler, *middlewares: GatewayMiddleware) -> GatewayHandler:
    call = handler
    for middleware in reversed(middlewares):

        def bind(mw: GatewayMiddleware, call_next: GatewayHandler) -> GatewayHandler:
            return lambda exchange: mw(exchange, call_next)

        call = bind(middleware, call)
    return call


def exchange_for(
    method: str = "GET",
    headers: dict[str, str] | None = None,
    *,
    client: ClientIdentity | None = None,
    remote: str = "10.0.0.1",
    route: RouteConfig = ROUTE,
    payload: Any = None,
) -> Exchange:
    options = {} if payload is None else {"payload": payload}
    request = make_mocked_request(method, "/x", headers=headers, **options).clone(remote=remote)
    return Exchange(
        request=request, route=route, params={}, gtxid="g-1", request_id="r-1", client=client
    )


async def ok(exchange: Exchange) -> web.StreamResponse:
    return web.Response(text="ok")


def user(name: str, tier: str | None = None) -> ClientIdentity:
    return ClientIdentity(id=name, method="api_key", tier=tier)


# -- the token bucket ----------------------------------------------------------------------------


def test_a_burst_is_allowed_then_tokens_refill_at_the_rate() -> None:
    clock = Clock()
    limits = limiter(clock)

    first, second, third = (limits.check("alice", "free") for _ in range(3))
    assert (first.allowed, first.remaining, first.limit) == (True, 1, 2)
    assert (second.allowed, second.remaining) == (True, 0)
    assert not third.allowed
    assert third.retry_after == pytest.approx(1.0)

    clock.advance(0.5)
    assert limits.check("alice", "free").retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert limits.check("alice", "free").allowed

    clock.advance(1000)  # refill stops at the burst
    assert limits.check("alice", "free").remaining == 1


def test_tiers_have_their_own_rates_and_unknown_tiers_get_the_default() -> None:
    limits = limiter(Clock())
    free = [limits.check("f", "free").allowed for _ in range(6)]
    premium = [limits.check("p", "premium").allowed for _ in range(6)]
    forged = [limits.check("x", "platinum").allowed for _ in range(3)]
    assert free == [True, True, False, False, False, False]
    assert premium == [True] * 5 + [False]
    assert forged == [True, True, False]


def test_no_tier_at_all_is_unlimited() -> None:
    limits = RateLimiter(TIERS, default_tier=None)
    decisions = [limits.check("anyone", None) for _ in range(100)]
    assert all(d.allowed and d.limit is None for d in decisions)
    assert len(limits) == 0


def test_a_share_of_the_limits_is_each_divided_by_it_and_never_below_one() -> None:
    """`msa gateway --workers 2`: each worker holds half of every rate, burst and quota."""
    clock = Clock()
    half = limiter(clock, share=2)
    premium = [half.check("p", "premium").allowed for _ in range(4)]
    assert premium == [True, True, False, False]  # burst 5 // 2
    clock.advance(1 / 5)  # 10 tokens/s halved: one token in 0.2 s (the whole rate: two)
    assert [half.check("p", "premium").allowed for _ in range(2)] == [True, False]
    metered = [half.check("m", "metered").allowed for _ in range(3)]
    assert metered == [True, False, False]  # the daily quota of 2, halved
    assert half.check("m", "metered").quota_exhausted
    assert [half.check("s", "slow").allowed for _ in range(2)] == [True, False]  # burst 1 stays 1
    with pytest.raises(ConfigurationError, match="share"):
        limiter(clock, share=0)


def test_unknown_default_tier_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="gold"):
        RateLimiter(TIERS, default_tier="gold")


def test_daily_quota_is_used_up_then_starts_again_at_utc_midnight() -> None:
    clock = Clock(wall=100 * DAY + DAY - 400)  # 400 s before midnight UTC
    limits = limiter(clock)

    assert [limits.check("m", "metered").quota_remaining for _ in range(2)] == [1, 0]
    refused = limits.check("m", "metered")
    assert refused.quota_exhausted
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(400)
    assert limits.check("m", "metered").retry_after == pytest.approx(400)  # refusals are free

    clock.advance(399)
    assert not limits.check("m", "metered").allowed
    clock.advance(1)  # 00:00 UTC
    again = limits.check("m", "metered")
    assert again.allowed
    assert again.quota_remaining == 1


def test_clients_are_kept_in_a_bounded_lru() -> None:
    limits = limiter(Clock(), max_clients=2)
    for client in ("a", "b", "a", "c"):  # touching a makes b the least recently used
        limits.check(client, "free")
    assert len(limits) == 2
    assert "b" not in limits
    assert "a" in limits
    assert "c" in limits
    assert limits.check("b", "free").remaining == 1  # forgotten: starts with a full bucket


# -- rate_limit_middleware ----------------------------------------------------------------------


async def test_allowed_responses_carry_ratelimit_headers_and_refusals_are_429() -> None:
    call = chain(ok, rate_limit_middleware(limiter(Clock())))
    client = user("alice", "free")

    response = await call(exchange_for(client=client))
    assert response.headers["RateLimit-Limit"] == "2"
    assert response.headers["RateLimit-Remaining"] == "1"
    await call(exchange_for(client=client))

    exchange = exchange_for(client=client)
    with pytest.raises(GatewayError) as refused:
        await call(exchange)
    assert refused.value.status == 429
    assert refused.value.title == "Too Many Requests"
    assert refused.value.headers == {
        "Retry-After": "1",
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
    }
    assert exchange.notes["rate_limited"] == "rate"


async def test_retry_after_is_whole_seconds_rounded_up() -> None:
    call = chain(ok, rate_limit_middleware(limiter(Clock())))
    client = user("slow", "slow")
    await call(exchange_for(client=client))
    with pytest.raises(GatewayError) as refused:
        await call(exchange_for(client=client))
    assert refused.value.headers["Retry-After"] == "3"  # 1 token at 0.4/s: 2.5 s


async def test_quota_refusal_says_so_and_retries_after_midnight() -> None:
    clock = Clock(wall=100 * DAY + DAY - 90.5)
    call = chain(ok, rate_limit_middleware(limiter(clock)))
    client = user("m", "metered")
    for _ in range(2):
        assert (await call(exchange_for(client=client))).status == 200
    with pytest.raises(GatewayError) as refused:
        await call(exchange_for(client=client))
    assert refused.value.status == 429
    assert "daily quota of 2 requests" in refused.value.detail
    assert refused.value.headers["Retry-After"] == "91"


async def test_anonymous_callers_are_limited_by_address_in_the_anonymous_tier() -> None:
    call = chain(ok, rate_limit_middleware(limiter(Clock(), anonymous_tier="premium")))
    for _ in range(5):
        await call(exchange_for(remote="10.0.0.1"))
    with pytest.raises(GatewayError):
        await call(exchange_for(remote="10.0.0.1"))
    response = await call(exchange_for(remote="10.0.0.2"))
    assert response.headers["RateLimit-Limit"] == "5"


async def test_ratelimit_headers_are_added_to_errors_raised_inside() -> None:
    async def failing(exchange: Exchange) -> web.StreamResponse:
        raise GatewayError(502, "Bad Gateway")

    call = chain(failing, rate_limit_middleware(limiter(Clock())))
    with pytest.raises(GatewayError) as error:
        await call(exchange_for(client=user("alice")))
    assert error.value.headers == {"RateLimit-Limit": "2", "RateLimit-Remaining": "1"}


# -- serving a chain for real --------------------------------------------------------------------


def app_for(
    handler: GatewayHandler, *middlewares: GatewayMiddleware, route: RouteConfig = ROUTE
) -> web.Application:
    call = chain(handler, *middlewares)

    async def entry(request: web.Request) -> web.StreamResponse:
        exchange = Exchange(request=request, route=route, params={}, gtxid="g", request_id="r")
        try:
            return await call(exchange)
        except GatewayError as exc:
            return web.json_response(
                {"title": exc.title, "detail": exc.detail}, status=exc.status, headers=exc.headers
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", entry)
    return app


Serve = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start apps on test servers; every one is closed after the test."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(app: web.Application) -> TestClient[web.Request, web.Application]:
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def test_beyond_the_concurrency_limit_requests_are_shed_at_once(serve: Serve) -> None:
    release = asyncio.Event()

    async def slow(exchange: Exchange) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="done")

    shedder = ConcurrencyLimiter(2)
    client = await serve(app_for(slow, shedder.middleware))

    async def get() -> tuple[int, str | None]:
        async with client.get("/x") as response:
            return response.status, response.headers.get("Retry-After")

    requests = {asyncio.create_task(get()) for _ in range(5)}
    answered: set[asyncio.Task[tuple[int, str | None]]] = set()
    async with asyncio.timeout(5):
        while len(answered) < 3:  # the three beyond the limit come back while two are held
            done, _ = await asyncio.wait(requests - answered, return_when=asyncio.FIRST_COMPLETED)
            answered |= done
        assert [task.result() for task in answered] == [(503, "1")] * 3
        assert shedder.in_flight == 2
        release.set()
        results = await asyncio.gather(*requests)
    assert sorted(results) == [(200, None)] * 2 + [(503, "1")] * 3
    assert (shedder.in_flight, shedder.shed) == (0, 3)


# -- body limits ---------------------------------------------------------------------------------


class Unreadable:
    async def read(self, n: int = -1) -> bytes:
        raise AssertionError("the body must not be read")


class Chunks:
    def __init__(self, *chunks: bytes) -> None:
        self._data = b"".join(chunks)
        self.asked: list[int] = []

    async def read(self, n: int = -1) -> bytes:
        self.asked.append(n)
        data, self._data = self._data[:n], self._data[n:]
        return data


async def test_a_declared_length_above_the_limit_is_refused_before_reading() -> None:
    call = chain(ok, body_limit_middleware(10))
    with pytest.raises(GatewayError) as refused:
        await call(exchange_for("POST", {"Content-Length": "11"}, payload=Unreadable()))
    assert refused.value.status == 413


async def test_the_route_limit_overrides_the_default() -> None:
    route = RouteConfig(name="small", match=MatchConfig(path="/x"), upstream="u", max_body=4)
    call = chain(ok, body_limit_middleware(1000))
    with pytest.raises(GatewayError) as refused:
        await call(exchange_for("POST", {"Content-Length": "5"}, route=route, payload=Unreadable()))
    assert refused.value.status == 413
    assert "4 bytes" in refused.value.detail


async def test_a_body_within_the_limit_is_read_into_the_exchange() -> None:
    seen: list[tuple[bytes | None, int]] = []

    async def handler(exchange: Exchange) -> web.StreamResponse:
        seen.append((exchange.body, exchange.bytes_in))
        return web.Response()

    body = Chunks(b"0123456789")
    await chain(handler, body_limit_middleware(10))(
        exchange_for("POST", {"Content-Length": "10"}, payload=body)
    )
    assert seen == [(b"0123456789", 10)]


async def test_a_body_longer_than_declared_stops_one_byte_past_the_limit() -> None:
    body = Chunks(b"x" * 1000)
    with pytest.raises(GatewayError) as refused:
        await chain(ok, body_limit_middleware(10))(
            exchange_for("POST", {"Content-Length": "3"}, payload=body)
        )
    assert refused.value.status == 413
    assert sum(body.asked) == 11


@pytest.mark.parametrize("length", ["-1", "abc", "1.5", "", "5, 5", "+3"])
async def test_a_malformed_content_length_is_a_bad_request(length: str) -> None:
    with pytest.raises(GatewayError) as refused:
        await chain(ok, body_limit_middleware(10))(
            exchange_for("POST", {"Content-Length": length}, payload=Unreadable())
        )
    assert refused.value.status == 400


async def test_content_length_with_transfer_encoding_is_a_bad_request() -> None:
    headers = {"Content-Length": "3", "Transfer-Encoding": "chunked"}
    with pytest.raises(GatewayError) as refused:
        await chain(ok, body_limit_middleware(10))(
            exchange_for("POST", headers, payload=Unreadable())
        )
    assert refused.value.status == 400


async def test_chunked_bodies_are_capped_while_streaming(serve: Serve) -> None:
    async def echo(exchange: Exchange) -> web.StreamResponse:
        return web.Response(body=exchange.body, headers={"x-bytes-in": str(exchange.bytes_in)})

    client = await serve(app_for(echo, body_limit_middleware(16)))

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"12345678"

    async with client.post("/x", data=chunks(2)) as response:
        assert response.status == 200
        assert response.headers["x-bytes-in"] == "16"
        assert await response.read() == b"12345678" * 2
    async with client.post("/x", data=chunks(3)) as response:
        assert response.status == 413
        assert (await response.json())["title"] == "Content Too Large"
