"""The testing kit: `ServiceHarness` and the `msa_harness`/`msa_transport` pytest fixtures.

`test_a_shop_handles_orders_and_quotes` runs twice, on the in-memory transport and on a real
Apache Kafka (`[kafka]`): the harness gives the same answers on both. Dead letters and rejected
records: `test_testing_kit_dead_letters.py`; consumer groups on a real broker:
`test_testing_kit_groups.py`; the plugin's asyncio mode: `test_testing_kit_plugin.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from pydantic import BaseModel

from framework.bus import ConsumerOptions, HandlerSpec, MemoryTransport, Message, RetryPolicy
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.errors import ConfigurationError, Reject, RetryLater
from framework.messages import message_type
from framework.observability.metrics import Counter
from framework.observability.tracing import TraceContext, use_correlation_id, use_trace
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from framework.types import TopicPartition, Transport
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


@message_type("test.visitor")
class Visitor(BaseModel):
    name: str


class Turnstile(Service):
    """Lets a ticket through on its third attempt, and counts the visitors."""

    @handles("turnstile", retry=RetryPolicy(max_attempts=3, initial_backoff=0.001, jitter=0))
    async def on_ticket(self, ticket: Ticket, message: Message[Ticket]) -> int:
        if message.attempt < 3:
            raise RetryLater(f"attempt {message.attempt}: jammed")
        return message.attempt

    @handles("visitors")
    async def on_visitor(self, visitor: Visitor) -> None:
        return None


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


# -- one record per attempt -----------------------------------------------------------------------


async def test_each_attempt_is_recorded_with_its_own_attempt_number(
    msa_harness: MakeHarness,
) -> None:
    async with msa_harness(Turnstile) as harness:
        await harness.publish("turnstile", Ticket(number=7))
        handled = await harness.handled(Ticket, count=3)

    assert [h.message.attempt for h in handled] == [1, 2, 3]
    assert [type(h.error) for h in handled] == [RetryLater, RetryLater, type(None)]
    assert handled[2].result == 3
    assert len({id(h.message) for h in handled}) == 3
    assert {h.message.envelope.id for h in handled} == {handled[0].message.envelope.id}
    assert {h.message.handler for h in handled} == {"on_ticket"}


# -- handler mocks --------------------------------------------------------------------------------


async def test_mock_records_the_payloads_each_handler_was_called_with(
    msa_harness: MakeHarness,
) -> None:
    async with msa_harness(Turnstile) as harness:
        await harness.publish("visitors", Visitor(name="ada"), key="v")
        await harness.publish("visitors", Visitor(name="bob"), key="v")
        await harness.publish("turnstile", Ticket(number=7))
        await harness.handled(Visitor, count=2)
        await harness.handled(Ticket, count=3)

    visitors = harness.mock(Turnstile.on_visitor)
    assert visitors is harness.mock("on_visitor")
    assert visitors.call_count == 2
    visitors.assert_any_call(Visitor(name="ada"))
    visitors.assert_called_with(Visitor(name="bob"))  # the last call; one key keeps the order
    tickets = harness.mock("on_ticket")
    assert tickets.call_args_list == [((Ticket(number=7),),)] * 3  # once per attempt
    with pytest.raises(AssertionError):
        tickets.assert_called_once_with(Ticket(number=7))


async def test_mock_of_a_handler_not_called_yet_is_not_called(msa_harness: MakeHarness) -> None:
    async with msa_harness(Gate) as harness:
        harness.mock(Gate.on_ticket).assert_not_called()
        await harness.publish("tickets", Ticket(number=2))
        await harness.handled(Ticket)
        harness.mock(Gate.on_ticket).assert_called_once_with(Ticket(number=2))


def test_mock_of_an_unknown_handler_names_the_known_ones(msa_harness: MakeHarness) -> None:
    harness = msa_harness(Turnstile)
    with pytest.raises(ConfigurationError, match=r"no handler 'on_tiket'.*on_ticket, on_visitor"):
        harness.mock("on_tiket")


# -- what a timed-out wait says -------------------------------------------------------------------


async def test_a_timed_out_wait_lists_what_the_harness_saw(msa_harness: MakeHarness) -> None:
    async with msa_harness(Shop) as harness:
        await harness.publish("sample.orders", order("o-1"), key="o-1")
        await harness.publish("sample.orders", order("o-2"), key="o-2")
        await harness.publish("sample.orders", Ticket(number=1))
        await harness.publish("sample.orders", {"order_id": 5}, type="sample.order.placed")
        await harness.wait_published(OrderAccepted, count=2)
        await harness.dead_lettered(count=2)
        with pytest.raises(TimeoutError) as raised:
            await harness.handled(Price, timeout=0.05)

    text = str(raised.value)
    assert text.startswith("timed out after 0.05s waiting for 1 handled Price(s); saw 0. ")
    assert "handled sample.order.placed x2;" in text
    assert "published sample.order.accepted x2;" in text
    assert (
        "dead-lettered sample.order.placed [framework.errors.PayloadValidationError] x1, "
        "test.ticket [unhandled-type] x1;" in text
    )
    assert (
        "rejected sample.order.placed [PayloadValidationError] x1, "
        "test.ticket [UnknownMessageType] x1." in text
    )


async def test_a_timed_out_wait_on_a_quiet_service_says_it_saw_nothing(
    msa_harness: MakeHarness,
) -> None:
    async with msa_harness(Gate) as harness:
        with pytest.raises(TimeoutError) as raised:
            await harness.dead_lettered(Ticket, timeout=0.01)

    assert str(raised.value).endswith(
        "saw 0. The service handled nothing; published nothing; dead-lettered nothing; "
        "rejected nothing."
    )


async def test_failed_runs_are_counted_apart(msa_harness: MakeHarness) -> None:
    async with msa_harness(Gate) as harness:
        for number in (1, 2, 3):
            await harness.publish("tickets", Ticket(number=number), key=str(number))
        await harness.handled(count=3)

    assert "handled test.ticket x3 (failed: test.ticket x2);" in harness.summary()


# -- consumer groups ------------------------------------------------------------------------------


async def test_in_memory_the_service_keeps_its_own_groups(msa_harness: MakeHarness) -> None:
    async with msa_harness(Gate) as harness:
        assert harness.group_suffix == ""
        assert [s.group for s in harness.service.bus.subscriptions] == ["gate"]


async def test_the_harness_is_built_before_the_service_starts() -> None:
    async with Gate(ServiceSettings(http_port=-1), transport=MemoryTransport()) as gate:
        with pytest.raises(ConfigurationError, match="before the service starts"):
            ServiceHarness(gate)


async def test_a_group_suffix_reaches_subscriptions_made_before_the_harness() -> None:
    class Audited(Gate):
        def __init__(self) -> None:
            super().__init__(ServiceSettings(http_port=-1), transport=MemoryTransport())
            self.bus.subscribe(  # as a saga orchestrator does in a service's __init__
                ["audit"],
                {"*": HandlerSpec(bytes, self.on_audit)},
                ConsumerOptions(group="audited.audit", retry_mode="retry_topic"),
            )

        async def on_audit(self, message: Message[bytes]) -> None:
            return None

    async with ServiceHarness(Audited(), group_suffix="-t1") as harness:
        subscriptions = harness.service.bus.subscriptions
        assert sorted(s.group for s in subscriptions) == ["audited-t1", "audited.audit-t1"]
        [audit] = [s for s in subscriptions if s.topics == ("audit",)]
        assert audit.all_topics() == ["audit", "audit.retry.audited.audit-t1"]
        with pytest.raises(ConfigurationError, match="before the bus starts"):
            harness.service.bus.isolate_groups("-t2")


async def test_isolated_groups_leave_what_was_on_the_topics_before_they_started() -> None:
    shared = MemoryTransport()
    async with ServiceHarness(Gate(ServiceSettings(http_port=-1), transport=shared)) as deployed:
        await deployed.publish("tickets", Ticket(number=2), key="k")  # history, handled here
        await deployed.handled(Ticket)
        isolated = ServiceHarness(
            Gate(ServiceSettings(http_port=-1), transport=shared), group_suffix="-t"
        )
        async with isolated:
            await isolated.publish("tickets", Ticket(number=4), key="k")  # same key: after it
            [handled] = await isolated.handled(Ticket)
            on_deployed = await deployed.handled(Ticket, count=2)

    assert handled.message.data == Ticket(number=4)  # the ticket before was not the test's
    assert handled.message.group == "gate-t"
    assert [h.message.data.number for h in on_deployed] == [2, 4]
    [partition] = {handled.message.record.partition}
    tp = TopicPartition("tickets", partition)
    assert shared.committed("gate-t", tp) == shared.committed("gate", tp) == 2


# -- what the harness publishes -------------------------------------------------------------------


async def test_publish_starts_a_conversation_and_a_trace(msa_harness: MakeHarness) -> None:
    async with msa_harness(Shop) as harness:
        await harness.publish("sample.orders", order("o-1"), key="o-1")
        [handled] = await harness.handled(OrderPlaced)
        [accepted] = await harness.wait_published(OrderAccepted)

    placed = handled.message.envelope
    assert placed.correlationid == placed.id
    assert accepted.correlationid == placed.correlationid
    sent = TraceContext.parse(placed.traceparent)
    assert sent is not None
    continued = TraceContext.parse(accepted.traceparent)
    assert continued is not None
    assert continued.trace_id == sent.trace_id


async def test_publish_continues_the_tests_correlation_id_and_trace(
    msa_harness: MakeHarness,
) -> None:
    trace = TraceContext.new_root()
    async with msa_harness(Gate) as harness:
        with use_correlation_id("checkout-9"), use_trace(trace):
            await harness.publish("tickets", Ticket(number=2))
        [handled] = await harness.handled(Ticket)

    envelope = handled.message.envelope
    assert envelope.correlationid == "checkout-9"
    sent = TraceContext.parse(envelope.traceparent)
    assert sent is not None
    assert sent.trace_id == trace.trace_id
