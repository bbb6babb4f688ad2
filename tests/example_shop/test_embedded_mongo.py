"""The embedded MongoDB engine's lookups by `_id` (example_shop/embedded_mongo.py).

It replaces a private method of mongomock: these tests fail when mongomock changes what that
method or its store look like (the dependency is pinned below its next minor version), and
check that the lookup answers exactly what mongomock's own scan answers.
"""

from __future__ import annotations

from typing import Any

import mongomock
import pytest
from bson import ObjectId
from mongomock import filtering
from mongomock.collection import Collection

from example_shop import embedded_mongo
from example_shop.embedded_mongo import embedded_mongo_client


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The documents mongomock tests a filter against, in order."""
    tested: list[Any] = []
    original: Any = filtering.filter_applies

    def applies(filter: Any, document: Any) -> bool:
        tested.append(document.get("_id"))
        return bool(original(filter, document))

    monkeypatch.setattr(filtering, "filter_applies", applies)
    monkeypatch.setattr(embedded_mongo, "filter_applies", applies)
    monkeypatch.setattr("mongomock.collection.filter_applies", applies)
    return tested


async def test_the_private_method_it_replaces_is_still_there() -> None:
    embedded_mongo_client()
    assert Collection._iter_documents is embedded_mongo._iter_documents
    assert embedded_mongo._SCAN is not None
    assert embedded_mongo._SCAN.__qualname__ == "Collection._iter_documents"


async def test_a_lookup_by_id_tests_only_that_document(counted: list[Any]) -> None:
    collection = embedded_mongo_client()["db"]["things"]
    await collection.insert_many([{"_id": f"t-{n}", "n": n} for n in range(200)])
    counted.clear()
    assert await collection.find_one({"_id": "t-150"}) == {"_id": "t-150", "n": 150}
    assert counted == ["t-150"]
    counted.clear()
    result = await collection.update_one({"_id": "t-7", "n": 7}, {"$set": {"n": 70}})
    assert result.matched_count == 1
    assert counted == ["t-7"]
    counted.clear()
    found = await collection.find({"_id": {"$in": ["t-3", "t-1", "nope"]}}).to_list(None)
    assert sorted(doc["_id"] for doc in found) == ["t-1", "t-3"]
    assert sorted(counted) == ["t-1", "t-3"]
    counted.clear()
    await collection.find_one({"n": 5})  # not by `_id`: mongomock's scan
    assert len(counted) >= 6


IDS: list[Any] = [
    "a",
    7,
    ObjectId(),
    {"collection": "orders", "id": "o-1"},
    {"collection": "orders", "id": 2},
]  # (a UUID `_id` needs a client with a uuidRepresentation)


@pytest.mark.parametrize(
    "filter",
    [
        {"_id": "a"},
        {"_id": 7},
        {"_id": 7.0},
        {"_id": True},
        {"_id": IDS[2]},
        {"_id": {"collection": "orders", "id": "o-1"}},
        {"_id": {"id": "o-1", "collection": "orders"}},
        {"_id": {"$eq": "a"}},
        {"_id": {"$in": ["a", 7, "missing", {"collection": "orders", "id": 2}]}},
        {"_id": {"$in": []}},
        {"_id": {"$ne": "a"}},
        {"_id": {"$gt": 3}},
        {"_id": "a", "v": 1},
        {"_id": "a", "v": 2},
        {"_id": None},
        {"v": {"$exists": True}},
    ],
    ids=repr,
)
def test_the_answers_equal_mongomocks_scan(filter: dict[str, Any]) -> None:
    embedded_mongo.index_id_lookups()
    collection: Any = mongomock.MongoClient()["db"]["mixed"]
    collection.insert_many([{"_id": doc_id, "v": n} for n, doc_id in enumerate(IDS)])
    fast = list(collection.find(filter))
    assert embedded_mongo._SCAN is not None
    scanned = list(embedded_mongo._SCAN(collection, filter))
    assert sorted(map(repr, fast)) == sorted(map(repr, scanned))
