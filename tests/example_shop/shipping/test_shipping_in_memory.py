"""Shipping on the in-memory Mongo engine (mongomock_motor), as the embedded shop runs it."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from mongomock_motor import AsyncMongoMockClient

from example_shop.contracts import (
    TOPICS,
    CancelShipment,
    CreateShipment,
    OrderLine,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentTracked,
)
from example_shop.embedded_mongo import embedded_mongo_client
from example_shop.shipping import Shipping
from example_shop.shipping.tracking import CREATED, PACKED, SHIPMENTS, ShipmentTracker
from framework.bus import Bus, MemoryTransport
from framework.messages import (
    Envelope,
    decode_payload,
    from_binary,
    to_binary,
    type_name,
    utc_now,
)
from framework.persistence.mongo import MongoOutbox, MongoResource
from framework.service import ServiceSettings


async def test_runs_on_an_in_memory_mongo_client() -> None:
    transport = MemoryTransport()
    shipping = Shipping(
        ServiceSettings(http_port=-1, env={"SHIPPING_TICK_SECONDS": "0.05"}),
        transport=transport,
        mongo_client=AsyncMongoMockClient(),
    )

    async def send(data: CreateShipment | CancelShipment, saga_id: str) -> None:
        envelope = Envelope(
            type=type_name(type(data)), source="orders", data=data, correlationid=saga_id
        )
        key, value, headers = to_binary(envelope)
        for _ in range(2):  # every command delivered twice
            await transport.send(TOPICS.SHIPPING_COMMANDS, value, key=key, headers=headers)

    def events(of: type) -> list[Envelope[bytes]]:
        found = [from_binary(r) for r in transport.records(TOPICS.SHIPPING_EVENTS)]
        return [e for e in found if e.type == type_name(of)]

    def every_command_handled() -> bool:
        ends = {
            r.topic_partition: r.offset + 1 for r in transport.records(TOPICS.SHIPPING_COMMANDS)
        }
        return all(transport.committed("shipping", tp) == end for tp, end in ends.items())

    async def quiet() -> bool:
        """The shipments are delivered, every command (twice) was handled and the outbox
        is empty: every reply is on the bus, and nothing else is left to come."""
        return (
            len(events(ShipmentTracked)) == 3
            and every_command_handled()
            and not await shipping.outbox.pending()
        )

    await shipping.start()
    try:
        line = OrderLine(product_id="p-001", quantity=1, unit_price_cents=1290)
        await send(CreateShipment(order_id="o-1", address="1 Leaf Road", lines=[line]), "s-1")
        await send(CancelShipment(order_id="o-2"), "s-2")
        async with asyncio.timeout(5):
            while True:
                if await quiet():
                    break
                await asyncio.sleep(0.02)
        [created] = events(ShipmentCreated)
        assert created.correlationid == "s-1"
        assert decode_payload(created.data, ShipmentCreated).order_id == "o-1"
        [cancelled] = events(ShipmentCancelled)
        assert cancelled.correlationid == "s-2"
        statuses = [decode_payload(e.data, ShipmentTracked).status for e in events(ShipmentTracked)]
        assert statuses == ["packed", "in_transit", "delivered"]
    finally:
        await shipping.stop(grace=1)


async def test_the_tracker_moves_every_due_shipment_in_one_tick_not_one_batch() -> None:
    """More shipments due than one batch: all take their step in the same tick (one batch per
    tick moved 100 shipments every 5 s, fewer than the shop's orders under load)."""
    resource = MongoResource("mongodb://in-memory", "shipping", client=embedded_mongo_client())
    assert resource.indexed is False  # mongomock_motor's client is known for what it is
    bus = Bus(MemoryTransport(), source="shipping")
    outbox = MongoOutbox(resource, bus, collections=[SHIPMENTS], relay=False)
    await resource.start()
    try:
        past = utc_now() - timedelta(seconds=1)
        await resource.collection(SHIPMENTS).insert_many(
            [
                {
                    "_id": f"o-{n}",
                    "order_id": f"o-{n}",
                    "shipment_id": f"s-{n}",
                    "status": CREATED,
                    "version": 1,
                    "advance_at": past,
                }
                for n in range(7)
            ]
        )
        tracker = ShipmentTracker(resource, outbox, tick=5.0, batch_size=3)
        assert await tracker.advance_due() == 7
        statuses = await resource.collection(SHIPMENTS).distinct("status")
        assert statuses == [PACKED]
        assert await tracker.advance_due() == 0  # the next step is due a tick later
        assert await outbox.pending() == 7
    finally:
        await resource.stop()
