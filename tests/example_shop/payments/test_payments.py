"""The payments service on a real PostgreSQL, driven through the in-memory bus like the saga does:
commands in on `shop.payments.commands`, replies out of the outbox on `shop.payments.events`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from example_shop.contracts import (
    TOPICS,
    AuthorizePayment,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    RefundPayment,
)
from example_shop.payments import Payments
from example_shop.payments.processor import decide, luhn_valid
from example_shop.payments.service import DECLINE_RATE, FAULT_DECLINE_REASON
from framework.bus import Bus, MemoryTransport
from framework.faults import FaultSwitches
from framework.messages import Envelope, decode_payload, from_binary, to_binary, type_name
from framework.service import ServiceSettings
from framework.testing import ServiceHarness

pytestmark = pytest.mark.postgres

REPLY_TYPES: dict[str, type[Any]] = {
    type_name(cls): cls for cls in (PaymentAuthorized, PaymentDeclined, PaymentRefunded)
}


@pytest.fixture
async def harness(postgres_database: str) -> AsyncIterator[ServiceHarness]:
    settings = ServiceSettings(
        http_host="127.0.0.1", http_port=0, env={"PAYMENTS_DATABASE_URL": postgres_database}
    )
    async with ServiceHarness(Payments(settings, transport=MemoryTransport())) as running:
        yield running


def command_envelope(command: Any, saga_id: str) -> Envelope[Any]:
    """A command as the order saga sends it: keyed by order, correlated by the saga id."""
    return Envelope(
        type=type_name(type(command)),
        source="orders",
        data=command,
        correlationid=saga_id,
        partitionkey=command.order_id,
        extensions={"sagaid": saga_id, "sagastep": "authorize-payment"},
    )


async def deliver(harness: ServiceHarness, envelope: Envelope[Any]) -> None:
    """Put `envelope` on the commands topic (again, for a redelivery: the same record)."""
    key, value, headers = to_binary(envelope)
    await harness.send_raw(TOPICS.PAYMENTS_COMMANDS, value, key=key, headers=headers)


async def replies(
    harness: ServiceHarness, count: int, timeout: float = 10.0
) -> list[tuple[Envelope[bytes], Any]]:
    """The first `count` replies the outbox relay published, with their decoded payloads."""
    transport = harness.service.bus.transport
    assert isinstance(transport, MemoryTransport)
    deadline = time.monotonic() + timeout
    while len(records := transport.records(TOPICS.PAYMENTS_EVENTS)) < count:
        assert time.monotonic() < deadline, f"saw {len(records)} of {count} replies"
        await asyncio.sleep(0.01)
    records.sort(key=lambda record: record.timestamp_ms)
    envelopes = [from_binary(record) for record in records]
    return [(e, decode_payload(e.data, REPLY_TYPES[e.type])) for e in envelopes]


async def payment_rows(harness: ServiceHarness) -> list[dict[str, Any]]:
    service = harness.service
    assert isinstance(service, Payments)
    async with service.db.connection() as conn:
        return [dict(r) for r in await conn.fetch("select * from payments order by order_id")]


def test_the_processor_decides_by_card_and_amount() -> None:
    assert luhn_valid("4242424242424242")
    assert not luhn_valid("4242424242424241")
    assert decide("4242 4242 4242 4242", 100).approved
    assert decide("4000-0000-0000-0002", 100).reason == "card declined"
    assert decide("4000000000009995", 100).reason == "insufficient funds"
    assert decide("4242424242424241", 100).reason == "invalid card number"
    assert decide("424242424242424", 100).reason == "invalid card number"  # 15 digits
    assert decide("42424242424242ab", 100).reason == "invalid card number"
    assert decide("4242424242424242", 1_000_000).approved
    assert decide("4242424242424242", 1_000_001).reason == "amount over limit"
    assert decide("4242424242424242", 100).last4 == "4242"


async def test_authorizes_good_cards_and_declines_the_others(harness: ServiceHarness) -> None:
    cases = {
        "o-ok": ("4242424242424242", 2500, None),
        "o-declined": ("4000000000000002", 2500, "card declined"),
        "o-funds": ("4000000000009995", 2500, "insufficient funds"),
        "o-luhn": ("4242424242424241", 2500, "invalid card number"),
        "o-limit": ("4111111111111111", 1_000_001, "amount over limit"),
    }
    for order_id, (card, amount, _) in cases.items():
        command = AuthorizePayment(order_id=order_id, amount_cents=amount, card_number=card)
        await deliver(harness, command_envelope(command, saga_id=f"saga-{order_id}"))

    answered = await replies(harness, len(cases))
    assert len(answered) == len(cases)
    by_order = {reply.order_id: (envelope, reply) for envelope, reply in answered}
    for order_id, (_, amount, reason) in cases.items():
        envelope, reply = by_order[order_id]
        # What the saga correlates a reply by: the command's correlation id (its saga id).
        assert envelope.correlationid == f"saga-{order_id}"
        assert envelope.partitionkey == order_id
        assert envelope.source == "payments"
        if reason is None:
            assert isinstance(reply, PaymentAuthorized)
            assert reply.amount_cents == amount
            assert reply.payment_id.startswith("pay_")
        else:
            assert isinstance(reply, PaymentDeclined)
            assert reply.reason == reason

    rows = {row["order_id"]: row for row in await payment_rows(harness)}
    assert rows["o-ok"]["status"] == "authorized"
    assert rows["o-ok"]["card_last4"] == "4242"
    assert rows["o-funds"]["status"] == "declined"
    assert rows["o-funds"]["payment_id"] is None
    stored = " ".join(str(value) for row in rows.values() for value in row.values())
    assert "4242424242424242" not in stored, "only the last four digits are kept"
    assert "4000000000009995" not in stored


async def test_a_redelivered_authorization_authorizes_once_and_answers_the_same(
    harness: ServiceHarness,
) -> None:
    command = AuthorizePayment(order_id="o-1", amount_cents=990, card_number="4242424242424242")
    envelope = command_envelope(command, saga_id="saga-1")
    await deliver(harness, envelope)
    await deliver(harness, envelope)  # the broker redelivers the very same record
    await harness.handled(AuthorizePayment, count=2)

    (first_envelope, first), (second_envelope, second) = await replies(harness, 2)
    assert isinstance(first, PaymentAuthorized)
    assert second == first
    # The same event: the saga's inbox drops the copy instead of seeing a second answer.
    assert second_envelope.id == first_envelope.id
    assert second_envelope.correlationid == "saga-1"
    assert len(await payment_rows(harness)) == 1

    # Another command for the same order (say, with a declining card) is not a second charge:
    # the order's authorization was decided once, and that is the answer.
    again = AuthorizePayment(order_id="o-1", amount_cents=990, card_number="4000000000000002")
    await deliver(harness, command_envelope(again, saga_id="saga-1"))
    *_, (third_envelope, third) = await replies(harness, 3)
    assert third == first
    assert third_envelope.id != first_envelope.id  # a different command, a different reply
    [row] = await payment_rows(harness)
    assert row["payment_id"] == first.payment_id
    assert row["card_last4"] == "4242"


async def test_refunds_an_authorization_once(harness: ServiceHarness) -> None:
    authorize = AuthorizePayment(order_id="o-2", amount_cents=4200, card_number="4242424242424242")
    await deliver(harness, command_envelope(authorize, saga_id="saga-2"))
    [(_, authorized)] = await replies(harness, 1)
    assert isinstance(authorized, PaymentAuthorized)

    refund = command_envelope(RefundPayment(order_id="o-2"), saga_id="saga-2")
    await deliver(harness, refund)
    await deliver(harness, refund)  # redelivered
    resent = command_envelope(RefundPayment(order_id="o-2"), saga_id="saga-2")
    await deliver(harness, resent)  # the saga resends an unconfirmed compensation
    answered = await replies(harness, 4)
    refunds = [reply for _, reply in answered[1:]]
    assert refunds == [PaymentRefunded(order_id="o-2", payment_id=authorized.payment_id)] * 3
    assert all(envelope.correlationid == "saga-2" for envelope, _ in answered)
    [row] = await payment_rows(harness)
    assert row["status"] == "refunded"
    assert row["payment_id"] == authorized.payment_id

    # Admins see the record over HTTP; nobody else does.
    base = f"http://127.0.0.1:{harness.service.http_port}"
    admin = {"x-user-id": "u-admin", "x-user-roles": "customer admin"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/payments/o-2", headers=admin) as response:
            assert response.status == 200
            record = await response.json()
        assert record["status"] == "refunded"
        assert record["card_last4"] == "4242"
        assert record["amount_cents"] == 4200
        assert "card_number" not in record
        async with http.get(f"{base}/payments/nope", headers=admin) as response:
            assert response.status == 404
        customer = {"x-user-id": "u-1", "x-user-roles": "customer"}
        async with http.get(f"{base}/payments/o-2", headers=customer) as response:
            assert response.status == 403
        async with http.get(f"{base}/payments/o-2") as response:
            assert response.status == 401


async def test_a_refund_without_authorization_has_nothing_to_undo(
    harness: ServiceHarness,
) -> None:
    # The saga timed out waiting for payments and compensates before the command arrived.
    await deliver(harness, command_envelope(RefundPayment(order_id="o-3"), saga_id="saga-3"))
    [(envelope, refunded)] = await replies(harness, 1)
    assert refunded == PaymentRefunded(order_id="o-3", payment_id=None)
    assert envelope.correlationid == "saga-3"

    # The late authorization must not charge the cancelled order.
    late = AuthorizePayment(order_id="o-3", amount_cents=100, card_number="4242424242424242")
    await deliver(harness, command_envelope(late, saga_id="saga-3"))
    *_, (_, answer) = await replies(harness, 2)
    assert isinstance(answer, PaymentDeclined)
    [row] = await payment_rows(harness)
    assert row["status"] == "voided"
    assert row["payment_id"] is None

    # A declined payment has nothing to refund either.
    declined = AuthorizePayment(order_id="o-4", amount_cents=100, card_number="4000000000000002")
    await deliver(harness, command_envelope(declined, saga_id="saga-4"))
    await deliver(harness, command_envelope(RefundPayment(order_id="o-4"), saga_id="saga-4"))
    answered = [reply for _, reply in await replies(harness, 4) if reply.order_id == "o-4"]
    assert answered == [
        PaymentDeclined(order_id="o-4", reason="card declined"),
        PaymentRefunded(order_id="o-4", payment_id=None),
    ]


async def test_the_decline_rate_switch_declines_good_cards(postgres_database: str) -> None:
    transport = MemoryTransport()
    settings = ServiceSettings(
        http_host="127.0.0.1",
        http_port=0,
        faults=True,
        env={"PAYMENTS_DATABASE_URL": postgres_database},
    )
    admin = Bus(transport, source="admin")
    switches = FaultSwitches(admin)
    async with ServiceHarness(Payments(settings, transport=transport)) as harness:
        await admin.start()
        await switches.start()
        try:
            injector = harness.service.faults
            assert injector is not None
            await switches.set("payments", rates={DECLINE_RATE: 1.0})
            await eventually(lambda: injector.current.rate(DECLINE_RATE) == 1.0)
            good = AuthorizePayment(
                order_id="o-fault", amount_cents=500, card_number="4242424242424242"
            )
            envelope = command_envelope(good, saga_id="saga-fault")
            await deliver(harness, envelope)
            [(_, declined)] = await replies(harness, 1)
            assert declined == PaymentDeclined(order_id="o-fault", reason=FAULT_DECLINE_REASON)

            # Decided once: with the switch off again, the redelivered command gets the same
            # answer; a new order is authorized.
            await switches.set("payments", rates={DECLINE_RATE: 0.0})
            await eventually(lambda: injector.current.rate(DECLINE_RATE) == 0.0)
            await deliver(harness, envelope)
            again = AuthorizePayment(
                order_id="o-after", amount_cents=500, card_number="4242424242424242"
            )
            await deliver(harness, command_envelope(again, saga_id="saga-after"))
            answered = {reply.order_id: reply for _, reply in await replies(harness, 3)}
            assert answered["o-fault"] == declined
            assert isinstance(answered["o-after"], PaymentAuthorized)
            rows = {row["order_id"]: row for row in await payment_rows(harness)}
            assert rows["o-fault"]["status"] == "declined"
            assert rows["o-fault"]["reason"] == FAULT_DECLINE_REASON
            assert rows["o-fault"]["card_last4"] == "4242"
        finally:
            await switches.stop()
            await admin.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.01)
