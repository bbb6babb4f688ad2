"""The in-memory MongoDB engine of `msa shop` (mongomock-motor), with lookups by `_id` by key.

mongomock answers every query by testing the filter against every document of the
collection, a lookup by `_id` included: the shop's shipping service reads and writes a shipment
by its `_id` several times per order, and the outbox relay claims, re-reads and settles
documents by `_id`, so each order cost more the more shipments were stored (the profile of
`benchmarks/shop.py`: mongomock's filtering was a third of the shop process's CPU at 1,000
stored orders).

mongomock keeps a collection's documents in a dict keyed by `_id` (a `hashdict` for a document
`_id`). `index_id_lookups()` replaces its private `Collection._iter_documents` with one that,
for a filter whose `_id` is a plain value, `{"$eq": value}` or `{"$in": [values]}`, takes the
candidates from that dict and still tests the whole filter on each, so the answer is what
mongomock's scan would give; any other filter goes to mongomock's own scan. Plain values are
strings, integers, ObjectIds, UUIDs and documents of those: a datetime `_id` is stored
rounded to milliseconds, so it is left to the scan.

That is a private method of a dependency, so `mongomock` is pinned below its next minor
version (example_shop/pyproject.toml) and `tests/example_shop/test_embedded_mongo.py` fails
when the method or the store's layout change: it checks both that the lookup tests only the
matching document and that its answers equal the scan's.

Other indexes (the outbox's pending marker, shipments by `advance_at`) are not used by
mongomock either: those queries still scan (module `framework.persistence.mongo` keeps the
relay off them between its polls).

mongomock keeps nothing on disk: `save_snapshot()` writes every document of every database to
one file (MongoDB Extended JSON, so ObjectIds and datetimes come back as they were) and
`load_snapshot()` reads it into a fresh client. `msa shop` saves at stop and every
`SNAPSHOT_INTERVAL` seconds, so its catalog and shipments outlive a restart; a crash loses what
changed since the last snapshot.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bson import ObjectId, json_util
from mongomock import helpers
from mongomock.collection import Collection
from mongomock.filtering import filter_applies
from mongomock_motor import AsyncMongoMockClient

__all__ = [
    "SNAPSHOT_INTERVAL",
    "embedded_mongo_client",
    "index_id_lookups",
    "load_snapshot",
    "save_snapshot",
]

SNAPSHOT_INTERVAL = 30.0
"""Seconds between the snapshots `msa shop` takes of its in-memory MongoDB engine."""
_SYSTEM_DATABASES = frozenset({"admin", "config", "local"})

_PLAIN = (str, int, ObjectId, uuid.UUID)
_SCAN: Callable[[Collection, Any], Iterator[dict[str, Any]]] | None = None


def _key(value: Any) -> Any:
    """The store's key of `_id` value `value`, or None when it is not a plain value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, _PLAIN):
        return value
    plain_document = (
        isinstance(value, dict)
        and bool(value)
        and not any(str(k).startswith("$") for k in value)
        and all(isinstance(v, _PLAIN) and not isinstance(v, bool) for v in value.values())
    )
    return helpers.hashdict(value) if plain_document else None


def _candidates(selector: Any) -> list[Any] | None:
    """The store keys a filter's `_id` selector can match, or None to scan."""
    if isinstance(selector, dict) and len(selector) == 1:
        ((operator, operand),) = selector.items()
        if operator == "$eq":
            key = _key(operand)
            return None if key is None else [key]
        if operator == "$in" and isinstance(operand, list | tuple):
            keys = [_key(value) for value in operand]
            if any(key is None for key in keys):
                return None
            return list(dict.fromkeys(keys))  # once each, in the filter's order
        if str(operator).startswith("$"):
            return None
    key = _key(selector)
    return None if key is None else [key]


def _iter_documents(self: Collection, filter: Any) -> Iterator[dict[str, Any]]:
    assert _SCAN is not None
    if not isinstance(filter, dict) or "_id" not in filter:
        return _SCAN(self, filter)
    keys = _candidates(filter["_id"])
    if keys is None:
        return _SCAN(self, filter)
    store = self._store
    found = [store[key] for key in keys if key in store]
    return (doc for doc in found if filter_applies(filter, doc))  # type: ignore[no-untyped-call]


def index_id_lookups() -> None:
    """Make mongomock find documents by `_id` through its store's dict (once per process)."""
    global _SCAN
    if _SCAN is None:
        _SCAN = Collection._iter_documents
        Collection._iter_documents = _iter_documents  # type: ignore[method-assign]


def embedded_mongo_client() -> Any:  # an AsyncIOMotorClient look-alike
    """A new in-memory MongoDB client (mongomock-motor) whose `_id` lookups are by key."""
    index_id_lookups()
    return AsyncMongoMockClient()


async def save_snapshot(client: Any, path: Path) -> int:
    """Write every document `client` holds to `path` (replaced atomically); returns how many."""
    snapshot: dict[str, dict[str, list[Any]]] = {}
    count = 0
    for database in await client.list_database_names():
        if database in _SYSTEM_DATABASES:
            continue
        collections = snapshot.setdefault(database, {})
        for name in await client[database].list_collection_names():
            documents = await client[database][name].find({}).to_list(None)
            collections[name] = documents
            count += len(documents)
    text = json_util.dumps(snapshot, json_options=json_util.CANONICAL_JSON_OPTIONS)
    await asyncio.to_thread(_replace, path, text)
    return count


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


async def load_snapshot(client: Any, path: Path) -> int:
    """Insert the documents a `save_snapshot()` wrote to `path` into `client`; returns how many
    (0 when there is no snapshot yet)."""
    try:
        text = await asyncio.to_thread(path.read_text)
    except FileNotFoundError:
        return 0
    snapshot = json_util.loads(text)
    count = 0
    for database, collections in snapshot.items():
        for name, documents in collections.items():
            if documents:
                await client[database][name].insert_many(documents)
                count += len(documents)
    return count
