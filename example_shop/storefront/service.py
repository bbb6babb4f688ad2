"""Serves the storefront page (HTML, JavaScript, CSS, product pictures) to browsers, through
the web gateway.

    GET /                     the page (`static/index.html`)
    GET /static/{path}        its files; `products/` holds one picture per demo product
    GET /favicon.ico          the shop's icon (the SVG of `static/favicon.svg`)
    GET /graph                admin view: the system drawn (Mermaid source and SVG) with
                              live messages per second per topic

The page talks only to the gateway (`/api/...`): it never calls a service directly, so the
gateway's authentication, rate limits and SSE stream apply to it like to any client.

**Caching.** Every file carries an ETag (a hash of its bytes), and a request that names it in
`If-None-Match` is answered 304 without a body. Pictures may be kept for a day
(`public, max-age=86400`); the page's own HTML, JavaScript and CSS are `no-cache`: the browser
keeps them but asks each time, so a new version of the shop is seen at the next load.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from example_shop.common import PORTS, default_settings
from example_shop.registry import backend_services, system_graph
from example_shop.storefront.faults import FaultsAdmin, FaultsChange
from framework.graph import SystemGraph, render_mermaid, render_svg
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
    ".png": "image/png",
}
_REVALIDATE = "no-cache"
"""The page's code and layout: kept, but checked with the server (ETag) at every use."""
_KEEP = "public, max-age=86400"
"""Pictures: a day without asking (a changed picture is a new file in practice)."""
_CACHE_CONTROL = {".html": _REVALIDATE, ".js": _REVALIDATE, ".css": _REVALIDATE}


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
        self.faults_admin = FaultsAdmin(self.bus, self.settings)

    async def on_start(self) -> None:
        await self.faults_admin.start()

    async def on_stop(self) -> None:
        await self.faults_admin.stop()

    @route("GET", "/")
    async def index(self, request: web.Request) -> web.StreamResponse:
        """The storefront page."""
        return _file(request, "index.html")

    @route("GET", "/static/{path:.+}")
    async def asset(self, request: web.Request) -> web.StreamResponse:
        """A file of the page: code, styles, pictures (404 outside `static/`)."""
        return _file(request, request.match_info["path"])

    @route("GET", "/favicon.ico")
    async def favicon(self, request: web.Request) -> web.StreamResponse:
        """The shop's icon, for browsers that ask for it by its traditional name."""
        return _file(request, "favicon.svg")

    @route("GET", "/graph")
    async def graph(self, request: web.Request) -> web.StreamResponse:
        """The system drawn from the services' own declarations (admin view; see msa graph),
        its publish edges labelled with live rates scraped from the services' /metrics."""
        if self._graph is None:
            self._graph = await asyncio.to_thread(_shop_graph)
        rates = await self._rates()
        return web.json_response(
            {
                "mermaid": render_mermaid(self._graph, rates),
                "svg": render_svg(self._graph, rates),
                "rates": rates,
            }
        )

    # -- fault switches (the admin page's panel; the web gateway forwards /api/admin/faults...
    # here, for admins only) ----------------------------------------------------------------------

    @route("GET", "/faults")
    async def get_faults(self, request: web.Request) -> web.Response:
        """Every service's fault-injection switches (admin view; framework.faults)."""
        return await self.faults_admin.get(request)

    @route("PUT", "/faults/{service}", body=FaultsChange)
    async def put_faults(self, request: web.Request) -> web.Response:
        """Change some of a service's fault-injection switches (admin)."""
        return await self.faults_admin.put(request)

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


def _file(request: web.Request, name: str) -> web.StreamResponse:
    """A file under `static/` with its validators; 304 when the browser holds this version."""
    root = STATIC.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file() or path.suffix not in _TYPES:
        raise web.HTTPNotFound()
    stat = path.stat()
    body, etag = _read(path, stat.st_mtime_ns, stat.st_size)
    headers = {"ETag": etag, "Cache-Control": _CACHE_CONTROL.get(path.suffix, _KEEP)}
    wanted = _etags(request.headers.get("If-None-Match", ""))
    if etag in wanted or "*" in wanted:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=_TYPES[path.suffix], headers=headers)


@lru_cache(maxsize=128)
def _read(path: Path, mtime_ns: int, size: int) -> tuple[bytes, str]:
    """The file's bytes and strong ETag, read once per version of the file (its mtime and size
    are part of the cache key, so an edited file is read again)."""
    body = path.read_bytes()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def _etags(header: str) -> set[str]:
    """The entity tags of an `If-None-Match` header; weak ones compare as strong (RFC 9110
    uses the weak comparison for it)."""
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return tags - {""}


def _shop_graph() -> SystemGraph:
    """The services behind the storefront and the gateways in front of them."""
    return system_graph(backend_services().values())
