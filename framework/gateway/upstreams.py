"""The gateway's upstream pools: `framework.resilience.upstreams`, answering in gateway errors.

The pools (balancing, health checks, ejection, retries, circuit breaker, bulkhead), their
config and the header hygiene live in `framework.resilience.upstreams`, which a service's
`framework.client.ResilientClient` shares. The gateway's `UpstreamPool` is that pool raising
its `UpstreamError`s as `GatewayError`s (the same status, title, detail and headers, the
original as the cause), which the gateway's middleware and its outermost layer answer as
problem documents. The names the gateway exported from here before stay importable.
"""

from __future__ import annotations

from collections.abc import Mapping

from framework.errors import UpstreamError
from framework.gateway.types import GatewayError
from framework.resilience import upstreams as resilience
from framework.resilience.upstreams import (
    HOP_BY_HOP,
    IDEMPOTENT_METHODS,
    UpstreamResponse,
    clean_headers,
)

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "UpstreamPool",
    "UpstreamResponse",
    "clean_headers",
]


class UpstreamPool(resilience.UpstreamPool):
    """`framework.resilience.UpstreamPool` whose `send` raises `GatewayError` (502, 503, 504)."""

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
        try:
            return await super().send(
                method, path_qs, headers=headers, body=body, timeout=timeout, clean=clean
            )
        except UpstreamError as exc:
            raise GatewayError(exc.status, exc.title, exc.detail, headers=exc.headers) from exc
