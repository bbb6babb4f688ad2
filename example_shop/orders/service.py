"""Orders: the customer's cart, placing an order, and the saga that sees it through.

Routes (the caller is the user the gateway vouched for, see `example_shop.common.caller`):

    GET    /cart                       the caller's cart with names, prices and total
    PUT    /cart/items/{product_id}    {"quantity"}: set a line (404 unknown product,
                                       409 sold out or fewer left than asked for)
    DELETE /cart/items/{product_id}    remove a line (404 when it is not in the cart)
    POST   /orders                     {"address", "card_number"}
                                       -> 202 {"order_id", "number", "status"}
    GET    /orders                     the caller's orders, newest first
    GET    /orders/{order_id}          one order with its steps (its owner or an admin)

What they answer (times are ISO 8601 with their offset):

    cart   {"items": [line, ...], "total_cents"}
    line   {"product_id", "name", "quantity", "unit_price_cents", "line_total_cents"}
    order  {"order_id", "number", "customer_id", "status", "total_cents", "address",
            "card_last4", "reason", "created_at", "updated_at", "lines": [line, ...]}
           and from GET /orders/{order_id} also
           "steps": [{"step", "at"}, ...]   placed, the saga's milestones, the outcome
           "progress": [step, ...]          the forward milestones reached (older clients)

`number` is the order's short number for people (1001, 1002, ... in the order they were
placed); URLs name orders by `order_id`. A line's `name` is the product's name when it was put
in the cart (a cart) or when the order was placed (an order); the product id stands in for a
name the read model never learned. `steps` reads in the order the order went through them:
`placed`, then the milestones its saga recorded (`stock_reserved`, `payment_authorized`,
`shipment_created`; a refusal `stock_rejected` or `payment_declined`; and undoing
`shipment_cancelled`, `payment_refunded`, `stock_released`;
see `example_shop.orders.saga`), then `confirmed`, `cancelled` or `failed` once it is over; a
step's `at` is null for a milestone of a saga recorded before their times were kept.

Placing an order is ONE transaction: the order and its lines are written, the cart emptied,
`OrderPlaced` added to the outbox and the `PlaceOrderSaga` started (its first command enqueued
in the outbox too). Either all of it commits or none. The saga (`example_shop.orders.saga`) then
moves the order to `confirmed` or `cancelled` and publishes the outcome.

**Prices and stock: local read models.** A client's word is no price list: a cart line holds a
product and a quantity, nothing else (a body naming a price is refused, 422). The catalog owns
prices and announces every product it holds with `ProductCreated` (its seeded demo products
too), every new price with `ProductPriceChanged` and every new name with `ProductRenamed`; this
service keeps the latest price and name of each product in its `prices` table (through the
inbox, so a redelivered event changes nothing; an event from before they carried names leaves
the name as it was). Its consumer group reads the catalog's topic from the beginning, so
products created before this service first subscribed are known as well; no HTTP call to the
catalog is needed, at any time.
A product the read model does not know is not for sale: 404. The cart shows the current price,
and an order is priced from the read model when it is placed, in its transaction.

Inventory announces each product's available units with `StockLevelChanged` (versioned; the
highest version wins); the `stock` table keeps them. A product with none available (or never
stocked) cannot be added to a cart (409, "sold out"), nor more units than are available. It is
advice, lagging inventory by the events' latency: the saga's reservation decides, and an order
for stock sold meanwhile is cancelled ("sold out"). Both read models trade a little staleness
for carts that work without a synchronous call to another service.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from example_shop.common import caller, default_settings, postgres_url
from example_shop.contracts import (
    TOPICS,
    AuthorizePayment,
    CancelShipment,
    CommitStock,
    CreateShipment,
    OrderCancelled,
    OrderConfirmed,
    OrderLine,
    OrderPlaced,
    ProductCreated,
    ProductPriceChanged,
    ProductRenamed,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    StockLevelChanged,
)
from example_shop.orders.saga import OrderSagaData, OrderStatusChanged, PlaceOrderSaga
from framework.bus import Message
from framework.http import json_response, read_json
from framework.messages import new_id
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import Migration, PostgresResource
from framework.persistence.saga import SagaNotFound, SagaOrchestrator
from framework.service import Service, ServiceSettings, handles, route
from framework.types import Transport

__all__ = ["MIGRATIONS", "CartItemUpdate", "Orders", "PlaceOrder"]

MIGRATIONS = [
    Migration(
        1,
        "carts, orders, prices",
        """
        create table carts (
            customer_id text not null,
            product_id text not null,
            quantity integer not null check (quantity > 0),
            unit_price_cents integer not null check (unit_price_cents >= 0),
            added_at timestamptz not null default clock_timestamp(),
            primary key (customer_id, product_id)
        );
        create table orders (
            order_id text primary key,
            customer_id text not null,
            status text not null,
            total_cents integer not null,
            address text not null,
            card_last4 text not null,
            reason text,
            created_at timestamptz not null default clock_timestamp(),
            updated_at timestamptz not null default clock_timestamp()
        );
        create index orders_by_customer on orders (customer_id, created_at desc);
        create table order_lines (
            order_id text not null references orders (order_id) on delete cascade,
            product_id text not null,
            quantity integer not null check (quantity > 0),
            unit_price_cents integer not null check (unit_price_cents >= 0),
            primary key (order_id, product_id)
        );
        create table prices (
            product_id text primary key,
            price_cents integer not null check (price_cents >= 0),
            updated_at timestamptz not null default clock_timestamp()
        )
        """,
    ),
    Migration(
        2,
        "stock read model; carts hold no prices",
        """
        create table stock (
            product_id text primary key,
            available integer not null,
            version bigint not null
        );
        alter table carts drop column unit_price_cents
        """,
    ),
    Migration(
        3,
        "product names; order numbers",
        """
        alter table prices add column name text;
        alter table order_lines add column name text;
        alter table orders add column number bigint unique;
        update orders set number = numbered.number
        from (
            select order_id, 1000 + row_number() over (order by created_at, order_id) as number
            from orders
        ) numbered
        where orders.order_id = numbered.order_id;
        alter table orders alter column number set not null;
        alter table orders alter column number add generated always as identity;
        select setval(
            pg_get_serial_sequence('orders', 'number'),
            coalesce((select max(number) from orders), 1000) + 1,
            false
        )
        """,
    ),
]

HISTORY_LIMIT = 100
"""Orders listed by `GET /orders`, newest first."""
OUTCOMES = ("confirmed", "cancelled", "failed")
"""The statuses an order ends in: the last of its steps."""
ORDER_TOTAL_LIMIT_CENTS = 2**31 - 1
"""The largest total an order may have: what `orders.total_cents` holds. A cart worth more is
refused (409) when it is ordered."""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class CartItemUpdate(BaseModel):
    """The body of `PUT /cart/items/{product_id}`: how many. The price is the catalog's; a body
    that names one (or anything else) is refused."""

    model_config = ConfigDict(extra="forbid")

    quantity: int = Field(gt=0, le=100)


class PlaceOrder(BaseModel):
    """The body of `POST /orders`. The card number is simulated; only its last 4 are kept."""

    address: str = Field(min_length=3, max_length=500)
    card_number: str = Field(pattern=r"^\d{12,19}$")

    @field_validator("address", mode="before")
    @classmethod
    def _trim(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("address")
    @classmethod
    def _printable(cls, value: str) -> str:
        # Lines, yes; other control characters, no (PostgreSQL text cannot even hold NUL).
        if _CONTROL.search(value):
            raise ValueError("the address holds control characters")
        return value

    @field_validator("card_number", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        return value.replace(" ", "").replace("-", "") if isinstance(value, str) else value


_CART = """
select c.product_id, p.name, c.quantity, p.price_cents as unit_price_cents
from carts c join prices p using (product_id)
where c.customer_id = $1
order by c.added_at, c.product_id
"""
_ORDER_COLUMNS = (
    "order_id, number, customer_id, status, total_cents, address, card_last4, reason, "
    "created_at, updated_at"
)
_SET_PRODUCT = """
insert into prices (product_id, price_cents, name) values ($1, $2, $3)
on conflict (product_id)
do update set price_cents = excluded.price_cents, name = coalesce(excluded.name, prices.name),
    updated_at = clock_timestamp()
"""
_SET_STOCK = """
insert into stock (product_id, available, version) values ($1, $2, $3)
on conflict (product_id) do update set available = excluded.available, version = excluded.version
where stock.version < excluded.version
"""


class Orders(Service):
    """The orders service. Extra keyword arguments (embedded doubles other services take) are
    accepted and ignored: its PostgreSQL is always a real one."""

    name = "orders"
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {
        TOPICS.ORDERS_EVENTS: (OrderPlaced, OrderStatusChanged, OrderConfirmed, OrderCancelled),
        TOPICS.INVENTORY_COMMANDS: (ReserveStock, ReleaseStock, CommitStock),
        TOPICS.PAYMENTS_COMMANDS: (AuthorizePayment, RefundPayment),
        TOPICS.SHIPPING_COMMANDS: (CreateShipment, CancelShipment),
    }

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        **_: Any,
    ) -> None:
        super().__init__(default_settings("orders", settings), transport=transport)
        self.db = self.use(
            PostgresResource(
                postgres_url(self.settings.env, self.name),
                migrations=MIGRATIONS,
                create_database=True,
            )
        )
        self.outbox = self.use(PostgresOutbox(self.db, self.bus))
        self.inbox = self.use(PostgresInbox(self.db))
        self.saga = PlaceOrderSaga(self.outbox)
        self.sagas = self.use(
            SagaOrchestrator(self.db, self.outbox, self.inbox, definitions=[self.saga])
        )
        self.sagas.subscribe(
            self.bus, [TOPICS.INVENTORY_EVENTS, TOPICS.PAYMENTS_EVENTS, TOPICS.SHIPPING_EVENTS]
        )
        self._heard = asyncio.Condition()
        """Notified whenever a read model took an event (see `until_known`)."""

    # -- the price read model (prices and names) ------------------------------------------------

    # The catalog's topic may carry more: the rest is not this read model's business.
    @handles(TOPICS.CATALOG_EVENTS, unhandled="skip")
    async def on_product_created(
        self, event: ProductCreated, message: Message[ProductCreated]
    ) -> None:
        await self._set_product(message, event.product_id, event.price_cents, event.name)

    @handles(TOPICS.CATALOG_EVENTS, unhandled="skip")
    async def on_price_changed(
        self, event: ProductPriceChanged, message: Message[ProductPriceChanged]
    ) -> None:
        await self._set_product(message, event.product_id, event.new_price_cents, event.name)

    @handles(TOPICS.CATALOG_EVENTS, unhandled="skip")
    async def on_product_renamed(
        self, event: ProductRenamed, message: Message[ProductRenamed]
    ) -> None:
        await self._set_product(message, event.product_id, event.price_cents, event.name)

    async def _set_product(
        self, message: Message[Any], product_id: str, price_cents: int, name: str | None
    ) -> None:
        async with self.db.transaction() as tx:
            if await self.inbox.record(tx, message):
                await tx.execute(_SET_PRODUCT, product_id, price_cents, name)
        await self._changed()

    # -- the stock read model -------------------------------------------------------------------

    @handles(TOPICS.STOCK_EVENTS)
    async def on_stock_level(self, event: StockLevelChanged) -> None:
        # Versioned, so neither a redelivery nor an older level can undo a newer one: no inbox.
        async with self.db.connection() as conn:
            await conn.execute(_SET_STOCK, event.product_id, event.available, event.version)
        await self._changed()

    async def knows(self, product_ids: Sequence[str]) -> bool:
        """Whether the read models hold a price and a stock level for each of the products."""
        async with self.db.connection() as conn:
            known = await conn.fetchval(
                "select count(*) from prices join stock using (product_id) "
                "where product_id = any($1::text[])",
                list(product_ids),
            )
        return bool(known == len(set(product_ids)))

    async def until_known(self, product_ids: Sequence[str]) -> None:
        """Return once the read models hold a price and a stock level for each of the products
        (woken by every catalog or stock event this process takes; bound it with a timeout)."""
        async with self._heard:
            while not await self.knows(product_ids):
                await self._heard.wait()

    async def _changed(self) -> None:
        async with self._heard:
            self._heard.notify_all()

    # -- the cart -------------------------------------------------------------------------------

    @route("GET", "/cart")
    async def get_cart(self, request: web.Request) -> web.Response:
        """The caller's cart."""
        who = caller(request)
        async with self.db.connection() as conn:
            return json_response(_cart(await conn.fetch(_CART, who.user_id)))

    @route("PUT", "/cart/items/{product_id}", body=CartItemUpdate)
    async def put_cart_item(self, request: web.Request) -> web.Response:
        """Set how many of a product the cart holds; returns the cart."""
        who = caller(request)
        product_id = request.match_info["product_id"]
        item = await read_json(request, CartItemUpdate)
        async with self.db.transaction() as tx:
            known = await tx.fetchrow(
                "select p.product_id, coalesce(s.available, 0) as available "
                "from prices p left join stock s using (product_id) where p.product_id = $1",
                product_id,
            )
            if known is None:
                raise web.HTTPNotFound(text=f"no product {product_id!r}")
            if known["available"] <= 0:
                raise web.HTTPConflict(text=f"{product_id} is sold out")
            if known["available"] < item.quantity:
                raise web.HTTPConflict(
                    text=f"only {known['available']} of {product_id} left, "
                    f"{item.quantity} requested"
                )
            await tx.execute(
                "insert into carts (customer_id, product_id, quantity) values ($1, $2, $3) "
                "on conflict (customer_id, product_id) do update set quantity = excluded.quantity",
                who.user_id,
                product_id,
                item.quantity,
            )
            return json_response(_cart(await tx.fetch(_CART, who.user_id)))

    @route("DELETE", "/cart/items/{product_id}")
    async def delete_cart_item(self, request: web.Request) -> web.Response:
        """Remove a product from the cart; returns the cart."""
        who = caller(request)
        product_id = request.match_info["product_id"]
        async with self.db.transaction() as tx:
            status = await tx.execute(
                "delete from carts where customer_id = $1 and product_id = $2",
                who.user_id,
                product_id,
            )
            if status == "DELETE 0":
                raise web.HTTPNotFound(text=f"{product_id} is not in the cart")
            return json_response(_cart(await tx.fetch(_CART, who.user_id)))

    # -- orders ---------------------------------------------------------------------------------

    @route("POST", "/orders", body=PlaceOrder)
    async def place_order(self, request: web.Request) -> web.Response:
        """Order what the cart holds: 202, then the saga decides (follow the order's events)."""
        who = caller(request)
        body = await read_json(request, PlaceOrder)
        order_id = new_id()
        async with self.db.transaction() as tx:
            # Locking the cart rows makes a double submit wait, then find the cart empty.
            rows = await tx.fetch(_CART + " for update of c", who.user_id)
            if not rows:
                raise web.HTTPConflict(text="the cart is empty")
            lines = [OrderLine(**dict(row)) for row in rows]
            total = sum(line.quantity * line.unit_price_cents for line in lines)
            if total <= 0:
                raise web.HTTPConflict(text="the order has nothing to pay for")
            if total > ORDER_TOTAL_LIMIT_CENTS:
                raise web.HTTPConflict(
                    text=f"the order totals {total} cents; at most {ORDER_TOTAL_LIMIT_CENTS} "
                    "can be ordered at once"
                )
            number = await tx.fetchval(
                "insert into orders (order_id, customer_id, status, total_cents, address, "
                "card_last4) values ($1, $2, 'pending', $3, $4, $5) returning number",
                order_id,
                who.user_id,
                total,
                body.address,
                body.card_number[-4:],
            )
            await tx.executemany(
                "insert into order_lines (order_id, product_id, name, quantity, "
                "unit_price_cents) values ($1, $2, $3, $4, $5)",
                [
                    (order_id, li.product_id, li.name, li.quantity, li.unit_price_cents)
                    for li in lines
                ],
            )
            await tx.execute("delete from carts where customer_id = $1", who.user_id)
            placed = OrderPlaced(
                order_id=order_id, customer_id=who.user_id, lines=lines, total_cents=total
            )
            await self.outbox.add(tx, TOPICS.ORDERS_EVENTS, placed, key=order_id)
            data = OrderSagaData(
                order_id=order_id,
                customer_id=who.user_id,
                lines=lines,
                total_cents=total,
                address=body.address,
                card_number=body.card_number,
            )
            await self.sagas.start_saga(tx, self.saga, data, saga_id=order_id)
        return json_response(
            {"order_id": order_id, "number": number, "status": "pending"},
            status=202,
            headers={"Location": f"/orders/{order_id}"},
        )

    @route("GET", "/orders")
    async def list_orders(self, request: web.Request) -> web.Response:
        """The caller's orders, newest first."""
        who = caller(request)
        async with self.db.connection() as conn:
            rows = await conn.fetch(
                f"select {_ORDER_COLUMNS} from orders where customer_id = $1 "
                "order by created_at desc, order_id desc limit $2",
                who.user_id,
                HISTORY_LIMIT,
            )
            orders = await _with_lines(conn, rows)
        return json_response({"orders": orders})

    @route("GET", "/orders/{order_id}")
    async def get_order(self, request: web.Request) -> web.Response:
        """One order, with the steps it went through (its owner or an admin)."""
        who = caller(request)
        order_id = request.match_info["order_id"]
        async with self.db.connection() as conn:
            row = await conn.fetchrow(
                f"select {_ORDER_COLUMNS} from orders where order_id = $1", order_id
            )
            # Someone else's order is "not found", not "forbidden": ids are not confirmed.
            if row is None or (row["customer_id"] != who.user_id and not who.is_admin):
                raise web.HTTPNotFound(text=f"no order {order_id}")
            [order] = await _with_lines(conn, [row])
        saga: OrderSagaData | None
        try:
            saga = (await self.sagas.get(order_id)).data
        except SagaNotFound:  # every order placed here starts one; one imported reads without
            saga = None
        order["steps"] = _steps(row, saga)
        order["progress"] = saga.progress if saga is not None else []
        return json_response(order)


def _steps(order: Any, saga: OrderSagaData | None) -> list[dict[str, Any]]:
    """The order's steps: placed, its saga's milestones, its outcome."""
    steps = [{"step": "placed", "at": order["created_at"]}]
    if saga is not None:
        steps += [{"step": m.step, "at": m.at} for m in saga.reached]
    if order["status"] in OUTCOMES:
        steps.append({"step": order["status"], "at": order["updated_at"]})
    return steps


def _line(row: Any) -> dict[str, Any]:
    """A cart or order line as the API shows it."""
    return {
        "product_id": row["product_id"],
        "name": row["name"] or row["product_id"],
        "quantity": row["quantity"],
        "unit_price_cents": row["unit_price_cents"],
        "line_total_cents": row["quantity"] * row["unit_price_cents"],
    }


def _cart(rows: Sequence[Any]) -> dict[str, Any]:
    items = [_line(row) for row in rows]
    return {"items": items, "total_cents": sum(i["line_total_cents"] for i in items)}


async def _with_lines(conn: Any, rows: Sequence[Any]) -> list[dict[str, Any]]:
    orders = {row["order_id"]: {**dict(row), "lines": []} for row in rows}
    lines = await conn.fetch(
        "select order_id, product_id, name, quantity, unit_price_cents from order_lines "
        "where order_id = any($1::text[]) order by product_id",
        list(orders),
    )
    for line in lines:
        orders[line["order_id"]]["lines"].append(_line(line))
    return list(orders.values())
