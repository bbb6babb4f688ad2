"""The gateway's contracts: the per-request `Exchange`, the middleware shape, its errors.

Every gateway feature is a middleware `async def mw(exchange, call_next) -> response`, built
once per config (a reload builds a new stack) and wrapped around the route's target handler:

    async def timing(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        response = await call_next(exchange)
        response.headers["x-took-ms"] = f"{exchange.elapsed_ms():.1f}"
        return response

A middleware refuses a request by raising `GatewayError(status, title, detail)`; the outermost
layer turns it into an RFC 9457 problem response (plus `headers`, e.g. `Retry-After`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeAlias

from aiohttp import web

from framework.errors import MsaError

if TYPE_CHECKING:
    from framework.gateway.config import RouteConfig

__all__ = [
    "ClientIdentity",
    "Exchange",
    "GatewayError",
    "GatewayHandler",
    "GatewayMiddleware",
    "status_title",
]


class GatewayError(MsaError):
    """A request the gateway refuses or cannot serve; answered as a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra


def status_title(status: int) -> str:
    """A problem's title for `status`: its standard reason phrase ("Bad Request" for a status
    the standard does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Bad Request"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientIdentity:
    """Who is calling, as authentication established it."""

    id: str
    """The subject (`sub` claim), the API key's id, or `anon:<address>`."""
    method: str
    """`jwt`, `api_key` or `anonymous`."""
    tier: str | None = None
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class Exchange:
    """One request's state as it passes through the gateway's middleware."""

    request: web.Request
    route: RouteConfig
    params: dict[str, str]
    """Path parameters the route's pattern captured."""
    gtxid: str
    """The transaction id across every hop (`x-gtxid`), made here when the client sent none."""
    request_id: str
    """This hop's own id (`x-request-id`)."""
    started: float = field(default_factory=time.perf_counter)
    client: ClientIdentity | None = None
    upstream: str | None = None
    """The instance that served it (`http://10.0.0.5:8080`), for the access log."""
    upstream_headers: dict[str, str] = field(default_factory=dict)
    """Extra headers to send upstream (forwarded claims, ids)."""
    bytes_in: int = 0
    bytes_out: int = 0
    body: bytes | None = None
    """The request body once read (bounded by the body limit)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for the access log (cache hit, retries, partial aggregation)."""

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


GatewayHandler: TypeAlias = Callable[[Exchange], Awaitable[web.StreamResponse]]
GatewayMiddleware: TypeAlias = Callable[[Exchange, GatewayHandler], Awaitable[web.StreamResponse]]
