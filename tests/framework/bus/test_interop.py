"""Any Kafka client can read and write our events: CloudEvents Kafka binding, binary mode.

Each test runs on both of our Kafka clients (`[kafka]` aiokafka, `[confluent]` librdkafka), with
a plain aiokafka client on the other side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import message_type
from framework.types import Transport

pytestmark = pytest.mark.kafka


@pytest.fixture(params=["kafka", "confluent"])
def kafka_transport(
    request: pytest.FixtureRequest, kafka_bootstrap: str
) -> Callable[[], Transport]:
    """New transports on the real Kafka, through one of our two clients."""
    if request.param == "confluent":
        from framework.bus.confluent import ConfluentSettings, ConfluentTransport

        return lambda: ConfluentTransport(ConfluentSettings(bootstrap_servers=kafka_bootstrap))
    return lambda: KafkaTransport(KafkaSettings(bootstrap_servers=kafka_bootstrap))


@message_type("shop.stock.reserved")
class StockReserved(BaseModel):
    sku: str
    quantity: int


async def test_a_plain_aiokafka_producer_feeds_our_handlers(
    kafka_bootstrap: str, kafka_transport: Callable[[], Transport], topic_name: str
) -> None:
    got: list[Message[StockReserved]] = []
    arrived = asyncio.Event()
    bus = Bus(kafka_transport(), source="it")

    async def on_reserved(message: Message[StockReserved]) -> None:
        got.append(message)
        arrived.set()

    bus.subscribe(
        [topic_name],
        {"shop.stock.reserved": HandlerSpec(StockReserved, on_reserved)},
        ConsumerOptions(group=f"{topic_name}-g"),
    )
    await bus.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic_name,
            b'{"sku": "mug", "quantity": 2}',
            key=b"mug",
            headers=[
                ("ce_specversion", b"1.0"),
                ("ce_id", b"legacy-1"),
                ("ce_source", b"/legacy/warehouse"),
                ("ce_type", b"shop.stock.reserved"),
                ("content-type", b"application/json"),
            ],
        )
        await asyncio.wait_for(arrived.wait(), 20)
    finally:
        await producer.stop()
        await bus.stop(grace=1)
    [message] = got
    assert message.data == StockReserved(sku="mug", quantity=2)
    assert message.envelope.id == "legacy-1"
    assert message.envelope.source == "/legacy/warehouse"
    assert message.key == "mug"


async def test_a_plain_aiokafka_consumer_reads_our_events(
    kafka_bootstrap: str, kafka_transport: Callable[[], Transport], topic_name: str
) -> None:
    bus = Bus(kafka_transport(), source="inventory")
    await bus.start()
    try:
        sent = bus.envelope(StockReserved(sku="cup", quantity=3), key="cup")
        await bus.publish_envelope(topic_name, sent)
    finally:
        await bus.stop()
    consumer = AIOKafkaConsumer(
        topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000)
    finally:
        await consumer.stop()
    [record] = [r for records in batch.values() for r in records]
    headers = {k: v.decode() for k, v in record.headers}
    assert record.key == b"cup"
    assert orjson.loads(record.value) == {"sku": "cup", "quantity": 3}
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_type"] == "shop.stock.reserved"
    assert headers["ce_source"] == "inventory"
    assert headers["ce_id"] == sent.id
    assert headers["content-type"] == "application/json"
    assert headers["ce_traceparent"].startswith("00-")
