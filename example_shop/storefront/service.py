"""Serves the storefront page (HTML, JavaScript, CSS) to browsers, through the web gateway.

The page talks only to the gateway (`/api/...`): it never calls a service directly, so the
gateway's authentication, rate limits and SSE stream apply to it like to any client.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from example_shop.common import PORTS, default_settings
from example_shop.registry import backend_services, system_graph
from framework.graph import SystemGraph
from framework.service import Service, ServiceSettings, route
from framework.types import Transport

__all__ = ["Storefront"]

STATIC = Path(__file__).with_name("static")
# Published directly by a bus, or by an outbox relay: either way, a message on the topic.
_OUT = re.compile(
    r'^msa_(?:messages_out|outbox_published)_total\{[^}]*topic="([^"]+)"[^}]*\} ([0-9.e+]+)',
    re.M,
)
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


class Storefront(Service):
    name = "storefront"

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        **_: Any,
    ) -> None:
        super().__init__(default_settings("storefront", settings), transport=transport)
        self._graph: SystemGraph | None = None
        self._sample: tuple[float, dict[str, float]] | None = None

    @route("GET", "/")
    async def index(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    @route("GET", "/static/{name}")
    async def asset(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    @route("GET", "/graph")
    async def graph(self, request: web.Request) -> web.StreamResponse:
        """The system drawn from the services' own declarations (admin view; see msa graph),
        its publish edges labelled with live rates scraped from the services' /metrics."""
        from framework.graph import render_mermaid

        if self._graph is None:
            self._graph = await asyncio.to_thread(_shop_graph)
        rates = await self._rates()
        return web.json_response({"mermaid": render_mermaid(self._graph, rates), "rates": rates})

    async def _rates(self) -> dict[str, float]:
        """Messages per second published to each topic since the previous call."""
        totals: dict[str, float] = {}
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for name in PORTS:
                base = self.settings.env.get(f"{name.upper()}_URL")
                if not base or name == self.name:
                    continue
                try:
                    async with http.get(f"{base}/metrics") as response:
                        text = await response.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                for match in _OUT.finditer(text):
                    topic = match.group(1)
                    totals[topic] = totals.get(topic, 0.0) + float(match.group(2))
        now = time.monotonic()
        previous, self._sample = self._sample, (now, totals)
        if previous is None:
            return {}
        elapsed = max(now - previous[0], 1e-3)
        return {
            topic: round(max(0.0, value - previous[1].get(topic, 0.0)) / elapsed, 2)
            for topic, value in totals.items()
        }

    def _file(self, name: str) -> web.StreamResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file() or path.suffix not in _TYPES:
            raise web.HTTPNotFound()
        return web.Response(
            body=path.read_bytes(),
            content_type=_TYPES[path.suffix],
            headers={"Cache-Control": "no-cache"},
        )


def _shop_graph() -> SystemGraph:
    """The services behind the storefront and the gateways in front of them."""
    return system_graph(backend_services().values())
