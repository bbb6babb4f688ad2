"""The gateway program: routes, a middleware pipeline per route, an admin API, hot reload.

    gateway = Gateway.from_file("gateway.yaml")      # or Gateway(config, bus=shared_bus)
    await gateway.start()                             # listens on gateway.listen, admin port
    ...
    await gateway.stop()                              # finishes in-flight requests first

`msa gateway --config gateway.yaml` runs it until SIGTERM. Several gateways (web, mobile,
internal: backends for frontends) are the same program with different files.

Before a request exists, its connection passes the door (`framework.gateway.guard`): at most
`limits.max_connections` open, headers complete within `limits.header_timeout` and within
`limits.max_header_bytes` / `limits.max_headers` (else 408, 431 or 503, and the connection is
closed). HTTP/0.9 is refused; `Expect: 100-continue` is answered 413 (not `100 Continue`) when
the declared body is over the route's limit; no answer names the server's software.

Each request then passes, outermost first: header checks (a repeated `Host`, `Authorization`,
API-key or `Cookie` header, or one that is not UTF-8: 400), ids (`x-gtxid` kept or made, a new
`x-request-id` per hop) and problem responses -> path normalisation and routing (400 for any
path that could resolve elsewhere, `framework.gateway.router`) -> access log and metering ->
CORS -> authentication and authorization (verified claims forwarded as headers) -> rate limits
and quotas per client tier -> the body, read within its limit and timeouts (413, 408) -> load
shedding (the gateway's concurrency limit, taken only now, so a slow client never holds a slot)
-> gzip (on the way out) -> response cache -> transformation (field mapping, JSON <-> XML) ->
the route's target: an upstream pool (load balanced, health-checked, retried, circuit-broken,
with an adaptive concurrency limit and a bounded wait for a slot, then 503), an aggregation of
several, the bus (publish + 202 + status, request/reply), a queue drained to an upstream, an SSE
or WebSocket stream from topics, or a signed URL for a file transfer. What an upstream receives
is the client's headers cleaned in one step (`framework.gateway.headers`: hop-by-hop, what
`Connection` names, and every header the gateway owns) with the gateway's own added last.

Each route is compiled when its config is built into one handler of two frames holding only
the steps it uses (`_Runtime._chain`): a route without tiers has no rate-limit step, one without
CORS, a cache or a transformation no such layer. The main port is aiohttp's low-level server:
`_handle` gets every request with no URL dispatcher in between.

Reload (`POST /admin/reload`, or a change of the file, polled every `watch_interval` s): the new
config is validated and built beside the running one; if anything is wrong the old one keeps
serving and the reload answers 400 with every problem. Otherwise new requests go to the new
config at once, and the old one is stopped once the requests it was serving have finished
(at most `drain_timeout` s), so no request is dropped. The `bus` section is read at the first
start only: changing it needs a restart (a reload that changes it is refused).

Admin API (its own port, bearer tokens checked against `gateway.admin.token_hashes`):
`GET /admin/routes`, `GET /admin/upstreams` (instances, health, breaker states),
`GET /admin/metering` (per-client calls and bytes), `GET /admin/config`, `POST /admin/reload`,
`GET /metrics` (Prometheus), and for probes, without a token, `GET /alive` and `GET /ready`
(503 from the moment the gateway starts stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import orjson
from aiohttp import HttpVersion10, HttpVersion11, StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from framework.bus import Bus, Subscription, transport_from_env
from framework.errors import TranslationError
from framework.gateway import peers
from framework.gateway.aggregate import Aggregator
from framework.gateway.auth import Authenticator, authorize, forwarded_headers
from framework.gateway.cache import (
    ResponseCache,
    cache_middleware,
    cors_middleware,
    gzip_candidate,
    gzip_response,
)
from framework.gateway.config import (
    BusConfig,
    GatewayConfig,
    GatewayConfigError,
    RouteConfig,
    StreamAuthorization,
    load_config,
)
from framework.gateway.guard import (
    SERVER_NAME,
    ConnectionGuard,
    ConnectionLimit,
    GatewayProtocol,
    guard_of,
)
from framework.gateway.headers import GATEWAY_OWNED, check_client_headers, forwardable_headers
from framework.gateway.metering import ACCESS_LOGGER, Meter, account, failure_status
from framework.gateway.qos import ConcurrencyLimiter, RateLimiter, limit_rate, read_body
from framework.gateway.router import RouteTable, fill_template
from framework.gateway.signing import sign_url
from framework.gateway.types import (
    Exchange,
    GatewayError,
    GatewayHandler,
    GatewayMiddleware,
    status_title,
)
from framework.gateway.upstreams import UpstreamPool
from framework.http import problem
from framework.messages import new_id
from framework.observability.metrics import CONTENT_TYPE, MetricsRegistry
from framework.observability.tracing import TraceContext
from framework.translate.codecs import CodecRegistry, default_registry
from framework.translate.drain import QueueAndDrain
from framework.translate.feed import EventFeed
from framework.translate.http_bus import AcceptedPublish, RequestReply, StatusTracker
from framework.translate.mapping import FieldMapping
from framework.translate.push import RequestFilter, SseBridge, WebSocketBridge

__all__ = ["Gateway", "settle_garbage_collector"]

log = logging.getLogger("framework.gateway")
_GTXID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _problem_response(error: GatewayError, exchange: Exchange | None) -> web.Response:
    response = problem(error.status, error.title, error.detail, **error.extra)
    response.headers.update(error.headers)
    if exchange is not None:
        response.headers["x-gtxid"] = exchange.gtxid
        response.headers["x-request-id"] = exchange.request_id
    return response


class _Runtime:
    """Everything one config version needs: built, started, swapped in, drained, stopped."""

    def __init__(
        self, config: GatewayConfig, *, bus: Bus | None, meter: Meter, share: int = 1
    ) -> None:
        self.config = config
        self.bus = bus
        self.meter = meter
        settings = config.gateway
        self.table = RouteTable(config.routes, internal_paths=settings.internal_paths)
        self.pools = {
            name: UpstreamPool(name, upstream, default_timeout=settings.timeout)
            for name, upstream in config.upstreams.items()
        }
        self.auth = Authenticator(config.auth)
        self.limiter = RateLimiter(
            config.tiers,
            default_tier=config.default_tier,
            anonymous_tier=config.anonymous_tier,
            share=share,
        )
        self.shedder = ConcurrencyLimiter(settings.max_concurrency)
        self.cache = ResponseCache(max_entries=10_000)
        self.codecs: CodecRegistry = default_registry()
        self.feeds: dict[tuple[str, ...], EventFeed] = {}
        self.drains: list[QueueAndDrain] = []
        self.subscriptions: list[Subscription] = []
        self.chains: dict[str, GatewayHandler] = {}
        self.trackers: dict[str, StatusTracker] = {}
        self.singleton_headers = (config.auth.api_key_header.lower(),)
        self.owned_headers = GATEWAY_OWNED | {
            name.lower() for name in config.auth.forward_claims.values()
        }
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._targets: dict[str, GatewayHandler] = {}
        for route in config.routes:
            self._targets[route.name] = self._target(route)
            self.chains[route.name] = self._chain(route, self._targets[route.name])

    # -- building --------------------------------------------------------------------------------

    def _needs_bus(self, route: RouteConfig) -> Bus:
        if self.bus is None:
            raise GatewayConfigError("<config>", [f"route {route.name!r} needs the bus"])
        return self.bus

    def _feed(self, topics: tuple[str, ...]) -> EventFeed:
        feed = self.feeds.get(topics)
        if feed is None:
            bus = self.bus
            assert bus is not None
            feed = self.feeds[topics] = EventFeed(bus.transport, topics, replay=1000)
        return feed

    def _target(self, route: RouteConfig) -> GatewayHandler:
        if route.upstream is not None:
            return self._proxy_target(route)
        if route.aggregate is not None:
            aggregator = Aggregator(route.aggregate, self.pools)

            async def aggregate(exchange: Exchange) -> web.StreamResponse:
                return await aggregator(exchange, self._upstream_headers(exchange))

            return aggregate
        if route.publish is not None:
            target = route.publish
            bus = self._needs_bus(route)
            tracker = None
            if target.status_topics:
                tracker = StatusTracker(self._feed(target.status_topics), states=target.states)
            status_url = None
            if tracker is not None:
                status_url = f"/_status/{route.name}/{{id}}"
            publisher = AcceptedPublish(
                bus,
                target.topic,
                event_type=target.event_type,
                key_from=target.key,
                tracker=tracker,
                status_url=status_url,
                codecs=self.codecs,
                max_body=route.max_body or self.config.gateway.max_body,
            )
            if tracker is not None:
                self.trackers[route.name] = tracker

            async def publish(exchange: Exchange) -> web.StreamResponse:
                return await publisher.handle(
                    exchange.request, exchange.body or b"", exchange.params
                )

            return publish
        if route.request is not None:
            target_request = route.request
            requester = RequestReply(
                self._needs_bus(route),
                target_request.topic,
                event_type=target_request.event_type,
                key_from=target_request.key,
                timeout=target_request.timeout,
                errors=target_request.errors,
                codecs=self.codecs,
            )

            async def request_reply(exchange: Exchange) -> web.StreamResponse:
                return await requester.handle(
                    exchange.request, exchange.body or b"", exchange.params
                )

            return request_reply
        if route.drain is not None:
            target_drain = route.drain
            upstream = self.config.upstreams[target_drain.upstream]
            backend = (
                upstream.targets[0] if upstream.targets else f"{upstream.scheme}://{upstream.dns}"
            )
            drain = QueueAndDrain(
                self._needs_bus(route),
                target_drain.topic,
                backend,
                rate=target_drain.rate,
                burst=target_drain.burst,
                group=f"{self.config.gateway.name}.{route.name}.drain",
            )
            self.drains.append(drain)

            async def drain_accept(exchange: Exchange) -> web.StreamResponse:
                return await drain.accept(exchange.request, exchange.body or b"")

            return drain_accept
        if route.stream is not None:
            stream = route.stream
            feed = self._feed(tuple(stream.topics))
            filters = RequestFilter(
                types=frozenset(stream.types) if stream.types else None,
                key=stream.key,
                query=stream.query_filters,
            )
            bridge: SseBridge | WebSocketBridge = (
                SseBridge(feed, filters)
                if stream.protocol == "sse"
                else WebSocketBridge(feed, filters)
            )

            check = stream.authorize

            async def push(exchange: Exchange) -> web.StreamResponse:
                if check is not None:
                    await self._stream_allowed(exchange, check)
                return await bridge.handle(exchange.request, exchange.params)

            return push
        assert route.files is not None
        files = route.files
        key = self.config.gateway.signing_key or ""

        async def signed_url(exchange: Exchange) -> web.StreamResponse:
            path = exchange.params.get("tail") or exchange.params.get("name") or ""
            if not path:
                raise GatewayError(400, "Bad Request", "no file named in the path")
            method = "PUT" if exchange.request.method in ("PUT", "POST") else "GET"
            url = sign_url(files.base_url, path, key, ttl=files.ttl, method=method)
            return web.json_response({"url": url, "method": method, "expires_in": files.ttl})

        return signed_url

    async def _stream_allowed(self, exchange: Exchange, check: StreamAuthorization) -> None:
        """Ask `check.upstream` whether this caller may follow the stream (a 2xx); its 4xx
        is the client's answer."""
        answer = await self.pools[check.upstream].send(
            "GET",
            fill_template(check.path, exchange.params),
            headers=self._upstream_headers(exchange),
            body=None,
            timeout=check.timeout,
        )
        if 200 <= answer.status < 300:
            return
        if 400 <= answer.status < 500:
            raise GatewayError(
                answer.status,
                status_title(answer.status),
                "this stream is not open to this caller",
            )
        raise GatewayError(502, "Bad Gateway", "the stream's authorization could not be checked")

    def _proxy_target(self, route: RouteConfig) -> GatewayHandler:
        assert route.upstream is not None
        pool = self.pools[route.upstream]
        timeout = route.timeout or self.config.gateway.timeout
        table = self.table

        async def proxy(exchange: Exchange) -> web.StreamResponse:
            request = exchange.request
            path = table.upstream_path(exchange.route, exchange.params, request)
            answer = await pool.send(
                request.method,
                path,
                headers=self._upstream_headers(exchange),
                body=exchange.body,
                timeout=timeout,
                clean=False,  # forwardable_headers cleaned them
            )
            exchange.upstream = answer.instance
            # The pool already dropped hop-by-hop headers and the body's stale length/encoding;
            # the response copies them into its own multidict, repeated ones (several
            # Set-Cookie) as the upstream sent them.
            return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

        return proxy

    def _upstream_headers(self, exchange: Exchange) -> CIMultiDict[str]:
        """The request's headers for the upstream: the client's, cleaned in one step
        (`forwardable_headers`: hop-by-hop, what `Connection` names, framing, and every header
        the gateway owns), then ours (forwarding, ids, trace, verified identity) on top, so no
        client header can remove or replace one of ours."""
        request = exchange.request
        headers = forwardable_headers(request.headers, owned=self.owned_headers)
        peer = request.remote or ""
        previous = request.headers.get("X-Forwarded-For", "").strip()
        if previous and peer in self.config.gateway.trusted_proxies:
            headers["X-Forwarded-For"] = f"{previous}, {peer}"
        else:  # an untrusted client's claims about earlier hops are not passed on
            headers["X-Forwarded-For"] = peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        headers["x-gtxid"] = exchange.gtxid
        headers["x-request-id"] = exchange.request_id
        trace = TraceContext.continue_from(request.headers.get("traceparent"))
        headers["traceparent"] = trace.to_header()
        headers.update(exchange.upstream_headers)
        return headers

    def _chain(self, route: RouteConfig, target: GatewayHandler) -> GatewayHandler:
        """`route` compiled into one handler holding only the steps it uses.

        The steps every route takes (access log and metering; authentication; rate limits
        when tiers exist; the body within its limits; a concurrency slot; gzip on the way out
        unless it is off or the route streams) run in two frames, `logged` and `admitted`, with
        what is off left out when the config is built, not skipped per request. The optional
        layers (CORS, cache, transformation) are wrapped around the target only on routes
        that use them. The order is the module
        docstring's; a reload compiles the new config's routes beside the old ones.
        """
        settings = self.config.gateway
        inner = target
        optional: list[GatewayMiddleware] = []
        if route.cache is not None:
            optional.append(cache_middleware(self.cache))
        if route.transform is not None:
            optional.append(self._transformer(route))
        for layer in reversed(optional):
            inner = _wrap(layer, inner)
        admitted = self._admission(route, inner)
        if settings.cors is not None:  # answers preflights before authentication
            admitted = _wrap(cors_middleware(settings.cors), admitted)
        return self._logged(admitted)

    def _logged(self, inner: GatewayHandler) -> GatewayHandler:
        """The outermost step: every final status counted on the meter and access-logged."""
        meter = self.meter
        access = logging.getLogger(ACCESS_LOGGER)

        async def logged(exchange: Exchange) -> web.StreamResponse:
            try:
                response = await inner(exchange)
            except BaseException as exc:
                status, error = failure_status(exc)
                account(meter, access, exchange, None, status, error)
                raise
            account(meter, access, exchange, response, response.status, None)
            return response

        return logged

    def _admission(self, route: RouteConfig, inner: GatewayHandler) -> GatewayHandler:
        """Who is calling, may they, within their rate, with a body within its limits, while
        the gateway has a free slot: then `inner`. The body is read before a slot is taken, so
        a slow client costs a socket (bounded by the limits' timeouts), never a slot other
        clients are waiting for."""
        settings = self.config.gateway
        auth = self.auth
        methods = route.auth
        roles, scopes = route.roles, route.scopes
        anonymous_tier = self.config.anonymous_tier
        forward_claims = self.config.auth.forward_claims
        limiter = self.limiter if self.config.tiers else None
        shedder = self.shedder
        default_max = settings.max_body
        pause = settings.limits.body_timeout
        min_rate = settings.limits.body_min_rate
        client_address = self._client_address
        # gzip is the last step on the way out (outside the cache: one copy is kept), checked
        # in line: most answers are too small or already encoded, and cost no coroutine.
        gzip_min = settings.gzip_min_size if route.stream is None else None

        async def admitted(exchange: Exchange) -> web.StreamResponse:
            request = exchange.request
            identity = await auth.authenticate(
                request, methods, anonymous_tier=anonymous_tier, peer=client_address(request)
            )
            if roles or scopes:
                authorize(identity, roles, scopes)
            exchange.client = identity
            if identity.method != "anonymous":
                exchange.upstream_headers.update(forwarded_headers(identity, forward_claims))
            rate = limit_rate(limiter, exchange) if limiter is not None else None
            try:
                await read_body(exchange, default_max, pause, min_rate)
                shedder.enter(exchange)
                try:
                    response = await inner(exchange)
                    if gzip_min is not None and gzip_candidate(response, gzip_min):
                        response = await gzip_response(exchange, response)
                finally:
                    shedder.leave()
            except GatewayError as exc:
                if rate:
                    for name, value in rate.items():
                        exc.headers.setdefault(name, value)
                raise
            if rate and not response.prepared:
                response.headers.update(rate)
            return response

        return admitted

    def _client_address(self, request: web.Request) -> str:
        """The client's address: the peer, or - when the peer is a trusted proxy - the last
        address in X-Forwarded-For that is not a trusted proxy itself."""
        peer = request.remote or ""
        trusted = self.config.gateway.trusted_proxies
        if peer not in trusted:
            return peer
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed(hops):
            if hop and hop not in trusted:
                return hop
        return peer

    def _transformer(self, route: RouteConfig) -> GatewayMiddleware:
        transform = route.transform
        assert transform is not None
        request_mapping = (
            FieldMapping.from_config(list(transform.request)) if transform.request else None
        )
        response_mapping = (
            FieldMapping.from_config(list(transform.response)) if transform.response else None
        )
        codecs = self.codecs

        async def transformer(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
            request = exchange.request
            try:
                if exchange.body and (request_mapping is not None or transform.request_format):
                    codec = codecs.for_content_type(request.headers.get("Content-Type"))
                    document = codec.decode(exchange.body)
                    if request_mapping is not None:
                        document = request_mapping.apply(document)
                    out = codecs.for_content_type(transform.request_format or codec.media_type)
                    exchange.body = out.encode(document)
                    exchange.upstream_headers["Content-Type"] = out.media_type
                answer_codec = None
                if transform.response_format == "negotiate":
                    answer_codec = codecs.for_accept(request.headers.get("Accept"))
                elif transform.response_format:
                    answer_codec = codecs.for_content_type(transform.response_format)
            except TranslationError as exc:
                raise GatewayError(
                    exc.status, _TITLES.get(exc.status, "Bad Request"), str(exc)
                ) from exc
            response = await call_next(exchange)
            if not isinstance(response, web.Response) or response.body is None:
                return response
            if response_mapping is None and answer_codec is None:
                return response
            if not 200 <= response.status < 300 or not response.body:
                return response
            try:
                source = codecs.for_content_type(response.content_type)
                document = source.decode(bytes(response.body))  # type: ignore[arg-type]
                if response_mapping is not None:
                    document = response_mapping.apply(document)
                target = answer_codec or source
                body = target.encode(document)
            except TranslationError as exc:
                raise GatewayError(
                    502, "Bad Gateway", f"the upstream answer cannot be translated: {exc}"
                ) from exc
            translated = web.Response(
                status=response.status, body=body, content_type=target.media_type
            )
            for name, value in response.headers.items():
                if name.lower() not in ("content-type", "content-length", "content-encoding"):
                    translated.headers[name] = value
            return translated

        return transformer

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.auth.start()
        for pool in self.pools.values():
            await pool.start()
        for feed in self.feeds.values():
            await feed.start()
        for drain in self.drains:
            await drain.start()
            self.subscriptions.append(await drain.attach_running())

    async def stop(self, drain_timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                await self.idle.wait()
        for subscription in self.subscriptions:
            await subscription.stop(grace=drain_timeout)
        for drain in self.drains:
            await drain.stop()
        for feed in self.feeds.values():
            await feed.stop()
        for pool in self.pools.values():
            await pool.stop()
        await self.auth.stop()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


_TITLES = {415: "Unsupported Media Type", 406: "Not Acceptable", 413: "Content Too Large"}


def _wrap(layer: GatewayMiddleware, inner: GatewayHandler) -> GatewayHandler:
    async def call(exchange: Exchange) -> web.StreamResponse:
        return await layer(exchange, inner)

    return call


class Gateway:
    """An API gateway serving one config at a time, reloadable without dropping requests."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: str | Path | None = None,
        bus: Bus | None = None,
        metrics: MetricsRegistry | None = None,
        watch_interval: float = 1.0,
        drain_timeout: float = 30.0,
        environ: Mapping[str, str] | None = None,
        reuse_port: bool = False,
        share: int = 1,
        admin_unix: str | None = None,
        peers: Sequence[str] = (),
    ) -> None:
        self.config_path = Path(config_path) if config_path is not None else None
        self.reuse_port = reuse_port
        """Listen with SO_REUSEPORT: several processes serve one port (`msa gateway
        --workers N`)."""
        self.share = share
        """This process's part of every rate limit and quota is 1/`share` (N workers: N)."""
        self.admin_unix = admin_unix
        """Serve the peer API (`framework.gateway.peers`) on this unix socket instead of the
        admin API on its TCP port: a worker other than the first."""
        self.peers = tuple(peers)
        """The other workers' peer sockets: metering, metrics and reloads span them all."""
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        """Where the bus's `KAFKA_*` settings are read (`os.environ` unless given)."""
        self.metrics = metrics or MetricsRegistry()
        self.meter = Meter(self.metrics)
        self.watch_interval = watch_interval
        self.drain_timeout = drain_timeout
        self._config = config
        self._given_bus = bus
        self._bus: Bus | None = bus
        self._owns_bus = False
        self._runtime: _Runtime | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._runners: list[web.BaseRunner] = []
        self._servers: list[asyncio.Server] = []
        self.connections = ConnectionLimit(1)
        """Open client connections against `gateway.limits.max_connections` (set at start)."""
        self._watch_task: asyncio.Task[None] | None = None
        self._mtime: float | None = None
        self._reload_lock = asyncio.Lock()
        self.reloads = 0
        self._stopping = False
        self.port: int | None = None
        self.admin_port: int | None = None

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Gateway:
        return cls(load_config(path), config_path=path, **options)

    @property
    def config(self) -> GatewayConfig:
        return self._config

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._given_bus is not None:
            self._bus = self._given_bus
        else:
            self._bus = self.make_bus()
            if self._bus is not None:
                await self._bus.start()
                self._owns_bus = True
        runtime = self._build(self._config)
        await runtime.start()
        self._runtime = runtime
        if self.config_path is not None:
            self._mtime = _mtime(self.config_path)
        settings = self._config.gateway
        loop = asyncio.get_running_loop()
        # The main port is aiohttp's low-level server: every request, any path at all, goes to
        # `_handle` (whose router refuses what it must with a problem) without an Application's
        # URL dispatcher and signals in between (~8 us a request).
        client_max_size = max(settings.max_body, 1024) + 1024

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            return _GatewayRequest(
                message, payload, protocol, writer, task, loop, client_max_size=client_max_size
            )

        main = web.Server(
            cast(Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], self._handle),
            request_factory=request_factory,
            handler_cancellation=True,
        )
        admin = web.Application()
        if self.admin_unix is None:
            self._admin_routes(admin)
        else:
            admin = peers.peer_app(self)
        # Limits and timeouts are read at the first start only (like `bus`): they shape the
        # listening sockets, which a reload keeps.
        limits = settings.limits
        self.connections = ConnectionLimit(limits.max_connections, self.metrics)
        for app, listen, attribute in (
            (main, (settings.listen.host, settings.listen.port), "port"),
            (admin, (settings.admin.host, settings.admin.port), "admin_port"),
        ):
            if app is admin and self.admin_unix is not None:
                peer_runner = web.AppRunner(admin, access_log=None)
                await peer_runner.setup()
                await web.UnixSite(peer_runner, self.admin_unix).start()
                self._runners.append(peer_runner)
                continue
            # A client that hangs up cancels its request (nginx's default for proxied
            # requests): what it gave up on holds no upstream slot or database work.
            runner: web.BaseRunner
            if isinstance(app, web.Server):
                runner = web.ServerRunner(app, shutdown_timeout=self.drain_timeout)
            else:
                app.on_response_prepare.append(_without_banner)
                runner = web.AppRunner(
                    app,
                    access_log=None,
                    shutdown_timeout=self.drain_timeout,
                    handler_cancellation=True,
                )
            await runner.setup()
            manager = runner.server
            assert manager is not None  # set by setup()
            options: dict[str, Any] = {
                "access_log": None,
                "keepalive_timeout": limits.keepalive_timeout,
                # The guard refuses a head over the limits first (431); these only keep
                # aiohttp's own parser limits out of its way.
                "max_line_size": limits.max_header_bytes,
                "max_field_size": limits.max_header_bytes,
                "max_headers": limits.max_headers + 8,
                "lingering_time": min(2.0, limits.body_timeout),
            }

            def guarded(manager: web.Server = manager, options: dict[str, Any] = options) -> Any:
                protocol = GatewayProtocol(manager, loop=loop, **options)
                return ConnectionGuard(protocol, limits, self.connections)

            server = await loop.create_server(
                guarded,
                listen[0],
                listen[1],
                reuse_address=True,
                reuse_port=self.reuse_port and app is main,
            )
            self._runners.append(runner)
            self._servers.append(server)
            setattr(self, attribute, int(server.sockets[0].getsockname()[1]))
        if self.config_path is not None and self.watch_interval > 0:
            self._watch_task = asyncio.create_task(self._watch(), name="gateway:watch")
        log.info(
            "gateway %s listening on %s:%s (admin on %s:%s), %d routes",
            settings.name,
            settings.listen.host,
            self.port,
            settings.admin.host,
            self.admin_port,
            len(self._config.routes),
        )

    async def stop(self) -> None:
        self._stopping = True  # /ready answers 503 from now on
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        for server in self._servers:
            server.close()  # stops accepting
        await self._end_streams()
        for runner in reversed(self._runners):
            await runner.cleanup()  # lets in-flight requests finish
        self._runners.clear()
        self._servers.clear()
        if self._runtime is not None:
            await self._runtime.stop(self.drain_timeout)
            self._runtime = None
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
        if self._owns_bus and self._bus is not None:
            await self._bus.stop()
        self._bus = None

    async def _end_streams(self) -> None:
        """Before aiohttp waits for open requests: end the endless ones (streams)."""
        runtime = self._runtime
        if runtime is not None:
            for feed in runtime.feeds.values():
                await feed.stop()

    def make_bus(self) -> Bus | None:
        """The bus the config's `bus` section describes, not started; None when no route needs
        one. Its transport is `bus.transport`, set up from `environ` as a service's is
        (`framework.bus.transport_from_env`: `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, ...),
        with `bus.bootstrap_servers`, when given, in place of `KAFKA_BOOTSTRAP`."""
        config: BusConfig = self._config.bus
        if not any(r.publish or r.request or r.drain or r.stream for r in self._config.routes):
            return None
        env = dict(self.environ)
        if config.bootstrap_servers:
            env["KAFKA_BOOTSTRAP"] = config.bootstrap_servers
        if config.transport == "kafka" and not env.get("KAFKA_BOOTSTRAP", "").strip():
            raise GatewayConfigError(
                "<config>", ["bus.bootstrap_servers (or KAFKA_BOOTSTRAP) is needed"]
            )
        return Bus(transport_from_env(env, name=config.transport), source=config.source)

    def _build(self, config: GatewayConfig) -> _Runtime:
        try:
            runtime = _Runtime(config, bus=self._bus, meter=self.meter, share=self.share)
        except GatewayConfigError:
            raise
        except (ValueError, TypeError) as exc:  # a mapping in a transform that does not parse
            raise GatewayConfigError("<config>", [str(exc)]) from exc
        return runtime

    # -- reload ----------------------------------------------------------------------------------

    async def reload(self, config: GatewayConfig | None = None) -> GatewayConfig:
        """Swap in `config` (or the file, re-read); the old config keeps serving on any error
        (`GatewayConfigError`), and stops once its requests are done."""
        async with self._reload_lock:
            if config is None:
                if self.config_path is None:
                    raise GatewayConfigError(
                        "<config>", ["this gateway was not started from a file"]
                    )
                self._mtime = _mtime(self.config_path)
                config = load_config(self.config_path)
            if config.bus != self._config.bus:
                raise GatewayConfigError(
                    str(self.config_path or "<config>"),
                    ["bus: changing the bus section needs a restart"],
                )
            runtime = self._build(config)
            try:
                await runtime.start()
            except Exception as exc:
                await runtime.stop(0)
                raise GatewayConfigError(
                    str(self.config_path or "<config>"), [f"cannot start: {exc}"]
                ) from exc
            old, self._runtime, self._config = self._runtime, runtime, config
            self.reloads += 1
            if old is not None:
                task = asyncio.create_task(old.stop(self.drain_timeout))
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
            log.info(
                "gateway %s: config reloaded (%d routes)", config.gateway.name, len(config.routes)
            )
            return config

    async def _watch(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(self.watch_interval)
            mtime = _mtime(self.config_path)
            if mtime is None or mtime == self._mtime:
                continue
            self._mtime = mtime
            try:
                await self.reload()
            except GatewayConfigError as exc:
                log.error("config change refused, the previous config keeps serving: %s", exc)

    # -- serving ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        guard = guard_of(request)
        if guard is not None:
            guard.request_started()
        try:
            if request.headers.get("Expect"):  # what an Application's router would do first
                refused = await self._expect(request)
                await request.writer.drain()
                if refused is not None:
                    return refused
            return await self._serve(request)
        finally:
            if guard is not None:
                guard.request_finished()

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: the body is invited only if it could be accepted, so a
        client never sends megabytes that will be refused (413) or cannot be routed."""
        expect = request.headers.get("Expect", "")
        if request.version != HttpVersion11:
            return None
        if expect.lower() != "100-continue":
            return problem(417, "Expectation Failed", "only Expect: 100-continue is understood")
        runtime = self._runtime
        if runtime is not None:
            try:
                found = runtime.table.match(request)
            except GatewayError as error:
                return _problem_response(error, None)
            if found is not None:
                route = found[0]
                limit = route.max_body
                if limit is None:
                    limit = self._config.gateway.max_body
                declared = request.content_length
                if declared is not None and declared > limit:
                    return problem(
                        413, "Content Too Large", f"the request body exceeds {limit} bytes"
                    )
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's size
        return None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        runtime = self._runtime
        if runtime is None:
            return problem(503, "Service Unavailable", "the gateway is not started")
        if request.version < HttpVersion10:
            old = problem(400, "Bad Request", "HTTP/0.9 requests are not served")
            old.force_close()
            return old
        gtxid = request.headers.get("x-gtxid", "")
        if not _GTXID.fullmatch(gtxid):
            gtxid = new_id()
        exchange: Exchange | None = None
        runtime.enter()
        try:
            check_client_headers(request.headers, singletons=runtime.singleton_headers)
            if request.path.startswith("/_status/"):
                return await self._status(runtime, request)
            found = runtime.table.match(request)
            if found is None:
                raise GatewayError(
                    404, "Not Found", f"no route for {request.method} {request.path}"
                )
            route, params = found
            exchange = Exchange(
                request=request, route=route, params=params, gtxid=gtxid, request_id=new_id()
            )
            response = await runtime.chains[route.name](exchange)
            if not response.prepared:
                response.headers["x-gtxid"] = exchange.gtxid
                response.headers["x-request-id"] = exchange.request_id
            return response
        except GatewayError as error:
            refusal = _problem_response(error, exchange)
            if error.status == 408:  # the client stalled: answer, then close at once
                await refusal.prepare(request)
                await refusal.write_eof()
                if request.transport is not None:
                    request.transport.close()
            return refusal
        except web.HTTPException:
            raise
        except Exception:  # a bug, not the client's fault: a 500 that leaks nothing
            log.exception("gateway: unhandled error on %s %s", request.method, request.path)
            return _problem_response(
                GatewayError(500, "Internal Server Error", "the gateway failed"), exchange
            )
        finally:
            runtime.leave()

    async def _status(self, runtime: _Runtime, request: web.Request) -> web.StreamResponse:
        parts = request.path.split("/")
        if len(parts) != 4 or parts[2] not in runtime.trackers:
            raise GatewayError(404, "Not Found", "no such status")
        tracker = runtime.trackers[parts[2]]
        document = tracker.status(parts[3])
        if document is None:
            raise GatewayError(404, "Not Found", f"no accepted request {parts[3]!r} is known")
        return _json(document)

    # -- admin -----------------------------------------------------------------------------------

    def _admin_routes(self, app: web.Application) -> None:
        guard = self._admin_guard
        app.router.add_get("/admin/routes", guard(self._admin_list_routes))
        app.router.add_get("/admin/upstreams", guard(self._admin_upstreams))
        app.router.add_get("/admin/metering", guard(self._admin_metering))
        app.router.add_get("/admin/config", guard(self._admin_config))
        app.router.add_post("/admin/reload", guard(self._admin_reload))
        app.router.add_get("/metrics", self._admin_metrics)
        app.router.add_get("/alive", self._alive)  # probes: no token, like a service's
        app.router.add_get("/ready", self._ready)

    def _admin_guard(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            headers = request.headers.getall("Authorization", [])
            if len(headers) > 1:
                return problem(
                    400, "Bad Request", "the Authorization header is sent more than once"
                )
            header = headers[0] if headers else ""
            token = header[7:] if header.lower().startswith("bearer ") else ""
            digest = "sha256:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
            allowed = self._config.gateway.admin.token_hashes
            if not token or not any(hmac.compare_digest(digest, h) for h in allowed):
                response = problem(401, "Unauthorized", "the admin API needs a valid bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
                return response
            result: web.StreamResponse = await handler(request)
            return result

        return guarded

    async def _admin_list_routes(self, request: web.Request) -> web.Response:
        routes = [
            {
                "name": r.name,
                "match": r.match.model_dump(),
                "target": r.target,
                "auth": list(r.auth),
                "roles": list(r.roles),
                "scopes": list(r.scopes),
            }
            for r in self._config.routes
        ]
        return _json({"routes": routes, "reloads": self.reloads})

    async def _admin_upstreams(self, request: web.Request) -> web.Response:
        runtime = self._runtime
        pools = runtime.pools if runtime is not None else {}
        return _json({name: pool.snapshot() for name, pool in pools.items()})

    async def _admin_metering(self, request: web.Request) -> web.Response:
        snapshots: list[Any] = [self.meter.snapshot()]
        if self.peers:
            answers = await peers.get_all(self.peers, "/peer/metering")
            snapshots += [orjson.loads(body) for body in answers if body is not None]
            return _json(peers.merge_metering(snapshots))
        return _json(snapshots[0])

    async def _admin_config(self, request: web.Request) -> web.Response:
        connections = self.connections
        return _json(
            {
                "name": self._config.gateway.name,
                "reloads": self.reloads,
                "routes": len(self._config.routes),
                "connections": {
                    "open": connections.open,
                    "max": connections.maximum,
                    "closed": connections.closed,
                },
            }
        )

    async def _admin_reload(self, request: web.Request) -> web.Response:
        try:
            config = await self.reload()
        except GatewayConfigError as exc:
            return peers.refused_reload(exc)
        answer: dict[str, Any] = {
            "reloaded": True,
            "routes": len(config.routes),
            "reloads": self.reloads,
        }
        if self.peers:  # every worker reads the file itself; one refusal is reported
            others = await peers.post_all(self.peers, "/peer/reload")
            answer["workers"] = 1 + len(others)
            refused = [
                {"status": status, "answer": body.decode("utf-8", "replace")}
                for status, body in others
                if status != 200
            ]
            if refused:
                answer["reloaded"] = False
                answer["refused"] = refused
                return web.json_response(answer, status=502)
        return _json(answer)

    async def _alive(self, request: web.Request) -> web.Response:
        return _json({"alive": True})

    async def _ready(self, request: web.Request) -> web.Response:
        """200 while serving; 503 once stopping (so a load balancer stops sending)."""
        ready = self._runtime is not None and not self._stopping
        return (
            _json({"ready": ready, "config": self._config.gateway.name})
            if ready
            else (problem(503, "Service Unavailable", "the gateway is stopping or not started"))
        )

    async def _admin_metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        if self.peers:
            body = peers.merge_metrics([body, *await peers.get_all(self.peers, "/peer/metrics")])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def settle_garbage_collector(young: int = 10_000) -> None:
    """Tune the garbage collector of a process that serves one gateway (`msa gateway`, each of
    its workers), once the gateway has started.

    What exists by then - modules, the config, compiled routes, pools - lives as long as the
    process: after one collection it is frozen out of the collector's sight (`gc.freeze`), so
    collections stop traversing it over and over, and the youngest generation is collected
    after `young` net allocations instead of 700 (a request leaves a few cycles - futures,
    exceptions - that wait a little longer to be freed). Measured on the plain-proxy benchmark
    with the collector's own callbacks: ~15 us of collection per request before, ~1 us after.
    Not for a process that starts and stops many gateways (tests, a modular monolith): what is
    frozen is never collected.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


class _GatewayRequest(web.Request):
    """The main port's requests: an aiohttp `Request` made by the low-level server (no
    Application routed it, so `match_info` is None), whose every response - answered, streamed
    or refused by the protocol - names no server software (`Server: msa-gateway`).

    `_prepare_hook` is aiohttp's (3.10-3.14, pinned in pyproject) hook before a response's
    headers are sent; the gateway's tests check the header on an answer and a stream
    (test_gateway_bridges.py) and a refusal (test_hygiene.py), so a change of the hook fails
    there.
    """

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_NAME


async def _without_banner(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """No product or version in `Server` (aiohttp's default names Python and aiohttp's
    versions; an upstream's would pass through too)."""
    response.headers["Server"] = SERVER_NAME


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
