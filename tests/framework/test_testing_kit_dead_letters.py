"""The harness's dead-letter view and its list of rejected records, on memory and on real Kafka.

`harness.dead_letters` is what the consumer published to `<topic>.dlq` as the transport
acknowledged it: the tests read the dead-letter topic with a group-less reader and find the very
records the harness lists. `harness.rejected` lists the records refused before any handler ran
(they never reach the consume middleware, so `handled_log` cannot show them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from framework.bus import RetryPolicy
from framework.bus.consumer import UNHANDLED_TYPE
from framework.errors import DecodeError, PayloadValidationError, Reject, UnknownMessageType
from framework.messages import message_type
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from framework.types import TopicPartition, Transport
from tests.readers import read_topic

NO_HTTP = ServiceSettings(http_port=-1)


@message_type("test.kit.ticket")
class Ticket(BaseModel):
    number: int


@message_type("test.kit.coupon")
class Coupon(BaseModel):
    code: str


def gate_on(topic: str, **options: Any) -> type[Service]:
    """A service on `topic` that lets even tickets in and rejects odd ones."""

    class Gate(Service):
        name = f"gate-{topic}"

        @handles(topic, **options)
        async def on_ticket(self, ticket: Ticket) -> int:
            if ticket.number % 2:
                raise Reject(f"ticket {ticket.number} is odd")
            return ticket.number

    return Gate


async def test_dead_letters_are_what_the_service_published_to_the_dead_letter_topic(
    make_transport: Callable[[], Transport], topic_name: str
) -> None:
    transport = make_transport()
    harness = ServiceHarness(gate_on(topic_name)(NO_HTTP, transport=transport))
    async with harness:
        odd = await harness.publish(topic_name, Ticket(number=3), key="t-3")
        coupon = await harness.publish(topic_name, Coupon(code="c"), key="c")
        broken = await harness.publish(topic_name, {"number": "many"}, type="test.kit.ticket")
        letters = await harness.dead_lettered(count=3)
        on_the_topic = await read_topic(transport, f"{topic_name}.dlq", count=3)

    by_type = {letter.error_type: letter for letter in letters}
    assert set(by_type) == {
        "framework.errors.Reject",
        UNHANDLED_TYPE,
        "framework.errors.PayloadValidationError",
    }
    rejected = by_type["framework.errors.Reject"]
    unhandled = by_type[UNHANDLED_TYPE]
    invalid = by_type["framework.errors.PayloadValidationError"]
    assert rejected.error_message == "ticket 3 is odd"
    assert "'test.kit.coupon'" in unhandled.error_message
    assert "number" in invalid.error_message
    for letter, published in ((rejected, odd), (unhandled, coupon), (invalid, broken)):
        assert letter.attempts == 1
        assert letter.group == f"gate-{topic_name}{harness.group_suffix}"
        assert letter.original_topic == topic_name
        assert (letter.original_partition, letter.original_offset) == (
            published.partition,
            published.offset,
        )
        assert letter.record.topic == f"{topic_name}.dlq"
    found = {(r.partition, r.offset): r for r in on_the_topic}
    for letter in letters:
        record = found[letter.record.partition, letter.record.offset]
        assert (record.key, record.value, record.headers) == (
            letter.record.key,
            letter.record.value,
            letter.record.headers,
        )
    tickets = await harness.dead_lettered(Ticket, count=2)
    assert {letter.record.key for letter in tickets} == {b"t-3", None}
    [unhandled_again] = await harness.dead_lettered("test.kit.coupon")
    assert unhandled_again is unhandled


async def test_a_record_out_of_attempts_is_a_dead_letter_with_its_attempt_count(
    msa_harness: Callable[..., ServiceHarness], topic_name: str
) -> None:
    class Flaky(Service):
        @handles(topic_name, retry=RetryPolicy(max_attempts=2, initial_backoff=0.001))
        async def on_ticket(self, ticket: Ticket) -> None:
            raise RuntimeError(f"ticket {ticket.number} is stuck")

    async with msa_harness(Flaky) as harness:
        await harness.publish(topic_name, Ticket(number=2))
        [letter] = await harness.dead_lettered(Ticket)

    assert letter.error_type == "RuntimeError"
    assert letter.error_message == "ticket 2 is stuck"
    assert letter.attempts == 2
    assert [h.message.attempt for h in harness.handled_log] == [1, 2]


# -- rejected records -----------------------------------------------------------------------------


async def test_records_refused_before_any_handler_are_listed_with_their_error(
    make_transport: Callable[[], Transport], topic_name: str
) -> None:
    transport = make_transport()
    harness = ServiceHarness(gate_on(topic_name)(NO_HTTP, transport=transport))
    async with harness:
        invalid = await harness.publish(topic_name, {"number": "many"}, type="test.kit.ticket")
        await harness.publish(topic_name, Coupon(code="c"), key="c")
        await harness.send_raw(topic_name, b"not a cloudevent", key=b"raw")
        await harness.publish(topic_name, Ticket(number=2))
        rejected = await harness.wait_rejected(count=3)
        await harness.handled(Ticket)

    errors = {type(r.error): r for r in rejected}
    assert set(errors) == {PayloadValidationError, UnknownMessageType, DecodeError}
    assert [r.envelope for r in rejected if isinstance(r.error, DecodeError)] == [None]
    not_valid = errors[PayloadValidationError]
    assert not_valid.envelope is not None
    assert not_valid.envelope.type == "test.kit.ticket"
    assert not_valid.envelope.data == b'{"number":"many"}'  # raw: it never became a Ticket
    assert not_valid.record.topic_partition == TopicPartition(topic_name, invalid.partition)
    assert not_valid.record.offset == invalid.offset
    assert not_valid.group == f"gate-{topic_name}{harness.group_suffix}"
    assert [r.error for r in await harness.wait_rejected(Ticket)] == [not_valid.error]
    assert [r.envelope for r in await harness.wait_rejected(Coupon)] == [
        errors[UnknownMessageType].envelope
    ]
    [handled] = harness.handled_log  # only the valid ticket reached the handler
    assert handled.message.data == Ticket(number=2)


async def test_rejected_records_are_listed_also_when_nothing_is_dead_lettered(
    msa_harness: Callable[..., ServiceHarness], topic_name: str
) -> None:
    async with msa_harness(gate_on(topic_name, dead_letter=False, unhandled="skip")) as harness:
        await harness.publish(topic_name, {"number": []}, type="test.kit.ticket")
        await harness.publish(topic_name, Coupon(code="c"))
        rejected = await harness.wait_rejected(count=2)

    assert {type(r.error) for r in rejected} == {PayloadValidationError, UnknownMessageType}
    assert harness.dead_letters == []


async def test_a_listener_that_raises_is_logged_and_consuming_goes_on(
    msa_harness: Callable[..., ServiceHarness], topic_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    harness = msa_harness(gate_on(topic_name))

    async def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    harness.service.bus.on_dead_letter.insert(0, broken)
    harness.service.bus.on_rejected.insert(0, broken)
    async with harness:
        await harness.publish(topic_name, Ticket(number=1), key="k")
        await harness.publish(topic_name, Coupon(code="c"), key="k")
        await harness.publish(topic_name, Ticket(number=4), key="k")
        handled = await harness.handled(Ticket, count=2)
        await harness.dead_lettered(count=2)  # the harness, a later listener, still heard

    assert [h.message.data.number for h in handled] == [1, 4]
    failures = [r for r in caplog.records if r.getMessage().startswith("listener")]
    assert len(failures) == 3  # the dead letters of both, the rejection of the coupon
    assert all(r.exc_info is not None for r in failures)
