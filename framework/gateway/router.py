"""Route matching: method, path (parameters, prefixes), host and headers; first match wins.

    table = RouteTable(config.routes, internal_paths=("/metrics",))
    found = table.match(request)        # (RouteConfig, {"id": "42"}) or None
    table.upstream_path(route, params, request)   # "/products/42?lang=en"

Every path is normalised once, before matching and before anything is forwarded
(`normalise_path`): each segment is percent-decoded exactly once and must then be UTF-8 text
without `/`, `\\`, control characters or a further escape of a separator (`%252f`); no segment
may be `.` or `..`, also with path parameters (`..;x`, which Tomcat, Jetty and Spring resolve
as `..`); no segment may be empty except the last. Anything else is refused with 400, so no
spelling of a path reaches a route (or an upstream file) it does not name, on any route kind.

Routes match the decoded path. Parameters match one segment (`{id}`); a prefix route puts the
rest of the path in `{tail}`. The upstream path is always rebuilt from the decoded segments,
each percent-encoded again (`;` included, so an upstream never reads a path parameter the
gateway did not see) - from the route's `rewrite` template, or the request's path minus
`strip_prefix` - never passed on raw. A prefix route never forwards to an upstream's internal
paths (`internal_paths`: metrics, probes, docs): those need a route that names them exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from aiohttp import web

from framework.gateway.config import RouteConfig
from framework.gateway.types import GatewayError

__all__ = ["RouteTable", "check_path", "fill_template", "normalise_path"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPED_SEPARATOR = re.compile(r"%(2[eEfF]|5[cC]|3[bB]|25|00)")
_SAFE = "!$&'()*+,=:@~"
"""Characters left unencoded in a rebuilt segment: RFC 3986 pchar sub-delims, minus `;`."""
_PLAIN = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,=:@-]*)+")
"""A path of segments that decode and re-encode to themselves (no `%`, no `;`): most paths,
checked for empty and dot segments only, and forwarded as they came."""


def _bad(detail: str) -> GatewayError:
    return GatewayError(400, "Bad Request", detail)


def normalise_path(raw_path: str) -> list[str]:
    """The decoded segments of `raw_path` (without its query), or `GatewayError` 400.

    >>> normalise_path("/api/caf%C3%A9/x%20y/")
    ['api', 'café', 'x y', '']
    """
    if _PLAIN.fullmatch(raw_path):
        plain = raw_path[1:].split("/")
        for index, part in enumerate(plain):
            if not part and index < len(plain) - 1:
                raise _bad("the path holds an empty segment")
            if part in (".", ".."):
                raise _bad("the path holds a '.' or '..' segment")
        return plain
    if not raw_path.startswith("/"):
        raise _bad("the path must start with '/'")
    if "\\" in raw_path:
        raise _bad("the path holds a backslash")
    if _ESCAPE.search(raw_path):
        raise _bad("the path holds a malformed percent-escape")
    raw_segments = raw_path[1:].split("/")
    segments: list[str] = []
    for index, raw in enumerate(raw_segments):
        if not raw and index < len(raw_segments) - 1:
            raise _bad("the path holds an empty segment")
        try:
            segment = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("the path is not UTF-8") from None
        if "/" in segment or "\\" in segment:
            raise _bad("the path holds an encoded or backslash separator")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in segment):
            raise _bad("the path holds control characters")
        if _ESCAPED_SEPARATOR.search(segment):
            raise _bad("the path holds a doubly encoded character")
        if segment.split(";", 1)[0] in (".", ".."):
            raise _bad("the path holds a '.' or '..' segment")
        segments.append(segment)
    return segments


def check_path(raw_path: str) -> None:
    """Refuse a path `normalise_path` refuses (raises `GatewayError` 400)."""
    normalise_path(raw_path)


def _encode(segments: Sequence[str]) -> str:
    return "/" + "/".join(quote(segment, safe=_SAFE) for segment in segments)


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

    def __init__(self, routes: Sequence[RouteConfig], *, internal_paths: Sequence[str] = ()):
        self.routes = tuple(routes)
        self.internal_paths = tuple(p.rstrip("/") for p in internal_paths)
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
        self._by_host = any(c.host is not None or c.host_suffix for c in self._compiled)

    def match(self, request: web.Request) -> tuple[RouteConfig, dict[str, str]] | None:
        """The first route matching the request and its path parameters (decoded), or None.
        Raises `GatewayError` 400 for paths refused by `check_path`."""
        path = "/" + "/".join(normalise_path(request.raw_path.split("?", 1)[0]))
        method = request.method
        if method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            method = request.headers["Access-Control-Request-Method"].upper()  # a preflight
        host = (request.host or "").split(":", 1)[0].lower() if self._by_host else ""
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
            if compiled.headers and any(
                headers.get(name) != value for name, value in compiled.headers
            ):
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
        parameters percent-encoded, or the request's normalised path minus `strip_prefix`.
        Raises `GatewayError` 404 when a prefix route would reach an internal path."""
        if route.rewrite is not None:
            path = fill_template(route.rewrite, params)
        else:
            raw_path = request.raw_path.split("?", 1)[0]
            segments = normalise_path(raw_path)
            strip = [part for part in (route.strip_prefix or "").split("/") if part]
            if strip and segments[: len(strip)] == strip:
                segments = segments[len(strip) :] or [""]
            elif _PLAIN.fullmatch(raw_path):
                segments = []  # re-encoding would give it back as it is
            path = _encode(segments) if segments else raw_path
        if route.match.prefix and self._internal(path):
            raise GatewayError(404, "Not Found", f"no route for {request.method} {request.path}")
        query = request.rel_url.raw_query_string
        return f"{path}?{query}" if query else path

    def _internal(self, path: str) -> bool:
        decoded = "/" + "/".join(normalise_path(path))
        return any(
            decoded == internal or decoded.startswith(internal + "/")
            for internal in self.internal_paths
        )


def fill_template(template: str, params: Mapping[str, str]) -> str:
    """A path template (`/products/{id}`) with each parameter percent-encoded."""
    return _PARAM.sub(lambda m: _encode_param(m.group(1), params), template)


def _encode_param(name: str, params: Mapping[str, str]) -> str:
    value = params.get(name, "")
    if name == "tail":  # keeps its slashes; each segment encoded on its own
        return "/".join(quote(segment, safe=_SAFE) for segment in value.split("/"))
    return quote(value, safe=_SAFE)
