"""Hostile requests against the gateway: none reaches a route it does not name, none gets a 5xx.

Requests are written on a raw socket, so no client library tidies the path first.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.framework.gateway.conftest import ADMIN_HASH, GatewayFactory, Upstream

API_KEY_HASH = "sha256:" + "0" * 64  # no key hashes to this: the private route stays closed


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{extra}\r\n".encode()


@pytest.fixture
async def gateway_port(make_gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> int:
    a, c = upstreams["a"], upstreams["c"]
    gateway = await make_gateway(
        f"""
gateway:
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
  max_body: 1024
auth:
  api_keys: [{{id: ops, hash: "{API_KEY_HASH}"}}]
upstreams:
  public: {{targets: ["{a.url}"]}}
  private: {{targets: ["{c.url}"]}}
routes:
  - name: private
    match: {{path: /private, prefix: true}}
    auth: api_key
    upstream: private
  - name: public
    match: {{path: /public, prefix: true}}
    upstream: public
    rewrite: "/public/{{tail}}"
  - name: orders
    match: {{methods: [POST], path: /orders}}
    upstream: public
"""
    )
    assert gateway.port is not None
    return gateway.port


TRAVERSALS = [
    "/public/../private/secret",
    "/public/%2e%2e/private/secret",
    "/public/%2E%2E/private/secret",
    "/public/.%2e/private/secret",
    "/public/%2e./private/secret",
    "/public/..%2fprivate/secret",
    "/public/%2e%2e%2fprivate%2fsecret",
    "/public/..%5cprivate%5csecret",
    "/public/..\\private\\secret",
    "/public/./../private/secret",
    "/public//../private/secret",
    "/public/%252e%252e/private/secret",
    "/public/%00/../private",
    "/public/%0d%0aX-Injected:%201",
    "/private/../public/x",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_path_traversal_never_reaches_another_route(gateway_port: int, path: str) -> None:
    status, _, body = await raw_request(gateway_port, get(path))
    assert status < 500, body
    if status == 200:
        echoed = orjson.loads(body)
        assert echoed["name"] == "a"  # only the public upstream, never the private one
        assert echoed["path"].startswith("/public/")
        assert ".." not in echoed["path"].replace("%252e%252e", "")
        assert "x-injected" not in {k.lower() for k in echoed["headers"]}
    else:
        assert status in (400, 401, 404), (status, body)


async def test_header_injection_and_smuggling_attempts_are_refused(gateway_port: int) -> None:
    attempts = [
        get("/public/x?q=%0d%0aX-Injected:%201"),
        b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-A: one\r\n two\r\nConnection: close\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-A: a\rX-Injected: 1\r\nConnection: close\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
    ]
    for request in attempts:
        status, _, body = await raw_request(gateway_port, request)
        assert status < 500, (request, body)
        if status == 200:
            echoed = orjson.loads(body)
            assert "x-injected" not in {k.lower() for k in echoed["headers"]}


async def test_oversized_and_malformed_bodies_get_4xx(gateway_port: int) -> None:
    big = b"x" * 5000
    status, _, _ = await raw_request(
        gateway_port,
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(big)}\r\nConnection: close\r\n\r\n".encode()
        + big,
    )
    assert status == 413
    chunked = b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    status, _, _ = await raw_request(
        gateway_port,
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunked,
    )
    assert status == 413
    status, _, _ = await raw_request(
        gateway_port,
        b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\nConnection: close\r\n\r\n",
    )
    assert status == 400


async def test_a_private_route_needs_its_credential(gateway_port: int) -> None:
    status, headers, _ = await raw_request(gateway_port, get("/private/secret"))
    assert status == 401
    assert "www-authenticate" in headers
    status, _, _ = await raw_request(gateway_port, get("/private/secret", "x-api-key: guess"))
    assert status == 401
    # Spoofed identity headers from the client do not open anything either.
    status, _, _ = await raw_request(
        gateway_port, get("/private/secret", "x-user-id: admin", "x-user-roles: admin")
    )
    assert status == 401
