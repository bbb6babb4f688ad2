"""The testing kit: `ServiceHarness` and the `msa_harness`/`msa_transport` pytest fixtures.

`test_a_shop_handles_orders_and_quotes` runs twice, on the in-memory transport and on a real
Apache Kafka (`[kafka]`): the harness gives the same answers on both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from pydantic import BaseModel

from framework.bus import MemoryTransport
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.errors import ConfigurationError, Reject
from framework.messages import message_type
from framework.observability.metrics import Counter
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from framework.types import Transport
from tests.framework.sample_services import (
    UNIT_PRICE,
    OrderAccepted,
    OrderLine,
    OrderPlaced,
    Price,
    PriceRequested,
    Shop,
    ShopTopics,
    make_shop,
)

MakeHarness = Callable[..., ServiceHarness]


@message_type("test.ticket")
class Ticket(BaseModel):
    number: int


class Gate(Service):
    """Lets even tickets in and rejects odd ones."""

    @handles("tickets")
    async def on_ticket(self, ticket: Ticket) -> int:
        if ticket.number % 2:
            raise Reject(f"ticket {ticket.number} is odd")
        return ticket.number


def order(order_id: str) -> OrderPlaced:
    return OrderPlaced(order_id=order_id, total=5.0, lines=[OrderLine(sku="mug", quantity=1)])


# -- the same test on both transports -------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def shop_harness(
    request: pytest.FixtureRequest, msa_harness: MakeHarness, topic_name: str
) -> AsyncIterator[tuple[ServiceHarness, ShopTopics]]:
    if request.param == "memory":
        topics = ShopTopics()
        harness = msa_harness(Shop)
    else:
        topics = ShopTopics(
            orders=f"{topic_name}.orders",
            prices=f"{topic_name}.prices",
            accepted=f"{topic_name}.accepted",
        )
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        transport = KafkaTransport(
            KafkaSettings(
                bootstrap_servers=bootstrap, session_timeout_ms=6_000, heartbeat_interval_ms=200
            )
        )
        harness = msa_harness(make_shop(topics, name=f"shop-{topic_name}"), transport=transport)
    async with harness:
        yield harness, topics


async def test_a_shop_handles_orders_and_quotes(
    shop_harness: tuple[ServiceHarness, ShopTopics],
) -> None:
    harness, topics = shop_harness

    await harness.publish(topics.orders, order("o-1"), key="o-1")
    await harness.publish(topics.orders, order("o-2"), key="o-2")
    handled = await harness.handled(OrderPlaced, count=2)
    accepted = await harness.wait_published(OrderAccepted, count=2)
    price = await harness.request(
        topics.prices, PriceRequested(sku="mug", quantity=3), reply_type=Price, timeout=10
    )

    assert [h.error for h in handled] == [None, None]
    assert sorted(h.message.data.order_id for h in handled) == ["o-1", "o-2"]
    assert sorted(e.data.order_id for e in accepted) == ["o-1", "o-2"]
    by_order = {h.message.data.order_id: h.message.envelope for h in handled}
    for event in accepted:
        assert event.causationid == by_order[event.data.order_id].id
        assert event.partitionkey == event.data.order_id
    assert harness.published(topic=topics.accepted) == accepted
    assert price == Price(sku="mug", amount=3 * UNIT_PRICE)


# -- the harness ----------------------------------------------------------------------------------


def test_msa_transport_is_a_memory_transport(msa_transport: MemoryTransport) -> None:
    assert isinstance(msa_transport, MemoryTransport)


async def test_msa_harness_runs_a_class_on_msa_transport_with_http_off(
    msa_harness: MakeHarness, msa_transport: Transport
) -> None:
    harness = msa_harness(Gate)
    assert harness.service.bus.transport is msa_transport
    assert harness.service.settings.http_port == -1
    async with harness:
        assert harness.service.ready
        assert harness.service.http_port is None
    assert not harness.service.ready


async def test_msa_harness_takes_an_instance(msa_harness: MakeHarness) -> None:
    gate = Gate(ServiceSettings(http_port=-1), transport=MemoryTransport())
    async with msa_harness(gate) as harness:
        assert harness.service is gate
        await harness.publish("tickets", Ticket(number=2))
        [handled] = await harness.handled(Ticket)
        assert handled.result == 2


async def test_handled_records_results_and_errors(msa_harness: MakeHarness) -> None:
    async with msa_harness(Gate) as harness:
        await harness.publish("tickets", Ticket(number=4))
        await harness.publish("tickets", Ticket(number=5))
        handled = await harness.handled("test.ticket", count=2)

    outcomes = {h.message.data.number: (h.result, h.error) for h in handled}
    assert outcomes[4] == (4, None)
    result, error = outcomes[5]
    assert result is None
    assert isinstance(error, Reject)
    assert error.reason == "ticket 5 is odd"


async def test_handled_times_out_naming_what_it_waited_for(msa_harness: MakeHarness) -> None:
    async with msa_harness(Gate) as harness:
        await harness.publish("tickets", Ticket(number=2))
        with pytest.raises(TimeoutError, match=r"2 handled test\.ticket\(s\); saw 1"):
            await harness.handled(Ticket, count=2, timeout=0.3)


async def test_published_filters_by_type_and_topic(msa_harness: MakeHarness) -> None:
    async with msa_harness(Shop) as harness:
        await harness.publish("sample.orders", order("o-9"), key="o-9")
        [event] = await harness.wait_published(OrderAccepted)

        assert harness.published("sample.order.accepted") == [event]
        assert harness.published(OrderAccepted, topic="sample.accepted") == [event]
        assert harness.published(OrderAccepted, topic="elsewhere") == []
        assert harness.published(OrderPlaced) == []


async def test_send_raw_delivers_records_that_are_not_cloudevents(
    msa_harness: MakeHarness,
) -> None:
    async with msa_harness(Gate) as harness:
        await harness.send_raw("tickets", b"not a cloudevent", key=b"k")
        await harness.publish("tickets", Ticket(number=8))
        [handled] = await harness.handled()

    assert handled.message.data == Ticket(number=8)  # the broken record never reached it
    messages_in = harness.service.metrics.get("msa_messages_in_total")
    assert isinstance(messages_in, Counter)
    assert messages_in.labels(topic="tickets", type="?", outcome="invalid").value == 1


async def test_request_needs_a_running_service(msa_harness: MakeHarness) -> None:
    harness = msa_harness(Shop)
    with pytest.raises(ConfigurationError, match="not running"):
        await harness.request("sample.prices", PriceRequested(sku="mug", quantity=1))
