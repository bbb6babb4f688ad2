"""The catalog service against the real MongoDB-wire server (FerretDB), on the in-memory bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from example_shop.catalog import Catalog
from example_shop.catalog.seed import CATEGORIES, DEMO_PRODUCTS
from example_shop.catalog.service import DEFAULT_IMAGE, PRODUCTS
from example_shop.contracts import TOPICS, ProductCreated, ProductPriceChanged, ProductRenamed
from framework.bus import MemoryTransport
from framework.messages import Envelope, decode_payload, from_binary, type_name
from framework.service import ServiceSettings

pytestmark = pytest.mark.mongo

ADMIN = {"x-user-id": "u-admin", "x-user-roles": "admin"}
CUSTOMER = {"x-user-id": "u-1", "x-user-roles": "customer"}
ALL_IDS = [p["product_id"] for p in DEMO_PRODUCTS]


@pytest.fixture
def env(mongo_url: str, mongo_database_name: str) -> dict[str, str]:
    return {"MONGO_URL": mongo_url, "CATALOG_MONGO_DB": mongo_database_name}


@contextlib.asynccontextmanager
async def running(
    env: dict[str, str], transport: MemoryTransport | None = None
) -> AsyncIterator[tuple[Catalog, aiohttp.ClientSession]]:
    catalog = Catalog(
        ServiceSettings(http_host="127.0.0.1", http_port=0, env=env),
        transport=transport or MemoryTransport(),
    )
    await catalog.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{catalog.http_port}") as http:
            yield catalog, http
    finally:
        await catalog.stop(grace=1)


def events(catalog: Catalog, of: type) -> list[Envelope[bytes]]:
    transport = catalog.bus.transport
    assert isinstance(transport, MemoryTransport)
    found = [from_binary(r) for r in transport.records(TOPICS.CATALOG_EVENTS)]
    return [e for e in found if e.type == type_name(of)]


async def outbox_drained(catalog: Catalog, timeout: float = 10.0) -> None:
    """Wait until the relay published every event written so far. It publishes before it
    removes, so from then on the bus holds them all and nothing else is left to come."""
    async with asyncio.timeout(timeout):
        while True:
            if not await catalog.outbox.pending():
                return
            await asyncio.sleep(0.02)


async def wait_for_events(catalog: Catalog, of: type, count: int) -> list[Envelope[bytes]]:
    await outbox_drained(catalog)
    found = events(catalog, of)
    assert len(found) == count, [e.type for e in found]
    return found


def created_ids(catalog: Catalog) -> list[str]:
    """The products announced with ProductCreated, sorted."""
    found = events(catalog, ProductCreated)
    return sorted(decode_payload(e.data, ProductCreated).product_id for e in found)


async def get_json(http: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with http.get(path) as response:
        assert response.status == status, await response.text()
        return await response.json(content_type=None)


async def test_seeded_products_search_and_categories(env: dict[str, str]) -> None:
    async with running(env) as (_, http):
        page = await get_json(http, "/products?size=100")
        assert page["total"] == 24
        assert [p["product_id"] for p in page["items"]] == ALL_IDS
        categories = await get_json(http, "/categories")
        assert {c["name"]: c["products"] for c in categories["items"]} == dict.fromkeys(
            CATEGORIES, 6
        )

        # case-insensitive, over name and description
        mugs = await get_json(http, "/products?q=MUG&size=100")
        expected = [
            p["product_id"]
            for p in DEMO_PRODUCTS
            if "mug" in p["name"].lower() or "mug" in p["description"].lower()
        ]
        assert [p["product_id"] for p in mugs["items"]] == expected
        assert mugs["total"] == len(expected) >= 4
        by_description = await get_json(http, "/products?q=bergamot")
        assert [p["name"] for p in by_description["items"]] == ["Earl Grey Supreme"]

        # the query is a literal: regex characters match themselves, and only themselves
        filters = await get_json(http, "/products?q=filters%20(100)")
        assert [p["product_id"] for p in filters["items"]] == ["p-020"]
        assert (await get_json(http, "/products?q=.*"))["total"] == 0

        green_tea = await get_json(http, "/products?q=green&category=tea")
        assert {p["name"] for p in green_tea["items"]} == {"Sencha Green Tea", "Jasmine Pearls"}
        coffee = await get_json(http, "/products?category=coffee&size=100")
        assert coffee["total"] == 6
        assert {p["category"] for p in coffee["items"]} == {"coffee"}
        assert (await get_json(http, "/products?category=shoes"))["total"] == 0


async def test_paging(env: dict[str, str]) -> None:
    async with running(env) as (_, http):
        seen: list[str] = []
        for number in range(1, 6):
            page = await get_json(http, f"/products?page={number}&size=5")
            assert (page["page"], page["size"], page["total"]) == (number, 5, 24)
            seen += [p["product_id"] for p in page["items"]]
        assert seen == ALL_IDS  # five pages: 5+5+5+5+4, no overlap, no gap
        assert (await get_json(http, "/products?page=6&size=5"))["items"] == []
        default = await get_json(http, "/products")
        assert (default["page"], default["size"], len(default["items"])) == (1, 20, 20)
        for bad in ("page=0", "size=0", "size=101", "size=ten"):
            problem = await get_json(http, f"/products?{bad}", status=422)
            assert problem["status"] == 422


async def test_get_product_and_404(env: dict[str, str]) -> None:
    async with running(env) as (_, http):
        product = await get_json(http, "/products/p-001")
        assert product["name"] == "Classic White Mug"
        assert product["price_cents"] == 1290
        assert product["created_at"].endswith(("Z", "+00:00"))
        async with http.get("/products/p-999") as response:
            assert response.status == 404
            assert response.content_type == "application/problem+json"
            assert (await response.json(content_type=None))["status"] == 404


async def test_edits_are_for_admins_only(env: dict[str, str]) -> None:
    async with running(env) as (catalog, http):
        new = {"name": "Tin Caddy", "category": "accessories", "price_cents": 990}
        for headers, status in (({}, 401), (CUSTOMER, 403)):
            async with http.post("/products", json=new, headers=headers) as response:
                assert response.status == status
                assert response.content_type == "application/problem+json"
            async with http.patch(
                "/products/p-001", json={"price_cents": 1}, headers=headers
            ) as response:
                assert response.status == status
        assert (await get_json(http, "/products/p-001"))["price_cents"] == 1290
        assert (await get_json(http, "/products?size=100"))["total"] == 24
        await outbox_drained(catalog)  # a refused edit wrote no event to publish
        assert events(catalog, ProductPriceChanged) == []
        assert created_ids(catalog) == ALL_IDS  # the seeded products' only


async def test_price_change_is_published_exactly_once(env: dict[str, str]) -> None:
    async with running(env) as (catalog, http):
        async with http.patch(
            "/products/p-003", json={"price_cents": 1990, "name": "Glass Mug XL"}, headers=ADMIN
        ) as response:
            assert response.status == 200
            body = await response.json()
            assert (body["price_cents"], body["name"]) == (1990, "Glass Mug XL")
        [changed] = await wait_for_events(catalog, ProductPriceChanged, 1)
        assert changed.partitionkey == "p-003"
        assert decode_payload(changed.data, ProductPriceChanged) == ProductPriceChanged(
            product_id="p-003", old_price_cents=1890, new_price_cents=1990, name="Glass Mug XL"
        )
        assert events(catalog, ProductRenamed) == []  # the price change carries the new name
        stored = await get_json(http, "/products/p-003")
        assert (stored["price_cents"], stored["name"]) == (1990, "Glass Mug XL")

        # the same price again, or only a new description: no price event
        for change in ({"price_cents": 1990}, {"description": "Bigger."}):
            async with http.patch("/products/p-003", json=change, headers=ADMIN) as response:
                assert response.status == 200
        second = {"price_cents": 1790}
        async with http.patch("/products/p-003", json=second, headers=ADMIN) as response:
            assert response.status == 200
        found = await wait_for_events(catalog, ProductPriceChanged, 2)
        assert [decode_payload(e.data, ProductPriceChanged).old_price_cents for e in found] == [
            1890,
            1990,
        ]
        assert (await get_json(http, "/products/p-003"))["description"] == "Bigger."
        # the relay removed the published events from the document
        assert await catalog.outbox.pending() == 0

        async with http.patch(
            "/products/p-404", json={"price_cents": 100}, headers=ADMIN
        ) as response:
            assert response.status == 404
        for invalid in ({"price_cents": -5}, {"colour": "red"}):
            async with http.patch("/products/p-003", json=invalid, headers=ADMIN) as response:
                assert response.status == 422


async def test_a_new_name_is_published_with_the_price_it_keeps(env: dict[str, str]) -> None:
    async with running(env) as (catalog, http):
        for change in ({"name": "Camp Mug"}, {"name": "Camp Mug", "description": "Blue."}):
            async with http.patch("/products/p-002", json=change, headers=ADMIN) as response:
                assert response.status == 200
                assert (await response.json())["name"] == "Camp Mug"
        [renamed] = await wait_for_events(catalog, ProductRenamed, 1)  # the same name: no event
        assert renamed.partitionkey == "p-002"
        assert decode_payload(renamed.data, ProductRenamed) == ProductRenamed(
            product_id="p-002", name="Camp Mug", price_cents=1490
        )
        # a later price change carries the name the product has now
        async with http.patch(
            "/products/p-002", json={"price_cents": 1590}, headers=ADMIN
        ) as response:
            assert response.status == 200
        [changed] = await wait_for_events(catalog, ProductPriceChanged, 1)
        assert decode_payload(changed.data, ProductPriceChanged).name == "Camp Mug"


async def test_create_product(env: dict[str, str]) -> None:
    async with running(env) as (catalog, http):
        new = {
            "product_id": "p-100",
            "name": "Tin Caddy",
            "description": "Airtight tea tin, 200 g.",
            "category": "accessories",
            "price_cents": 990,
            "image": "/static/products/tin-caddy.svg",
        }
        async with http.post("/products", json=new, headers=ADMIN) as response:
            assert response.status == 201
            assert response.headers["Location"] == "/products/p-100"
        found = await wait_for_events(catalog, ProductCreated, len(ALL_IDS) + 1)
        [created] = [e for e in found if e.partitionkey == "p-100"]
        assert decode_payload(created.data, ProductCreated) == ProductCreated(
            product_id="p-100", name="Tin Caddy", category="accessories", price_cents=990
        )
        assert (await get_json(http, "/products/p-100"))["image"] == new["image"]
        async with http.post("/products", json=new, headers=ADMIN) as response:
            assert response.status == 409
        generated = {"name": "Oolong", "category": "tea", "price_cents": 1290}
        async with http.post("/products", json=generated, headers=ADMIN) as response:
            assert response.status == 201
            product_id = (await response.json())["product_id"]
        assert product_id.startswith("p-")
        assert (await get_json(http, f"/products/{product_id}"))["image"] == DEFAULT_IMAGE
        for image in ("🥫", "javascript:alert(1)", "/static/../secrets.svg", "http://x/a.png"):
            bad = {**generated, "image": image}
            async with http.post("/products", json=bad, headers=ADMIN) as response:
                assert response.status == 422, image
        assert (await get_json(http, "/products?category=tea"))["total"] == 7
        async with http.post("/products", json={"name": "x"}, headers=ADMIN) as response:
            assert response.status == 422
        assert len(await wait_for_events(catalog, ProductCreated, len(ALL_IDS) + 2))


async def test_seeding_announces_every_product_with_its_price(env: dict[str, str]) -> None:
    async with running(env) as (catalog, _):
        found = await wait_for_events(catalog, ProductCreated, len(DEMO_PRODUCTS))
        announced = {e.partitionkey: decode_payload(e.data, ProductCreated) for e in found}
        assert announced == {
            p["product_id"]: ProductCreated(
                product_id=p["product_id"],
                name=p["name"],
                category=p["category"],
                price_cents=p["price_cents"],
            )
            for p in DEMO_PRODUCTS
        }


async def test_seeding_is_idempotent_across_restarts(env: dict[str, str]) -> None:
    # two replicas start together on an empty database: both seed, one set of products, and
    # each is announced once
    transport = MemoryTransport()
    async with running(env, transport) as (one, first), running(env, transport) as (two, second):
        assert (await get_json(first, "/products?size=1"))["total"] == 24
        assert (await get_json(second, "/products?size=1"))["total"] == 24
        await outbox_drained(one)
        await outbox_drained(two)
        assert created_ids(one) == ALL_IDS
        async with first.patch(
            "/products/p-010", json={"price_cents": 999}, headers=ADMIN
        ) as response:
            assert response.status == 200
    async with running(env, transport) as (catalog, http):
        assert await catalog.seed() == 0
        await outbox_drained(catalog)
        assert created_ids(catalog) == ALL_IDS  # nothing announced again
        assert (await get_json(http, "/products?size=100"))["total"] == 24
        # the restart did not reseed over the edit
        assert (await get_json(http, "/products/p-010"))["price_cents"] == 999


async def test_demo_products_seeded_with_emoji_get_their_pictures(env: dict[str, str]) -> None:
    """A catalog seeded by an earlier version (emoji images) is upgraded at start: the demo
    products' images become the storefront's pictures; an admin's product keeps its own."""
    async with running(env) as (catalog, http):
        await outbox_drained(catalog)  # the relay is done with the documents edited below
        products = catalog.db.collection(PRODUCTS)
        for product_id, emoji in (("p-001", "☕"), ("p-013", "🫘")):  # as the earlier seed had
            await products.update_one({"_id": product_id}, {"$set": {"image": emoji}})
        new = {"product_id": "p-100", "name": "Tin", "category": "tea", "price_cents": 990}
        own = {**new, "image": "https://img.example/tin.png"}
        async with http.post("/products", json=own, headers=ADMIN) as response:
            assert response.status == 201
        assert (await get_json(http, "/products/p-001"))["image"] == "☕"
        await outbox_drained(catalog)  # the admin's product is announced by this catalog

    async with running(env) as (catalog, http):
        images = {
            p["product_id"]: p["image"]
            for p in (await get_json(http, "/products?size=100"))["items"]
        }
        assert images == {
            **{p["product_id"]: f"/static/products/{p['product_id']}.svg" for p in DEMO_PRODUCTS},
            "p-100": "https://img.example/tin.png",
        }
        assert await catalog.upgrade_demo_images() == 0  # nothing left to upgrade
        await outbox_drained(catalog)
        assert events(catalog, ProductCreated) == []  # and nothing to tell: seeded before
        assert events(catalog, ProductRenamed) == events(catalog, ProductPriceChanged) == []
