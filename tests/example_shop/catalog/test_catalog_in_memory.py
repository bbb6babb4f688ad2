"""The catalog on the in-memory Mongo engine (mongomock_motor), as the embedded shop runs it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from mongomock_motor import AsyncMongoMockClient

from example_shop.catalog import Catalog
from example_shop.catalog.seed import DEMO_PRODUCTS
from example_shop.catalog.service import PRODUCTS
from example_shop.contracts import TOPICS, ProductPriceChanged
from framework.bus import MemoryTransport
from framework.messages import decode_payload, from_binary, type_name
from framework.service import ServiceSettings

ADMIN = {"x-user-id": "u-admin", "x-user-roles": "admin"}


async def test_runs_on_an_in_memory_mongo_client() -> None:
    transport = MemoryTransport()
    catalog = Catalog(
        ServiceSettings(http_host="127.0.0.1", http_port=0, env={}),  # no MONGO_URL at all
        transport=transport,
        mongo_client=AsyncMongoMockClient(),
    )
    await catalog.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{catalog.http_port}") as http:
            async with http.get("/products?q=tea&category=accessories") as response:
                assert response.status == 200
                found = await response.json()
            assert [p["name"] for p in found["items"]] == ["Tea Infuser Ball"]
            async with http.get("/categories") as response:
                assert len((await response.json())["items"]) == 4
            async with http.patch(
                "/products/p-007", json={"price_cents": 990}, headers=ADMIN
            ) as response:
                assert response.status == 200

            # The relay publishes, then removes what it published: once the outbox is empty,
            # every event of the change is on the bus, and nothing else is left to come.
            async with asyncio.timeout(5):
                while True:
                    if not await catalog.outbox.pending():
                        break
                    await asyncio.sleep(0.02)
            found = [from_binary(r) for r in transport.records(TOPICS.CATALOG_EVENTS)]
            [event] = [e for e in found if e.type == type_name(ProductPriceChanged)]
            assert len(found) == 1 + 24  # and the seeded products' ProductCreated
            assert decode_payload(event.data, ProductPriceChanged) == ProductPriceChanged(
                product_id="p-007",
                old_price_cents=890,
                new_price_cents=990,
                name="Earl Grey Supreme",
            )
            async with http.get("/products/p-007") as response:
                assert (await response.json())["price_cents"] == 990
    finally:
        await catalog.stop(grace=1)


async def test_an_earlier_seed_gets_the_pictures_on_the_in_memory_engine() -> None:
    """The embedded shop may keep its catalog across runs (`--data-dir`): one seeded by an
    earlier version has its demo products' emoji replaced when it starts."""
    client: Any = AsyncMongoMockClient()
    settings = ServiceSettings(http_host="127.0.0.1", http_port=0, env={})
    earlier = Catalog(settings, transport=MemoryTransport(), mongo_client=client)
    await earlier.start()
    try:
        products = earlier.db.collection(PRODUCTS)
        await products.update_one({"_id": "p-002"}, {"$set": {"image": "🏕️"}})
        admins = {**DEMO_PRODUCTS[0], "_id": "p-200", "product_id": "p-200", "image": "📦"}
        await products.insert_one(admins)
    finally:
        await earlier.stop(grace=1)

    catalog = Catalog(settings, transport=MemoryTransport(), mongo_client=client)
    await catalog.start()
    try:
        found = await catalog.db.collection(PRODUCTS).find({}, {"image": 1}).to_list(None)
        images = {doc["_id"]: doc["image"] for doc in found}
        assert images["p-002"] == "/static/products/p-002.svg"
        assert images["p-200"] == "📦"  # not a demo product
        assert {images[p["product_id"]] for p in DEMO_PRODUCTS} == {
            f"/static/products/{p['product_id']}.svg" for p in DEMO_PRODUCTS
        }
    finally:
        await catalog.stop(grace=1)
