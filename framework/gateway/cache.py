"""Shaping responses at the edge: a response cache, CORS and gzip compression.

Three middleware factories; compose them so CORS answers preflights before anything else runs
and compression happens once, after the cache (which then stores plain bodies):

    stack = [
        access_log_middleware(meter),
        cors_middleware(config.gateway.cors),          # when configured
        ...,                                           # auth, QoS
        gzip_middleware(config.gateway.gzip_min_size), # when not None
        cache_middleware(ResponseCache()),
        ...,                                           # the route's target
    ]

`ResponseCache` / `cache_middleware`
    For routes with a `cache` section, GET and HEAD responses with status 200, 203, 204, 301 or
    404 are kept for the route's `ttl` (shorter when the upstream's `s-maxage`/`max-age` says
    so). The key is the route, method, raw path and query, and the request's values of the
    route's `vary` headers. Responses to authenticated requests are cached per client: the
    client's id is part of the key unless the route is public (`auth: none`), so one client
    never sees another's answer. Never stored: an upstream `Cache-Control` of `no-store`,
    `private` or `no-cache`, a `Set-Cookie`, `Vary: *`, a streamed or non-bytes body, a body
    above `max_entry_bytes`. A request's `Cache-Control: no-cache` (or `Pragma: no-cache`)
    skips the lookup and refreshes the entry; `no-store` skips both. An upstream `Vary` naming
    headers the route does not list is honoured too: the stored variant is only served to
    requests with the same values. Entries live in an LRU bounded by `max_entries` overall and
    by each route's `cache.max_entries`. Answers carry `X-Cache: HIT` (with `Age`) or
    `X-Cache: MISS`; the access log gets `notes["cache"]` = `hit`, `miss` or `bypass`.
    Concurrent misses of one key each go upstream (no request coalescing).

`cors_middleware`
    A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered here
    with 204 and the allowed methods, headers and max age, or refused with 403 when the origin,
    method or a requested header is not allowed; the route's target never sees it (the router
    has to let `OPTIONS` reach a route for this to run). Other requests from an allowed origin
    get `Access-Control-Allow-Origin: <the origin>`, `Access-Control-Expose-Headers` and, when
    configured, `Access-Control-Allow-Credentials: true`; problem responses raised inside get
    them too, so a browser can read a 429. Every response gets `Vary: Origin`.

`gzip_middleware`
    Compresses a `web.Response` body of at least `min_size` bytes when the client accepts gzip
    (q > 0, directly or through `*`), the body is not already encoded, the type is textual
    (text/*, JSON, XML, JavaScript, SVG) and `Cache-Control` does not say `no-transform`. Sets
    `Content-Encoding`, `Content-Length` and `Vary: Accept-Encoding`, weakens a strong `ETag`.
    Streamed responses (SSE, WebSocket) pass untouched: their headers are already sent.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from framework.errors import ConfigurationError
from framework.gateway.config import CacheConfig, CorsConfig
from framework.gateway.types import Exchange, GatewayError, GatewayHandler, GatewayMiddleware
from framework.gateway.upstreams import HOP_BY_HOP

__all__ = [
    "CacheKey",
    "ResponseCache",
    "cache_middleware",
    "cors_middleware",
    "gzip_candidate",
    "gzip_middleware",
    "gzip_response",
]

CacheKey = tuple[str, str, str, str, tuple[str, ...], str | None]
"""(route, method, raw path, raw query, values of the route's vary headers, client id)."""

_CACHEABLE_STATUSES = frozenset({200, 203, 204, 301, 404})
_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
# Never replayed from the cache: they describe one connection, or are set per answer.
_UNSTORED_HEADERS = HOP_BY_HOP | {"age", "x-cache"}


def _directives(values: Iterable[str]) -> dict[str, str]:
    """`Cache-Control` values as `{directive: argument}` (lowercase names, "" without one)."""
    out: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name, _, argument = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = argument.strip().strip('"')
    return out


def _tokens(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def _with_vary(existing: str | None, name: str) -> str:
    """`existing` Vary header value with `name` added (once; never next to `*`)."""
    tokens = _tokens(existing)
    if "*" in tokens or name.lower() in (t.lower() for t in tokens):
        return ", ".join(tokens)
    return ", ".join([*tokens, name])


def _add_vary(headers: CIMultiDict[str], name: str) -> None:
    headers["Vary"] = _with_vary(", ".join(headers.getall("Vary", [])) or None, name)


@dataclass(slots=True, kw_only=True)
class _Entry:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    stored: float
    expires: float
    variant: tuple[tuple[str, str], ...]
    """Request values, when stored, of headers the upstream's Vary named beyond the route's."""


class ResponseCache:
    """An in-memory LRU of upstream responses; see the module docstring for what is kept.

    `max_entries` bounds the whole cache, each route's `cache.max_entries` its own share;
    `max_entry_bytes` the body of one entry. `time_fn` is the clock of TTLs and `Age`.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        max_entry_bytes: int = 1 << 20,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self.max_entry_bytes = max_entry_bytes
        self._time = time_fn
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._by_route: dict[str, OrderedDict[CacheKey, None]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self, route: str | None = None) -> None:
        """Forget every entry, or those of one route."""
        if route is None:
            self._entries.clear()
            self._by_route.clear()
            return
        for key in list(self._by_route.pop(route, ())):
            self._entries.pop(key, None)

    def key(self, exchange: Exchange, config: CacheConfig) -> CacheKey:
        request = exchange.request
        url = request.rel_url
        vary = tuple(",".join(request.headers.getall(name, [])) for name in config.vary)
        client = exchange.client
        per_client = (
            client is not None
            and client.method != "anonymous"
            and "none" not in exchange.route.auth
        )
        return (
            exchange.route.name,
            request.method,
            url.raw_path,
            url.raw_query_string,
            vary,
            client.id if per_client and client is not None else None,
        )

    def lookup(self, key: CacheKey, request: web.BaseRequest) -> web.Response | None:
        """A fresh copy of the stored response for `key` (None: none, expired, other variant)."""
        entry = self._entries.get(key)
        now = self._time()
        if entry is not None and entry.expires <= now:
            self._forget(key)
            entry = None
        if entry is None or any(
            ",".join(request.headers.getall(name, [])) != value for name, value in entry.variant
        ):
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        self._by_route[key[0]].move_to_end(key)
        response = web.Response(status=entry.status, body=entry.body, headers=entry.headers)
        response.headers["X-Cache"] = "HIT"
        response.headers["Age"] = str(int(now - entry.stored))
        return response

    def store(
        self,
        key: CacheKey,
        config: CacheConfig,
        request: web.BaseRequest,
        response: web.StreamResponse,
    ) -> bool:
        """Keep `response` under `key` if it may be cached; True when it was."""
        if (
            not isinstance(response, web.Response)
            or response.prepared
            or response.status not in _CACHEABLE_STATUSES
            or "Set-Cookie" in response.headers
        ):
            return False
        body = response.body
        if body is None:
            body = b""
        if not isinstance(body, bytes | bytearray) or len(body) > self.max_entry_bytes:
            return False
        directives = _directives(response.headers.getall("Cache-Control", []))
        if directives.keys() & {"no-store", "private", "no-cache"}:
            return False
        ttl = config.ttl
        max_age = directives.get("s-maxage", directives.get("max-age"))
        if max_age is not None:
            try:
                ttl = min(ttl, float(max_age))
            except ValueError:
                return False
        if ttl <= 0:
            return False
        route_vary = {name.lower() for name in config.vary}
        upstream_vary = [
            name
            for value in response.headers.getall("Vary", [])
            for name in _tokens(value)
            if name.lower() not in route_vary
        ]
        if "*" in upstream_vary:
            return False
        headers = CIMultiDict(
            (name, value)
            for name, value in response.headers.items()
            if name.lower() not in _UNSTORED_HEADERS
        )
        now = self._time()
        self._forget(key)
        self._entries[key] = _Entry(
            status=response.status,
            headers=CIMultiDictProxy(headers),
            body=bytes(body),
            stored=now,
            expires=now + ttl,
            variant=tuple(
                (name, ",".join(request.headers.getall(name, []))) for name in upstream_vary
            ),
        )
        route_keys = self._by_route.setdefault(key[0], OrderedDict())
        route_keys[key] = None
        while len(route_keys) > config.max_entries:
            self._forget(next(iter(route_keys)))
        while len(self._entries) > self.max_entries:
            self._forget(next(iter(self._entries)))
        return True

    def _forget(self, key: CacheKey) -> None:
        if self._entries.pop(key, None) is None:
            return
        route_keys = self._by_route.get(key[0])
        if route_keys is not None:
            route_keys.pop(key, None)
            if not route_keys:
                del self._by_route[key[0]]


def cache_middleware(cache: ResponseCache) -> GatewayMiddleware:
    """Serve GET/HEAD of routes with a `cache` section from `cache`, filling it on misses."""

    async def cached(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        config = exchange.route.cache
        request = exchange.request
        if config is None or request.method not in _CACHEABLE_METHODS:
            return await call_next(exchange)
        asked = _directives(request.headers.getall("Cache-Control", []))
        no_store = "no-store" in asked
        bypass = (
            no_store or "no-cache" in asked or "no-cache" in _tokens(request.headers.get("Pragma"))
        )
        key = cache.key(exchange, config)
        if not bypass:
            hit = cache.lookup(key, request)
            if hit is not None:
                exchange.notes["cache"] = "hit"
                return hit
        exchange.notes["cache"] = "bypass" if bypass else "miss"
        response = await call_next(exchange)
        if response.prepared:
            return response
        response.headers["X-Cache"] = "MISS"
        if not no_store:
            cache.store(key, config, request, response)
        return response

    return cached


# -- CORS ----------------------------------------------------------------------------------------


def cors_middleware(config: CorsConfig) -> GatewayMiddleware:
    """Answer CORS preflights and add CORS headers for the allowed origins (module docstring)."""
    any_origin = "*" in config.origins
    origins = frozenset(origin.lower() for origin in config.origins)
    methods = frozenset(method.upper() for method in config.methods)
    allowed_headers = frozenset(header.lower() for header in config.headers)
    preflight_vary = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"

    def origin_headers(origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin}
        if config.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight(origin: str, request: web.BaseRequest) -> web.Response:
        if not (any_origin or origin.lower() in origins):
            problem = f"origin {origin} is not allowed"
        elif request.headers["Access-Control-Request-Method"].upper() not in methods:
            problem = f"method {request.headers['Access-Control-Request-Method']} is not allowed"
        else:
            asked = _tokens(request.headers.get("Access-Control-Request-Headers"))
            refused = [h for h in asked if h.lower() not in allowed_headers]
            problem = f"headers {', '.join(refused)} are not allowed" if refused else ""
        if problem:
            raise GatewayError(
                403,
                "Forbidden",
                f"CORS preflight refused: {problem}",
                headers={"Vary": preflight_vary},
            )
        headers = origin_headers(origin)
        headers.update(
            {
                "Access-Control-Allow-Methods": ", ".join(config.methods),
                "Access-Control-Allow-Headers": ", ".join(config.headers),
                "Access-Control-Max-Age": str(config.max_age),
                "Vary": preflight_vary,
            }
        )
        return web.Response(status=204, headers=headers)

    async def cors(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        request = exchange.request
        origin = request.headers.get("Origin")
        if (
            origin is not None
            and request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
        ):
            exchange.notes["cors"] = "preflight"
            return preflight(origin, request)
        headers: dict[str, str] = {}
        if origin is not None and (any_origin or origin.lower() in origins):
            headers = origin_headers(origin)
            if config.expose:
                headers["Access-Control-Expose-Headers"] = ", ".join(config.expose)
        try:
            response = await call_next(exchange)
        except GatewayError as exc:
            for name, value in headers.items():
                exc.headers.setdefault(name, value)
            exc.headers["Vary"] = _with_vary(exc.headers.get("Vary"), "Origin")
            raise
        if not response.prepared:
            response.headers.update(headers)
            _add_vary(response.headers, "Origin")
        return response

    return cors


# -- gzip ----------------------------------------------------------------------------------------

_COMPRESSIBLE_WORDS = ("json", "xml", "javascript", "svg")
_THREAD_SIZE = 256 * 1024
"""Bodies at least this large are compressed in a worker thread, off the event loop."""


def _compressible(content_type: str) -> bool:
    kind, _, subtype = content_type.lower().partition("/")
    if kind == "text":
        return True
    return kind in ("application", "image") and any(w in subtype for w in _COMPRESSIBLE_WORDS)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an `Accept-Encoding` value allows gzip (q > 0 for gzip, or else for `*`)."""
    gzip_q: float | None = None
    any_q: float | None = None
    for part in accept_encoding.split(","):
        coding, *parameters = part.split(";")
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            gzip_q = quality if gzip_q is None else max(gzip_q, quality)
        elif coding == "*":
            any_q = quality
    if gzip_q is not None:
        return gzip_q > 0
    return any_q is not None and any_q > 0


def gzip_middleware(min_size: int, *, level: int = 6) -> GatewayMiddleware:
    """Gzip textual `web.Response` bodies of at least `min_size` bytes (module docstring)."""
    if min_size < 0 or not 1 <= level <= 9:
        raise ConfigurationError("gzip needs min_size >= 0 and a level from 1 to 9")

    async def compress(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        response = await call_next(exchange)
        if not gzip_candidate(response, min_size):
            return response
        return await gzip_response(exchange, response, level)

    return compress


def gzip_candidate(response: web.StreamResponse, min_size: int) -> bool:
    """Whether `response` could be gzipped at all (a whole, unencoded body of at least
    `min_size` bytes): the cheap checks, made without a coroutine, so the gateway's compiled
    routes skip `gzip_response` for most answers."""
    if not isinstance(response, web.Response) or response.prepared or response.compression:
        return False
    body = response.body
    return (
        isinstance(body, bytes | bytearray)
        and len(body) >= min_size
        and response.status not in (204, 206, 304)
        and "Content-Encoding" not in response.headers
    )


async def gzip_response(
    exchange: Exchange, response: web.StreamResponse, level: int = 6
) -> web.StreamResponse:
    """`response` (a `gzip_candidate`) gzipped when its type is textual, no `Cache-Control:
    no-transform` forbids it, the client accepts gzip and it gets smaller; `Vary:
    Accept-Encoding` is added whenever the answer could have been either."""
    assert isinstance(response, web.Response)
    headers = response.headers
    if not _compressible(response.content_type) or "no-transform" in _directives(
        headers.getall("Cache-Control", [])
    ):
        return response
    _add_vary(headers, "Accept-Encoding")
    if not _accepts_gzip(", ".join(exchange.request.headers.getall("Accept-Encoding", []))):
        return response
    body = response.body
    assert isinstance(body, bytes | bytearray)
    data = bytes(body)
    if len(data) >= _THREAD_SIZE:
        compressed = await asyncio.to_thread(gzip.compress, data, level, mtime=0)
    else:
        compressed = gzip.compress(data, level, mtime=0)
    if len(compressed) >= len(data):
        return response
    response.body = compressed
    headers["Content-Encoding"] = "gzip"
    headers["Content-Length"] = str(len(compressed))
    etag = headers.get("ETag")
    if etag is not None and not etag.startswith("W/"):
        headers["ETag"] = "W/" + etag
    exchange.notes["gzip"] = True
    return response
