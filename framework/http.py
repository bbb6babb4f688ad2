"""The HTTP side of a service: its routes plus health, metrics and API documents, on aiohttp.

    GET /alive               200 while the process serves requests (no dependency checks)
    GET /ready               200 when started, dependencies reachable and not stopping; else 503
    GET /metrics             Prometheus text format
    GET /docs/asyncapi.json  AsyncAPI 3.0 of the topics it consumes and publishes
    GET /docs/openapi.json   OpenAPI 3.1 of its routes

Errors are answered as RFC 9457 problem documents (`application/problem+json`): an aiohttp
HTTP exception keeps its status; `PayloadValidationError` and `DecodeError` are 422/400 with the
validation errors; any other exception is a 500 whose detail does not leak internals. Every
request continues the caller's W3C trace (or starts one) and runs with a correlation id taken
from `X-Correlation-ID` (or the trace id), which log lines then carry.

Draining (`ServiceHttp.drain`, the first step of `Service.stop`): from then on every response
carries `Connection: close`, so a client's pool (say a gateway behind a Kubernetes Service, whose
conntrack entries keep kept-alive connections on this pod after it left the endpoints) opens a
new connection for its next request, which reaches another replica. Requests under way finish
while resources and bus still serve them; once none is (or the time is up) the service takes
no more work: later requests are answered 503 with `Retry-After: 1` and `X-MSA-Not-Processed: 1`
(`framework.types.NOT_PROCESSED`: no handler saw it, so an upstream pool may send even a POST
again, elsewhere), while `/alive`, `/ready` and `/metrics` answer until the HTTP side stops,
last. Idle kept-alive connections stay open until then: one used meanwhile gets an answer and
closes, never a reset in the middle of a request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from framework.docs import DocumentedService, asyncapi, openapi
from framework.errors import DecodeError, MessageError, PayloadValidationError, TranslationError
from framework.messages import decode_payload, encode_payload
from framework.observability.metrics import CONTENT_TYPE, MetricsRegistry
from framework.observability.tracing import current_trace, use_correlation_id
from framework.observability.web import trace_middleware
from framework.types import NOT_PROCESSED

__all__ = [
    "HttpSettings",
    "ServedService",
    "ServiceHttp",
    "json_response",
    "problem",
    "read_json",
    "translation_problem",
]

T = TypeVar("T")
log = logging.getLogger("framework.http")
PROBLEM = "application/problem+json"
PROBES = frozenset({"/alive", "/ready", "/metrics"})
"""Paths served until the HTTP side stops, draining or not (probes and scrapes)."""


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson (pydantic models and dataclasses included)."""
    return web.Response(
        body=encode_payload(data), status=status, content_type="application/json", headers=headers
    )


def problem(status: int, title: str, detail: str = "", **extra: Any) -> web.Response:
    """An RFC 9457 problem response."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(body=orjson.dumps(body), status=status, content_type=PROBLEM)


async def read_json(request: web.Request, cls: type[T]) -> T:
    """The request body validated as `cls`; raises the errors the problem middleware maps."""
    raw = await request.read()
    if not raw:
        raise DecodeError("the request body is empty; a JSON document is expected")
    return decode_payload(raw, cls)


def translation_problem(exc: TranslationError) -> web.Response:
    """The problem response for a body a codec or mapping refused (400, 415 or 406)."""
    extra: dict[str, Any] = {"path": exc.path} if exc.path else {}
    title = {415: "Unsupported Media Type", 406: "Not Acceptable"}.get(exc.status, "Bad Request")
    return problem(exc.status, title, str(exc), **extra)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    correlation = request.headers.get("X-Correlation-ID")
    if not correlation:  # trace_middleware, outside this one, has made the request's span current
        trace = current_trace.get()
        correlation = trace.trace_id if trace is not None else None
    with use_correlation_id(correlation):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            detail = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else ""
            return problem(exc.status, exc.reason, detail or "")
        except PayloadValidationError as exc:
            return problem(422, "Unprocessable Content", str(exc), errors=exc.errors)
        except TranslationError as exc:
            return translation_problem(exc)
        except (DecodeError, MessageError) as exc:
            return problem(400, "Bad Request", str(exc))
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return problem(500, "Internal Server Error", "the service failed to handle the request")


class HttpSettings(Protocol):
    """Where the HTTP side listens (`framework.service.ServiceSettings` is one)."""

    @property
    def http_host(self) -> str: ...

    @property
    def http_port(self) -> int: ...


class ServedService(DocumentedService, Protocol):
    """What the HTTP side needs of its service (`framework.service.Service` provides it); a
    protocol, so that this module does not import the service module, which starts it."""

    @property
    def settings(self) -> HttpSettings: ...

    @property
    def metrics(self) -> MetricsRegistry: ...

    @property
    def ready(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    async def check_ready(self) -> dict[str, bool]: ...


class ServiceHttp:
    """Serves a service's aiohttp application; started first, drained first and stopped last
    by `Service`."""

    def __init__(self, service: ServedService) -> None:
        self.service = service
        self.in_flight = 0
        """Requests under way other than probes (`PROBES`)."""
        self.refusing = False
        """True once drained: requests other than probes are answered 503 (not processed)."""
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.app = self.build_app()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def build_app(self) -> web.Application:
        service = self.service
        app = web.Application(
            middlewares=[self.work_middleware, trace_middleware, problem_middleware]
        )
        app.on_response_prepare.append(self._closing_when_draining)
        app.router.add_get("/alive", self.alive)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/docs/asyncapi.json", self.asyncapi)
        app.router.add_get("/docs/openapi.json", self.openapi)
        for info in type(service).__msa_routes__:
            app.router.add_route(info.method, info.path, getattr(service, info.attribute))
        return app

    async def start(self) -> None:
        settings = self.service.settings
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.http_host, settings.http_port)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else settings.http_port
        log.info("service %s: HTTP on %s:%s", self.service.name, settings.http_host, self.port)

    async def drain(self, timeout: float) -> bool:
        """Let requests under way finish (at most `timeout` seconds), then refuse further work
        (see the module docstring). True when every request finished in time."""
        try:
            await asyncio.wait_for(self._quiet.wait(), timeout)
            finished = True
        except TimeoutError:
            finished = False
            log.warning(
                "service %s: %d HTTP requests still under way after %.1fs of draining",
                self.service.name,
                self.in_flight,
                timeout,
            )
        self.refusing = True
        return finished

    @web.middleware
    async def work_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts the requests under way; refuses them once drained (probes excepted)."""
        if request.path in PROBES:
            return await handler(request)
        if self.refusing:
            response = problem(
                503,
                "Service Unavailable",
                f"{self.service.name} is stopping; send the request again",
            )
            response.headers["Retry-After"] = "1"
            response.headers[NOT_PROCESSED] = "1"
            return response
        self.in_flight += 1
        self._quiet.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._quiet.set()

    async def _closing_when_draining(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        if self.service.stopping:  # the client's next request opens a connection elsewhere
            response.force_close()
            response.headers["Connection"] = "close"  # (aiohttp has written its own by now)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def alive(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive", "service": self.service.name})

    async def ready(self, request: web.Request) -> web.Response:
        service = self.service
        checks = await service.check_ready()
        ok = service.ready and all(checks.values())
        body = {
            "status": "ready" if ok else "not ready",
            "service": service.name,
            "stopping": service.stopping,
            "checks": checks,
        }
        return json_response(body, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.service.metrics.render(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def asyncapi(self, request: web.Request) -> web.Response:
        return json_response(asyncapi(self.service))

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi(self.service))
