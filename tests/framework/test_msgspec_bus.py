"""`msgspec.Struct` payloads on the bus, in memory and on a real Kafka: a handler receives the
decoded Struct, an invalid one is a dead letter naming the field, what a service publishes is
plain JSON any client reads, request/reply carries Structs both ways, the outbox stores them, and
the testing kit awaits them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import msgspec
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.bus.dlq import DeadLetter
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.errors import ConfigurationError, PayloadValidationError
from framework.messages import decode_payload, from_binary, message_type
from framework.persistence.outbox import PostgresOutbox
from framework.persistence.postgres import PostgresResource
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from framework.types import Transport
from tests.readers import read_topic

NO_HTTP = ServiceSettings(http_port=-1)


class OrderLine(msgspec.Struct, frozen=True):
    sku: str
    quantity: int


@message_type("test.msgspec.bus.order.placed")
class OrderPlaced(msgspec.Struct, kw_only=True):
    order_id: str
    lines: list[OrderLine]
    total: Decimal


@message_type("test.msgspec.bus.order.accepted")
class OrderAccepted(msgspec.Struct):
    order_id: str
    items: int


@message_type("test.msgspec.bus.quote.requested")
class QuoteRequest(msgspec.Struct):
    sku: str
    quantity: int


class Quote(msgspec.Struct):
    sku: str
    total: Decimal


PLACED = OrderPlaced(
    order_id="o-1", lines=[OrderLine("mug", 2), OrderLine("tea", 1)], total=Decimal("12.50")
)


def orders_on(topic: str) -> type[Service]:
    """A service whose handlers take and return Structs only."""

    class Orders(Service):
        name = f"msgspec-orders-{topic}"

        @handles(topic)
        async def on_order(self, order: OrderPlaced) -> None:
            # Typed access that a dict or a half-decoded value would fail.
            items = sum(line.quantity for line in order.lines)
            accepted = OrderAccepted(order.order_id, items)
            await self.publish(f"{topic}.accepted", accepted, key=order.order_id)

        @handles(f"{topic}.quotes")
        async def on_quote(self, request: QuoteRequest) -> Quote:
            return Quote(sku=request.sku, total=Decimal("2.50") * request.quantity)

    return Orders


@pytest.fixture
def harness(make_transport: Callable[[], Transport], topic_name: str) -> ServiceHarness:
    return ServiceHarness(orders_on(topic_name)(NO_HTTP, transport=make_transport()))


async def test_a_struct_handler_receives_the_decoded_struct_and_publishes_json(
    harness: ServiceHarness, topic_name: str
) -> None:
    async with harness:
        await harness.publish(topic_name, PLACED, key="o-1")
        [handled] = await harness.handled(OrderPlaced)
        [accepted] = await harness.wait_published(OrderAccepted)
        transport = harness.service.bus.transport
        [record] = await read_topic(transport, f"{topic_name}.accepted", count=1)

    assert handled.error is None
    assert type(handled.message.data) is OrderPlaced
    assert handled.message.data == PLACED
    harness.mock("on_order").assert_called_once_with(PLACED)
    assert accepted.data == OrderAccepted("o-1", 3)

    # What a second client reads: plain JSON and CloudEvents binary-mode headers.
    assert orjson.loads(record.value) == {"order_id": "o-1", "items": 3}
    assert record.key == b"o-1"
    assert record.header("ce_type") == b"test.msgspec.bus.order.accepted"
    assert record.header("content-type") == b"application/json"
    assert decode_payload(from_binary(record).data, OrderAccepted) == OrderAccepted("o-1", 3)


async def test_a_wrong_typed_field_is_a_dead_letter_that_names_the_field(
    harness: ServiceHarness, topic_name: str
) -> None:
    broken = {"order_id": "o-2", "lines": [{"sku": "mug", "quantity": "two"}], "total": "1"}
    async with harness:
        await harness.publish(topic_name, broken, type="test.msgspec.bus.order.placed", key="o-2")
        await harness.publish(topic_name, PLACED, key="o-2")  # the partition keeps moving
        [letter] = await harness.dead_lettered(OrderPlaced)
        [rejected] = await harness.wait_rejected(OrderPlaced)
        [handled] = await harness.handled(OrderPlaced)
        [on_the_topic] = await read_topic(
            harness.service.bus.transport, f"{topic_name}.dlq", count=1
        )

    assert isinstance(letter, DeadLetter)
    assert letter.error_type == "framework.errors.PayloadValidationError"
    assert letter.error_message == (
        "payload is not a valid test.msgspec.bus.order.placed: 1 error(s): "
        "lines.0.quantity: Expected `int`, got `str`"
    )
    assert letter.attempts == 1
    assert orjson.loads(letter.record.value) == broken, "the dead letter keeps the bytes"
    # A second reader of the dead-letter topic finds the error in the record's headers.
    read_back = DeadLetter.from_record(on_the_topic)
    assert read_back.error_message == letter.error_message
    assert read_back.original_topic == topic_name

    assert isinstance(rejected.error, PayloadValidationError)
    assert rejected.error.errors[0]["loc"] == ["lines", 0, "quantity"]
    # Only the valid order reached the handler.
    assert handled.message.data == PLACED
    harness.mock("on_order").assert_called_once_with(PLACED)


async def test_request_and_reply_carry_structs(harness: ServiceHarness, topic_name: str) -> None:
    async with harness:
        quote = await harness.request(
            f"{topic_name}.quotes", QuoteRequest("mug", 3), reply_type=Quote, timeout=30
        )
        [handled] = await harness.handled(QuoteRequest)

    assert quote == Quote(sku="mug", total=Decimal("7.50"))
    assert type(quote) is Quote
    assert handled.result == quote
    assert handled.message.data == QuoteRequest("mug", 3)


class Unsupported:
    """No library can validate it."""


class Holder(msgspec.Struct):
    inner: Unsupported


async def test_a_subscription_with_an_unsupported_payload_type_is_refused() -> None:
    bus = Bus(MemoryTransport(), source="orders")

    async def ignore(message: Message[Any]) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"'test\.holder' on t: 'Holder' is not a payload"):
        bus.subscribe(
            ["t"], {"test.holder": HandlerSpec(Holder, ignore)}, ConsumerOptions(group="g")
        )
    assert bus.subscriptions == []
    bus.subscribe(
        ["t"], {"test.placed": HandlerSpec(OrderPlaced, ignore)}, ConsumerOptions(group="g")
    )


@pytest.mark.kafka
async def test_a_plain_aiokafka_consumer_reads_a_published_struct(
    kafka_bootstrap: str, topic_name: str
) -> None:
    bus = Bus(KafkaTransport(KafkaSettings(bootstrap_servers=kafka_bootstrap)), source="orders")
    await bus.start()
    try:
        await bus.publish(topic_name, PLACED, key="o-1")
    finally:
        await bus.stop(grace=1)
    consumer = AIOKafkaConsumer(
        topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await consumer.getone()  # the test's timeout bounds it
    finally:
        await consumer.stop()
    headers = {name: value.decode() for name, value in record.headers}
    assert record.key == b"o-1"
    assert orjson.loads(record.value) == {
        "order_id": "o-1",
        "lines": [{"sku": "mug", "quantity": 2}, {"sku": "tea", "quantity": 1}],
        "total": "12.50",
    }
    assert headers["ce_type"] == "test.msgspec.bus.order.placed"
    assert headers["ce_source"] == "orders"
    assert headers["content-type"] == "application/json"


@pytest.fixture
async def postgres(postgres_database: str) -> AsyncIterator[PostgresResource]:
    resource = PostgresResource(postgres_database)
    yield resource
    await resource.stop()


@pytest.mark.postgres
async def test_the_outbox_stores_and_relays_a_struct(
    postgres: PostgresResource, topic_name: str
) -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="orders")
    outbox = PostgresOutbox(postgres, bus)
    await bus.start()
    await postgres.start()
    await outbox.start()
    try:
        async with postgres.transaction() as tx:
            envelope = await outbox.add(tx, topic_name, PLACED, key="o-1")
        [record] = await read_topic(transport, topic_name, count=1)
    finally:
        await outbox.stop()
        await bus.stop(grace=1)
    assert from_binary(record).id == envelope.id
    assert record.header("ce_type") == b"test.msgspec.bus.order.placed"
    assert decode_payload(record.value, OrderPlaced) == PLACED
