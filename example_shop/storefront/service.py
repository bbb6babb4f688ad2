"""Serves the storefront page (HTML, JavaScript, CSS) to browsers, through the web gateway.

The page talks only to the gateway (`/api/...`): it never calls a service directly, so the
gateway's authentication, rate limits and SSE stream apply to it like to any client.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from example_shop.common import PORTS
from framework.service import Service, ServiceSettings, route
from framework.types import Transport

__all__ = ["Storefront"]

STATIC = Path(__file__).with_name("static")
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
        super().__init__(settings or _default_settings(), transport=transport)
        self._graph: str | None = None

    @route("GET", "/")
    async def index(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    @route("GET", "/static/{name}")
    async def asset(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    @route("GET", "/graph")
    async def graph(self, request: web.Request) -> web.StreamResponse:
        """The system drawn from the services' own declarations (admin view; see msa graph)."""
        if self._graph is None:
            self._graph = await asyncio.to_thread(_shop_graph)
        return web.json_response({"mermaid": self._graph})

    def _file(self, name: str) -> web.StreamResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file() or path.suffix not in _TYPES:
            raise web.HTTPNotFound()
        return web.Response(
            body=path.read_bytes(),
            content_type=_TYPES[path.suffix],
            headers={"Cache-Control": "no-cache"},
        )


def _shop_graph() -> str:
    from example_shop.shop import GATEWAY_CONFIGS, service_classes
    from framework.gateway.config import load_config
    from framework.graph import describe, render_mermaid

    settings = ServiceSettings(
        http_port=-1,
        env={"POSTGRES_URL": "postgresql://graph/graph", "MONGO_URL": "mongodb://graph:27017"},
    )
    services = [cls(settings) for name, cls in service_classes().items() if name != "storefront"]
    gateways = {
        n: load_config(GATEWAY_CONFIGS / f"{n}.yaml", env={}) for n in ("web", "mobile", "internal")
    }
    return render_mermaid(describe(services, gateways))


def _default_settings() -> ServiceSettings:
    import dataclasses

    settings = ServiceSettings.from_env()
    if "MSA_HTTP_PORT" not in settings.env:
        settings = dataclasses.replace(settings, http_port=PORTS["storefront"])
    return settings
