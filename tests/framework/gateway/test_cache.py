"""The response cache, CORS and gzip compression."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from framework.gateway.cache import (
    ResponseCache,
    cache_middleware,
    cors_middleware,
    gzip_middleware,
)
from framework.gateway.config import CacheConfig, CorsConfig, MatchConfig, RouteConfig
from framework.gateway.types import (
    ClientIdentity,
    Exchange,
    GatewayError,
    GatewayHandler,
    GatewayMiddleware,
)

CACHED = RouteConfig(
    name="products",
    match=MatchConfig(path="/x"),
    upstream="u",
    cache=CacheConfig(ttl=10, vary=("accept-language",)),
)
PRIVATE = RouteConfig(
    name="orders",
    match=MatchConfig(path="/x"),
    upstream="u",
    auth=("api_key",),
    cache=CacheConfig(ttl=10),
)
PLAIN = RouteConfig(name="plain", match=MatchConfig(path="/x"), upstream="u")


def chain(handler: GatewayHandler, *middlewares: GatewayMiddleware) -> GatewayHandler:
    call = handler
    for middleware in reversed(middlewares):

        def bind(mw: GatewayMiddleware, call_next: GatewayHandler) -> GatewayHandler:
            return lambda exchange: mw(exchange, call_next)

        call = bind(middleware, call)
    return call


def exchange_for(
    method: str = "GET",
    path: str = "/x",
    headers: dict[str, str] | None = None,
    *,
    route: RouteConfig = CACHED,
    client: ClientIdentity | None = None,
) -> Exchange:
    request = make_mocked_request(method, path, headers=headers)
    return Exchange(
        request=request, route=route, params={}, gtxid="g", request_id="r", client=client
    )


class Upstream:
    """A handler that counts its calls and answers what it is told."""

    def __init__(
        self, status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"hi"
    ) -> None:
        self.calls = 0
        self.status = status
        self.headers = headers or {}
        self.body = body

    async def __call__(self, exchange: Exchange) -> web.StreamResponse:
        self.calls += 1
        body = self.body + f" #{self.calls}".encode()
        return web.Response(status=self.status, headers=self.headers, body=body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> ResponseCache:
    return ResponseCache(100, time_fn=clock)


async def get(
    call: GatewayHandler, path: str = "/x", headers: dict[str, str] | None = None, **options: Any
) -> web.Response:
    response = await call(exchange_for("GET", path, headers, **options))
    assert isinstance(response, web.Response)
    return response


# -- the response cache --------------------------------------------------------------------------


async def test_a_miss_is_stored_and_the_next_request_is_a_hit_with_its_age(
    cache: ResponseCache, clock: Clock
) -> None:
    upstream = Upstream(headers={"Content-Type": "application/json", "ETag": '"v1"'})
    call = chain(upstream, cache_middleware(cache))

    first = await get(call)
    assert (first.headers["X-Cache"], first.body) == ("MISS", b"hi #1")
    clock.now += 4.7
    second = await get(call)
    assert (second.status, second.body, upstream.calls) == (200, b"hi #1", 1)
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["Age"] == "4"
    assert second.headers["ETag"] == '"v1"'
    assert second.content_type == "application/json"
    assert (cache.hits, cache.misses) == (1, 1)


async def test_entries_expire_after_the_route_ttl(cache: ResponseCache, clock: Clock) -> None:
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))
    await get(call)
    clock.now += 9.9
    assert (await get(call)).headers["X-Cache"] == "HIT"
    clock.now += 0.1
    expired = await get(call)
    assert (expired.headers["X-Cache"], expired.body, upstream.calls) == ("MISS", b"hi #2", 2)


async def test_upstream_max_age_shortens_the_ttl(cache: ResponseCache, clock: Clock) -> None:
    upstream = Upstream(headers={"Cache-Control": "public, max-age=2"})
    call = chain(upstream, cache_middleware(cache))
    await get(call)
    clock.now += 2
    assert (await get(call)).headers["X-Cache"] == "MISS"


async def test_the_key_has_the_query_and_the_route_vary_headers(cache: ResponseCache) -> None:
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))
    await get(call, "/x?page=1", {"Accept-Language": "en"})
    assert (await get(call, "/x?page=1", {"Accept-Language": "en"})).headers["X-Cache"] == "HIT"
    assert (await get(call, "/x?page=2", {"Accept-Language": "en"})).headers["X-Cache"] == "MISS"
    assert (await get(call, "/x?page=1", {"Accept-Language": "de"})).headers["X-Cache"] == "MISS"
    assert (await get(call, "/x?page=1")).headers["X-Cache"] == "MISS"
    assert upstream.calls == 4


async def test_an_upstream_vary_header_is_honoured_too(cache: ResponseCache) -> None:
    upstream = Upstream(headers={"Vary": "Accept"})
    call = chain(upstream, cache_middleware(cache))
    await get(call, headers={"Accept": "application/json"})
    assert (await get(call, headers={"Accept": "application/json"})).headers["X-Cache"] == "HIT"
    assert (await get(call, headers={"Accept": "text/html"})).headers["X-Cache"] == "MISS"


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "no-store"},
        {"Cache-Control": "private, max-age=60"},
        {"Cache-Control": "no-cache"},
        {"Cache-Control": "max-age=0"},
        {"Set-Cookie": "session=1"},
        {"Vary": "*"},
    ],
)
async def test_responses_the_upstream_marks_uncacheable_are_not_stored(
    cache: ResponseCache, headers: dict[str, str]
) -> None:
    upstream = Upstream(headers=headers)
    call = chain(upstream, cache_middleware(cache))
    await get(call)
    assert (await get(call)).headers["X-Cache"] == "MISS"
    assert (upstream.calls, len(cache)) == (2, 0)


@pytest.mark.parametrize(
    ("status", "stored"), [(200, True), (404, True), (301, True), (500, False)]
)
async def test_only_cacheable_statuses_are_stored(
    cache: ResponseCache, status: int, stored: bool
) -> None:
    await chain(Upstream(status=status), cache_middleware(cache))(exchange_for())
    assert len(cache) == int(stored)


async def test_request_no_cache_bypasses_the_lookup_and_refreshes_the_entry(
    cache: ResponseCache,
) -> None:
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))
    await get(call)
    exchange = exchange_for(headers={"Cache-Control": "no-cache"})
    fresh = await call(exchange)
    assert fresh.headers["X-Cache"] == "MISS"
    assert exchange.notes["cache"] == "bypass"
    assert (await get(call)).body == b"hi #2"

    await get(call, headers={"Cache-Control": "no-store"})
    assert (await get(call)).body == b"hi #2"  # no-store neither read nor wrote the cache
    assert upstream.calls == 3


async def test_the_cache_is_an_lru_bounded_overall_and_per_route(clock: Clock) -> None:
    cache = ResponseCache(2, time_fn=clock)
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))
    await get(call, "/a")
    await get(call, "/b")
    await get(call, "/a")  # /b is now the least recently used
    await get(call, "/c")
    assert len(cache) == 2
    assert (await get(call, "/a")).headers["X-Cache"] == "HIT"
    assert (await get(call, "/b")).headers["X-Cache"] == "MISS"

    small = RouteConfig(
        name="small",
        match=MatchConfig(path="/x"),
        upstream="u",
        cache=CacheConfig(ttl=10, max_entries=1),
    )
    roomy = ResponseCache(100, time_fn=clock)
    call = chain(upstream, cache_middleware(roomy))
    await get(call, "/a", route=small)
    await get(call, "/b", route=small)
    await get(call, "/a")
    assert len(roomy) == 2
    assert (await get(call, "/a", route=small)).headers["X-Cache"] == "MISS"


async def test_authenticated_responses_are_cached_per_client_unless_the_route_is_public(
    cache: ResponseCache,
) -> None:
    alice = ClientIdentity(id="alice", method="api_key")
    bob = ClientIdentity(id="bob", method="api_key")
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))

    await get(call, route=PRIVATE, client=alice)
    assert (await get(call, route=PRIVATE, client=alice)).headers["X-Cache"] == "HIT"
    assert (await get(call, route=PRIVATE, client=bob)).headers["X-Cache"] == "MISS"

    await get(call, route=CACHED, client=alice)
    assert (await get(call, route=CACHED, client=bob)).headers["X-Cache"] == "HIT"


async def test_other_methods_and_routes_without_cache_pass_through(cache: ResponseCache) -> None:
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))
    for _ in range(2):
        posted = await call(exchange_for("POST"))
        plain = await call(exchange_for(route=PLAIN))
        assert "X-Cache" not in posted.headers
        assert "X-Cache" not in plain.headers
    assert (upstream.calls, len(cache)) == (4, 0)


async def test_head_is_cached_apart_from_get(cache: ResponseCache) -> None:
    upstream = Upstream()
    call = chain(upstream, cache_middleware(cache))
    await call(exchange_for("HEAD"))
    assert (await call(exchange_for("HEAD"))).headers["X-Cache"] == "HIT"
    assert (await get(call)).headers["X-Cache"] == "MISS"


# -- CORS ----------------------------------------------------------------------------------------

CORS = CorsConfig(origins=("https://shop.example",), expose=("x-gtxid",))


async def test_an_allowed_preflight_is_answered_without_the_target() -> None:
    upstream = Upstream()
    call = chain(upstream, cors_middleware(CORS.model_copy(update={"credentials": True})))
    headers = {
        "Origin": "https://shop.example",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "Content-Type, X-Api-Key",
    }
    response = await call(exchange_for("OPTIONS", headers=headers))
    assert response.status == 204
    assert upstream.calls == 0
    assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, PATCH, DELETE"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-api-key"
    )
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Origin": "https://evil.example"}, "origin"),
        ({"Access-Control-Request-Method": "TRACE"}, "method TRACE"),
        ({"Access-Control-Request-Headers": "content-type, x-secret"}, "headers x-secret"),
    ],
)
async def test_a_preflight_outside_the_policy_is_refused_with_403(
    headers: dict[str, str], reason: str
) -> None:
    asked = {"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"} | headers
    with pytest.raises(GatewayError) as refused:
        await chain(Upstream(), cors_middleware(CORS))(exchange_for("OPTIONS", headers=asked))
    assert refused.value.status == 403
    assert reason in refused.value.detail


async def test_a_request_from_an_allowed_origin_gets_the_cors_headers() -> None:
    call = chain(Upstream(headers={"Vary": "Accept"}), cors_middleware(CORS))
    response = await get(call, headers={"Origin": "https://shop.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert response.headers["Access-Control-Expose-Headers"] == "x-gtxid"
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert response.headers["Vary"] == "Accept, Origin"


async def test_other_origins_get_no_cors_headers_and_a_wildcard_reflects_the_origin() -> None:
    denied = await get(
        chain(Upstream(), cors_middleware(CORS)), headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in denied.headers
    assert denied.headers["Vary"] == "Origin"

    anyone = await get(
        chain(Upstream(), cors_middleware(CorsConfig(origins=("*",)))),
        headers={"Origin": "https://any.example"},
    )
    assert anyone.headers["Access-Control-Allow-Origin"] == "https://any.example"


async def test_problems_raised_inside_carry_the_cors_headers() -> None:
    async def limited(exchange: Exchange) -> web.StreamResponse:
        raise GatewayError(429, "Too Many Requests", headers={"Retry-After": "1"})

    with pytest.raises(GatewayError) as refused:
        await chain(limited, cors_middleware(CORS))(
            exchange_for(headers={"Origin": "https://shop.example"})
        )
    assert refused.value.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert refused.value.headers["Vary"] == "Origin"
    assert refused.value.headers["Retry-After"] == "1"


# -- gzip ----------------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
BIG = b'{"items": [' + b", ".join(b'{"id": %d}' % i for i in range(200)) + b"]}"


async def test_a_large_textual_body_is_gzipped_for_a_client_that_accepts_it() -> None:
    upstream = Upstream(headers=JSON | {"ETag": '"v1"'}, body=BIG)
    exchange = exchange_for(headers={"Accept-Encoding": "br;q=1.0, gzip;q=0.5"})
    response = await chain(upstream, gzip_middleware(256))(exchange)
    assert isinstance(response, web.Response)
    assert isinstance(response.body, bytes)
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Vary"] == "Accept-Encoding"
    assert response.headers["Content-Length"] == str(len(response.body))
    assert response.headers["ETag"] == 'W/"v1"'
    assert gzip.decompress(response.body) == BIG + b" #1"
    assert exchange.notes["gzip"] is True


@pytest.mark.parametrize(
    ("accept", "headers", "body"),
    [
        ("gzip", JSON, b"{}"),  # below min_size
        (None, JSON, BIG),
        ("gzip;q=0, deflate", JSON, BIG),
        ("*;q=0", JSON, BIG),
        ("gzip", JSON | {"Content-Encoding": "br"}, BIG),
        ("gzip", {"Content-Type": "image/png"}, BIG),
        ("gzip", JSON | {"Cache-Control": "no-transform"}, BIG),
    ],
    ids=["small", "no-accept", "q0", "star-q0", "encoded", "png", "no-transform"],
)
async def test_gzip_is_skipped(accept: str | None, headers: dict[str, str], body: bytes) -> None:
    request_headers = {"Accept-Encoding": accept} if accept else {}
    upstream = Upstream(headers=headers, body=body)
    response = await chain(upstream, gzip_middleware(256))(exchange_for(headers=request_headers))
    assert response.headers.get("Content-Encoding") == headers.get("Content-Encoding")
    assert isinstance(response, web.Response)
    assert response.body == body + b" #1"


async def test_a_wildcard_accept_encoding_allows_gzip() -> None:
    upstream = Upstream(headers={"Content-Type": "text/html"}, body=b"<p>hello</p>" * 100)
    response = await chain(upstream, gzip_middleware(256))(
        exchange_for(headers={"Accept-Encoding": "*"})
    )
    assert response.headers["Content-Encoding"] == "gzip"


async def test_a_streamed_response_is_left_alone() -> None:
    async def events(exchange: Exchange) -> web.StreamResponse:
        return web.StreamResponse(headers={"Content-Type": "text/event-stream"})

    response = await chain(events, gzip_middleware(0))(
        exchange_for(headers={"Accept-Encoding": "gzip"})
    )
    assert "Content-Encoding" not in response.headers
    assert "Vary" not in response.headers


async def test_gzip_cache_and_cors_compose_over_http() -> None:
    cache = ResponseCache()
    upstream = Upstream(headers=JSON, body=BIG)
    call = chain(upstream, cors_middleware(CORS), gzip_middleware(256), cache_middleware(cache))

    async def entry(request: web.Request) -> web.StreamResponse:
        return await call(
            Exchange(request=request, route=CACHED, params={}, gtxid="g", request_id="r")
        )

    app = web.Application()
    app.router.add_get("/x", entry)
    client: TestClient[web.Request, web.Application]
    async with TestClient(TestServer(app)) as client:
        for expected in ("MISS", "HIT"):
            headers = {"Accept-Encoding": "gzip", "Origin": "https://shop.example"}
            async with client.get("/x", headers=headers) as response:
                assert response.status == 200
                assert response.headers["Content-Encoding"] == "gzip"
                assert response.headers["X-Cache"] == expected
                assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"
                assert await response.read() == BIG + b" #1"  # decompressed by the client
    assert upstream.calls == 1
