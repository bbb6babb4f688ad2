"""The storefront's files over HTTP: validators and caching, the product pictures, the icon,
what is refused; and the system drawing of `/graph`.

Most requests go to the storefront service itself (the web gateway's rate limit would count
them against the anonymous browsers of the other tests); one of each kind goes through the
gateway too, which passes validators and 304s on."""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from example_shop.catalog.seed import DEMO_PRODUCTS
from example_shop.shop import Shop
from example_shop.storefront import service as storefront_service
from example_shop.storefront.artwork import PRODUCTS_DIR, picture_svg
from tests.example_shop.browsing import ADMIN, api_session

on_the_shops_loop = pytest.mark.asyncio(loop_scope="package")  # the loop of `embedded_shop`

SVG = "{http://www.w3.org/2000/svg}"


def storefront(shop: Shop) -> str:
    return f"http://127.0.0.1:{shop.ports['storefront']}/"


@on_the_shops_loop
@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("", "text/html"),
        ("static/app.js", "text/javascript"),
        ("static/admin.js", "text/javascript"),
        ("static/style.css", "text/css"),
    ],
)
async def test_the_page_is_revalidated_with_its_etag(
    embedded_shop: Shop, path: str, content_type: str
) -> None:
    base = storefront(embedded_shop)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + path) as response:
            assert response.status == 200
            assert response.content_type == content_type
            assert response.headers["Cache-Control"] == "no-cache"
            etag = response.headers["ETag"]
            body = await response.read()
        assert re.fullmatch(r'(W/)?"[0-9a-f]{32}"', etag)  # weak: the gateway compressed it
        assert body

        strong = etag.removeprefix("W/")
        for validator in (strong, f"W/{strong}", f'"other", {etag}', "*"):
            headers = {"If-None-Match": validator}
            async with http.get(base + path, headers=headers) as response:
                assert response.status == 304, validator
                assert await response.read() == b""
                assert response.headers["ETag"].removeprefix("W/") == strong
        async with http.get(base + path, headers={"If-None-Match": '"old"'}) as r:
            assert r.status == 200
            assert await r.read() == body


@on_the_shops_loop
async def test_the_gateway_passes_validators_and_304s_on(embedded_shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("", "static/products/p-001.svg"):
            async with http.get(embedded_shop.url + path) as response:
                assert response.status == 200
                etag = response.headers["ETag"]
            headers = {"If-None-Match": etag}
            async with http.get(embedded_shop.url + path, headers=headers) as response:
                assert response.status == 304, path


@on_the_shops_loop
async def test_every_product_has_its_own_picture_kept_for_a_day(embedded_shop: Shop) -> None:
    etags = set()
    async with aiohttp.ClientSession() as http:
        for product in DEMO_PRODUCTS:
            async with http.get(storefront(embedded_shop) + product["image"][1:]) as response:
                assert response.status == 200, product["image"]
                assert response.content_type == "image/svg+xml"
                assert response.headers["Cache-Control"] == "public, max-age=86400"
                etags.add(response.headers["ETag"])
                drawing = ElementTree.fromstring(await response.read())
            assert drawing.tag == f"{SVG}svg"
            assert drawing.findtext(f"{SVG}title") == product["name"]
            assert drawing.get("viewBox") == "0 0 400 300"
    assert len(etags) == len(DEMO_PRODUCTS) == 24  # 24 different pictures


def test_the_committed_pictures_are_what_the_artwork_module_draws() -> None:
    for product in DEMO_PRODUCTS:
        committed = (PRODUCTS_DIR / f"{product['product_id']}.svg").read_text(encoding="utf-8")
        assert committed == picture_svg(product["product_id"]), (
            f"{product['product_id']}.svg is stale: python -m example_shop.storefront.artwork"
        )


@on_the_shops_loop
async def test_the_icon_answers_under_both_of_its_names(embedded_shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("favicon.ico", "static/favicon.svg", "static/products/placeholder.svg"):
            async with http.get(storefront(embedded_shop) + path) as response:
                assert response.status == 200, path
                assert response.content_type == "image/svg+xml"
                assert response.headers["Cache-Control"].startswith("public")


@on_the_shops_loop
@pytest.mark.parametrize(
    "path",
    [
        "static/%2e%2e/service.py",
        "static/..%2fservice.py",
        "static/products/%2e%2e/%2e%2e/service.py",
        "static/%2e%2e/%2e%2e/identity/service.py",
        "static/products/p-001.svg%2f..%2f..%2f..%2fservice.py",
        "static/nothing.js",
        "static/products",
        "static/app.js.map",
        "static/%2fetc%2fpasswd",
    ],
)
async def test_nothing_outside_the_static_files_is_served(embedded_shop: Shop, path: str) -> None:
    """Refused by the storefront itself (404), and by the gateway in front of it (which stops
    some of these paths first, 400)."""
    async with aiohttp.ClientSession() as http:
        url = URL(storefront(embedded_shop) + path, encoded=True)
        async with http.get(url) as response:
            assert response.status == 404, path
            assert "import" not in await response.text()
        async with http.get(URL(embedded_shop.url + path, encoded=True)) as response:
            assert response.status in {400, 404}, path


def test_a_file_beside_the_static_folder_is_refused_even_with_a_served_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    static = tmp_path / "static"
    (static / "products").mkdir(parents=True)
    (static / "products" / "p-001.svg").write_text("<svg/>")
    (tmp_path / "secret.js").write_text("the storefront's neighbour")
    (tmp_path / "static-too").mkdir()
    (tmp_path / "static-too" / "app.js").write_text("a folder whose name starts the same")
    monkeypatch.setattr(storefront_service, "STATIC", static)
    request = make_mocked_request("GET", "/")

    served = storefront_service._file(request, "products/p-001.svg")
    assert isinstance(served, web.Response)
    assert served.body == b"<svg/>"
    for name in ("../secret.js", "products/../../secret.js", "../static-too/app.js",
                 str(tmp_path / "secret.js"), "products"):  # fmt: skip
        with pytest.raises(web.HTTPNotFound):
            storefront_service._file(request, name)


@on_the_shops_loop
async def test_the_graph_is_drawn_with_live_rates(embedded_shop: Shop) -> None:
    async with api_session(embedded_shop.url, ADMIN) as http:
        for _ in range(2):  # rates are measured between two calls
            async with http.get("/api/admin/graph") as response:
                assert response.status == 200
                drawing = await response.json()
    assert drawing["mermaid"].startswith("flowchart")
    svg = ElementTree.fromstring(drawing["svg"])
    assert svg.tag == f"{SVG}svg"
    names = {g.get("data-name") for g in svg.iter(f"{SVG}g") if "node" in (g.get("class") or "")}
    assert {"orders", "payments", "storefront"} <= names
    assert drawing["rates"]  # topics published to since the services started: catalog, stock
    assert all(isinstance(rate, float) and rate >= 0 for rate in drawing["rates"].values())
