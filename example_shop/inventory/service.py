"""Inventory: how many of each product are on hand, and how many are held for orders.

    stock(product_id, on_hand, reserved)        available = on_hand - reserved, never negative
    reservations(order_id, product_id, quantity)

Commands arrive on `shop.inventory.commands` and are applied once (the inbox records each
message id in the transaction of its effect); each is answered on `shop.inventory.events`
through the outbox, from inside the command's handler, so the reply carries the command's
correlation id and the orders saga recognises it:

    ReserveStock  -> StockReserved | StockRejected(reason names the product)
    ReleaseStock  -> StockReleased          (also for an order with nothing reserved)
    CommitStock                             (no reply; the order is confirmed: its reserved
                                             units are sold, on hand and reserved drop by them)
    RestockProduct                          (no reply; the partner gateway's POST /partner/restock)

**Stock levels.** Every change of a product's stock row (reserve, release, commit, restock, a
count) bumps the row's `version` and publishes `StockLevelChanged(product_id, available,
version)` on `shop.inventory.stock` (keyed by product), in the transaction of the change. The
orders service keeps them as its read model of what can be added to a cart. At start, rows never
announced (version 0: the demo stock, or rows from before versions) are announced once.

A reservation takes every line of the order or none: the stock rows are locked with
`SELECT ... FOR UPDATE` in product-id order (so two orders never wait for each other in a
cycle), checked, and only then updated. The table's check constraints are the last line of
defence: stock never goes negative even if that check had a bug.

Routes (callers as forwarded by the gateway, see `example_shop.common`):

    GET /stock/{product_id}   public   {"product_id", "available"}
    GET /availability?ids=p-001,p-002   public   {"items": [{"product_id", "available"}]}, the
                              products stock is kept for, in the order asked (a page of the
                              storefront's grid in one request; at most 100 ids)
    GET /stock                admin    every row, with on_hand and reserved
    PUT /stock/{product_id}   admin    {"on_hand"}; below what is reserved -> 409

Demo stock for the catalog's products p-001..p-024 is seeded by a migration (once per database):
50 each, except p-013 (sold out) and p-014 (2 left), to show rejections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, Field

from example_shop.common import default_settings, postgres_url, require_admin
from example_shop.contracts import (
    TOPICS,
    CommitStock,
    ReleaseStock,
    ReserveStock,
    StockLevelChanged,
    StockRejected,
    StockReleased,
    StockReserved,
)
from framework.bus import Message
from framework.http import json_response, read_json
from framework.messages import message_type, validate_payload
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import Migration, PostgresResource
from framework.service import Service, ServiceSettings, handles, route
from framework.types import Transport

__all__ = ["MIGRATIONS", "Inventory", "RestockProduct", "StockLevel", "StockUpdate"]

DEMO_STOCK = 50
"""Units seeded for each demo product, except the two below."""

MIGRATIONS = [
    Migration(
        1,
        "stock and reservations",
        """
        create table stock (
            product_id text primary key,
            on_hand integer not null check (on_hand >= 0),
            reserved integer not null default 0 check (reserved >= 0),
            check (reserved <= on_hand)
        );
        create table reservations (
            order_id text not null,
            product_id text not null references stock (product_id),
            quantity integer not null check (quantity > 0),
            primary key (order_id, product_id)
        )
        """,
    ),
    Migration(
        2,
        "demo stock",
        f"""
        insert into stock (product_id, on_hand, reserved)
        select format('p-%s', lpad(n::text, 3, '0')),
               case n when 13 then 0 when 14 then 2 else {DEMO_STOCK} end,
               0
        from generate_series(1, 24) as n
        on conflict (product_id) do nothing
        """,
    ),
    Migration(
        3,
        "stock versions",
        "alter table stock add column version bigint not null default 0",
    ),
]


@message_type("shop.inventory.restock")
class RestockProduct(BaseModel):
    """Goods arrived at the warehouse (published by the internal gateway's restock route)."""

    product_id: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1_000_000)


AVAILABILITY_LIMIT = 100
"""The most product ids one `GET /availability` may ask for."""


class AvailabilityQuery(BaseModel):
    """The query of `GET /availability`: comma-separated product ids."""

    ids: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}(,[A-Za-z0-9_-]{1,64})*$")

    def product_ids(self) -> list[str]:
        ids = list(dict.fromkeys(self.ids.split(",")))
        if len(ids) > AVAILABILITY_LIMIT:
            raise web.HTTPUnprocessableEntity(
                text=f"at most {AVAILABILITY_LIMIT} product ids, {len(ids)} asked"
            )
        return ids


class StockUpdate(BaseModel):
    """The body of `PUT /stock/{product_id}`."""

    on_hand: int = Field(ge=0, le=1_000_000)


class StockLevel(BaseModel):
    product_id: str
    on_hand: int
    reserved: int
    available: int


class Inventory(Service):
    """The inventory service. Extra keyword arguments (embedded doubles other services take)
    are accepted and ignored: its PostgreSQL is always a real one."""

    name = "inventory"
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {
        TOPICS.INVENTORY_EVENTS: (StockReserved, StockRejected, StockReleased),
        TOPICS.STOCK_EVENTS: (StockLevelChanged,),
    }

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        **_: Any,
    ) -> None:
        super().__init__(default_settings("inventory", settings), transport=transport)
        self.db = self.use(
            PostgresResource(
                postgres_url(self.settings.env, self.name),
                migrations=MIGRATIONS,
                create_database=True,
            )
        )
        self.outbox = self.use(PostgresOutbox(self.db, self.bus))
        self.inbox = self.use(PostgresInbox(self.db))

    async def on_start(self) -> None:
        async with self.db.transaction() as tx:
            # Locks what it announces: replicas starting together announce each row once.
            rows = await tx.fetch(
                "select product_id from stock where version = 0 order by product_id for update"
            )
            await self._announce(tx, [row["product_id"] for row in rows])

    async def _announce(self, tx: Any, product_ids: Sequence[str]) -> None:
        """Bump the products' stock versions and publish their levels (in `tx`, after the
        change)."""
        rows = await tx.fetch(
            "update stock set version = version + 1 where product_id = any($1::text[]) "
            "returning product_id, on_hand - reserved as available, version",
            sorted(set(product_ids)),
        )
        for row in sorted(rows, key=lambda r: r["product_id"]):
            level = StockLevelChanged(**dict(row))
            await self.outbox.add(tx, TOPICS.STOCK_EVENTS, level, key=level.product_id)

    # -- commands -------------------------------------------------------------------------------

    @handles(TOPICS.INVENTORY_COMMANDS)
    async def on_reserve(self, command: ReserveStock, message: Message[ReserveStock]) -> None:
        async with self.db.transaction() as tx:
            if not await self.inbox.record(tx, message):
                return  # a redelivery: reserved (or rejected) and answered already
            reply = await _reserve(tx, command)
            await self.outbox.add(tx, TOPICS.INVENTORY_EVENTS, reply, key=command.order_id)
            if isinstance(reply, StockReserved):
                await self._announce(tx, [line.product_id for line in command.lines])

    @handles(TOPICS.INVENTORY_COMMANDS)
    async def on_release(self, command: ReleaseStock, message: Message[ReleaseStock]) -> None:
        async with self.db.transaction() as tx:
            if not await self.inbox.record(tx, message):
                return
            released = await _settle(tx, command.order_id, sold=False)
            reply = StockReleased(order_id=command.order_id)
            await self.outbox.add(tx, TOPICS.INVENTORY_EVENTS, reply, key=command.order_id)
            await self._announce(tx, released)

    @handles(TOPICS.INVENTORY_COMMANDS)
    async def on_commit(self, command: CommitStock, message: Message[CommitStock]) -> None:
        async with self.db.transaction() as tx:
            if not await self.inbox.record(tx, message):
                return
            await self._announce(tx, await _settle(tx, command.order_id, sold=True))

    @handles(TOPICS.INVENTORY_COMMANDS)
    async def on_restock(self, command: RestockProduct, message: Message[RestockProduct]) -> None:
        async with self.db.transaction() as tx:
            if not await self.inbox.record(tx, message):
                return
            await tx.execute(
                "insert into stock (product_id, on_hand, reserved) values ($1, $2, 0) "
                "on conflict (product_id) do update set on_hand = stock.on_hand + excluded.on_hand",
                command.product_id,
                command.quantity,
            )
            await self._announce(tx, [command.product_id])

    # -- routes ---------------------------------------------------------------------------------

    @route("GET", "/stock/{product_id}")
    async def get_available(self, request: web.Request) -> web.Response:
        """How many units of a product can be ordered now (public)."""
        product_id = request.match_info["product_id"]
        async with self.db.connection() as conn:
            available = await conn.fetchval(
                "select on_hand - reserved from stock where product_id = $1", product_id
            )
        if available is None:
            raise web.HTTPNotFound(text=f"no stock is kept for {product_id!r}")
        return json_response({"product_id": product_id, "available": available})

    @route("GET", "/availability")
    async def get_availability(self, request: web.Request) -> web.Response:
        """How many units of each of several products can be ordered now (public)."""
        ids = validate_payload(dict(request.query), AvailabilityQuery).product_ids()
        async with self.db.connection() as conn:
            rows = await conn.fetch(
                "select product_id, on_hand - reserved as available from stock "
                "where product_id = any($1::text[])",
                ids,
            )
        found = {row["product_id"]: row["available"] for row in rows}
        items = [{"product_id": i, "available": found[i]} for i in ids if i in found]
        return json_response({"items": items})

    @route("GET", "/stock", response=list[StockLevel])
    async def list_stock(self, request: web.Request) -> web.Response:
        """Every product's stock, with what is reserved (admins)."""
        require_admin(request)
        async with self.db.connection() as conn:
            rows = await conn.fetch(f"{_LEVELS} order by product_id")
        return json_response([_level(row) for row in rows])

    @route("PUT", "/stock/{product_id}", body=StockUpdate, response=StockLevel)
    async def set_on_hand(self, request: web.Request) -> web.Response:
        """Set the units on hand after a count (admins); never below what is reserved."""
        require_admin(request)
        product_id = request.match_info["product_id"]
        update = await read_json(request, StockUpdate)
        async with self.db.transaction() as tx:
            reserved = await tx.fetchval(
                "select reserved from stock where product_id = $1 for update", product_id
            )
            if reserved is not None and update.on_hand < reserved:
                raise web.HTTPConflict(
                    text=f"{reserved} unit(s) of {product_id} are reserved for orders; "
                    f"on_hand cannot go below that"
                )
            await tx.execute(
                "insert into stock (product_id, on_hand, reserved) values ($1, $2, 0) "
                "on conflict (product_id) do update set on_hand = excluded.on_hand",
                product_id,
                update.on_hand,
            )
            await self._announce(tx, [product_id])
            row = await tx.fetchrow(f"{_LEVELS} where product_id = $1", product_id)
        return json_response(_level(row))


_LEVELS = "select product_id, on_hand, reserved, on_hand - reserved as available from stock"


def _level(row: Any) -> StockLevel:
    return StockLevel(**dict(row))


async def _reserve(tx: Any, command: ReserveStock) -> StockReserved | StockRejected:
    """Reserve every line of the order, or none; the reply says which."""
    order_id = command.order_id
    if await tx.fetchval("select 1 from reservations where order_id = $1 limit 1", order_id):
        return StockReserved(order_id=order_id)  # the same order asked twice: it holds already
    wanted: dict[str, int] = {}
    for line in command.lines:  # a product on two lines is one reservation
        wanted[line.product_id] = wanted.get(line.product_id, 0) + line.quantity
    products = sorted(wanted)
    if not products:
        return StockRejected(order_id=order_id, reason="the order has no lines")
    rows = await tx.fetch(
        "select product_id, on_hand - reserved as available from stock "
        "where product_id = any($1::text[]) order by product_id for update",
        products,
    )
    available = {row["product_id"]: row["available"] for row in rows}
    for product_id in products:
        if product_id not in available:
            return StockRejected(order_id=order_id, reason=f"{product_id} is not stocked")
        if available[product_id] < wanted[product_id]:
            left = available[product_id]
            reason = (
                f"{product_id} is sold out"
                if left == 0
                else f"only {left} of {product_id} left, {wanted[product_id]} requested"
            )
            return StockRejected(order_id=order_id, reason=reason)
    quantities = [wanted[p] for p in products]
    await tx.execute(
        "update stock set reserved = stock.reserved + w.quantity "
        "from unnest($1::text[], $2::int[]) as w(product_id, quantity) "
        "where stock.product_id = w.product_id",
        products,
        quantities,
    )
    await tx.execute(
        "insert into reservations (order_id, product_id, quantity) "
        "select $1, w.product_id, w.quantity "
        "from unnest($2::text[], $3::int[]) as w(product_id, quantity)",
        order_id,
        products,
        quantities,
    )
    return StockReserved(order_id=order_id)


async def _settle(tx: Any, order_id: str, *, sold: bool) -> list[str]:
    """End the order's reservation: its units are given back, or (`sold`) leave the warehouse.
    Nothing to do for an order that holds none. Returns the products whose stock changed."""
    rows = await tx.fetch(
        "delete from reservations where order_id = $1 returning product_id, quantity", order_id
    )
    held = sorted((row["product_id"], row["quantity"]) for row in rows)
    for product_id, quantity in held:  # product-id order, as reservations lock them
        await tx.execute(
            "update stock set reserved = reserved - $2, "
            "on_hand = on_hand - case when $3 then $2 else 0 end where product_id = $1",
            product_id,
            quantity,
            sold,
        )
    return [product_id for product_id, _ in held]
