"""Events no handler takes are never dropped in silence (on memory and on a real Kafka).

Three ways an adopter's handler misses its events, each seen in the wild: a payload class without
`@message_type` (its type is then its class name), a handler annotated with the wrong model, and
`event: dict`. Plus a producer's new event type on a subscribed topic. By default each such record
is dead-lettered with error type `unhandled-type`; `unhandled="skip"` drops it with a warning;
`unhandled="fail"` stops the subscription uncommitted and turns the service not ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from framework.bus import MemoryTransport
from framework.bus.consumer import DLQ_PREFIX, UNHANDLED_TYPE
from framework.errors import ConfigurationError
from framework.messages import message_type
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from framework.types import TopicPartition, Transport
from tests.readers import read_topic

NO_HTTP = ServiceSettings(http_port=-1)


@message_type("adopter.order.placed")
class OrderPlaced(BaseModel):
    order_id: str


class OrderPlacedUndeclared(BaseModel):  # no @message_type: its type is "OrderPlacedUndeclared"
    order_id: str


@message_type("adopter.invoice.sent")
class InvoiceSent(BaseModel):
    invoice_id: str


def service_with(handler_type: Any, topic: str, **options: Any) -> type[Service]:
    """A service whose one handler on `topic` is annotated `event: handler_type`."""

    async def on_order(self: Service, event: Any) -> None:
        return None

    on_order.__annotations__ = {"event": handler_type, "return": None}
    handler = handles(topic, **options)(on_order)
    return type("Orders", (Service,), {"name": f"orders-{topic}", "on_order": handler})


@pytest.fixture
def topic(make_transport: Callable[[], Transport], topic_name: str) -> str:
    return topic_name


@pytest.mark.parametrize(
    ("handler_type", "handler_takes"),
    [
        (OrderPlacedUndeclared, "OrderPlacedUndeclared"),  # forgot @message_type
        (InvoiceSent, "adopter.invoice.sent"),  # annotated with the wrong model
        (dict, "dict"),  # `event: dict`
    ],
)
async def test_an_event_no_handler_takes_is_dead_lettered_with_the_reason(
    make_transport: Callable[[], Transport],
    topic: str,
    handler_type: Any,
    handler_takes: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = make_transport()
    service = service_with(handler_type, topic)(NO_HTTP, transport=transport)
    with caplog.at_level(logging.WARNING, logger="framework"):
        async with ServiceHarness(service) as harness:
            await harness.publish(topic, OrderPlaced(order_id="o-1"), key="o-1")
            [letter] = await read_topic(transport, f"{topic}.dlq", count=1)

    assert letter.header(DLQ_PREFIX + "error-type") == UNHANDLED_TYPE.encode()
    reason = (letter.header(DLQ_PREFIX + "error-message") or b"").decode()
    assert "'adopter.order.placed'" in reason
    assert repr(handler_takes) in reason
    assert letter.key == b"o-1"
    assert harness.handled_log == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'adopter.order.placed'" in w and "dead-lettering" in w for w in warnings)


@pytest.mark.parametrize("handler_type", [OrderPlacedUndeclared, dict])
def test_a_handler_for_a_type_nothing_declares_is_a_startup_warning(
    handler_type: Any, caplog: pytest.LogCaptureFixture
) -> None:
    service = service_with(handler_type, "orders")(NO_HTTP, transport=MemoryTransport())
    with caplog.at_level(logging.WARNING, logger="framework.service"):
        service._subscribe_handlers()
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"handles type {handler_type.__name__!r}" in warning
    assert "@message_type" in warning


def test_a_declared_type_or_an_explicit_type_gives_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for service_class in (
        service_with(OrderPlaced, "orders"),
        service_with(dict, "orders", type="adopter.order.placed"),
    ):
        with caplog.at_level(logging.WARNING, logger="framework.service"):
            service_class(NO_HTTP, transport=MemoryTransport())._subscribe_handlers()
    assert caplog.records == []


async def test_skip_drops_other_types_with_one_warning_and_handles_the_rest(
    make_transport: Callable[[], Transport], topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport = make_transport()
    service = service_with(OrderPlaced, topic, unhandled="skip")(NO_HTTP, transport=transport)
    with caplog.at_level(logging.DEBUG, logger="framework.bus"):
        async with ServiceHarness(service) as harness:
            for n in range(3):
                await harness.publish(topic, InvoiceSent(invoice_id=f"i-{n}"), key="k")
            await harness.publish(topic, OrderPlaced(order_id="o-1"), key="k")  # after them
            [handled] = await harness.handled(OrderPlaced)
    assert handled.message.data == OrderPlaced(order_id="o-1")
    skips = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert [r.levelno for r in skips] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    metrics = service.metrics.render().decode()
    assert 'outcome="unhandled"' in metrics
    assert 'type="adopter.invoice.sent"' in metrics


async def test_fail_stops_the_subscription_uncommitted_and_the_service_is_not_ready(
    topic_name: str,
) -> None:
    topic = topic_name
    transport = MemoryTransport()
    service = service_with(OrderPlaced, topic, unhandled="fail")(NO_HTTP, transport=transport)
    async with ServiceHarness(service) as harness:
        assert (await service.check_ready())["consumers"]
        await harness.publish(topic, InvoiceSent(invoice_id="i-1"), key="k")
        for _ in range(1000):  # the record is on its way to the worker
            if service.bus.failed_subscriptions():
                break
            await asyncio.sleep(0.01)
        assert not (await service.check_ready())["consumers"]
    [subscription] = service.bus.subscriptions
    assert subscription.failure is not None
    assert "'adopter.invoice.sent'" in str(subscription.failure)
    committed = [transport.committed(service.name, TopicPartition(topic, p)) for p in range(3)]
    assert not any(committed), "the record stays to be read again"


def test_handlers_of_one_group_on_one_topic_must_agree_on_their_options() -> None:
    class Split(Service):
        name = "split"

        @handles("orders")
        async def on_order(self, event: OrderPlaced) -> None:
            return None

        @handles("orders", unhandled="skip")
        async def on_invoice(self, event: InvoiceSent) -> None:
            return None

    with pytest.raises(ConfigurationError, match="different consumer options"):
        Split(NO_HTTP, transport=MemoryTransport())._subscribe_handlers()
