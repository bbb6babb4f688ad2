"""Service-to-service HTTP with the gateway's resilience: `ResilientClient`.

One `UpstreamPool` per named service, so calls between services get what calls through the
gateway get (the gateway's upstreams are the same pools): load balancing, health checks, passive
ejection, timeouts, retries of idempotent methods within a retry budget, a circuit breaker and a
bulkhead (see `framework.resilience.upstreams`). Every call carries the trace on (`traceparent`:
a child span of the current trace, or the root of a new one) and the correlation id
(`x-correlation-id`) of the message or request being handled.

    class Checkout(Service):
        def __init__(self, settings: ServiceSettings | None = None) -> None:
            super().__init__(settings)
            self.http = self.use(ResilientClient({
                "catalog": UpstreamConfig(dns="catalog.shop.svc:8080", timeout=2.0),
                "pricing": ["http://10.0.0.7:8080", "http://10.0.0.8:8080"],
            }))

        @handles("orders")
        async def on_order(self, event: OrderPlaced) -> None:
            product = (await self.http.get("catalog", f"/products/{event.sku}")).json()
            quote = await self.http.post("pricing", "/quotes", json={"sku": event.sku})
            if not quote.ok: ...

Errors: a call that gets no answer raises an `UpstreamError` (`framework.errors`), with `status`
the status a gateway would answer: `UpstreamTimeout` (504), `UpstreamUnreachable` (502),
`UpstreamUnavailable` (503: circuit open, no instance available, at capacity). An answer is never
an error, whatever its status: check `response.ok` or `response.status`. A service that needs the
difference between "the callee said no" and "the callee could not be reached" has it in the
exception type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias

from framework.errors import ConfigurationError, UpstreamError
from framework.messages import encode_payload
from framework.observability.tracing import TRACEPARENT, current_correlation_id, inject
from framework.resilience.upstreams import UpstreamConfig, UpstreamPool, UpstreamResponse

__all__ = [
    "CORRELATION_ID",
    "ResilientClient",
    "ServiceTargets",
    "UpstreamConfig",
    "UpstreamError",
    "UpstreamResponse",
]

CORRELATION_ID = "x-correlation-id"
"""The header the correlation id travels in (what `framework.http` reads on the other side)."""

ServiceTargets: TypeAlias = UpstreamConfig | Sequence[str] | str
"""A service's pool: a full `UpstreamConfig`, or just its base URL(s)."""


class ResilientClient:
    """HTTP to named services over resilient pools; a `Resource` (start/stop with a Service).

    `services` maps a service name to an `UpstreamConfig`, or to base URLs (one or several),
    which get the config's defaults. `default_timeout` applies when neither the call nor the
    service's config gives one.
    """

    def __init__(
        self, services: Mapping[str, ServiceTargets], *, default_timeout: float = 30.0
    ) -> None:
        if not services:
            raise ConfigurationError("ResilientClient needs at least one service")
        self._pools = {
            name: UpstreamPool(name, _config(name, targets), default_timeout=default_timeout)
            for name, targets in services.items()
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every pool (sessions, DNS, health checks); a failure stops the started ones."""
        started: list[UpstreamPool] = []
        try:
            for pool in self._pools.values():
                await pool.start()
                started.append(pool)
        except BaseException:
            for pool in reversed(started):
                await pool.stop()
            raise

    async def stop(self) -> None:
        """Stop every pool, closing its connections."""
        for pool in self._pools.values():
            await pool.stop()

    async def __aenter__(self) -> ResilientClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- calls ----------------------------------------------------------------------------------

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._pools)

    def pool(self, service: str) -> UpstreamPool:
        """The pool behind `service`; raises `ConfigurationError` for an unknown name."""
        try:
            return self._pools[service]
        except KeyError:
            raise ConfigurationError(
                f"no service named {service!r}; known: {', '.join(sorted(self._pools))}"
            ) from None

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Call `service`: `path` is the encoded path and query (`/products/42?full=1`).

        `json` (any value `framework.messages.encode_payload` takes: plain values, pydantic
        models, dataclasses) is sent as `application/json`. Headers the caller gives win over
        the ones added here (`traceparent`, `x-correlation-id`, `accept`).
        """
        pool = self.pool(service)
        outgoing = {k.lower(): v for k, v in (headers or {}).items()}
        if TRACEPARENT not in outgoing:
            inject(outgoing)
        correlation_id = current_correlation_id.get()
        if correlation_id is not None:
            outgoing.setdefault(CORRELATION_ID, correlation_id)
        outgoing.setdefault("accept", "application/json")
        body: bytes | None = None
        if json is not None:
            body = encode_payload(json)
            outgoing.setdefault("content-type", "application/json")
        if not path.startswith("/"):
            path = "/" + path
        return await pool.send(method, path, headers=outgoing, body=body, timeout=timeout)

    async def get(
        self,
        service: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        return await self.request(service, "GET", path, headers=headers, timeout=timeout)

    async def post(
        self,
        service: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        return await self.request(
            service, "POST", path, json=json, headers=headers, timeout=timeout
        )

    async def put(
        self,
        service: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        return await self.request(service, "PUT", path, json=json, headers=headers, timeout=timeout)

    async def delete(
        self,
        service: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        return await self.request(service, "DELETE", path, headers=headers, timeout=timeout)

    def snapshot(self) -> dict[str, Any]:
        """Every pool's state (instances, breaker, counters), by service name."""
        return {name: pool.snapshot() for name, pool in self._pools.items()}


def _config(name: str, targets: ServiceTargets) -> UpstreamConfig:
    if isinstance(targets, UpstreamConfig):
        return targets
    urls = (targets,) if isinstance(targets, str) else tuple(targets)
    if not urls:
        raise ConfigurationError(f"service {name!r} has no base URL")
    return UpstreamConfig(targets=urls)
