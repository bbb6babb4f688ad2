"""The orders service and its saga, end to end on a real PostgreSQL and one in-memory bus.

The real inventory service takes part (its own database); the catalog's part is its events (the
demo products' `ProductCreated`, published by the fixture); payments and shipping are played by
the minimal fakes below, which answer the saga's commands with the contract's replies from
inside their command handlers (so the replies carry the saga id as correlation id, like a real
participant's). The shop-level tests run the real payments and shipping services.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest

from example_shop.catalog.seed import DEMO_PRODUCTS
from example_shop.contracts import (
    TOPICS,
    AuthorizePayment,
    CancelShipment,
    CreateShipment,
    OrderCancelled,
    OrderConfirmed,
    OrderPlaced,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    ProductCreated,
    ProductPriceChanged,
    ProductRenamed,
    RefundPayment,
    ShipmentCancelled,
    ShipmentCreated,
    StockLevelChanged,
)
from example_shop.inventory import Inventory
from example_shop.orders import Orders, OrderStatusChanged
from example_shop.orders.saga import Milestone, OrderSagaData
from example_shop.orders.service import MIGRATIONS
from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.messages import Envelope, decode_payload, from_binary, to_binary, type_name
from framework.persistence.postgres import PostgresResource
from framework.service import ServiceSettings
from framework.types import RecordMetadata, TopicPartition

pytestmark = pytest.mark.postgres

DECLINED_CARD = "4000 0000 0000 0002"
GOOD_CARD = "4242 4242 4242 4242"
PRICES = {p["product_id"]: p["price_cents"] for p in DEMO_PRODUCTS}
"""The catalog's prices of the demo products: p-001 costs 1290, p-002 1490, p-003 1890."""
NAMES = {p["product_id"]: p["name"] for p in DEMO_PRODUCTS}


def line(product_id: str, quantity: int, unit_price_cents: int | None = None) -> dict[str, Any]:
    """A cart or order line as the API shows it, of a demo product."""
    price = PRICES[product_id] if unit_price_cents is None else unit_price_cents
    return {
        "product_id": product_id,
        "name": NAMES[product_id],
        "quantity": quantity,
        "unit_price_cents": price,
        "line_total_cents": quantity * price,
    }


# -- the participants this test does not own ------------------------------------------------------


@dataclass
class FakePayments:
    """Authorizes every card but DECLINED_CARD; refunds whatever it is asked to (or, when
    `silent_refunds`, never answers a refund)."""

    bus: Bus
    silent_refunds: bool = False
    seen: list[Any] = field(default_factory=list)

    def subscribe(self) -> None:
        self.bus.subscribe(
            [TOPICS.PAYMENTS_COMMANDS],
            {
                type_name(AuthorizePayment): HandlerSpec(AuthorizePayment, self.on_authorize),
                type_name(RefundPayment): HandlerSpec(RefundPayment, self.on_refund),
            },
            ConsumerOptions(group="payments"),
        )

    async def on_authorize(self, message: Message[AuthorizePayment]) -> None:
        command = message.data
        self.seen.append(command)
        reply: PaymentAuthorized | PaymentDeclined
        if command.card_number == DECLINED_CARD.replace(" ", ""):
            reply = PaymentDeclined(order_id=command.order_id, reason="insufficient funds")
        else:
            reply = PaymentAuthorized(
                order_id=command.order_id,
                payment_id=f"pay-{command.order_id}",
                amount_cents=command.amount_cents,
            )
        await self.bus.publish(TOPICS.PAYMENTS_EVENTS, reply, key=command.order_id)

    async def on_refund(self, message: Message[RefundPayment]) -> None:
        self.seen.append(message.data)
        if self.silent_refunds:
            return
        refunded = PaymentRefunded(order_id=message.data.order_id)
        await self.bus.publish(TOPICS.PAYMENTS_EVENTS, refunded, key=message.data.order_id)


@dataclass
class FakeShipping:
    """Creates shipments (or, when `silent`, never answers); cancels whatever it is asked to."""

    bus: Bus
    silent: bool = False
    seen: list[Any] = field(default_factory=list)

    def subscribe(self) -> None:
        self.bus.subscribe(
            [TOPICS.SHIPPING_COMMANDS],
            {
                type_name(CreateShipment): HandlerSpec(CreateShipment, self.on_create),
                type_name(CancelShipment): HandlerSpec(CancelShipment, self.on_cancel),
            },
            ConsumerOptions(group="shipping"),
        )

    async def on_create(self, message: Message[CreateShipment]) -> None:
        self.seen.append(message.data)
        if not self.silent:
            order_id = message.data.order_id
            created = ShipmentCreated(order_id=order_id, shipment_id=f"ship-{order_id}")
            await self.bus.publish(TOPICS.SHIPPING_EVENTS, created, key=order_id)

    async def on_cancel(self, message: Message[CancelShipment]) -> None:
        self.seen.append(message.data)
        cancelled = ShipmentCancelled(order_id=message.data.order_id)
        await self.bus.publish(TOPICS.SHIPPING_EVENTS, cancelled, key=message.data.order_id)


# -- the shop -------------------------------------------------------------------------------------


@dataclass
class Shop:
    orders: Orders
    inventory: Inventory
    payments: FakePayments
    shipping: FakeShipping
    transport: MemoryTransport
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.orders.http_port}{path}"

    async def call(
        self, method: str, path: str, user: str | None = "alice", *, admin: bool = False, **kw: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {}
        if user is not None:
            headers = {"x-user-id": user, "x-user-roles": "admin" if admin else "customer"}
        async with self.http.request(method, self.url(path), headers=headers, **kw) as response:
            body = await response.json() if response.content_length != 0 else None
            return response.status, body, response

    async def add(self, user: str, product_id: str, quantity: int) -> Any:
        status, cart, _ = await self.call(
            "PUT", f"/cart/items/{product_id}", user, json={"quantity": quantity}
        )
        assert status == 200, cart
        return cart

    async def place(self, user: str, card: str = GOOD_CARD) -> str:
        order_id: str = (await self.place_answer(user, card))["order_id"]
        return order_id

    async def place_answer(self, user: str, card: str = GOOD_CARD) -> dict[str, Any]:
        """The 202 answer of placing the cart of `user`."""
        body = {"address": "1 Main St, Springfield", "card_number": card}
        status, placed, response = await self.call("POST", "/orders", user, json=body)
        assert status == 202, placed
        assert set(placed) == {"order_id", "number", "status"}
        assert placed["status"] == "pending"
        assert response.headers["Location"] == f"/orders/{placed['order_id']}"
        answer: dict[str, Any] = placed
        return answer

    async def outcome(self, order_id: str, user: str = "alice", timeout: float = 15.0) -> Any:
        """The order once its saga finished."""
        deadline = time.monotonic() + timeout
        while True:
            status, order, _ = await self.call("GET", f"/orders/{order_id}", user)
            assert status == 200, order
            if order["status"] != "pending":
                return order
            assert time.monotonic() < deadline, f"order {order_id} still pending"
            await asyncio.sleep(0.05)

    def events(self, topic: str, order_id: str | None = None) -> list[Envelope[bytes]]:
        found = [from_binary(r) for r in self.transport.records(topic)]  # one key: one partition
        return [e for e in found if order_id is None or e.partitionkey == order_id]

    def order_events(self, order_id: str) -> list[str]:
        return [e.type for e in self.events(TOPICS.ORDERS_EVENTS, order_id)]

    def announced(self, order_id: str) -> list[OrderStatusChanged]:
        """The order's status changes, as published."""
        return [
            OrderStatusChanged.model_validate_json(e.data)
            for e in self.events(TOPICS.ORDERS_EVENTS, order_id)
            if e.type == type_name(OrderStatusChanged)
        ]

    async def stock(self, product_id: str) -> tuple[int, int]:
        async with self.inventory.db.connection() as conn:
            row = await conn.fetchrow(
                "select on_hand, reserved from stock where product_id = $1", product_id
            )
        return (row["on_hand"], row["reserved"])

    def consumers_caught_up(self) -> bool:
        """Every consumer of the shop has taken every record and has none left in hand."""
        buses = (self.orders.bus, self.inventory.bus, self.payments.bus, self.shipping.bus)
        return all(
            subscription.in_flight == 0 and not any(subscription.lag().values())
            for bus in buses
            for subscription in bus.subscriptions
        )

    def records(self) -> int:
        """How many records the bus holds, over every topic."""
        return sum(len(log) for topic in self.transport.topics.values() for log in topic.logs)

    async def settled(self) -> None:
        """Wait until the shop is quiet: both outboxes drained (what committed is on the bus),
        and every consumer caught up before and after that, with no record published between.
        Then nothing more is coming: only a handler or a relay could make more."""

        async def quiet() -> bool:
            records = self.records()
            return (
                self.consumers_caught_up()
                and await _all_zero(self.orders.outbox.pending(), self.inventory.outbox.pending())
                and self.consumers_caught_up()
                and self.records() == records
            )

        await eventually_async(quiet)


def step_names(order: dict[str, Any]) -> list[str]:
    """The names of an order's steps, once their times are checked: each has an offset, they
    are in the order they happened, "placed" is when the order was created and its outcome
    (once it has one) when it last changed."""
    steps = order["steps"]
    times = [datetime.fromisoformat(step["at"]) for step in steps]
    assert all(at.tzinfo is not None for at in times)
    assert times == sorted(times)
    assert steps[0] == {"step": "placed", "at": order["created_at"]}
    if order["status"] != "pending":
        assert steps[-1] == {"step": order["status"], "at": order["updated_at"]}
    return [step["step"] for step in steps]


def announced_as_listed(shop: Shop, order: dict[str, Any]) -> list[str]:
    """The statuses the order's events announced, once each is checked to carry the time its
    step has on the order's page."""
    listed = {step["step"]: datetime.fromisoformat(step["at"]) for step in order["steps"]}
    changes = shop.announced(order["order_id"])
    assert [change.at for change in changes] == [listed[change.status] for change in changes]
    return [change.status for change in changes]


async def _all_zero(*counts: Awaitable[int]) -> bool:
    return not any([await c for c in counts])


async def eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
async def inventory_database() -> AsyncIterator[str]:
    """A second fresh database (the orders service has the `postgres_database` one)."""
    server = os.environ["POSTGRES_URL"]
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'create database "{name}"')
        yield urlunsplit(urlsplit(server)._replace(path="/" + name))
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@pytest.fixture
async def shop(postgres_database: str, inventory_database: str) -> AsyncIterator[Shop]:
    transport = MemoryTransport()
    env = {
        "ORDERS_DATABASE_URL": postgres_database,
        "INVENTORY_DATABASE_URL": inventory_database,
        "MSA_HTTP_HOST": "127.0.0.1",
        "MSA_HTTP_PORT": "0",
    }
    orders = Orders(ServiceSettings.from_env(env), transport=transport)
    inventory = Inventory(ServiceSettings.from_env(env), transport=transport)
    payments = FakePayments(Bus(transport, source="payments"))
    shipping = FakeShipping(Bus(transport, source="shipping"))
    payments.subscribe()
    shipping.subscribe()
    catalog = Bus(transport, source="catalog")
    await inventory.start()  # announces its demo stock
    await catalog.start()
    for product in DEMO_PRODUCTS:  # what the catalog announces when it seeds them
        created = ProductCreated(**{k: product[k] for k in ProductCreated.model_fields})
        await catalog.publish(TOPICS.CATALOG_EVENTS, created, key=created.product_id)
    await orders.start()  # subscribes after the events were published: reads from the start
    await payments.bus.start()
    await shipping.bus.start()
    try:
        async with aiohttp.ClientSession() as http:
            shop = Shop(orders, inventory, payments, shipping, transport, http)
            async with asyncio.timeout(10):
                await orders.until_known([p["product_id"] for p in DEMO_PRODUCTS])
            yield shop
    finally:
        await catalog.stop(grace=1)
        await shipping.bus.stop(grace=1)
        await payments.bus.stop(grace=1)
        await orders.stop(grace=1)
        await inventory.stop(grace=1)


# -- the cart -------------------------------------------------------------------------------------


async def test_cart_lines_are_set_replaced_and_removed_per_customer(shop: Shop) -> None:
    assert (await shop.call("GET", "/cart"))[:2] == (200, {"items": [], "total_cents": 0})

    await shop.add("alice", "p-001", 2)
    await shop.add("alice", "p-002", 1)
    cart = await shop.add("alice", "p-001", 3)  # sets, does not add up
    assert cart["items"] == [
        {
            "product_id": "p-001",
            "name": "Classic White Mug",
            "quantity": 3,
            "unit_price_cents": 1290,
            "line_total_cents": 3870,
        },
        line("p-002", 1),
    ]
    assert cart["total_cents"] == 5360
    status, cart, _ = await shop.call("DELETE", "/cart/items/p-002")
    assert status == 200
    assert [i["product_id"] for i in cart["items"]] == ["p-001"]
    assert (await shop.call("DELETE", "/cart/items/p-002"))[0] == 404
    assert (await shop.call("GET", "/cart", "bob"))[1]["items"] == []  # carts are per customer

    assert (await shop.call("PUT", "/cart/items/p-003", json={"quantity": 0}))[0] == 422
    assert (await shop.call("PUT", "/cart/items/p-003", data=b"{"))[0] == 422
    assert (await shop.call("GET", "/cart", None))[0] == 401


async def test_the_client_cannot_set_a_price(shop: Shop) -> None:
    tampered = {"quantity": 2, "unit_price_cents": 1}
    status, problem, response = await shop.call("PUT", "/cart/items/p-001", json=tampered)
    assert status == 422
    assert response.content_type == "application/problem+json"
    assert "unit_price_cents" in str(problem)
    assert (await shop.call("GET", "/cart"))[1] == {"items": [], "total_cents": 0}

    cart = await shop.add("alice", "p-001", 2)
    assert cart["total_cents"] == 2 * PRICES["p-001"] == 2580
    order = await shop.outcome(await shop.place("alice"))
    assert order["status"] == "confirmed"
    assert order["total_cents"] == 2 * PRICES["p-001"]
    assert order["lines"] == [line("p-001", 2)]
    [authorize] = shop.payments.seen
    assert authorize.amount_cents == 2 * PRICES["p-001"]


async def test_unknown_products_are_not_found_and_sold_out_ones_refused(shop: Shop) -> None:
    status, problem, response = await shop.call(
        "PUT", "/cart/items/no-such-product", json={"quantity": 1}
    )
    assert status == 404
    assert response.content_type == "application/problem+json"
    assert problem["detail"] == "no product 'no-such-product'"

    status, problem, _ = await shop.call("PUT", "/cart/items/p-013", json={"quantity": 1})
    assert (status, problem["detail"]) == (409, "p-013 is sold out")
    status, problem, _ = await shop.call("PUT", "/cart/items/p-014", json={"quantity": 3})
    assert (status, problem["detail"]) == (409, "only 2 of p-014 left, 3 requested")
    assert (await shop.call("GET", "/cart"))[1]["items"] == []

    # Restocked: inventory announces the new level, and the product can be added again.
    status, level = await _set_on_hand(shop, "p-013", 5)
    assert (status, level["available"]) == (200, 5)
    await eventually_async(lambda: _available_is(shop, "p-013", 5))
    cart = await shop.add("alice", "p-013", 5)
    assert cart["items"][0]["unit_price_cents"] == PRICES["p-013"]


async def _set_on_hand(shop: Shop, product_id: str, on_hand: int) -> tuple[int, Any]:
    """A count in the warehouse, through the inventory service's admin route."""
    url = f"http://127.0.0.1:{shop.inventory.http_port}/stock/{product_id}"
    headers = {"x-user-id": "root", "x-user-roles": "admin"}
    async with shop.http.put(url, json={"on_hand": on_hand}, headers=headers) as response:
        return response.status, await response.json()


async def _available_is(shop: Shop, product_id: str, available: int) -> bool:
    async with shop.orders.db.connection() as conn:
        found = await conn.fetchval("select available from stock where product_id = $1", product_id)
    return bool(found == available)


async def test_stock_levels_keep_the_newest_version(shop: Shop) -> None:
    """An older level, redelivered or announced again, never replaces a newer one."""
    inventory = Bus(shop.transport, source="inventory")
    await inventory.start()
    try:
        newer = StockLevelChanged(product_id="p-001", available=7, version=100)
        older = StockLevelChanged(product_id="p-001", available=50, version=99)
        await inventory.publish(TOPICS.STOCK_EVENTS, newer, key="p-001")
        last = await inventory.publish(TOPICS.STOCK_EVENTS, older, key="p-001")
        assert isinstance(last, RecordMetadata)
        await eventually_async(lambda: _handled(shop, "orders", last))
        assert await _available_is(shop, "p-001", 7)
    finally:
        await inventory.stop(grace=1)


async def test_cart_prices_come_from_the_catalogs_events(shop: Shop) -> None:
    catalog = Bus(shop.transport, source="catalog")
    await catalog.start()
    try:
        created = ProductCreated(product_id="p-003", name="Mug", category="home", price_cents=1500)
        await catalog.publish(TOPICS.CATALOG_EVENTS, created, key="p-003")
        await eventually_async(lambda: _price_is(shop, "p-003", 1500))

        cart = await shop.add("alice", "p-003", 1)
        cart = await shop.add("alice", "p-004", 1)
        assert [i["unit_price_cents"] for i in cart["items"]] == [1500, PRICES["p-004"]]

        change = Envelope(
            type=type_name(ProductPriceChanged),
            source="catalog",
            data=ProductPriceChanged(
                product_id="p-003", old_price_cents=1500, new_price_cents=1200
            ),
            partitionkey="p-003",
        )
        await catalog.publish_envelope(TOPICS.CATALOG_EVENTS, change)
        await eventually_async(lambda: _price_is(shop, "p-003", 1200))
        assert (await shop.call("GET", "/cart"))[1]["total_cents"] == 1200 + PRICES["p-004"]

        # A later price, then the old change redelivered: the inbox keeps the later one.
        await catalog.publish(
            TOPICS.CATALOG_EVENTS,
            ProductPriceChanged(product_id="p-003", old_price_cents=1200, new_price_cents=1300),
            key="p-003",
        )
        await eventually_async(lambda: _price_is(shop, "p-003", 1300))
        key, value, headers = to_binary(change)
        again = await (
            await shop.transport.send(TOPICS.CATALOG_EVENTS, value, key=key, headers=headers)
        )
        await eventually_async(lambda: _handled(shop, "orders", again))
        assert await _price_is(shop, "p-003", 1300)
    finally:
        await catalog.stop(grace=1)


async def test_names_come_from_the_catalogs_events_and_orders_keep_theirs(shop: Shop) -> None:
    catalog = Bus(shop.transport, source="catalog")
    await catalog.start()

    async def announce(event: ProductCreated | ProductPriceChanged | ProductRenamed) -> None:
        await catalog.publish(TOPICS.CATALOG_EVENTS, event, key=event.product_id)

    try:
        await announce(
            ProductCreated(product_id="p-003", name="Mug", category="mugs", price_cents=1500)
        )
        await eventually_async(lambda: _name_is(shop, "p-003", "Mug"))
        # An event from before price changes carried names leaves the name as it was.
        await announce(
            ProductPriceChanged(product_id="p-003", old_price_cents=1500, new_price_cents=1400)
        )
        await eventually_async(lambda: _price_is(shop, "p-003", 1400))
        assert await _name_is(shop, "p-003", "Mug")
        assert (await shop.add("alice", "p-003", 2))["items"] == [
            {
                "product_id": "p-003",
                "name": "Mug",
                "quantity": 2,
                "unit_price_cents": 1400,
                "line_total_cents": 2800,
            }
        ]
        order = await shop.outcome(await shop.place("alice"))

        await announce(ProductRenamed(product_id="p-003", name="Big Mug", price_cents=1400))
        await eventually_async(lambda: _name_is(shop, "p-003", "Big Mug"))
        cart = await shop.add("bob", "p-003", 1)
        assert [(i["name"], i["unit_price_cents"]) for i in cart["items"]] == [("Big Mug", 1400)]
        await announce(
            ProductPriceChanged(
                product_id="p-003", old_price_cents=1400, new_price_cents=1300, name="Huge Mug"
            )
        )
        await eventually_async(lambda: _name_is(shop, "p-003", "Huge Mug"))
        assert [i["name"] for i in (await shop.call("GET", "/cart", "bob"))[1]["items"]] == [
            "Huge Mug"
        ]
        # The order keeps the name the product had when it was placed.
        _, again, _ = await shop.call("GET", f"/orders/{order['order_id']}")
        assert [(li["name"], li["unit_price_cents"]) for li in again["lines"]] == [("Mug", 1400)]
        _, history, _ = await shop.call("GET", "/orders")
        assert history["orders"][0]["lines"] == again["lines"]

        # A product whose name the read model never learned shows its id instead.
        async with shop.orders.db.connection() as conn:
            await conn.execute("update prices set name = null where product_id = 'p-004'")
        cart = await shop.add("bob", "p-004", 1)
        assert [i["name"] for i in cart["items"]] == ["Huge Mug", "p-004"]
    finally:
        await catalog.stop(grace=1)


async def _name_is(shop: Shop, product_id: str, name: str) -> bool:
    async with shop.orders.db.connection() as conn:
        found = await conn.fetchval("select name from prices where product_id = $1", product_id)
    return bool(found == name)


async def _handled(shop: Shop, group: str, record: RecordMetadata) -> bool:
    """Whether `group` is done with `record`: it committed past it."""
    committed = shop.transport.committed(group, TopicPartition(record.topic, record.partition))
    return committed is not None and committed > record.offset


async def _price_is(shop: Shop, product_id: str, cents: int) -> bool:
    async with shop.orders.db.connection() as conn:
        found = await conn.fetchval(
            "select price_cents from prices where product_id = $1", product_id
        )
    return bool(found == cents)


# -- the saga -------------------------------------------------------------------------------------


async def test_an_order_is_reserved_paid_shipped_and_confirmed(shop: Shop) -> None:
    await shop.add("alice", "p-001", 2)
    await shop.add("alice", "p-002", 1)
    order_id = await shop.place("alice")

    order = await shop.outcome(order_id)
    assert order["status"] == "confirmed"
    assert order["reason"] is None
    assert order["total_cents"] == 2 * 1290 + 1490
    assert order["card_last4"] == "4242"
    assert order["progress"] == ["stock_reserved", "payment_authorized", "shipment_created"]
    assert order["lines"] == [line("p-001", 2, 1290), line("p-002", 1, 1490)]
    assert (await shop.call("GET", "/cart"))[1]["items"] == []  # the cart became the order
    [authorize] = shop.payments.seen
    assert authorize == AuthorizePayment(
        order_id=order_id, amount_cents=4070, card_number="4242424242424242"
    )
    [create] = shop.shipping.seen
    assert create.address == "1 Main St, Springfield"

    await shop.settled()  # nothing more is coming
    # The reservation became a sale: the units left the shelves, nothing is held any more,
    # and the orders service's stock read model heard of it.
    assert await shop.stock("p-001") == (48, 0)
    assert await shop.stock("p-002") == (49, 0)
    assert await _available_is(shop, "p-001", 48)
    async with shop.inventory.db.connection() as conn:
        assert await conn.fetchval("select count(*) from reservations") == 0
    saga = await shop.orders.sagas.get(order_id)
    assert "commit-stock" in [e.step for e in saga.history]
    assert shop.order_events(order_id) == [
        type_name(OrderPlaced),
        type_name(OrderStatusChanged),
        type_name(OrderStatusChanged),
        type_name(OrderStatusChanged),
        type_name(OrderConfirmed),  # once
    ]
    assert announced_as_listed(shop, order) == [
        "stock_reserved",
        "payment_authorized",
        "shipment_created",
    ]
    assert step_names(order) == [
        "placed",
        "stock_reserved",
        "payment_authorized",
        "shipment_created",
        "confirmed",
    ]
    [confirmed] = [
        OrderConfirmed.model_validate_json(e.data)
        for e in shop.events(TOPICS.ORDERS_EVENTS, order_id)
        if e.type == type_name(OrderConfirmed)
    ]
    assert confirmed.total_cents == 4070
    assert confirmed.customer_id == "alice"

    # The card number is nowhere in the orders database once payments answered.
    async with shop.orders.db.connection() as conn:
        dump = await conn.fetchval(
            "select string_agg(t::text, ' ') from (select * from orders) t"
        ) + await conn.fetchval("select data::text from msa_saga where id = $1", order_id)
    assert "4242424242424242" not in dump


async def test_missing_stock_cancels_the_order_and_holds_nothing(shop: Shop) -> None:
    await shop.add("alice", "p-001", 1)
    await shop.add("alice", "p-002", 1)  # in stock, as far as the cart knows ...
    async with shop.inventory.db.connection() as conn:  # ... but sold out when it is ordered
        await conn.execute("update stock set on_hand = 0 where product_id = 'p-002'")
    order_id = await shop.place("alice")

    order = await shop.outcome(order_id)
    assert order["status"] == "cancelled"
    assert order["reason"] == "p-002 is sold out"
    assert order["progress"] == []
    # refused at once: nothing was done, nothing undone
    assert step_names(order) == ["placed", "stock_rejected", "cancelled"]
    assert await shop.stock("p-001") == (50, 0)
    assert shop.payments.seen == []
    await shop.settled()
    assert shop.order_events(order_id) == [
        type_name(OrderPlaced),
        type_name(OrderStatusChanged),
        type_name(OrderCancelled),
    ]
    assert announced_as_listed(shop, order) == ["stock_rejected"]
    [cancelled] = shop.events(TOPICS.ORDERS_EVENTS, order_id)[-1:]
    assert OrderCancelled.model_validate_json(cancelled.data).reason == "p-002 is sold out"


async def test_a_declined_payment_releases_the_stock_and_cancels(shop: Shop) -> None:
    await shop.add("alice", "p-001", 4)
    order_id = await shop.place("alice", card=DECLINED_CARD)

    order = await shop.outcome(order_id)
    assert order["status"] == "cancelled"
    assert order["reason"] == "insufficient funds"
    assert order["card_last4"] == "0002"
    assert order["progress"] == ["stock_reserved"]
    assert await shop.stock("p-001") == (50, 0)  # reserved, then released before "cancelled"
    assert [type(c) for c in shop.payments.seen] == [AuthorizePayment]  # nothing to refund
    assert shop.shipping.seen == []
    await shop.settled()
    assert step_names(order) == [
        "placed",
        "stock_reserved",
        "payment_declined",
        "stock_released",
        "cancelled",
    ]
    assert shop.order_events(order_id) == [
        type_name(OrderPlaced),
        type_name(OrderStatusChanged),
        type_name(OrderStatusChanged),
        type_name(OrderStatusChanged),
        type_name(OrderCancelled),
    ]
    assert announced_as_listed(shop, order) == [
        "stock_reserved",
        "payment_declined",
        "stock_released",
    ]


async def test_a_shipment_that_never_comes_is_undone_step_by_step(shop: Shop) -> None:
    shop.shipping.silent = True
    await shop.add("alice", "p-001", 1)
    order_id = await shop.place("alice")

    await eventually_async(lambda: _waits_for(shop, order_id, "create-shipment"))
    assert await shop.stock("p-001") == (50, 1)
    # Thirty seconds pass: move the step's deadline (kept by the database clock) to now.
    async with shop.orders.db.connection() as conn:
        await conn.execute(
            "update msa_saga set deadline = clock_timestamp() where id = $1", order_id
        )

    order = await shop.outcome(order_id)
    assert order["status"] == "cancelled"
    assert order["reason"] == "shipping did not answer in time"
    assert [type(c) for c in shop.shipping.seen] == [CreateShipment, CancelShipment]
    assert [type(c) for c in shop.payments.seen] == [AuthorizePayment, RefundPayment]
    assert await shop.stock("p-001") == (50, 0)
    saga = await shop.orders.sagas.get(order_id)
    undone = [e.step for e in saga.history if e.event == "compensation-ok"]
    assert undone == ["create-shipment", "authorize-payment", "reserve-stock"]  # newest first
    # The shipment was never created, so its page shows no cancelled one; the rest was undone.
    assert step_names(order) == [
        "placed",
        "stock_reserved",
        "payment_authorized",
        "payment_refunded",
        "stock_released",
        "cancelled",
    ]
    await shop.settled()
    assert announced_as_listed(shop, order) == [
        "stock_reserved",
        "payment_authorized",
        "payment_refunded",
        "stock_released",
    ]


def test_saga_data_saved_before_milestones_were_recorded_still_reads() -> None:
    """A saga under way across the upgrade: its milestones are told by its fields, without
    times, and those it reaches from then on are added after them, with times."""
    saved = {
        "order_id": "o-1",
        "customer_id": "alice",
        "lines": [{"product_id": "p-001", "quantity": 1, "unit_price_cents": 1290}],
        "total_cents": 1290,
        "address": "1 Main St",
        "stock_reserved": True,
        "payment_id": "pay-1",
    }
    data = decode_payload(orjson.dumps(saved), OrderSagaData)
    assert data.reached == [
        Milestone(step="stock_reserved", at=None),
        Milestone(step="payment_authorized", at=None),
    ]
    refunded = data.reach("payment_refunded")
    assert [m.step for m in refunded.reached] == [
        "stock_reserved",
        "payment_authorized",
        "payment_refunded",
    ]
    assert refunded.time_of("payment_authorized") is None
    at = refunded.time_of("payment_refunded")
    assert at is not None
    assert at.tzinfo is not None
    assert refunded.turned_round() == [Milestone(step="payment_refunded", at=at)]
    assert refunded.progress == data.progress == ["stock_reserved", "payment_authorized"]


async def test_an_undo_never_confirmed_fails_the_order_at_a_time(shop: Shop) -> None:
    shop.shipping.silent = True
    shop.payments.silent_refunds = True
    await shop.add("alice", "p-001", 1)
    order_id = await shop.place("alice")

    await eventually_async(lambda: _waits_for(shop, order_id, "create-shipment"))
    await _deadline_passes(shop, order_id)  # the shipment never comes: undo, newest first
    for refunds in (1, 2, 3):  # the refund is asked for three times, never confirmed
        await eventually_async(functools.partial(_refunds_asked, shop, refunds))
        await _deadline_passes(shop, order_id)

    order = await shop.outcome(order_id)
    assert order["status"] == "failed"
    assert order["reason"] == "compensation of 'authorize-payment' not confirmed after 3 attempt(s)"
    assert step_names(order) == ["placed", "stock_reserved", "payment_authorized", "failed"]
    await shop.settled()
    assert announced_as_listed(shop, order) == [
        "stock_reserved",
        "payment_authorized",
        "failed",
    ]


async def _deadline_passes(shop: Shop, order_id: str) -> None:
    """The saga's current deadline (kept by the database clock) is moved to now."""
    async with shop.orders.db.connection() as conn:
        await conn.execute(
            "update msa_saga set deadline = clock_timestamp() where id = $1", order_id
        )


async def _refunds_asked(shop: Shop, count: int) -> bool:
    return sum(isinstance(c, RefundPayment) for c in shop.payments.seen) == count


async def _waits_for(shop: Shop, order_id: str, step: str) -> bool:
    return (await shop.orders.sagas.get(order_id)).step_name == step


async def test_concurrent_orders_for_the_last_items_get_only_what_is_left(shop: Shop) -> None:
    customers = [f"customer-{n}" for n in range(5)]
    for customer in customers:
        await shop.add(customer, "p-014", 1)  # two are left

    placed = await asyncio.gather(*(shop.place(customer) for customer in customers))
    outcomes = [await shop.outcome(o, c) for o, c in zip(placed, customers, strict=True)]

    assert sorted(o["status"] for o in outcomes) == ["cancelled"] * 3 + ["confirmed"] * 2
    assert {o["reason"] for o in outcomes if o["status"] == "cancelled"} == {"p-014 is sold out"}
    await shop.settled()
    assert await shop.stock("p-014") == (0, 0)  # both sold


# -- placing orders and reading them --------------------------------------------------------------


async def test_placing_needs_a_cart_an_address_and_a_card(shop: Shop) -> None:
    body = {"address": "1 Main St", "card_number": GOOD_CARD}
    status, problem, _ = await shop.call("POST", "/orders", json=body)
    assert status == 409
    assert problem["detail"] == "the cart is empty"
    assert (await shop.call("POST", "/orders", None, json=body))[0] == 401

    await shop.add("alice", "p-001", 1)
    for wrong in ({"address": "1 Main St", "card_number": "12ab"}, {"card_number": GOOD_CARD}):
        assert (await shop.call("POST", "/orders", json=wrong))[0] == 422
    assert (await shop.call("GET", "/cart"))[1]["total_cents"] == 1290  # still there

    first, second = await asyncio.gather(
        shop.call("POST", "/orders", json=body), shop.call("POST", "/orders", json=body)
    )
    assert sorted([first[0], second[0]]) == [202, 409]  # a double submit orders once


async def test_history_is_the_callers_newest_first_and_others_see_404(shop: Shop) -> None:
    await shop.add("alice", "p-001", 1)
    older = await shop.place("alice")
    await shop.add("alice", "p-002", 2)
    newer = await shop.place("alice")
    await shop.add("bob", "p-003", 1)
    bobs = await shop.place("bob")
    await shop.outcome(newer)

    status, history, _ = await shop.call("GET", "/orders")
    assert status == 200
    assert [o["order_id"] for o in history["orders"]] == [newer, older]
    assert history["orders"][0]["lines"] == [line("p-002", 2)]
    assert [o["order_id"] for o in (await shop.call("GET", "/orders", "bob"))[1]["orders"]] == [
        bobs
    ]
    assert (await shop.call("GET", f"/orders/{older}", "bob"))[0] == 404
    assert (await shop.call("GET", f"/orders/{bobs}"))[0] == 404
    status, order, _ = await shop.call("GET", f"/orders/{bobs}", "root", admin=True)
    assert status == 200
    assert order["customer_id"] == "bob"
    assert (await shop.call("GET", "/orders/nope"))[0] == 404
    assert (await shop.call("GET", "/orders", None))[0] == 401


async def test_orders_are_numbered_from_1001_in_the_order_they_are_placed(shop: Shop) -> None:
    numbers = []
    for customer in ("alice", "bob", "alice"):
        await shop.add(customer, "p-001", 1)
        numbers.append((await shop.place_answer(customer))["number"])
    assert numbers == [1001, 1002, 1003]

    customers = [f"customer-{n}" for n in range(6)]
    for customer in customers:
        await shop.add(customer, "p-002", 1)
    answers = await asyncio.gather(*(shop.place_answer(customer) for customer in customers))
    assert sorted(a["number"] for a in answers) == list(range(1004, 1010))  # none twice

    # The number is the order's, wherever it is shown; URLs still name the order by its id.
    first = answers[0]
    _, order, _ = await shop.call("GET", f"/orders/{first['order_id']}", customers[0])
    assert order["number"] == first["number"]
    _, history, _ = await shop.call("GET", "/orders")
    assert [o["number"] for o in history["orders"]] == [1003, 1001]  # newest first
    assert (await shop.call("GET", "/orders/1001"))[0] == 404


# -- upgrading ------------------------------------------------------------------------------------


async def test_orders_from_before_names_and_numbers_get_numbers_and_show_ids(
    postgres_database: str,
) -> None:
    """Migration 3 on a database with orders in it: they are numbered in the order they were
    placed (not as their rows lie), later orders go on from there, and a line or read-model
    product without a name shows its product id."""
    before = PostgresResource(postgres_database, migrations=MIGRATIONS[:2])
    await before.start()
    try:
        async with before.transaction() as tx:
            await tx.execute(
                "insert into orders (order_id, customer_id, status, total_cents, address, "
                "card_last4, created_at, updated_at) values "
                "('o-newer', 'alice', 'confirmed', 1290, '1 Main St', '4242', "
                "now() - interval '1 hour', now() - interval '1 hour'), "
                "('o-older', 'alice', 'cancelled', 2580, '1 Main St', '4242', "
                "now() - interval '2 hours', now() - interval '2 hours')"
            )
            await tx.execute(
                "insert into order_lines (order_id, product_id, quantity, unit_price_cents) "
                "values ('o-newer', 'p-001', 1, 1290), ('o-older', 'p-001', 2, 1290)"
            )
            await tx.execute("insert into prices (product_id, price_cents) values ('p-001', 1290)")
            await tx.execute(
                "insert into stock (product_id, available, version) values ('p-001', 5, 1)"
            )
            await tx.execute(
                "insert into carts (customer_id, product_id, quantity) values ('alice', 'p-001', 1)"
            )
    finally:
        await before.stop()

    env = {
        "ORDERS_DATABASE_URL": postgres_database,
        "MSA_HTTP_HOST": "127.0.0.1",
        "MSA_HTTP_PORT": "0",
    }
    orders = Orders(ServiceSettings.from_env(env), transport=MemoryTransport())
    await orders.start()
    try:
        base = f"http://127.0.0.1:{orders.http_port}"
        alice = {"x-user-id": "alice", "x-user-roles": "customer"}
        async with aiohttp.ClientSession(base, headers=alice) as http:
            async with http.get("/orders") as response:
                history = (await response.json())["orders"]
            assert [(o["order_id"], o["number"]) for o in history] == [
                ("o-newer", 1002),
                ("o-older", 1001),
            ]
            assert history[1]["lines"] == [
                {
                    "product_id": "p-001",
                    "name": "p-001",
                    "quantity": 2,
                    "unit_price_cents": 1290,
                    "line_total_cents": 2580,
                }
            ]
            async with http.get("/orders/o-older") as response:
                older = await response.json()
            assert step_names(older) == ["placed", "cancelled"]
            async with http.get("/cart") as response:
                assert [i["name"] for i in (await response.json())["items"]] == ["p-001"]
            body = {"address": "1 Main St", "card_number": GOOD_CARD}
            async with http.post("/orders", json=body) as response:
                assert response.status == 202
                assert (await response.json())["number"] == 1003
    finally:
        await orders.stop(grace=1)
