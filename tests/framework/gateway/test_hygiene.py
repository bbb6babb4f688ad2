"""The gateway's hygiene rules, one function at a time: path normalisation, the headers an
upstream may see, signed URLs, and the connection guard's limits on a live gateway."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from framework.errors import SignatureError
from framework.gateway.config import RouteConfig, parse_config
from framework.gateway.headers import check_client_headers, forwardable_headers
from framework.gateway.router import RouteTable, normalise_path
from framework.gateway.signing import sign_url, verify_signed_path
from framework.gateway.types import GatewayError
from tests.framework.gateway.conftest import GatewayFactory

# -- paths ---------------------------------------------------------------------------------------

REFUSED_PATHS = [
    "/api/cart/../private",
    "/api/cart/./x",
    "/api/cart/..;/private/x",
    "/api/cart/.;x/y",
    "/api/cart/..;jsessionid=1/x",
    "/api/cart/%2e%2e/x",
    "/api/cart/%2E%2e/x",
    "/api/cart/.%2e/x",
    "/api/cart/%2e%2e;/x",
    "/api/cart/..%3b/x",
    "/api/cart/a%2fb",
    "/api/cart/a%2Fb",
    "/api/cart/a%5cb",
    "/api/cart/a\\b",
    "/api/cart/a%00b",
    "/api/cart/%252e%252e/x",
    "/api/cart/a%252fb",
    "/api/cart/%c0%ae%c0%ae/x",
    "/api/cart/a%0d%0ab",
    "/api//cart",
    "/api/cart/%zz",
    "api/cart",
]


@pytest.mark.parametrize("path", REFUSED_PATHS)
def test_paths_that_could_resolve_elsewhere_are_refused(path: str) -> None:
    with pytest.raises(GatewayError) as caught:
        normalise_path(path)
    assert caught.value.status == 400


def test_paths_are_decoded_exactly_once() -> None:
    assert normalise_path("/api/caf%C3%A9/a%20b/x;v=1/") == ["api", "café", "a b", "x;v=1", ""]
    assert normalise_path("/") == [""]


def _route(**fields: object) -> RouteConfig:
    return RouteConfig.model_validate({"name": "r", "upstream": "u", **fields})


def _upstream_path(table: RouteTable, raw: str) -> str:
    request = make_mocked_request("GET", raw)
    found = table.match(request)
    assert found is not None
    return table.upstream_path(found[0], found[1], request)


def test_strip_prefix_routes_forward_the_rebuilt_path_never_the_raw_one() -> None:
    table = RouteTable([_route(match={"path": "/api/cart", "prefix": True}, strip_prefix="/api")])
    assert _upstream_path(table, "/api/cart/items?x=1") == "/cart/items?x=1"
    # A path parameter the gateway did not see as one reaches the upstream as a literal ';'.
    assert _upstream_path(table, "/api/cart/a;b") == "/cart/a%3Bb"
    assert _upstream_path(table, "/api/cart/caf%c3%a9") == "/cart/caf%C3%A9"
    with pytest.raises(GatewayError) as caught:
        _upstream_path(table, "/api/cart/..;/private/x")
    assert caught.value.status == 400


def test_prefix_routes_never_reach_internal_paths_but_exact_routes_may() -> None:
    table = RouteTable(
        [
            _route(name="metrics", match={"path": "/status/metrics"}, rewrite="/metrics"),
            _route(name="all", match={"path": "/", "prefix": True}),
        ],
        internal_paths=("/metrics", "/docs", "/ready"),
    )
    assert _upstream_path(table, "/status/metrics") == "/metrics"
    assert _upstream_path(table, "/products") == "/products"
    assert _upstream_path(table, "/metricsx") == "/metricsx"
    for internal in ("/metrics", "/docs/openapi.json", "/ready", "/docs/"):
        with pytest.raises(GatewayError) as caught:
            _upstream_path(table, internal)
        assert caught.value.status == 404


# -- headers -------------------------------------------------------------------------------------


def test_forwardable_headers_drop_what_connection_names_hop_by_hop_and_gateway_owned() -> None:
    headers = {
        "Connection": "close, x-user-id, X-Gtxid, traceparent, X-Forwarded-For, x-custom",
        "X-Custom": "1",
        "X-User-Id": "admin",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==",
        "Host": "gw",
        "Content-Length": "3",
        "Expect": "100-continue",
        "Forwarded": "for=1.2.3.4",
        "X-Real-IP": "1.2.3.4",
        "Accept": "application/json",
    }
    kept = forwardable_headers(headers, owned={"x-user-id", "forwarded", "x-real-ip"})
    assert list(kept.items()) == [("Accept", "application/json")]


@pytest.mark.parametrize("name", ["Host", "Authorization", "Cookie", "X-Api-Key"])
def test_repeated_single_headers_are_refused(name: str) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([(name, "a"), (name.lower(), "b")])
    with pytest.raises(GatewayError) as caught:
        check_client_headers(headers, singletons=("x-api-key",))
    assert caught.value.status == 400


def test_headers_that_are_not_utf8_are_refused() -> None:
    undecodable = b"\xff\xfe".decode("utf-8", "surrogateescape")  # how aiohttp keeps them
    for headers in ({"X-Note": undecodable}, {undecodable: "x"}):
        with pytest.raises(GatewayError) as caught:
            check_client_headers(headers)
        assert caught.value.status == 400
    check_client_headers({"X-Note": "café"})


# -- signed URLs ---------------------------------------------------------------------------------


def _parts(url: str) -> tuple[str, dict[str, str]]:
    from yarl import URL

    parsed = URL(url)
    return parsed.raw_path, dict(parsed.query)


def test_a_signed_url_binds_its_method_whole_path_prefix_and_expiry() -> None:
    now = time.time()
    url = sign_url("http://files/blobs", "invoices/17.pdf", "k3y", ttl=60, method="GET", now=now)
    path, query = _parts(url)
    assert path == "/blobs/invoices/17.pdf"
    verify_signed_path(path, query, "k3y", method="GET", prefix="/blobs", now=now)
    refusals = {
        "another file": ("/blobs/invoices/18.pdf", query, "GET", "/blobs", now),
        "another prefix": ("/other/invoices/17.pdf", query, "GET", "/other", now),
        "outside the prefix": ("/blobs/invoices/17.pdf", query, "GET", "/private", now),
        "dot segments": ("/blobs/x/../invoices/17.pdf", query, "GET", "/blobs", now),
        "dots with parameters": ("/blobs/..;/invoices/17.pdf", query, "GET", "/blobs", now),
        "another method": (path, query, "PUT", "/blobs", now),
        "a method rewritten": (path, {**query, "method": "PUT"}, "PUT", "/blobs", now),
        "a later expiry": (path, {**query, "expires": str(int(now) + 999)}, "GET", "/blobs", now),
        "expired": (path, query, "GET", "/blobs", now + 61),
        "a changed signature": (path, {**query, "signature": "0" * 64}, "GET", "/blobs", now),
        "a non-ASCII signature": (path, {**query, "signature": "é" * 64}, "GET", "/blobs", now),
        "no signature": (path, {"expires": query["expires"]}, "GET", "/blobs", now),
    }
    for why, (p, q, method, prefix, at) in refusals.items():
        with pytest.raises(SignatureError):
            verify_signed_path(p, q, "k3y", method=method, prefix=prefix, now=at)
            pytest.fail(f"accepted with {why}")
    with pytest.raises(SignatureError):
        sign_url("http://files/blobs", "../secret", "k3y", ttl=60)


# -- the connection guard, on a live gateway -----------------------------------------------------


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(20):  # a safety net: the answers below come on their own
            return await reader.read()
    finally:
        writer.close()


async def test_the_guard_answers_slow_and_oversized_heads_and_stalled_bodies(
    make_gateway: GatewayFactory,
) -> None:
    upstream_requests: list[str] = []

    async def record(request: web.Request) -> web.Response:
        upstream_requests.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        gateway = await make_gateway(
            f"""
gateway:
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{port: 0}}
  max_body: 1000
  limits: {{header_timeout: 0.5, body_timeout: 0.5, max_header_bytes: 4096, max_headers: 20}}
upstreams:
  u: {{targets: ["http://127.0.0.1:{port}"]}}
routes:
  - {{name: all, match: {{path: /, prefix: true}}, upstream: u}}
"""
        )
        assert gateway.port is not None
        malformed = await _exchange(
            gateway.port, b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Token: secret\r\n\r\n"
        )
        # aiohttp's parser refuses it; the gateway's protocol words the answer (no banner,
        # a problem body, nothing of the request echoed).
        assert malformed.split(b" ", 2)[1] == b"400"
        assert b"application/problem+json" in malformed
        assert b"Server: msa-gateway" in malformed
        assert b"secret" not in malformed
        slow_head, big_head, many_headers, stalled_body, control = await asyncio.gather(
            _exchange(gateway.port, b"GET /slow HTTP/1.1\r\nHost: gw\r\n"),
            _exchange(gateway.port, b"GET /big HTTP/1.1\r\nX-A: " + b"a" * 5000 + b"\r\n\r\n"),
            _exchange(gateway.port, b"GET /many HTTP/1.1\r\n" + b"X-A: a\r\n" * 30 + b"\r\n"),
            _exchange(
                gateway.port,
                b"POST /stalled HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n0123456789",
            ),
            _exchange(gateway.port, b"GET /fine HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
        )
        assert slow_head.startswith(b"HTTP/1.1 408 ")
        assert big_head.startswith(b"HTTP/1.1 431 ")
        assert many_headers.startswith(b"HTTP/1.1 431 ")
        assert stalled_body.startswith(b"HTTP/1.1 408 ")
        assert control.startswith(b"HTTP/1.1 200 ")
        for answer in (slow_head, big_head, stalled_body):
            assert b"application/problem+json" in answer
            assert b"aiohttp" not in answer
            assert b"Python" not in answer
        assert upstream_requests == ["/fine"]
        assert gateway.connections.closed == {
            "capacity": 0,
            "header_timeout": 1,
            "header_size": 2,
        }
        assert 'gateway_connections_closed_total{reason="header_size"} 2.0' in (
            gateway.metrics.render().decode()
        )
    finally:
        await runner.cleanup()


def test_limits_have_safe_defaults() -> None:
    limits = parse_config("{}").gateway.limits
    assert 0 < limits.header_timeout <= 60
    assert 0 < limits.body_timeout <= 60
    assert limits.max_header_bytes <= 65_536
    assert limits.max_headers <= 128
