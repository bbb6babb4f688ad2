"""MongoResource, MongoOutbox and MongoInbox against the real MongoDB-wire server (FerretDB)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from pymongo import IndexModel

import framework.persistence.mongo
from framework.bus import Bus, MemoryTransport, Message, Outgoing
from framework.errors import ConfigurationError, DatabaseUnavailable, PublishError
from framework.messages import from_binary, message_type
from framework.observability.metrics import Counter as CounterMetric
from framework.persistence.mongo import (
    CLAIMS_COLLECTION,
    DocumentChange,
    DocumentNotFound,
    DuplicateKey,
    IndexSpec,
    MongoInbox,
    MongoOutbox,
    MongoResource,
    translate,
)
from framework.types import Headers, Record, RecordMetadata
from tests.framework.fakes import FlakyTransport
from tests.framework.persistence.relaying import STAMP, StampingMiddleware, messages_out

pytestmark = pytest.mark.mongo
TOPIC = "orders"


@message_type("test.order.changed")
class OrderChanged(BaseModel):
    order_id: str
    step: int


class LostAckTransport(MemoryTransport):
    """Stores every record but reports the first `failures` acknowledgements as failed."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
        immediate: bool = False,
    ) -> asyncio.Future[RecordMetadata]:
        future = await super().send(
            topic, value, key=key, headers=headers, partition=partition, immediate=immediate
        )
        if self.failures > 0:
            self.failures -= 1
            failed: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
            failed.set_exception(PublishError("acknowledgement lost"))
            return failed
        return future


class GatedTransport(MemoryTransport):
    """Holds every send until `gate` opens; `entered` tells that the relay is publishing."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
        immediate: bool = False,
    ) -> asyncio.Future[RecordMetadata]:
        self.entered.set()
        await self.gate.wait()
        return await super().send(
            topic, value, key=key, headers=headers, partition=partition, immediate=immediate
        )


@contextlib.asynccontextmanager
async def running(*components: Any) -> AsyncIterator[None]:
    """Start in order, stop in reverse (as a service does with its resources)."""
    started: list[Any] = []
    try:
        for component in components:
            await component.start()
            started.append(component)
        yield
    finally:
        for component in reversed(started):
            await component.stop()


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await _maybe_await(condition()):
                return
            await asyncio.sleep(0.02)


async def _maybe_await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


async def next_rounds(*relays: MongoOutbox) -> None:
    """Until each relay finished a round that began after this call: whatever they had read
    before, they have published (or left alone) by then."""
    seen = [relay.rounds for relay in relays]
    await eventually(lambda: all(r.rounds >= n + 2 for r, n in zip(relays, seen, strict=True)))


def published_ids(transport: MemoryTransport) -> list[str]:
    return [from_binary(r).id for r in transport.records(TOPIC)]


def steps_of(transport: MemoryTransport, order_id: str) -> list[int]:
    """The `step`s published for one order, in the order of its (single) partition."""
    steps = []
    for record in transport.records(TOPIC):
        data = OrderChanged.model_validate_json(record.value)
        if data.order_id == order_id:
            steps.append(data.step)
    return steps


def incoming(bus: Bus, *, group: str = "billing", envelope: Any = None) -> Message[Any]:
    """A delivered message as a handler would receive it."""
    envelope = envelope or bus.envelope(OrderChanged(order_id="o-1", step=1))
    record = Record(topic=TOPIC, partition=0, offset=0, key=None, value=b"{}")
    return Message(envelope=envelope, record=record, attempt=1, group=group)


# -- the resource ------------------------------------------------------------------------------


async def test_resource_creates_indexes_idempotently_and_translates_errors(
    mongo_url: str, mongo_database_name: str
) -> None:
    indexes: dict[str, list[IndexSpec | IndexModel]] = {
        "products": [IndexSpec("sku", unique=True), IndexModel([("name", 1)], name="by_name")]
    }
    db = MongoResource(mongo_url, mongo_database_name, indexes=indexes)
    again = MongoResource(mongo_url, mongo_database_name, indexes=indexes)  # a second replica
    async with running(db, again):
        assert await db.check()
        info = await db.collection("products").index_information()
        assert info["sku_1"]["unique"] is True
        assert info["by_name"]["key"] == [("name", 1)]

        products = db.collection("products")
        await products.insert_one({"sku": "A-1", "name": "mug"})
        with pytest.raises(DuplicateKey), translate():
            await products.insert_one({"sku": "A-1", "name": "another mug"})
        assert await products.count_documents({}) == 1
    assert not await db.check()

    async with running(db):
        with pytest.raises(ConfigurationError, match="add indexes before"):
            db.add_indexes("products", [IndexSpec("name")])
    with pytest.raises(ConfigurationError, match="two different indexes"):
        db.add_indexes("products", [IndexSpec("sku", name="sku_1")])


async def test_unreachable_server_is_database_unavailable(mongo_database_name: str) -> None:
    db = MongoResource("mongodb://127.0.0.1:9/", mongo_database_name, server_selection_timeout=0.2)
    with warnings.catch_warnings():
        # pymongo 4.20 leaks the socket of a monitor check cancelled mid-connect when the client
        # closes (`_async_create_connection` closes it on OSError, not on cancellation).
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(DatabaseUnavailable):
            await db.start()
        await asyncio.sleep(0.05)
        gc.collect()
    assert not await db.check()
    assert framework.persistence.mongo.DatabaseUnavailable is DatabaseUnavailable  # one class


async def test_a_motor_client_serves_the_resource_outbox_and_inbox(
    mongo_url: str, mongo_database_name: str
) -> None:
    from motor.motor_asyncio import AsyncIOMotorClient

    motor: AsyncIOMotorClient[dict[str, Any]] = AsyncIOMotorClient(mongo_url)
    try:
        transport = MemoryTransport()
        bus = Bus(transport, source="orders")
        db = MongoResource("", mongo_database_name, client=motor)
        outbox = MongoOutbox(db, bus, collections=["orders"])
        inbox = MongoInbox(db)
        async with running(bus, db, outbox):
            assert db.client is motor
            event = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=1), key="o-1")
            await outbox.insert_one("orders", {"_id": "o-1", "status": "new"}, event)
            await eventually(lambda: outbox.published == 1)
            assert len(transport.records(TOPIC)) == 1
            assert await outbox.pending() == 0

            message = incoming(bus)
            assert await inbox.apply("orders", "o-1", message, {"$set": {"status": "paid"}})
            assert not await inbox.apply("orders", "o-1", message, {"$set": {"status": "x"}})
            assert (await motor[mongo_database_name].orders.find_one({"_id": "o-1"}))[
                "status"
            ] == "paid"
        # a given client is not closed by the resource
        assert await motor[mongo_database_name].command("ping") == {"ok": 1.0}
    finally:
        motor.close()


# -- the outbox --------------------------------------------------------------------------------


async def test_state_change_and_event_in_one_update_are_published(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"], poll_interval=3600)
    async with running(bus, db, outbox):
        await eventually(lambda: outbox.rounds >= 1)  # its first round is over: it sleeps now
        orders = db.collection("orders")
        placed = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=1), key="o-1")
        await orders.insert_one(outbox.attach({"_id": "o-1", "status": "new"}, placed))
        paid = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=2), key="o-1")
        result = await orders.update_one(
            {"_id": "o-1", "status": "new"}, outbox.push({"$set": {"status": "paid"}}, paid)
        )
        assert result.modified_count == 1
        stored = await orders.find_one({"_id": "o-1"})
        assert stored is not None
        assert stored["status"] == "paid"
        assert [e["id"] for e in stored["msa_outbox"]] == [placed["id"], paid["id"]]
        assert await outbox.pending() == 2

        outbox.wake()  # the poll interval is an hour: only the wake-up can publish
        await eventually(lambda: len(transport.records(TOPIC)) == 2)

        records = transport.records(TOPIC)
        assert [from_binary(r).id for r in records] == [placed["id"], paid["id"]]
        assert all(r.key == b"o-1" for r in records)
        envelope = from_binary(records[1])
        assert envelope.type == "test.order.changed"
        assert envelope.source == "orders"
        assert OrderChanged.model_validate_json(envelope.data) == OrderChanged(
            order_id="o-1", step=2
        )
        await eventually(lambda: outbox.published == 2)
        stored = await orders.find_one({"_id": "o-1"})
        assert stored == {"_id": "o-1", "status": "paid"}  # entries and marker are gone
        assert await outbox.pending() == 0
        counter = bus.metrics.registry.get("msa_outbox_published_total")
        assert isinstance(counter, CounterMetric)
        assert counter.labels(topic=TOPIC).value == 2


async def test_the_relay_publishes_through_the_bus_middleware_and_metrics(
    mongo_url: str, mongo_database_name: str
) -> None:
    stamping = StampingMiddleware()
    transport = MemoryTransport()
    bus = Bus(transport, source="orders", publish_middleware=[stamping])
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"])
    async with running(bus, db, outbox):
        entries = [
            outbox.event(TOPIC, OrderChanged(order_id="o-1", step=s), key="o-1") for s in (1, 2, 3)
        ]
        await outbox.insert_one("orders", {"_id": "o-1"}, *entries)
        await eventually(lambda: outbox.published == 3)

        # the middleware saw each stored event, in order, with its id ...
        assert [(o.topic, o.envelope.id) for o in stamping.seen] == [
            (TOPIC, e["id"]) for e in entries
        ]
        # ... and what it added is on the bus, next to everything the outbox stored
        records = transport.records(TOPIC)
        assert [from_binary(r).id for r in records] == [e["id"] for e in entries]
        assert all(from_binary(r).extensions == {STAMP: "relayed"} for r in records)
        assert all(r.key == b"o-1" for r in records)
        assert steps_of(transport, "o-1") == [1, 2, 3]
        assert messages_out(bus, TOPIC, "test.order.changed") == 3
        assert await outbox.pending() == 0


async def test_a_document_change_writes_state_event_and_inbox_in_one_update(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"])
    inbox = MongoInbox(db)
    async with running(bus, db, outbox):
        orders = db.collection("orders")
        placed = DocumentChange(orders, {"_id": "o-1", "status": "new"}, new=True)
        await outbox.add(placed, TOPIC, OrderChanged(order_id="o-1", step=1), key="o-1")
        assert await placed.commit()  # inserted with its event
        # published and removed: the relay is done writing the document (FerretDB does not
        # isolate updates, so a test does not race it)
        await eventually(lambda: outbox.published == 1)

        message = incoming(bus)
        applied = []
        for _ in range(2):  # a redelivery: the inbox sees it in the document as read
            read = await orders.find_one({"_id": "o-1"})
            assert read is not None
            change = DocumentChange(orders, read, guard={"status": "new"})
            if not await inbox.record(change, message):
                continue
            change.set({"status": "paid"})
            paid = await outbox.add(change, TOPIC, OrderChanged(order_id="o-1", step=2), key="o-1")
            applied.append(await change.commit())
        assert applied == [True]
        await eventually(lambda: outbox.published == 2)
        assert steps_of(transport, "o-1") == [1, 2]
        assert published_ids(transport)[-1] == paid.id
        stored = await orders.find_one({"_id": "o-1"})
        assert stored == {"_id": "o-1", "status": "paid", "msa_inbox": [inbox.entry(message)]}

        # a guard that no longer matches writes neither the state nor the event
        stale = DocumentChange(orders, stored, guard={"status": "new"})
        stale.set({"status": "cancelled"})
        await outbox.add(stale, TOPIC, OrderChanged(order_id="o-1", step=3), key="o-1")
        assert not await stale.commit()
        assert await outbox.pending() == 0
        assert (await orders.find_one({"_id": "o-1"}) or {})["status"] == "paid"

        # events only go into documents whose collection the relay reads
        elsewhere = DocumentChange(db.collection("invoices"), {"_id": "i-1"}, new=True)
        with pytest.raises(ConfigurationError, match="invoices"):
            await outbox.add(elsewhere, TOPIC, OrderChanged(order_id="o-1", step=4))


async def test_the_relay_leaves_a_held_document_alone_until_it_is_released(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"], poll_interval=0.02)
    async with running(bus, db, outbox):
        async with outbox.holding("orders", "o-1") as held:
            assert held
            event = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=1), key="o-1")
            await outbox.insert_one("orders", {"_id": "o-1"}, event)
            async with outbox.holding("orders", "o-1", wait=False) as again:
                assert not again  # one holder at a time
            await next_rounds(outbox)  # rounds that saw the event, and skipped it
            assert transport.records(TOPIC) == []
            assert await outbox.pending() == 1
        await eventually(lambda: outbox.published == 1)  # released: published
        assert published_ids(transport) == [event["id"]]
        claims = db.collection(CLAIMS_COLLECTION)
        # The relay counts what it published before it releases its own claim: await that.
        await eventually(lambda: _no_documents(claims))


async def test_events_of_one_aggregate_are_published_in_order(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"], batch_size=3)
    async with running(bus, db):
        for order in ("o-1", "o-2", "o-3", "o-4"):
            await db.collection("orders").insert_one({"_id": order, "step": 0})
        for step in range(1, 8):
            for order in ("o-1", "o-2", "o-3", "o-4"):
                await outbox.update_one(
                    "orders",
                    {"_id": order},
                    {"$set": {"step": step}},
                    outbox.event(TOPIC, OrderChanged(order_id=order, step=step), key=order),
                )
        await outbox.update_one(  # several events in one update keep their order as well
            "orders",
            {"_id": "o-1"},
            {"$set": {"step": 10}},
            *(
                outbox.event(TOPIC, OrderChanged(order_id="o-1", step=s), key="o-1")
                for s in (8, 9, 10)
            ),
        )
        async with running(outbox):  # 4 documents, 3 per round: two rounds at least
            await eventually(lambda: len(transport.records(TOPIC)) == 31)
        assert steps_of(transport, "o-1") == list(range(1, 11))
        for order in ("o-2", "o-3", "o-4"):
            assert steps_of(transport, order) == list(range(1, 8))
        assert await outbox.pending() == 0


async def test_events_added_while_the_relay_publishes_are_kept_for_the_next_round(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = GatedTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"])
    async with running(bus, db, outbox):
        first = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=1), key="o-1")
        await outbox.insert_one("orders", {"_id": "o-1"}, first)
        await asyncio.wait_for(transport.entered.wait(), 2)  # claimed, read, now publishing
        second = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=2), key="o-1")
        await outbox.update_one("orders", {"_id": "o-1"}, {"$set": {"step": 2}}, second)
        transport.gate.set()
        await eventually(lambda: len(transport.records(TOPIC)) == 2)
        await eventually(lambda: outbox.published == 2)
        assert published_ids(transport) == [first["id"], second["id"]]
        assert await outbox.pending() == 0
        assert await db.collection("orders").find_one({"_id": "o-1"}) == {"_id": "o-1", "step": 2}


async def test_a_failed_write_publishes_nothing(mongo_url: str, mongo_database_name: str) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"], poll_interval=0.02)
    async with running(bus, db, outbox):
        await db.collection("orders").insert_one({"_id": "o-1", "status": "paid"})
        event = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=1))
        refused = await outbox.update_one(  # the guard on the state does not match
            "orders", {"_id": "o-1", "status": "new"}, {"$set": {"status": "paid"}}, event
        )
        assert refused.matched_count == 0
        with pytest.raises(DuplicateKey):
            await outbox.insert_one("orders", {"_id": "o-1"}, event)
        # An entry leaves its document only after it was published: with none pending, an
        # event of the failed writes would be on the bus by now.
        assert await outbox.pending() == 0
        assert transport.records(TOPIC) == []
        assert await db.collection("orders").find_one({"_id": "o-1"}) == {
            "_id": "o-1",
            "status": "paid",
        }


async def test_two_relays_never_publish_the_same_event_twice(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = MemoryTransport()
    # Relay A claims the first order's events and holds its first publish; relay B starts only
    # then, and A is released once B has published: both relays take part, with no bet on
    # which polls first (A's hold is far shorter than its lease).
    a_holding, release_a = asyncio.Event(), asyncio.Event()

    async def hold_first_publish(outgoing: Outgoing, call_next: Any) -> Any:
        a_holding.set()
        await release_a.wait()
        return await call_next(outgoing)

    bus_a = Bus(transport, source="orders", publish_middleware=[hold_first_publish])
    bus_b = Bus(transport, source="orders")
    db_a = MongoResource(mongo_url, mongo_database_name)  # two replicas: two clients
    db_b = MongoResource(mongo_url, mongo_database_name)
    relay_a = MongoOutbox(db_a, bus_a, collections=["orders"], batch_size=4, poll_interval=0.01)
    relay_b = MongoOutbox(db_b, bus_b, collections=["orders"], batch_size=4, poll_interval=0.01)

    async def place(n: int) -> None:
        order = f"o-{n}"
        events = [
            relay_a.event(TOPIC, OrderChanged(order_id=order, step=s), key=order) for s in (1, 2, 3)
        ]
        await db_a.collection("orders").insert_one(relay_a.attach({"_id": order}, *events))

    async with running(bus_a, db_a, relay_a):
        await place(0)
        async with asyncio.timeout(15):
            await a_holding.wait()
        async with running(bus_b, db_b, relay_b):
            for n in range(1, 40):
                await place(n)
            await eventually(lambda: relay_b.published > 0, timeout=15)
            release_a.set()
            await eventually(lambda: relay_a.published + relay_b.published == 120, timeout=15)
            assert await relay_a.pending() == 0
            # a second copy could only come from a round that read a document before it was
            # settled
            await next_rounds(relay_a, relay_b)
            counts = Counter(published_ids(transport))
            assert len(counts) == 120
            assert set(counts.values()) == {1}
            for n in range(40):
                assert steps_of(transport, f"o-{n}") == [1, 2, 3]
            assert relay_a.published > 0
            assert relay_b.published > 0
            assert await db_a.collection(CLAIMS_COLLECTION).count_documents({}) == 0


async def test_a_claim_is_respected_until_its_lease_expires(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"], poll_interval=0.02)
    async with running(bus, db):
        claims = db.collection(CLAIMS_COLLECTION)
        now = datetime.now(UTC)
        for order, until in (("o-held", now + timedelta(minutes=5)), ("o-dead", now)):
            event = outbox.event(TOPIC, OrderChanged(order_id=order, step=1), key=order)
            await outbox.insert_one("orders", {"_id": order}, event)
            await claims.insert_one(  # another relay's claim (o-dead: that relay crashed)
                {
                    "_id": {"collection": "orders", "id": order},
                    "owner": "elsewhere",
                    "token": "t",
                    "until": until,
                }
            )
        async with running(outbox):
            await eventually(lambda: outbox.published == 1)
            await next_rounds(outbox)  # and it still keeps its hands off o-held
        assert steps_of(transport, "o-dead") == [1]
        assert steps_of(transport, "o-held") == []
        assert await outbox.pending() == 1


async def test_a_relay_whose_publishing_fails_keeps_the_events_and_publishes_later(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = FlakyTransport(failures=sys.maxsize)  # the broker is down until said otherwise
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"])
    async with running(bus, db, outbox):
        events = [
            outbox.event(TOPIC, OrderChanged(order_id="o-1", step=s), key="o-1") for s in (1, 2)
        ]
        await outbox.insert_one("orders", {"_id": "o-1"}, *events)
        await eventually(lambda: transport.refused > 0)  # it tried and failed ...
        assert await outbox.pending() == 2  # ... and kept the events
        transport.failures = 0  # the broker is back
        await eventually(lambda: outbox.published == 2, timeout=15)  # after its back-off
        assert published_ids(transport) == [e["id"] for e in events]
        assert await outbox.pending() == 0


async def test_a_lost_acknowledgement_republishes_never_loses(
    mongo_url: str, mongo_database_name: str
) -> None:
    transport = LostAckTransport(failures=1)
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"])
    async with running(bus, db, outbox):
        events = [
            outbox.event(TOPIC, OrderChanged(order_id="o-1", step=s), key="o-1") for s in (1, 2)
        ]
        await outbox.insert_one("orders", {"_id": "o-1"}, *events)
        await eventually(lambda: outbox.published == 2)
        ids = [e["id"] for e in events]
        assert published_ids(transport) == ids + ids  # at least once: the whole batch again
        assert await outbox.pending() == 0


# -- the inbox ---------------------------------------------------------------------------------


async def test_the_same_message_applied_twice_has_its_effect_once(
    mongo_url: str, mongo_database_name: str
) -> None:
    bus = Bus(MemoryTransport(), source="billing")
    db = MongoResource(mongo_url, mongo_database_name)
    inbox = MongoInbox(db)
    async with running(db):
        accounts = db.collection("accounts")
        await accounts.insert_one({"_id": "a-1", "balance": 0})
        message = incoming(bus)
        assert await inbox.apply("accounts", "a-1", message, {"$inc": {"balance": 5}})
        assert not await inbox.apply("accounts", "a-1", message, {"$inc": {"balance": 5}})
        other_group = incoming(bus, group="audit", envelope=message.envelope)  # same id
        assert await inbox.apply(accounts, "a-1", other_group, {"$inc": {"balance": 1}})
        stored = await accounts.find_one({"_id": "a-1"})
        assert stored is not None
        assert stored["balance"] == 6

        with pytest.raises(DocumentNotFound):
            await inbox.apply("accounts", "missing", incoming(bus), {"$inc": {"balance": 1}})

        # composing the guard into an update of one's own
        second = incoming(bus)
        guarded = inbox.guard(
            second, {"_id": "a-1", "balance": {"$gte": 6}}, {"$inc": {"balance": -6}}
        )
        assert (await accounts.update_one(*guarded)).modified_count == 1
        assert (await accounts.update_one(*guarded)).matched_count == 0
        assert await inbox.is_duplicate("accounts", "a-1", second)


async def test_an_effect_that_creates_a_document_happens_once(
    mongo_url: str, mongo_database_name: str
) -> None:
    bus = Bus(MemoryTransport(), source="shipping")
    db = MongoResource(mongo_url, mongo_database_name)
    inbox = MongoInbox(db)
    async with running(db):
        message = incoming(bus)
        create = {"$setOnInsert": {"status": "scheduled"}, "$inc": {"parcels": 1}}
        assert await inbox.apply("shipments", "s-1", message, create, upsert=True)
        assert not await inbox.apply("shipments", "s-1", message, create, upsert=True)
        stored = await db.collection("shipments").find_one({"_id": "s-1"})
        assert stored is not None
        assert (stored["status"], stored["parcels"]) == ("scheduled", 1)


async def test_inbox_and_outbox_in_one_update(mongo_url: str, mongo_database_name: str) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    db = MongoResource(mongo_url, mongo_database_name)
    outbox = MongoOutbox(db, bus, collections=["orders"])
    inbox = MongoInbox(db)
    async with running(bus, db, outbox):
        await db.collection("orders").insert_one({"_id": "o-1", "status": "new"})
        message = incoming(bus)
        for _ in range(2):  # a redelivery
            event = outbox.event(TOPIC, OrderChanged(order_id="o-1", step=2), key="o-1")
            update = outbox.push({"$set": {"status": "paid"}}, event)
            if await inbox.apply("orders", "o-1", message, update):
                outbox.wake()
        await eventually(lambda: outbox.published == 1)
        # none pending: an entry of the redelivery would have been published by now
        assert await outbox.pending() == 0
        assert len(transport.records(TOPIC)) == 1


async def test_the_inbox_array_is_bounded(mongo_url: str, mongo_database_name: str) -> None:
    bus = Bus(MemoryTransport(), source="billing")
    db = MongoResource(mongo_url, mongo_database_name)
    inbox = MongoInbox(db, keep=3)
    async with running(db):
        accounts = db.collection("accounts")
        await accounts.insert_one({"_id": "a-1", "balance": 0})
        messages = [incoming(bus) for _ in range(5)]
        for message in messages:
            assert await inbox.apply("accounts", "a-1", message, {"$inc": {"balance": 1}})
        stored = await accounts.find_one({"_id": "a-1"})
        assert stored is not None
        assert stored["msa_inbox"] == [inbox.entry(m) for m in messages[-3:]]
        assert not await inbox.apply("accounts", "a-1", messages[-1], {"$inc": {"balance": 1}})
        # the window is the last `keep` messages: an older redelivery is not recognised
        assert await inbox.apply("accounts", "a-1", messages[0], {"$inc": {"balance": 1}})


async def _no_documents(collection: Any) -> bool:
    count: int = await collection.count_documents({})
    return count == 0
