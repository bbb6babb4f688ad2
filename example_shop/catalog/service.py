"""The catalog: products, their categories and prices, on MongoDB.

    GET   /products?q=&category=&page=&size=   search; {"items", "page", "size", "total"}
    GET   /products/{product_id}               one product (404 problem when unknown)
    GET   /categories                          the categories and their product counts
    POST  /products                            admin: create a product   -> ProductCreated
    PATCH /products/{product_id}               admin: name, description, price
                                               (a new price             -> ProductPriceChanged,
                                                a new name alone        -> ProductRenamed)

`q` matches name or description case-insensitively, as a literal substring (a regex of the
escaped query: FerretDB has no text index). Pages count from 1; `size` is 1..100.

**Events.** MongoDB has one unit of atomicity here, the document: the event a change emits is
written by `MongoOutbox` *into the product document*, in the same single-document insert or
update as the change, and the outbox relay publishes it to `TOPICS.CATALOG_EVENTS` (keyed by
product id) and removes it. A write that does not happen carries no event; there is no second
write that could be lost. A price change is guarded by the price it was computed from, so
`old_price_cents` is the price it really replaced. Every event carries the product's name (a
price change the name it has after the change), and a rename its price: the topic is compacted
by product id, so a product's latest event must tell a reader all it keeps (see
`example_shop.contracts`).

**Demo data.** At start, an empty collection is seeded with 24 products (`p-001` ... `p-024`,
see `seed.py`), which the other services' demo data refers to by id. Each is announced with
`ProductCreated` (its price included) through the outbox, written into its document like any
other product's: the catalog is the single source of prices, and the orders service learns every
one of them from this topic (its consumer group reads it from the beginning, so a service that
subscribes later still learns of products created before it). Replicas starting together may
both seed; the stable ids make the second insert a no-op, events included. Their images are
the storefront's pictures (`/static/products/<id>.svg`); a collection seeded by an earlier
version, with emoji, has them replaced at start (`upgrade_demo_images`), products an admin
created excepted.

Environment: MONGO_URL (or CATALOG_MONGO_URL / CATALOG_MONGO_DB; database `shop_catalog` by
default, see `example_shop.common`), MSA_HTTP_PORT (default `PORTS["catalog"]`), and the
`ServiceSettings` variables. `Catalog(mongo_client=...)` runs on a given client instead, e.g.
`mongomock_motor.AsyncMongoMockClient()` for an in-memory shop.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from example_shop.catalog.seed import DEMO_PRODUCTS, demo_documents, image_path
from example_shop.common import default_settings, mongo_target, require_admin
from example_shop.contracts import TOPICS, ProductCreated, ProductPriceChanged, ProductRenamed
from framework.http import json_response, read_json
from framework.messages import new_id, utc_now, validate_payload
from framework.persistence.mongo import (
    DuplicateKey,
    IndexSpec,
    MongoOutbox,
    MongoResource,
    translate,
)
from framework.service import Service, ServiceSettings, route
from framework.types import Transport

__all__ = [
    "Catalog",
    "CategoryCount",
    "NewProduct",
    "Product",
    "ProductChanges",
    "ProductPage",
    "ProductQuery",
]

PRODUCTS = "products"
_CATEGORY = r"^[a-z][a-z0-9-]{0,31}$"


class Product(BaseModel):
    product_id: str
    name: str
    description: str
    category: str
    price_cents: int
    image: str
    created_at: datetime


class ProductPage(BaseModel):
    items: list[Product]
    page: int
    size: int
    total: int


class CategoryCount(BaseModel):
    name: str
    products: int


class ProductQuery(BaseModel):
    """The query string of `GET /products`."""

    q: str = Field(default="", max_length=100)
    category: str | None = None
    page: int = Field(default=1, ge=1, le=10_000)
    size: int = Field(default=20, ge=1, le=100)


DEFAULT_IMAGE = "/static/products/placeholder.svg"
"""The picture of a product created without one."""
_IMAGE = r"^(/static/products/[a-z0-9][a-z0-9-]{0,63}\.(svg|png)|https://[^\s\"'<>]+)$"


class NewProduct(BaseModel):
    """The body of `POST /products`; the id is generated unless given."""

    model_config = ConfigDict(extra="forbid")

    product_id: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    category: str = Field(pattern=_CATEGORY)
    price_cents: int = Field(gt=0, le=100_000_000)
    image: str = Field(default=DEFAULT_IMAGE, max_length=200, pattern=_IMAGE)
    """A picture the storefront serves (`/static/products/<name>.svg|.png`) or an https URL."""


class ProductChanges(BaseModel):
    """The body of `PATCH /products/{id}`: the fields to change (absent or null: unchanged)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    price_cents: int | None = Field(default=None, gt=0, le=100_000_000)


class Catalog(Service):
    """Products on MongoDB; admins edit them, and price changes are announced as events."""

    name = "catalog"
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {
        TOPICS.CATALOG_EVENTS: [ProductCreated, ProductPriceChanged, ProductRenamed]
    }

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        mongo_client: Any = None,
    ) -> None:
        """`mongo_client`: a ready client (pymongo or Motor-like) to use instead of MONGO_URL."""
        super().__init__(default_settings("catalog", settings), transport=transport)
        url, database = mongo_target(self.settings.env, "catalog")
        self.db = self.use(
            MongoResource(
                url,
                database,
                indexes={PRODUCTS: [IndexSpec("category"), IndexSpec("product_id", unique=True)]},
                client=mongo_client,
            )
        )
        self.outbox = self.use(MongoOutbox(self.db, self.bus, collections=[PRODUCTS]))

    async def on_start(self) -> None:
        await self.seed()
        await self.upgrade_demo_images()

    async def seed(self) -> int:
        """Insert the demo products if the collection is empty, each with its ProductCreated;
        returns how many were added."""
        products = self.db.collection(PRODUCTS)
        documents = [
            self.outbox.attach(
                doc, self.outbox.event(TOPICS.CATALOG_EVENTS, _created(doc), key=doc["_id"])
            )
            for doc in demo_documents(utc_now())
        ]
        try:
            with translate():
                if await products.count_documents({}, limit=1):
                    return 0
                result = await products.insert_many(documents, ordered=False)
        except DuplicateKey:  # another replica seeded at the same time
            return 0
        self.outbox.wake()
        return len(result.inserted_ids)

    async def upgrade_demo_images(self) -> int:
        """Replace the emoji an earlier version seeded as the demo products' images with their
        pictures' paths; returns how many changed. Only a demo product (by its id) whose image
        is not a path changes, so a second run changes nothing; products admins created keep
        theirs."""
        products = self.db.collection(PRODUCTS)
        demo_ids = [p["product_id"] for p in DEMO_PRODUCTS]
        with translate():
            found = await products.find({"_id": {"$in": demo_ids}}, {"image": 1}).to_list(None)
        upgraded = 0
        for doc in found:
            if str(doc.get("image", "")).startswith("/"):
                continue
            # Held like an edit: the relay may be removing published events from the document.
            async with self.outbox.holding(PRODUCTS, doc["_id"]):
                result = await self.outbox.update_one(
                    PRODUCTS,
                    {"_id": doc["_id"], "image": doc.get("image")},
                    {"$set": {"image": image_path(doc["_id"])}},
                )
            upgraded += result.modified_count
        return upgraded

    # -- reading --------------------------------------------------------------------------------

    @route("GET", "/products", response=ProductPage)
    async def search_products(self, request: web.Request) -> web.Response:
        """Search products by text and category, a page at a time."""
        query = validate_payload(dict(request.query), ProductQuery)
        filter: dict[str, Any] = {}
        if query.q:
            pattern = {"$regex": re.escape(query.q), "$options": "i"}
            filter["$or"] = [{"name": pattern}, {"description": pattern}]
        if query.category:
            filter["category"] = query.category
        products = self.db.collection(PRODUCTS)
        with translate():
            total = await products.count_documents(filter)
            docs = (
                await products.find(filter)
                .sort("product_id", 1)
                .skip((query.page - 1) * query.size)
                .limit(query.size)
                .to_list(None)
            )
        page = ProductPage(
            items=[_product(d) for d in docs], page=query.page, size=query.size, total=total
        )
        return json_response(page)

    @route("GET", "/products/{product_id}", response=Product)
    async def get_product(self, request: web.Request) -> web.Response:
        """One product."""
        return json_response(_product(await self._find(request.match_info["product_id"])))

    @route("GET", "/categories", response=list[CategoryCount])
    async def list_categories(self, request: web.Request) -> web.Response:
        """The categories, with how many products each has."""
        pipeline: list[dict[str, Any]] = [
            {"$group": {"_id": "$category", "products": {"$sum": 1}}},
            {"$sort": {"_id": 1}},
        ]
        with translate():
            cursor: Any = self.db.collection(PRODUCTS).aggregate(pipeline)
            if inspect.isawaitable(cursor):  # pymongo's aggregate is a coroutine, Motor's not
                cursor = await cursor
            rows: list[dict[str, Any]] = await cursor.to_list(None)
        items = [CategoryCount(name=r["_id"], products=r["products"]) for r in rows]
        return json_response({"items": items})

    # -- editing (admins) -----------------------------------------------------------------------

    @route("POST", "/products", body=NewProduct, response=Product)
    async def create_product(self, request: web.Request) -> web.Response:
        """Create a product (admins); announces it with ProductCreated."""
        require_admin(request)
        new = await read_json(request, NewProduct)
        product_id = new.product_id or f"p-{new_id()[:12]}"
        doc = {
            "_id": product_id,
            **new.model_dump(),
            "product_id": product_id,
            "created_at": utc_now(),
        }
        created = self.outbox.event(TOPICS.CATALOG_EVENTS, _created(doc), key=product_id)
        try:
            await self.outbox.insert_one(PRODUCTS, doc, created)
        except DuplicateKey:
            raise web.HTTPConflict(text=f"product {product_id!r} exists already") from None
        return json_response(
            _product(doc), status=201, headers={"Location": f"/products/{product_id}"}
        )

    @route("PATCH", "/products/{product_id}", body=ProductChanges, response=Product)
    async def update_product(self, request: web.Request) -> web.Response:
        """Change a product's name, description or price (admins); a new price is announced
        with ProductPriceChanged (old and new price, and the name), a new name alone with
        ProductRenamed."""
        require_admin(request)
        changes = (await read_json(request, ProductChanges)).model_dump(exclude_none=True)
        product_id = request.match_info["product_id"]
        for _ in range(3):
            # Held, so the relay's removal of published events never overlaps this write
            # (FerretDB does not isolate updates).
            async with self.outbox.holding(PRODUCTS, product_id):
                doc = await self._find(product_id)
                changed = {k: v for k, v in changes.items() if doc.get(k) != v}
                if not changed:
                    return json_response(_product(doc))
                events = [
                    self.outbox.event(TOPICS.CATALOG_EVENTS, event, key=product_id)
                    for event in _announced(doc, changed)
                ]
                # guarded by the price read: the event's old price is the one really replaced
                result = await self.outbox.update_one(
                    PRODUCTS,
                    {"_id": product_id, "price_cents": doc["price_cents"]},
                    {"$set": {**changed, "updated_at": utc_now()}},
                    *events,
                )
            if result.matched_count:
                return json_response(_product({**doc, **changed}))
        raise web.HTTPConflict(text="the product changed concurrently; try again")

    async def _find(self, product_id: str) -> dict[str, Any]:
        with translate():
            doc = await self.db.collection(PRODUCTS).find_one({"_id": product_id})
        if doc is None:
            raise web.HTTPNotFound(text=f"no product {product_id!r}")
        return doc


def _announced(
    doc: Mapping[str, Any], changed: Mapping[str, Any]
) -> list[ProductPriceChanged | ProductRenamed]:
    """The event of an edit: a new price (with the name it comes with), else a new name (with
    the price it keeps), else none (a description tells the other services nothing)."""
    name = changed.get("name", doc["name"])
    if "price_cents" in changed:
        return [
            ProductPriceChanged(
                product_id=doc["product_id"],
                old_price_cents=doc["price_cents"],
                new_price_cents=changed["price_cents"],
                name=name,
            )
        ]
    if "name" in changed:
        return [
            ProductRenamed(product_id=doc["product_id"], name=name, price_cents=doc["price_cents"])
        ]
    return []


def _created(doc: Mapping[str, Any]) -> ProductCreated:
    return ProductCreated(
        product_id=doc["product_id"],
        name=doc["name"],
        category=doc["category"],
        price_cents=doc["price_cents"],
    )


def _product(doc: dict[str, Any]) -> Product:
    created_at: datetime = doc["created_at"]
    if created_at.tzinfo is None:  # BSON dates come back naive (UTC)
        created_at = created_at.replace(tzinfo=UTC)
    return Product.model_validate({**doc, "created_at": created_at})
