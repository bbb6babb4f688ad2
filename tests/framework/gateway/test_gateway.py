"""The gateway end to end: real upstream processes, a gateway built from YAML, HTTP clients.

Routing, rewriting, ids, load balancing, auth hand-off, QoS, transformation, aggregation,
caching, CORS, gzip, signed URLs, the admin API and hot reload.
"""

from __future__ import annotations

import asyncio
import gzip as gzip_module
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from framework.gateway.app import Gateway
from framework.gateway.config import GatewayConfigError, parse_config
from framework.gateway.signing import SignatureError, verify_signed_path
from tests.framework.gateway.conftest import (
    ADMIN_HASH,
    ADMIN_TOKEN,
    GatewayFactory,
    Upstream,
    admin,
    base,
    eventually,
)

HEAD = f"""
gateway:
  name: test
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
  gzip_min_size: 64
"""


def pool(*members: Upstream, extra: str = "") -> str:
    targets = ", ".join(f'"{m.url}"' for m in members)
    return f"{{targets: [{targets}]{extra}}}"


async def get_json(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_routes_rewrite_paths_and_balance_over_the_pool(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    a, b = upstreams["a"], upstreams["b"]
    gateway = await make_gateway(
        HEAD
        + f"""
upstreams:
  items: {pool(a, b)}
routes:
  - name: item
    match: {{methods: [GET], path: "/api/items/{{id}}"}}
    upstream: items
    rewrite: "/items/{{id}}"
  - name: files
    match: {{path: /static, prefix: true}}
    upstream: items
    rewrite: "/assets/{{tail}}"
  - name: cookies
    match: {{methods: [GET], path: /cookies}}
    upstream: items
"""
    )
    served = []
    for _ in range(6):
        status, body, headers = await get_json(http, f"{base(gateway)}/api/items/42?lang=en")
        assert status == 200
        assert body["path"] == "/items/42"
        assert body["query"] == "lang=en"
        served.append(body["name"])
        assert headers["x-gtxid"] == body["headers"]["x-gtxid"]
        assert headers["x-request-id"] == body["headers"]["x-request-id"]
    assert served.count("a") == served.count("b") == 3  # round robin

    status, body, headers = await get_json(
        http,
        f"{base(gateway)}/api/items/7",
        headers={
            "x-gtxid": "txn-123",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "Connection": "keep-alive, x-secret",
            "x-secret": "hop-by-hop by Connection",
        },
    )
    assert body["headers"]["x-gtxid"] == "txn-123" == headers["x-gtxid"]
    assert "x-secret" not in body["headers"]  # named by Connection: hop-by-hop, not forwarded
    assert body["headers"]["x-gtxid"] == "txn-123"  # one value, whatever case the client used
    upstream_trace = body["headers"]["traceparent"].split("-")
    assert upstream_trace[1] == "0af7651916cd43dd8448eb211c80319c"  # same trace
    assert upstream_trace[2] != "b7ad6b7169203331"  # a new span for the hop
    assert "x-forwarded-for" in body["headers"]

    async with http.get(f"{base(gateway)}/cookies") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]

    async with http.get(f"{base(gateway)}/static/x", headers={"X-Gtxid": "CASE-1"}) as response:
        echoed = await response.json()
    assert echoed["headers"]["x-gtxid"] == "CASE-1"

    status, body, _ = await get_json(http, f"{base(gateway)}/static/css/site.css")
    assert (status, body["path"]) == (200, "/assets/css/site.css")

    status, problem, _ = await get_json(http, f"{base(gateway)}/nowhere")
    assert status == 404
    assert problem["status"] == 404
    async with http.post(f"{base(gateway)}/api/items/1") as response:
        assert response.status == 405


async def test_host_and_header_routing(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    a, b, c = upstreams["a"], upstreams["b"], upstreams["c"]
    gateway = await make_gateway(
        HEAD
        + f"""
upstreams:
  eu: {pool(a)}
  us: {pool(b)}
  admin: {pool(c)}
routes:
  - name: admin-host
    match: {{path: /, prefix: true, host: "admin.example.com"}}
    upstream: admin
  - name: eu
    match: {{path: /api, prefix: true, headers: {{x-region: eu}}}}
    upstream: eu
  - name: default
    match: {{path: /api, prefix: true}}
    upstream: us
"""
    )
    url = f"{base(gateway)}/api/x"
    assert (await get_json(http, url, headers={"x-region": "eu"}))[1]["name"] == "a"
    assert (await get_json(http, url, headers={"x-region": "us"}))[1]["name"] == "b"
    assert (await get_json(http, url))[1]["name"] == "b"
    assert (await get_json(http, url, headers={"Host": "admin.example.com"}))[1]["name"] == "c"


async def test_transformation_field_mapping_and_json_to_xml(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    a = upstreams["a"]
    gateway = await make_gateway(
        HEAD
        + f"""
upstreams:
  orders: {pool(a)}
routes:
  - name: compact
    match: {{methods: [GET], path: /mobile/order}}
    upstream: orders
    rewrite: /json
    transform:
      response:
        - rename: {{from: customer.name, to: customer_name}}
        - drop: customer
        - drop: served_by
  - name: as-xml
    match: {{methods: [GET], path: /legacy/order}}
    upstream: orders
    rewrite: /json
    transform: {{response_format: negotiate}}
  - name: xml-in
    match: {{methods: [POST], path: /orders}}
    upstream: orders
    transform:
      request: [{{rename: {{from: qty, to: quantity}}}}]
      request_format: application/json
"""
    )
    status, body, _ = await get_json(http, f"{base(gateway)}/mobile/order")
    assert status == 200
    assert body == {"order_id": "o-1", "total": 1250, "customer_name": "Ada"}

    async with http.get(
        f"{base(gateway)}/legacy/order", headers={"Accept": "application/xml"}
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/xml"
        assert "<order_id>o-1</order_id>" in await response.text()

    xml = b"<order><sku>mug</sku><qty>2</qty></order>"
    async with http.post(
        f"{base(gateway)}/orders", data=xml, headers={"Content-Type": "application/xml"}
    ) as response:
        echoed = await response.json()
    assert echoed["headers"]["content-type"] == "application/json"
    assert echoed["body"] == '{"sku":"mug","quantity":"2"}'

    async with http.post(
        f"{base(gateway)}/orders", data=b"<order><qty>", headers={"Content-Type": "application/xml"}
    ) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"


async def test_aggregation_merges_branches_and_marks_partial_results(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    a, b = upstreams["a"], upstreams["b"]
    gateway = await make_gateway(
        HEAD
        + f"""
upstreams:
  catalog: {pool(a)}
  stock: {pool(b)}
routes:
  - name: product-page
    match: {{methods: [GET], path: "/page/{{id}}"}}
    aggregate:
      branches:
        - {{name: product, upstream: catalog, path: "/products/{{id}}", required: true}}
        - {{name: stock, upstream: stock, path: "/stock/{{id}}"}}
  - name: slow-page
    match: {{methods: [GET], path: "/slow-page/{{id}}"}}
    aggregate:
      branches:
        - {{name: product, upstream: catalog, path: "/products/{{id}}"}}
        - {{name: stock, upstream: stock, path: "/slow?ms=2000", timeout: 0.3}}
  - name: broken-page
    match: {{methods: [GET], path: "/broken-page"}}
    aggregate:
      branches:
        - {{name: product, upstream: catalog, path: "/status/500", required: true}}
        - {{name: stock, upstream: stock, path: "/stock/1"}}
  - name: late-page
    match: {{methods: [GET], path: "/late-page"}}
    aggregate:
      branches:
        - {{name: product, upstream: catalog, path: "/slow?ms=2000", timeout: 0.3, required: true}}
  - name: missing-page
    match: {{methods: [GET], path: "/missing-page"}}
    aggregate:
      branches:
        - {{name: product, upstream: catalog, path: "/status/404", required: true}}
        - {{name: stock, upstream: stock, path: "/stock/1"}}
"""
    )
    status, body, headers = await get_json(http, f"{base(gateway)}/page/9")
    assert status == 200
    assert body["product"]["path"] == "/products/9"
    assert body["stock"]["name"] == "b"
    assert "x-gateway-partial" not in headers

    # The stock branch answers after 2 s; its 0.3 s timeout leaves it out of the page.
    status, body, headers = await get_json(http, f"{base(gateway)}/slow-page/9")
    assert status == 200
    assert body["stock"] is None
    assert body["_partial"] == ["stock"]
    assert headers["x-gateway-partial"] == "stock"

    status, _, _ = await get_json(http, f"{base(gateway)}/broken-page")
    assert status == 502

    # A required part that does not answer in time is a 504 (one shed by its pool, a 503).
    status, _, _ = await get_json(http, f"{base(gateway)}/late-page")
    assert status == 504

    # A required part that refuses the request (an unknown id) makes that the answer.
    status, body, _ = await get_json(http, f"{base(gateway)}/missing-page")
    assert status == 404
    assert body["detail"] == "required part 'product': answered 404"


async def test_get_responses_are_cached_and_cors_and_gzip_apply(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    c = upstreams["c"]
    gateway = await make_gateway(
        HEAD.replace(
            "  gzip_min_size: 64",
            '  gzip_min_size: 64\n  cors: {origins: ["https://shop.example"]}',
        )
        + f"""
upstreams:
  catalog: {pool(c)}
routes:
  - name: products
    match: {{methods: [GET], path: /products}}
    upstream: catalog
    cache: {{ttl: 30}}
"""
    )
    async with http.get(f"{c.url}/hits") as response:
        before = (await response.json())["hits"]
    first = await get_json(http, f"{base(gateway)}/products?page=1")
    second = await get_json(http, f"{base(gateway)}/products?page=1")
    other = await get_json(http, f"{base(gateway)}/products?page=2")
    async with http.get(f"{c.url}/hits") as response:
        after = (await response.json())["hits"]
    assert after - before == 2  # page=1 once, page=2 once
    assert first[2]["X-Cache"] == "MISS"
    assert second[2]["X-Cache"] == "HIT"
    assert second[1] == first[1]
    assert other[2]["X-Cache"] == "MISS"

    async with http.options(
        f"{base(gateway)}/products",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"},
    ) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    async with http.get(
        f"{base(gateway)}/products?page=3",
        headers={"Accept-Encoding": "gzip"},
        auto_decompress=False,
    ) as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert b'"name":"c"' in gzip_module.decompress(raw)


async def test_signed_urls_send_large_files_around_the_gateway(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        HEAD.replace("  gzip_min_size: 64", "  signing_key: k3y")
        + """
routes:
  - name: downloads
    match: {methods: [GET, PUT], path: /files, prefix: true}
    files: {base_url: "http://files.internal/blobs", ttl: 60}
"""
    )
    status, body, _ = await get_json(http, f"{base(gateway)}/files/invoices/17.pdf")
    assert status == 200
    url = URL(body["url"])
    assert url.host == "files.internal"
    assert url.path == "/blobs/invoices/17.pdf"
    verify_signed_path(url.path, dict(url.query), "k3y", prefix="/blobs")
    with pytest.raises(SignatureError, match="does not match"):
        verify_signed_path("/blobs/invoices/18.pdf", dict(url.query), "k3y", prefix="/blobs")
    with pytest.raises(SignatureError, match="expired"):
        verify_signed_path(
            url.path, dict(url.query), "k3y", prefix="/blobs", now=time.time() + 3600
        )


async def test_admin_api_needs_its_token_and_reports_routes_upstreams_and_metering(
    make_gateway: GatewayFactory, upstreams: dict[str, Upstream], http: aiohttp.ClientSession
) -> None:
    a = upstreams["a"]
    gateway = await make_gateway(
        HEAD
        + f"""
upstreams:
  items: {pool(a)}
routes:
  - name: item
    match: {{path: /items, prefix: true}}
    upstream: items
"""
    )
    await get_json(http, f"{base(gateway)}/items/1")
    async with http.get(f"{admin(gateway)}/admin/routes") as response:
        assert response.status == 401
    async with http.get(
        f"{admin(gateway)}/admin/routes", headers={"Authorization": "Bearer wrong"}
    ) as response:
        assert response.status == 401
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, routes, _ = await get_json(http, f"{admin(gateway)}/admin/routes", headers=auth)
    assert status == 200
    assert [r["name"] for r in routes["routes"]] == ["item"]
    status, pools, _ = await get_json(http, f"{admin(gateway)}/admin/upstreams", headers=auth)
    assert "items" in pools
    status, metering, _ = await get_json(http, f"{admin(gateway)}/admin/metering", headers=auth)
    assert status == 200
    assert metering  # per-client counters exist after one call
    async with http.get(f"{admin(gateway)}/metrics") as response:
        text = await response.text()
    assert "gateway_requests_total" in text


async def test_hot_reload_swaps_configs_without_dropping_requests_and_refuses_bad_ones(
    upstreams: dict[str, Upstream], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a, b = upstreams["a"], upstreams["b"]
    path = tmp_path / "gateway.yaml"
    writes = itertools.count(1)

    def write(target: Upstream, extra_route: str = "") -> None:
        path.write_text(
            HEAD
            + f"""
upstreams:
  main: {pool(target)}
routes:
  - name: hold
    match: {{path: /hold, prefix: true}}
    upstream: main
  - name: who
    match: {{path: /who}}
    upstream: main
{extra_route}"""
        )
        # The watcher reloads when the modification time changes: make it change on every write
        # (two writes within one tick of the file system's clock would look the same).
        version = next(writes)
        os.utime(path, (version, version))

    write(a)
    gateway = Gateway.from_file(path, watch_interval=0.1)
    await gateway.start()
    try:
        assert (await get_json(http, f"{base(gateway)}/who"))[1]["name"] == "a"
        # A request in flight on the old config, held by the upstream...
        held = asyncio.create_task(get_json(http, f"{base(gateway)}/hold/reload"))
        await eventually(lambda: holds(http, a, "reload"))
        write(b)  # ...while the file changes: the watcher reloads
        await eventually(lambda: serves(http, gateway, "b"))
        async with http.post(f"{a.url}/release/reload") as response:
            assert response.status == 200
        status, body, _ = await held
        assert (status, body["name"]) == (200, "a")  # finished on the old config

        # A broken file is refused: the previous config keeps serving.
        path.write_text(HEAD + "\nroutes:\n  - name: x\n    match: {path: nope}\n")
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.post(f"{admin(gateway)}/admin/reload", headers=auth) as response:
            assert response.status == 400
            problems = (await response.json())["problems"]
        assert any("routes[0].match.path" in p for p in problems)
        assert (await get_json(http, f"{base(gateway)}/who"))[1]["name"] == "b"

        write(b, "  - name: new\n    match: {path: /new}\n    upstream: main\n")
        async with http.post(f"{admin(gateway)}/admin/reload", headers=auth) as response:
            assert response.status == 200
        assert (await get_json(http, f"{base(gateway)}/new"))[0] == 200
    finally:
        async with http.post(f"{a.url}/release/reload"):  # a no-op unless an assertion failed
            pass
        await gateway.stop()


async def holds(http: aiohttp.ClientSession, upstream: Upstream, key: str) -> bool:
    async with http.get(f"{upstream.url}/holding") as response:
        held: list[str] = await response.json()
    return key in held


async def serves(http: aiohttp.ClientSession, gateway: Gateway, name: str) -> bool:
    _, body, _ = await get_json(http, f"{base(gateway)}/who")
    return bool(body["name"] == name)


def test_config_errors_name_the_file_the_path_and_the_reason() -> None:
    with pytest.raises(GatewayConfigError) as raised:
        parse_config(
            """
upstreams:
  catalog: {targets: ["http://x"], balance: random}
routes:
  - name: a
    match: {path: /a}
    upstream: catalgo
""",
            source="web.yaml",
        )
    text = str(raised.value)
    assert "web.yaml: upstreams.catalog.balance" in text
    with pytest.raises(GatewayConfigError, match="no upstream named 'catalgo'"):
        parse_config(
            "upstreams: {catalog: {targets: ['http://x']}}\n"
            "routes: [{name: a, match: {path: /a}, upstream: catalgo}]",
            source="web.yaml",
        )
    with pytest.raises(GatewayConfigError, match="MISSING_SECRET is not set"):
        parse_config("gateway: {signing_key: '${MISSING_SECRET}'}", env={})
    config = parse_config("gateway: {signing_key: '${SECRET:-dev}'}", env={})
    assert config.gateway.signing_key == "dev"


@pytest.mark.parametrize("profile", ["web", "mobile", "internal"])
def test_the_shop_gateway_profiles_validate(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends for frontends: one program, three configs."""
    from framework.cli import main

    monkeypatch.setenv("FILES_SIGNING_KEY", "a-real-secret-from-the-environment")
    path = Path(__file__).resolve().parents[3] / "example_shop" / "gateway" / f"{profile}.yaml"
    assert main(["gateway", "--check", str(path)]) == 0


def test_a_profile_refuses_its_development_secret_unless_told(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The web profile falls back to a public `dev-only` signing key: that is refused at load
    (so `msa gateway` does not start) unless the deployment says it is for development."""
    from framework.cli import main

    path = Path(__file__).resolve().parents[3] / "example_shop" / "gateway" / "web.yaml"
    monkeypatch.delenv("FILES_SIGNING_KEY", raising=False)
    monkeypatch.delenv("GATEWAY_DEVELOPMENT", raising=False)
    assert main(["gateway", "--check", str(path)]) == 1
    assert "gateway.signing_key: a built-in development secret" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_DEVELOPMENT", "true")
    assert main(["gateway", "--check", str(path)]) == 0
    with pytest.raises(GatewayConfigError, match="hs256_secret: a built-in development"):
        parse_config(
            "auth: {jwt: {issuer: i, audience: a, algorithms: [HS256],"
            " hs256_secret: dev-only-0123456789abcdef0123456789abcdef}}",
            env={},
        )


def test_msa_gateway_check_reports_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from framework.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [{name: x, match: {path: /x}, upstream: missing}]\n")
    assert main(["gateway", "--check", str(bad)]) == 1
    assert "no upstream named 'missing'" in capsys.readouterr().err


async def test_probes_answer_on_the_admin_port_without_a_token_and_ready_drops_on_stop(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(HEAD)
    assert (await get_json(http, f"{admin(gateway)}/alive"))[0] == 200
    assert (await get_json(http, f"{admin(gateway)}/ready"))[0] == 200
    gateway._stopping = True  # what stop() sets first, before it drains
    assert (await get_json(http, f"{admin(gateway)}/ready"))[0] == 503
    assert (await get_json(http, f"{admin(gateway)}/alive"))[0] == 200
    gateway._stopping = False


def test_a_gateway_process_settles_its_garbage_collector() -> None:
    """What exists once a gateway has started is frozen out of the collector's sight and the
    young generation is collected less often (in a process of its own: freezing is for good)."""
    program = (
        "import gc\n"
        "from framework.gateway.app import settle_garbage_collector\n"
        "made = [[n] for n in range(1000)]\n"
        "settle_garbage_collector(young=5000)\n"
        "print(gc.get_freeze_count() >= 1000, gc.get_threshold()[0], gc.get_count()[0] < 100)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "5000", "True"]
