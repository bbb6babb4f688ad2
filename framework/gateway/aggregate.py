"""Aggregation: one route fans out to several upstreams at once and merges their answers.

    aggregate:
      branches:
        - {name: product, upstream: catalog, path: "/products/{id}", timeout: 1, required: true}
        - {name: stock, upstream: inventory, path: "/stock/{id}", timeout: 0.5}

answers `{"product": {...}, "stock": {...}}`. Branches run concurrently, each within its own
timeout. A failed optional branch (error status, timeout, open breaker, not JSON) leaves its key
as null, lists it under `"_partial"` and in the `x-gateway-partial` header, and the status stays
200; a failed required branch makes the whole answer 502.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from framework.gateway.config import AggregateBranch, AggregateTarget
from framework.gateway.router import fill_template
from framework.gateway.types import Exchange, GatewayError, status_title
from framework.gateway.upstreams import UpstreamPool

__all__ = ["PARTIAL_HEADER", "Aggregator"]

PARTIAL_HEADER = "x-gateway-partial"


class Aggregator:
    """The target handler of an `aggregate` route."""

    def __init__(self, target: AggregateTarget, pools: Mapping[str, UpstreamPool]) -> None:
        self.branches = target.branches
        self.pools = pools

    async def __call__(self, exchange: Exchange, headers: Mapping[str, str]) -> web.Response:
        results = await asyncio.gather(
            *(self._branch(branch, exchange, headers) for branch in self.branches)
        )
        merged: dict[str, Any] = {}
        partial: list[str] = []
        for branch, (value, problem, status) in zip(self.branches, results, strict=True):
            if isinstance(problem, GatewayError):
                if branch.required:  # shed (503 + Retry-After) or timed out (504): say so
                    raise problem
                partial.append(branch.name)
            elif problem is not None:
                if branch.required and status is not None and 400 <= status < 500:
                    # The part the answer hinges on refused the client's request (an unknown
                    # id: 404): that is the answer, not a failure of the gateway's.
                    raise GatewayError(
                        status, status_title(status), f"required part {branch.name!r}: {problem}"
                    )
                if branch.required:
                    raise GatewayError(
                        502, "Bad Gateway", f"required part {branch.name!r} failed: {problem}"
                    )
                partial.append(branch.name)
            merged[branch.name] = value
        response_headers: dict[str, str] = {}
        if partial:
            merged["_partial"] = partial
            response_headers[PARTIAL_HEADER] = ",".join(partial)
            exchange.notes["partial"] = partial
        return web.Response(
            body=orjson.dumps(merged), content_type="application/json", headers=response_headers
        )

    async def _branch(
        self, branch: AggregateBranch, exchange: Exchange, headers: Mapping[str, str]
    ) -> tuple[Any, str | GatewayError | None, int | None]:
        """The branch's JSON value, or None with what went wrong (the pool's own refusal as
        it is: a 503 it shed, a 504) and the status the upstream answered."""
        path = fill_template(branch.path, exchange.params)
        try:
            async with asyncio.timeout(branch.timeout):
                answer = await self.pools[branch.upstream].send(
                    "GET", path, headers=headers, body=None, timeout=branch.timeout
                )
        except TimeoutError:
            return None, _timed_out(branch), None
        except GatewayError as exc:
            if exc.status in (503, 504):
                return None, exc, None
            return None, f"{exc.status} {exc.title}", None
        if not 200 <= answer.status < 300:
            return None, f"answered {answer.status}", answer.status
        try:
            return orjson.loads(answer.body), None, answer.status
        except orjson.JSONDecodeError:
            return None, "answered something that is not JSON", None


def _timed_out(branch: AggregateBranch) -> GatewayError:
    return GatewayError(
        504, "Gateway Timeout", f"part {branch.name!r} did not answer within {branch.timeout:g} s"
    )
