"""The document store the suite runs against speaks the MongoDB wire protocol for real."""

from __future__ import annotations

import pytest
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError

pytestmark = pytest.mark.mongo


async def test_insert_find_update_and_unique_index(
    mongo_url: str, mongo_database_name: str
) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
    try:
        info = await client.admin.command("buildInfo")
        print(f"MongoDB wire {info['version']}, FerretDB {info.get('ferretdbVersion')}")
        products = client[mongo_database_name]["products"]
        await products.create_index("sku", unique=True)
        await products.insert_many(
            [{"sku": "A-1", "name": "mug", "stock": 3}, {"sku": "B-2", "name": "cup", "stock": 0}]
        )

        found = await products.find_one({"sku": "A-1"}, {"_id": 0})
        assert found == {"sku": "A-1", "name": "mug", "stock": 3}

        updated = await products.find_one_and_update(
            {"sku": "A-1", "stock": {"$gte": 2}},
            {"$inc": {"stock": -2}},
            return_document=ReturnDocument.AFTER,
        )
        # (FerretDB v1 refuses a projection on findAndModify: the framework never sends one.)
        assert updated is not None
        assert updated["stock"] == 1
        # The guard refuses a second decrement that would go below zero: nothing changes.
        assert (
            await products.find_one_and_update(
                {"sku": "A-1", "stock": {"$gte": 2}}, {"$inc": {"stock": -2}}
            )
            is None
        )

        with pytest.raises(DuplicateKeyError):
            await products.insert_one({"sku": "A-1", "name": "duplicate"})
        assert await products.count_documents({}) == 2
        names = [d["name"] async for d in products.find({}, {"name": 1}).sort("sku", 1)]
        assert names == ["mug", "cup"]
    finally:
        await client.close()


async def test_motor_client_works_too(mongo_url: str, mongo_database_name: str) -> None:
    """Users who bring a Motor client (deprecated upstream, still common) are served as well."""
    from motor.motor_asyncio import AsyncIOMotorClient

    client: AsyncIOMotorClient = AsyncIOMotorClient(mongo_url)  # type: ignore[type-arg]
    try:
        orders = client[mongo_database_name]["orders"]
        result = await orders.insert_one({"order": 1, "items": ["mug"]})
        doc = await orders.find_one({"_id": result.inserted_id})
        assert doc is not None
        assert doc["items"] == ["mug"]
    finally:
        client.close()
