"""Orchestrated sagas on a real PostgreSQL and on a real MongoDB-wire server (FerretDB), with
participants simulated on the in-memory bus.

The participants (inventory, payments, the order approver) are plain bus subscriptions that
reply from inside their command handlers, so the replies carry the saga id as correlation id
the way a real service's would: the saga is driven end to end through the outbox relay, the bus
and the orchestrator's own subscription. The `world` fixture runs each scenario on both stores
(`[postgres]`, `[mongo]`); what only one database can do is tested on that one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message, Subscription
from framework.errors import ConfigurationError
from framework.messages import Envelope, message_type, type_name
from framework.persistence.contracts import Inbox, Outbox
from framework.persistence.mongo import DocumentChange, MongoInbox, MongoOutbox, MongoResource
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import PostgresResource
from framework.persistence.saga import (
    DuplicateSaga,
    SagaDefinition,
    SagaNotFound,
    SagaOrchestrator,
    SagaState,
    SagaStatus,
    Step,
    fail,
    ok,
)
from framework.persistence.saga_mongo import SAGAS_COLLECTION
from framework.types import Record

# -- the shop's messages --------------------------------------------------------------------------


@message_type("test.inventory.reserve-stock")
class ReserveStock(BaseModel):
    order_id: str
    quantity: int


@message_type("test.inventory.release-stock")
class ReleaseStock(BaseModel):
    order_id: str


@message_type("test.inventory.stock-reserved")
class StockReserved(BaseModel):
    order_id: str


@message_type("test.inventory.stock-rejected")
class StockRejected(BaseModel):
    order_id: str
    reason: str


@message_type("test.payments.charge")
class ChargePayment(BaseModel):
    order_id: str
    amount: int


@message_type("test.payments.refund")
class RefundPayment(BaseModel):
    order_id: str
    payment_id: str | None


@message_type("test.payments.captured")
class PaymentCaptured(BaseModel):
    order_id: str
    payment_id: str


@message_type("test.payments.declined")
class PaymentDeclined(BaseModel):
    order_id: str
    reason: str


@message_type("test.payments.refunded")
class PaymentRefunded(BaseModel):
    order_id: str


@message_type("test.orders.approve")
class ApproveOrder(BaseModel):
    order_id: str
    payment_id: str | None


class OrderData(BaseModel):
    order_id: str
    quantity: int
    amount: int
    payment_id: str | None = None
    declined_because: str | None = None


# -- the saga, as the orders service declares it --------------------------------------------------


def reserve_stock(order: OrderData) -> ReserveStock:
    return ReserveStock(order_id=order.order_id, quantity=order.quantity)


def release_stock(order: OrderData) -> ReleaseStock:
    return ReleaseStock(order_id=order.order_id)


def charge(order: OrderData) -> ChargePayment:
    return ChargePayment(order_id=order.order_id, amount=order.amount)


def refund(order: OrderData) -> RefundPayment:
    return RefundPayment(order_id=order.order_id, payment_id=order.payment_id)


def approve_order(order: OrderData) -> ApproveOrder:
    return ApproveOrder(order_id=order.order_id, payment_id=order.payment_id)


def record_payment(order: OrderData, captured: PaymentCaptured) -> OrderData:
    return order.model_copy(update={"payment_id": captured.payment_id})


def record_decline(order: OrderData, declined: PaymentDeclined) -> None:
    order.declined_because = declined.reason  # in place: returning None keeps `order`


class PlaceOrderSaga(SagaDefinition[OrderData]):
    name = "place-order"
    steps = (
        Step(
            "reserve-stock",
            topic="inventory.commands",
            send=reserve_stock,
            on_reply={StockReserved: ok, StockRejected: fail},
            compensate=release_stock,
            timeout=30,
        ),
        Step(
            "charge-payment",
            topic="payments.commands",
            send=charge,
            on_reply={PaymentCaptured: ok(record_payment), PaymentDeclined: fail(record_decline)},
            compensate=refund,
            on_compensate_reply={PaymentRefunded: ok},
            timeout=30,
        ),
        Step("approve", topic="orders.commands", send=approve_order),
    )

    def key(self, saga_id: str, data: OrderData) -> str:
        return data.order_id

    async def on_completed(self, tx: Any, saga_id: str, data: OrderData) -> None:
        await mark_order(tx, data.order_id, "approved")

    async def on_compensated(self, tx: Any, saga_id: str, data: OrderData) -> None:
        await mark_order(tx, data.order_id, "cancelled")


async def mark_order(tx: Any, order_id: str, status: str) -> None:
    """The order's status, changed with the saga's final transition: in its transaction on
    PostgreSQL; on MongoDB in the saga's own document (the document is the transaction)."""
    if isinstance(tx, DocumentChange):
        tx.set({"order": {"id": order_id, "status": status}})
    else:
        await tx.execute("update orders set status = $2 where id = $1", order_id, status)


class QuickPlaceOrderSaga(PlaceOrderSaga):
    """The same saga with sub-second timeouts, to see them fire."""

    name = "quick-place-order"
    compensation_attempts = 2
    steps = (
        Step(
            "reserve-stock",
            topic="inventory.commands",
            send=reserve_stock,
            on_reply={StockReserved: ok, StockRejected: fail},
            compensate=release_stock,
            timeout=0.4,
        ),
        Step(
            "charge-payment",
            topic="payments.commands",
            send=charge,
            on_reply={PaymentCaptured: ok(record_payment), PaymentDeclined: fail},
            compensate=refund,
            on_compensate_reply={PaymentRefunded: ok},
            timeout=0.4,
        ),
        Step("approve", topic="orders.commands", send=approve_order),
    )


def unpriced(order: OrderData) -> ChargePayment:
    raise RuntimeError("no price list")


class BrokenSaga(SagaDefinition[OrderData]):
    """A saga whose second command cannot be built."""

    name = "broken"
    topic = "inventory.commands"
    steps = (
        Step("reserve", send=reserve_stock, on_reply={StockReserved: ok}, compensate=release_stock),
        Step("charge", send=unpriced),
    )


# -- the participants -----------------------------------------------------------------------------


@dataclass
class Participants:
    """Inventory, payments and the approver, replying from inside their command handlers."""

    bus: Bus
    stock: str = "reserve"  # reserve | reject | silent
    payment: str = "capture"  # capture | decline | silent | hold (capture once released)
    refunds: str = "confirm"  # confirm | silent
    commands: list[tuple[str, str | None]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def subscribe_inventory(self) -> None:
        self.bus.subscribe(
            ["inventory.commands"],
            {
                type_name(ReserveStock): HandlerSpec(ReserveStock, self.on_reserve),
                type_name(ReleaseStock): HandlerSpec(ReleaseStock, self.note),
            },
            ConsumerOptions(group="inventory"),
        )

    def payment_handlers(self) -> dict[str, HandlerSpec]:
        return {
            type_name(ChargePayment): HandlerSpec(ChargePayment, self.on_charge),
            type_name(RefundPayment): HandlerSpec(RefundPayment, self.on_refund),
        }

    def subscribe_all(self) -> None:
        self.subscribe_inventory()
        self.bus.subscribe(
            ["payments.commands"], self.payment_handlers(), ConsumerOptions(group="payments")
        )
        self.bus.subscribe(
            ["orders.commands"],
            {type_name(ApproveOrder): HandlerSpec(ApproveOrder, self.note)},
            ConsumerOptions(group="approver"),
        )

    async def note(self, message: Message[Any]) -> None:
        self.commands.append((message.envelope.type, message.envelope.correlationid))
        self.changed.set()

    async def on_reserve(self, message: Message[ReserveStock]) -> None:
        await self.note(message)
        order_id = message.data.order_id
        if self.stock == "reserve":
            await self.bus.publish("inventory", StockReserved(order_id=order_id), key=order_id)
        elif self.stock == "reject":
            await self.bus.publish(
                "inventory", StockRejected(order_id=order_id, reason="sold out"), key=order_id
            )

    async def on_charge(self, message: Message[ChargePayment]) -> None:
        await self.note(message)
        order_id = message.data.order_id
        if self.payment == "hold":
            await self.released.wait()
        if self.payment in {"capture", "hold"}:
            captured = PaymentCaptured(order_id=order_id, payment_id=f"pay-{order_id}")
            await self.bus.publish("payments", captured, key=order_id)
        elif self.payment == "decline":
            declined = PaymentDeclined(order_id=order_id, reason="card expired")
            await self.bus.publish("payments", declined, key=order_id)

    async def on_refund(self, message: Message[RefundPayment]) -> None:
        await self.note(message)
        if self.refunds == "confirm":
            order_id = message.data.order_id
            await self.bus.publish("payments", PaymentRefunded(order_id=order_id), key=order_id)

    def seen(self, saga_id: str) -> list[str]:
        return [kind for kind, correlation in self.commands if correlation == saga_id]

    async def wait_for(self, saga_id: str, count: int, timeout: float = 10.0) -> list[str]:
        async with asyncio.timeout(timeout):
            while len(self.seen(saga_id)) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.seen(saga_id)


# -- the orders service's side --------------------------------------------------------------------


REPLY_TOPICS = ["inventory", "payments"]
ORDERS_TABLE = "create table if not exists orders (id text primary key, status text not null)"


class Orders:
    """What the orders service owns: its database, outbox, inbox and saga orchestrator; one
    subclass per database."""

    db: Any
    outbox: Outbox
    inbox: Inbox
    sagas: SagaOrchestrator

    def orchestrate(self, **options: Any) -> SagaOrchestrator:
        return SagaOrchestrator(
            self.db,
            self.outbox,
            self.inbox,
            definitions=[PlaceOrderSaga, QuickPlaceOrderSaga, BrokenSaga],
            timer_interval=0.1,
            **options,
        )

    @property
    def resources(self) -> list[Any]:
        """What starts, in order (and stops in reverse), as a service's resources do."""
        return [self.db, self.outbox, self.inbox, self.sagas]

    async def start(self) -> None:
        for resource in self.resources:
            await resource.start()

    async def stop(self) -> None:
        for resource in reversed(self.resources):
            await resource.stop()

    async def place_order(
        self, order: OrderData, saga: type[SagaDefinition[OrderData]] = PlaceOrderSaga
    ) -> str:
        raise NotImplementedError

    async def order_status(self, order_id: str) -> str | None:
        """What the saga's final transition marked the order as (None before)."""
        raise NotImplementedError

    async def expire_deadline(self, saga_id: str) -> None:
        """As if the step's timeout had passed: the saga's deadline moves to now."""
        raise NotImplementedError

    async def wait(
        self, saga_id: str, done: Callable[[SagaState[Any]], bool], timeout: float = 10.0
    ) -> SagaState[Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.sagas.get(saga_id)
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"saga {saga_id} stuck: {state}")
            await asyncio.sleep(0.05)

    async def finished(self, saga_id: str, timeout: float = 10.0) -> SagaState[Any]:
        return await self.wait(saga_id, lambda s: s.finished, timeout)


class PostgresOrders(Orders):
    """The orders table, the outbox, inbox and sagas in one PostgreSQL database."""

    def __init__(self, url: str, bus: Bus, **options: Any) -> None:
        self.url = url
        self.db = PostgresResource(url, max_size=5)
        self.outbox = PostgresOutbox(self.db, bus, poll_interval=0.1)
        self.inbox = PostgresInbox(self.db)
        self.sagas = self.orchestrate(**options)

    async def start(self) -> None:
        await super().start()
        async with self.db.connection() as conn:
            await conn.execute(ORDERS_TABLE)

    async def place_order(
        self, order: OrderData, saga: type[SagaDefinition[OrderData]] = PlaceOrderSaga
    ) -> str:
        async with self.db.transaction() as tx:  # the order and its saga commit together
            await tx.execute("insert into orders (id, status) values ($1, 'new')", order.order_id)
            return await self.sagas.start_saga(tx, saga, order)

    async def order_status(self, order_id: str) -> str | None:
        async with self.db.connection() as conn:
            status: str | None = await conn.fetchval(
                "select status from orders where id = $1 and status <> 'new'", order_id
            )
            return status

    async def expire_deadline(self, saga_id: str) -> None:
        """The deadline is kept by the database's clock: moved by it."""
        conn = await asyncpg.connect(self.url)
        try:
            status = await conn.execute(
                "update msa_saga set deadline = clock_timestamp() "
                "where id = $1 and deadline is not null",
                saga_id,
            )
        finally:
            await conn.close()
        assert status == "UPDATE 1", f"saga {saga_id} has no deadline"


class MongoOrders(Orders):
    """The sagas' documents (which carry their commands and replies taken) in one database."""

    def __init__(self, url: str, database: str, bus: Bus, **options: Any) -> None:
        self.url, self.database = url, database
        self.db = MongoResource(url, database)
        self.outbox = MongoOutbox(self.db, bus)  # the orchestrator adds its collection
        self.inbox = MongoInbox(self.db)
        self.sagas = self.orchestrate(**options)

    @property
    def resources(self) -> list[Any]:
        return [self.db, self.outbox, self.sagas]  # the inbox is no resource here

    async def place_order(
        self, order: OrderData, saga: type[SagaDefinition[OrderData]] = PlaceOrderSaga
    ) -> str:
        return await self.sagas.start_saga(None, saga, order)  # a document of its own

    async def order_status(self, order_id: str) -> str | None:
        saga = await self.db.collection(SAGAS_COLLECTION).find_one({"order.id": order_id})
        return None if saga is None else str(saga["order"]["status"])

    async def expire_deadline(self, saga_id: str) -> None:
        """By another client (the service may be stopped), holding the document as every
        writer of a saga's document does: the relay writes it too."""
        db = MongoResource(self.url, self.database)
        elsewhere = MongoOutbox(db, Bus(MemoryTransport(), source="tests"), relay=False)
        await db.start()
        try:
            async with elsewhere.holding(SAGAS_COLLECTION, saga_id):
                result = await db.collection(SAGAS_COLLECTION).update_one(
                    {"_id": saga_id, "deadline": {"$exists": True}},
                    {"$set": {"deadline": datetime.now(UTC)}},
                )
        finally:
            await db.stop()
        assert result.matched_count == 1, f"saga {saga_id} has no deadline"


@dataclass
class World:
    bus: Bus
    participants: Participants
    orders: Orders
    saga_subscription: Subscription
    build: Callable[[Bus], Orders]
    """A new orders service on the same database (a restart)."""


STORES = [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mongo", marks=pytest.mark.mongo),
]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Callable[[Bus], Orders]:
    """Builds the orders service on a fresh database of the store the test runs on."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_database")
        return lambda bus: PostgresOrders(url, bus)
    mongo_url = request.getfixturevalue("mongo_url")
    database = request.getfixturevalue("mongo_database_name")
    return lambda bus: MongoOrders(mongo_url, database, bus)


@pytest.fixture
async def world(store: Callable[[Bus], Orders]) -> AsyncIterator[World]:
    build = store
    bus = Bus(MemoryTransport(), source="orders")
    participants = Participants(bus)
    participants.subscribe_all()
    orders = build(bus)
    subscription = orders.sagas.subscribe(bus, REPLY_TOPICS)
    await orders.start()
    await bus.start()
    world = World(bus, participants, orders, subscription, build)
    try:
        yield world
    finally:
        await bus.stop(grace=1)
        await world.orders.stop()  # a test may have replaced it (restart)


only_postgres = pytest.mark.parametrize("store", STORES[:1], indirect=True)
only_mongo = pytest.mark.parametrize("store", STORES[1:], indirect=True)


async def drained(outbox: Outbox, timeout: float = 10.0) -> None:
    """Until the relay published every command and removed it (the database is polled)."""
    async with asyncio.timeout(timeout):
        while True:
            if not await outbox.pending():
                return
            await asyncio.sleep(0.02)


def events(state: SagaState[Any]) -> list[tuple[str, str | None, str | None]]:
    return [(e.event, e.step, e.message_type) for e in state.history]


def sent(state: SagaState[Any]) -> list[str | None]:
    """The types of every command and compensation the saga ever enqueued, from its history
    (written in the transactions that enqueued them)."""
    return [
        e.message_type for e in state.history if e.event in {"command-sent", "compensation-sent"}
    ]


def order(order_id: str) -> OrderData:
    return OrderData(order_id=order_id, quantity=2, amount=1250)


# -- the happy path -------------------------------------------------------------------------------


async def test_happy_path_sends_commands_in_order_and_completes(world: World) -> None:
    saga_id = await world.orders.place_order(order("o-1"))

    state = await world.orders.finished(saga_id)

    assert state.status is SagaStatus.COMPLETED
    assert state.type == "place-order"
    assert state.step == 3
    assert state.step_name is None
    assert state.data == OrderData(order_id="o-1", quantity=2, amount=1250, payment_id="pay-o-1")
    assert state.deadline is None
    assert state.error is None
    assert state.failed_step is None
    assert await world.participants.wait_for(saga_id, 3) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(ApproveOrder),
    ]
    assert await world.orders.order_status("o-1") == "approved"  # on_completed, same transaction
    assert events(state) == [
        ("started", None, None),
        ("command-sent", "reserve-stock", type_name(ReserveStock)),
        ("reply-ok", "reserve-stock", type_name(StockReserved)),
        ("command-sent", "charge-payment", type_name(ChargePayment)),
        ("reply-ok", "charge-payment", type_name(PaymentCaptured)),
        ("command-sent", "approve", type_name(ApproveOrder)),
        ("completed", None, None),
    ]
    assert [e.status for e in state.history][-2:] == [SagaStatus.RUNNING, SagaStatus.COMPLETED]
    assert state.version == 3  # started, reserved, captured: one transaction each
    assert [e.version for e in state.history] == [1, 1, 2, 2, 3, 3, 3]
    assert state.history[1].detail == "inventory.commands"


async def test_commands_carry_the_saga_id_and_the_partition_key(world: World) -> None:
    seen: list[Envelope[Any]] = []

    async def spy(message: Message[Any]) -> None:
        seen.append(message.envelope)

    await world.bus.subscribe_running(
        ["inventory.commands"], {"*": HandlerSpec(bytes, spy)}, ConsumerOptions(group="spy")
    )
    saga_id = await world.orders.place_order(order("o-key"))
    await world.orders.finished(saga_id)

    [command] = [e for e in seen if e.type == type_name(ReserveStock)]
    assert command.correlationid == saga_id
    assert command.extensions == {"sagaid": saga_id, "sagastep": "reserve-stock"}
    assert command.partitionkey == "o-key"
    assert command.source == "orders"


# -- failure and compensation ---------------------------------------------------------------------


async def test_failure_at_step_two_compensates_step_one_only(world: World) -> None:
    world.participants.payment = "decline"

    saga_id = await world.orders.place_order(order("o-2"))
    state = await world.orders.finished(saga_id)

    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == "charge-payment"
    assert state.error == f"charge-payment: {type_name(PaymentDeclined)}"
    assert state.data.declined_because == "card expired"  # fail(record_decline) kept the reason
    # The declined charge is not refunded; the reservation before it is released; no approval.
    assert await world.participants.wait_for(saga_id, 3) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(ReleaseStock),
    ]
    assert events(state)[-3:] == [
        ("reply-failed", "charge-payment", type_name(PaymentDeclined)),
        ("compensation-sent", "reserve-stock", type_name(ReleaseStock)),
        ("compensated", None, None),
    ]
    assert [e.status for e in state.history][-3:] == [
        SagaStatus.COMPENSATING,
        SagaStatus.COMPENSATING,
        SagaStatus.COMPENSATED,
    ]
    assert await world.orders.order_status("o-2") == "cancelled"
    assert sent(state) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(ReleaseStock),
    ]


async def test_failure_at_the_first_step_has_nothing_to_compensate(world: World) -> None:
    world.participants.stock = "reject"

    saga_id = await world.orders.place_order(order("o-3"))
    state = await world.orders.finished(saga_id)

    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == "reserve-stock"
    assert sent(state) == [type_name(ReserveStock)]
    assert await world.participants.wait_for(saga_id, 1) == [type_name(ReserveStock)]


async def test_step_timeout_compensates_the_step_and_those_before_it_in_reverse(
    world: World,
) -> None:
    world.participants.payment = "silent"  # the charge may or may not have happened

    saga_id = await world.orders.place_order(order("o-4"))
    waiting = await world.orders.wait(saga_id, lambda s: s.step == 1)
    assert waiting.status is SagaStatus.RUNNING
    assert waiting.deadline is not None
    assert waiting.step_name == "charge-payment"
    await world.orders.expire_deadline(saga_id)  # the 30 s pass
    state = await world.orders.finished(saga_id)

    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == "charge-payment"
    assert state.error == "charge-payment: no reply within 30s"
    assert await world.participants.wait_for(saga_id, 4) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(RefundPayment),  # the timed-out step is undone too, and first
        type_name(ReleaseStock),
    ]
    assert events(state)[-5:] == [
        ("timed-out", "charge-payment", None),
        ("compensation-sent", "charge-payment", type_name(RefundPayment)),
        # the refund is confirmed (its own transaction) before the release is sent
        ("compensation-ok", "charge-payment", type_name(PaymentRefunded)),
        ("compensation-sent", "reserve-stock", type_name(ReleaseStock)),
        ("compensated", None, None),
    ]
    statuses = {e.event: e.status for e in state.history}
    assert statuses["timed-out"] is SagaStatus.COMPENSATING


async def test_an_unconfirmed_compensation_is_resent_then_fails_the_saga(world: World) -> None:
    world.participants.payment = "silent"
    world.participants.refunds = "silent"

    saga_id = await world.orders.place_order(order("o-5"), QuickPlaceOrderSaga)
    state = await world.orders.finished(saga_id)

    assert state.status is SagaStatus.FAILED
    assert state.error == "compensation of 'charge-payment' not confirmed after 2 attempt(s)"
    assert state.step_name == "charge-payment"
    # compensation_attempts = 2: the refund is sent twice; the stock is never released
    assert await world.participants.wait_for(saga_id, 4) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(RefundPayment),
        type_name(RefundPayment),
    ]
    assert [e.event for e in state.history][-2:] == ["compensation-timed-out", "failed"]
    assert type_name(ReleaseStock) not in sent(state)


# -- duplicates and late replies ------------------------------------------------------------------


def reply(saga_id: str, data: Any, *, id: str | None = None) -> Message[Any]:
    """A reply as the bus would hand it over, correlated to `saga_id`."""
    envelope: Envelope[Any] = Envelope(
        type=type_name(type(data)), source="tests", data=data, correlationid=saga_id
    )
    if id is not None:
        envelope.id = id
    record = Record(topic="inventory", partition=0, offset=0, key=None, value=b"")
    return Message(envelope=envelope, record=record, attempt=1, group="orders.sagas")


async def test_a_redelivered_reply_moves_the_saga_once(world: World) -> None:
    world.participants.stock = "silent"
    world.participants.payment = "silent"
    saga_id = await world.orders.place_order(order("o-6"))
    await world.participants.wait_for(saga_id, 1)

    delivery = reply(saga_id, StockReserved(order_id="o-6"), id="reply-1")
    sagas = world.orders.sagas
    # Two deliveries at once: the second waits for the saga's row lock (on MongoDB: the hold
    # of its document), then the inbox says no.
    moved = await asyncio.gather(sagas.handle_reply(delivery), sagas.handle_reply(delivery))
    assert sorted(moved) == [False, True]
    assert await sagas.handle_reply(delivery) is False  # and later, too

    # ...and a redelivery through the bus is no different
    again = Envelope(
        id="reply-1",
        type=type_name(StockReserved),
        source="inventory",
        data=StockReserved(order_id="o-6"),
        correlationid=saga_id,
        partitionkey="o-6",
    )
    await world.bus.publish_envelope("inventory", again)
    await world.bus.publish_envelope("inventory", again)
    # Then a reply no step expects now, on the same partition: once the saga noted it as
    # ignored, the two redeliveries before it were handled.
    marker = Envelope(
        type=type_name(StockRejected),
        source="inventory",
        data=StockRejected(order_id="o-6", reason="marker"),
        correlationid=saga_id,
        partitionkey="o-6",
    )
    await world.bus.publish_envelope("inventory", marker)
    state = await world.orders.wait(
        saga_id, lambda s: any(e.message_id == marker.id for e in s.history)
    )

    assert state.status is SagaStatus.RUNNING
    assert state.step_name == "charge-payment"
    assert state.version == 2
    assert [e.event for e in state.history].count("reply-ok") == 1
    assert [e.message_id for e in state.history if e.event == "ignored"] == [marker.id]
    assert sent(state) == [type_name(ReserveStock), type_name(ChargePayment)]
    assert await world.participants.wait_for(saga_id, 2) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
    ]


async def test_late_and_foreign_replies_are_ignored(world: World) -> None:
    world.participants.stock = "silent"
    world.participants.payment = "silent"
    sagas = world.orders.sagas
    saga_id = await world.orders.place_order(order("o-7"))

    assert await sagas.handle_reply(reply(saga_id, StockReserved(order_id="o-7"))) is True
    # A second answer for the step already decided (a new message, not a redelivery):
    late = reply(saga_id, StockRejected(order_id="o-7", reason="oops"))
    assert await sagas.handle_reply(late) is False
    # A reply for a saga that does not exist, and a message without any correlation:
    assert await sagas.handle_reply(reply("nobody", StockReserved(order_id="x"))) is False
    uncorrelated = reply(saga_id, StockReserved(order_id="o-7"))
    uncorrelated.envelope.correlationid = None
    assert await sagas.handle_reply(uncorrelated) is False
    # A `sagaid` extension wins over the correlation id.
    explicit = reply("something-else", PaymentCaptured(order_id="o-7", payment_id="p-9"))
    explicit.envelope.extensions["sagaid"] = saga_id
    assert await sagas.handle_reply(explicit) is True

    state = await world.orders.finished(saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.data.payment_id == "p-9"
    ignored = [e for e in state.history if e.event == "ignored"]
    assert [(e.step, e.message_type) for e in ignored] == [
        ("charge-payment", type_name(StockRejected))
    ]
    # After the end, every reply is late.
    assert await sagas.handle_reply(reply(saga_id, PaymentRefunded(order_id="o-7"))) is False


# -- restart --------------------------------------------------------------------------------------


async def test_a_new_orchestrator_resumes_where_the_old_one_stopped(world: World) -> None:
    bus, participants = world.bus, world.participants
    participants.payment = "hold"  # payments answers only once the orders service restarted
    saga_id = await world.orders.place_order(order("o-8"))
    await world.orders.wait(saga_id, lambda s: s.step == 1)

    # The orders process stops: its reply subscription, orchestrator, outbox relay and pool.
    await world.saga_subscription.stop(grace=1)
    await world.orders.stop()
    # Payments captures and replies while no orchestrator runs.
    participants.released.set()
    await participants.wait_for(saga_id, 2)

    # A brand-new orders process on the same database continues the saga from its row.
    restarted = world.build(bus)
    await restarted.start()
    world.orders = restarted
    await bus.subscribe_running(
        REPLY_TOPICS, restarted.sagas.handlers(), ConsumerOptions(group="orders.sagas")
    )

    state = await restarted.finished(saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.data.payment_id == "pay-o-8"
    assert await participants.wait_for(saga_id, 3) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(ApproveOrder),
    ]
    assert await restarted.order_status("o-8") == "approved"


async def test_a_new_orchestrator_takes_over_expired_deadlines(world: World) -> None:
    world.participants.payment = "silent"
    saga_id = await world.orders.place_order(order("o-10"))
    await world.orders.wait(saga_id, lambda s: s.step == 1)
    await world.saga_subscription.stop(grace=1)
    await world.orders.stop()
    await world.orders.expire_deadline(saga_id)  # the 30 s pass while no timer runs

    restarted = world.build(world.bus)
    await restarted.start()
    world.orders = restarted
    await world.bus.subscribe_running(
        REPLY_TOPICS, restarted.sagas.handlers(), ConsumerOptions(group="orders.sagas")
    )
    state = await restarted.finished(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.error == "charge-payment: no reply within 30s"
    assert "timed-out" in [e.event for e in state.history]


# -- transactions ---------------------------------------------------------------------------------


class Boom(Exception):
    pass


@only_postgres
async def test_start_saga_in_a_rolled_back_transaction_leaves_no_saga_and_no_command(
    world: World,
) -> None:
    orders = world.orders
    with pytest.raises(Boom):
        async with orders.db.transaction() as tx:
            await tx.execute("insert into orders (id, status) values ('o-11', 'new')")
            await orders.sagas.start_saga(tx, PlaceOrderSaga, order("o-11"), saga_id="s-11")
            raise Boom

    with pytest.raises(SagaNotFound):
        await orders.sagas.get("s-11")
    async with orders.db.connection() as conn:
        for table in ("orders", "msa_saga", "msa_saga_history", "msa_outbox"):
            assert await conn.fetchval(f"select count(*) from {table}") == 0, table
    # Commands reach the bus only through msa_outbox: none can ever go out.

    # The same, committed: both the order and the saga exist, and the command goes out.
    async with orders.db.transaction() as tx:
        await tx.execute("insert into orders (id, status) values ('o-11', 'new')")
        await orders.sagas.start_saga(tx, "place-order", order("o-11"), saga_id="s-11")
    assert (await orders.finished("s-11")).status is SagaStatus.COMPLETED
    assert await world.participants.wait_for("s-11", 3) == [
        type_name(ReserveStock),
        type_name(ChargePayment),
        type_name(ApproveOrder),
    ]


async def test_a_saga_id_is_used_once(world: World) -> None:
    world.participants.stock = "silent"
    sagas = world.orders.sagas
    await sagas.start_saga(None, PlaceOrderSaga, order("o-12"), saga_id="s-12")
    with pytest.raises(DuplicateSaga):
        await sagas.start_saga(None, PlaceOrderSaga, order("o-12"), saga_id="s-12")
    assert await world.participants.wait_for("s-12", 1) == [type_name(ReserveStock)]
    assert events(await sagas.get("s-12")) == [  # the duplicate wrote nothing
        ("started", None, None),
        ("command-sent", "reserve-stock", type_name(ReserveStock)),
    ]


@only_postgres
async def test_a_duplicate_saga_leaves_the_callers_transaction_usable(world: World) -> None:
    world.participants.stock = "silent"
    sagas = world.orders.sagas
    assert isinstance(world.orders, PostgresOrders)
    await sagas.start_saga(None, PlaceOrderSaga, order("o-14"), saga_id="s-14")
    async with world.orders.db.transaction() as tx:
        with pytest.raises(DuplicateSaga):
            await sagas.start_saga(tx, PlaceOrderSaga, order("o-14"), saga_id="s-14")
        assert await tx.fetchval("select count(*) from msa_saga") == 1  # tx still usable


@only_mongo
async def test_on_mongodb_a_saga_starts_in_a_document_of_its_own(world: World) -> None:
    """No multi-document transactions: `start_saga` takes no caller's `tx`, and the saga's
    document carries its state, pending commands and the replies it took."""
    world.participants.payment = "silent"
    sagas = world.orders.sagas
    with pytest.raises(ConfigurationError, match="document of its own"):
        await sagas.start_saga(object(), PlaceOrderSaga, order("o-15"), saga_id="s-15")
    with pytest.raises(SagaNotFound):
        await sagas.get("s-15")

    await sagas.start_saga(None, PlaceOrderSaga, order("o-15"), saga_id="s-15")
    await world.orders.wait("s-15", lambda s: s.step == 1)  # stock reserved, charge sent
    await world.participants.wait_for("s-15", 2)
    await drained(world.orders.outbox)  # the relay published both commands and removed them
    document = await world.orders.db.collection(SAGAS_COLLECTION).find_one({"_id": "s-15"})
    assert document is not None
    assert (document["status"], document["step"], document["version"]) == ("running", 1, 2)
    assert "msa_outbox" not in document
    [reply] = document["msa_inbox"]  # the StockReserved it took, by the sagas' group
    assert reply.startswith("orders.sagas:")
    assert [line["event"] for line in document["history"]] == [
        "started",
        "command-sent",
        "reply-ok",
        "command-sent",
    ]


async def test_a_failing_command_builder_fails_the_step(world: World) -> None:
    saga_id = await world.orders.sagas.start_saga(None, BrokenSaga, order("o-13"))
    state = await world.orders.finished(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == "charge"
    assert state.error == "charge: command failed: RuntimeError: no price list"
    assert await world.participants.wait_for(saga_id, 2) == [
        type_name(ReserveStock),
        type_name(ReleaseStock),
    ]


# -- definitions ----------------------------------------------------------------------------------


def test_the_data_type_comes_from_the_class_argument() -> None:
    assert PlaceOrderSaga.data_type is OrderData
    assert QuickPlaceOrderSaga.data_type is OrderData


def test_malformed_definitions_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="needs replies"):
        Step("x", topic="t", send=reserve_stock, timeout=3)
    with pytest.raises(ConfigurationError, match="without a compensate"):
        Step("x", topic="t", send=reserve_stock, on_compensate_reply={PaymentRefunded: ok})

    class NoTopic(SagaDefinition[OrderData]):
        name = "no-topic"
        steps = (Step("a", send=reserve_stock),)

    with pytest.raises(ConfigurationError, match="has no topic"):
        NoTopic.validate()

    class Twice(SagaDefinition[OrderData]):
        name = "twice"
        topic = "t"
        steps = (Step("a", send=reserve_stock), Step("a", send=charge))

    with pytest.raises(ConfigurationError, match="used twice"):
        Twice.validate()
