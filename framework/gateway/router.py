"""Route matching: method, path (parameters, prefixes), host and headers; first match wins.

    table = RouteTable(config.routes)
    found = table.match(request)        # (RouteConfig, {"id": "42"}) or None
    table.upstream_path(route, params, request)   # "/products/42?lang=en"

Paths are checked before anything matches them: a path with a `..` or `.` segment (also
percent-encoded, e.g. `%2e%2e`), an encoded slash or backslash (`%2f`, `%5c`), a backslash,
or a control character is refused with 400, so no spelling of a path reaches a route (or an
upstream file) it does not name. Parameters match one segment (`{id}`); a prefix route puts the
rest of the path in `{tail}`. The upstream path is built from the route's `rewrite` template
with each parameter percent-encoded again, never from the raw client path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from framework.gateway.config import RouteConfig
from framework.gateway.types import GatewayError

__all__ = ["RouteTable", "check_path", "fill_template"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BAD_ENCODED = re.compile(r"%(2[fF]|5[cC]|00|0[aAdD])")
_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2[eE]){1,2}(/|$)")


def check_path(raw_path: str) -> None:
    """Refuse paths that could escape their route: dot segments, encoded separators,
    backslashes and control characters (raises `GatewayError` 400)."""
    if not raw_path.startswith("/"):
        raise GatewayError(400, "Bad Request", "the path must start with '/'")
    if "\\" in raw_path or _BAD_ENCODED.search(raw_path):
        raise GatewayError(400, "Bad Request", "the path holds an encoded or backslash separator")
    if _DOT_SEGMENT.search(raw_path.replace("%2E", "%2e")) or "/%2e" in raw_path.lower():
        raise GatewayError(400, "Bad Request", "the path holds a '.' or '..' segment")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw_path):
        raise GatewayError(400, "Bad Request", "the path holds control characters")


@dataclass(frozen=True, slots=True)
class _Compiled:
    route: RouteConfig
    pattern: re.Pattern[str]
    methods: frozenset[str]
    host: str | None
    host_suffix: str | None
    headers: tuple[tuple[str, str], ...]
    rewrite: str | None


def _compile_path(path: str, prefix: bool) -> re.Pattern[str]:
    out, position = "", 0
    for match in _PARAM.finditer(path):
        out += re.escape(path[position : match.start()])
        out += f"(?P<{match.group(1)}>[^/]+)"
        position = match.end()
    out += re.escape(path[position:].rstrip("/") if prefix else path[position:])
    if prefix:
        out += r"(?:/(?P<tail>.*))?"
    return re.compile(out + r"\Z")


class RouteTable:
    """The routes of one config, compiled once; `match` returns the first that fits."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)
        self._compiled = [
            _Compiled(
                route=route,
                pattern=_compile_path(route.match.path, route.match.prefix),
                methods=frozenset(route.match.methods),
                host=(route.match.host or "").lower() or None,
                host_suffix=(
                    route.match.host[1:].lower()
                    if route.match.host and route.match.host.startswith("*.")
                    else None
                ),
                headers=tuple((k.lower(), v) for k, v in route.match.headers.items()),
                rewrite=route.rewrite,
            )
            for route in routes
        ]

    def match(self, request: web.Request) -> tuple[RouteConfig, dict[str, str]] | None:
        """The first route matching the request and its path parameters (decoded), or None.
        Raises `GatewayError` 400 for paths refused by `check_path`."""
        raw_path = request.raw_path.split("?", 1)[0]
        check_path(raw_path)
        path = request.path
        method = request.method
        if method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            method = request.headers["Access-Control-Request-Method"].upper()  # a preflight
        host = (request.host or "").split(":", 1)[0].lower()
        headers = request.headers
        method_mismatch = False
        for compiled in self._compiled:
            found = compiled.pattern.match(path)
            if found is None:
                continue
            if compiled.host_suffix is not None:
                if not host.endswith(compiled.host_suffix):
                    continue
            elif compiled.host is not None and host != compiled.host:
                continue
            if any(headers.get(name) != value for name, value in compiled.headers):
                continue
            if compiled.methods and method not in compiled.methods:
                method_mismatch = True
                continue
            params = {k: v for k, v in found.groupdict().items() if v is not None}
            return compiled.route, params
        if method_mismatch:
            raise GatewayError(405, "Method Not Allowed", f"{method} is not allowed on {path}")
        return None

    def upstream_path(
        self, route: RouteConfig, params: dict[str, str], request: web.Request
    ) -> str:
        """The path (and query) to send upstream: the rewrite template filled with the
        parameters percent-encoded, or the request path minus `strip_prefix`."""
        if route.rewrite is not None:
            path = fill_template(route.rewrite, params)
        else:
            path = request.rel_url.raw_path
            if route.strip_prefix and path.startswith(route.strip_prefix):
                path = path[len(route.strip_prefix) :] or "/"
        query = request.rel_url.raw_query_string
        return f"{path}?{query}" if query else path


def fill_template(template: str, params: Mapping[str, str]) -> str:
    """A path template (`/products/{id}`) with each parameter percent-encoded."""
    return _PARAM.sub(lambda m: _encode_param(m.group(1), params), template)


def _encode_param(name: str, params: Mapping[str, str]) -> str:
    value = params.get(name, "")
    if name == "tail":  # keeps its slashes; each segment encoded on its own
        return "/".join(quote(segment, safe="") for segment in value.split("/"))
    return quote(value, safe="")
