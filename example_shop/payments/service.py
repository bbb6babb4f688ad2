"""Payments: authorizes and refunds card payments for the order saga (simulated processor).

    shop.payments.commands   AuthorizePayment -> PaymentAuthorized | PaymentDeclined
                             RefundPayment    -> PaymentRefunded   (replies on shop.payments.events)
    GET /payments/{order_id} the payment record of an order (admins only)

One row per order in `payments`, which keeps the card's last four digits and never the number:

    authorized  --RefundPayment-->  refunded
    declined                        (a refund has nothing to undo: PaymentRefunded(payment_id=None))
    voided                          a refund came first (the saga timed out and compensated), so
                                    a late AuthorizePayment is declined instead of charging a
                                    cancelled order

**Fault injection.** With `MSA_FAULTS=1` (`msa shop` sets it), the switch `decline_rate` (0.0 to
1.0, `framework.faults`; the admin page sets it) declines that fraction of the authorizations a
card would have got, with the reason `FAULT_DECLINE_REASON`: an ordinary business decline, so
the order saga cancels the order and releases its stock. The decision is recorded like any
other, so a redelivered command is answered the same.

Idempotent answers: each command is handled in one transaction that records it in the inbox,
changes the order's row at most once (an authorization is decided once per order; a refund
only moves `authorized` to `refunded`), and enqueues the reply in the outbox. Whatever the
delivery, the reply is built from the row, so a redelivered command is answered with the same
result, and even with the same event id (derived from the command's id), which the saga's inbox
then drops as a duplicate. Replies are enqueued inside the command's handler, so they carry
the command's correlation id (the saga id) without further ado.
"""

from __future__ import annotations

import hashlib
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel

from example_shop.common import default_settings, postgres_url, require_admin
from example_shop.contracts import (
    TOPICS,
    AuthorizePayment,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    RefundPayment,
)
from example_shop.payments.processor import Decision, decide
from framework.bus import Message
from framework.http import json_response
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import Migration, PostgresResource
from framework.service import Service, ServiceSettings, handles, route
from framework.types import Transport

__all__ = ["DECLINE_RATE", "FAULT_DECLINE_REASON", "PaymentRecord", "Payments"]

log = logging.getLogger("example_shop.payments")

VOIDED_REASON = "order cancelled before the payment was authorized"
DECLINE_RATE = "decline_rate"
"""The fault switch (a rate, `framework.faults.Switches.rate`) of authorizations to decline."""
FAULT_DECLINE_REASON = "card declined (injected fault)"

MIGRATIONS = [
    Migration(
        1,
        "payments",
        """
        create table payments (
            order_id text primary key,
            payment_id text unique,
            status text not null
                check (status in ('authorized', 'declined', 'refunded', 'voided')),
            amount_cents bigint,
            card_last4 text check (card_last4 ~ '^[0-9]{4}$'),
            reason text,
            created_at timestamptz not null default now(),
            updated_at timestamptz not null default now()
        )
        """,
    )
]


class PaymentRecord(BaseModel):
    """An order's payment; `payment_id` is set once an authorization was granted."""

    order_id: str
    payment_id: str | None
    status: str
    amount_cents: int | None
    card_last4: str | None
    reason: str | None
    created_at: datetime
    updated_at: datetime


def authorization_reply(row: Any) -> PaymentAuthorized | PaymentDeclined:
    if row["payment_id"] is not None:  # granted (perhaps refunded since): that was the answer
        return PaymentAuthorized(
            order_id=row["order_id"],
            payment_id=row["payment_id"],
            amount_cents=row["amount_cents"],
        )
    return PaymentDeclined(order_id=row["order_id"], reason=row["reason"])


def refund_reply(row: Any) -> PaymentRefunded:
    refunded = row["status"] == "refunded"
    return PaymentRefunded(
        order_id=row["order_id"], payment_id=row["payment_id"] if refunded else None
    )


def reply_id(command: Message[Any]) -> str:
    """The event id of the reply to `command`: the same for every delivery of the command."""
    return hashlib.sha256(f"{command.group}/{command.envelope.id}".encode()).hexdigest()[:32]


class Payments(Service):
    """The payments service. `rng` draws the injected declines (a seeded one in tests); no
    injectable resources: other keyword arguments are ignored."""

    name = "payments"
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {
        TOPICS.PAYMENTS_EVENTS: [PaymentAuthorized, PaymentDeclined, PaymentRefunded]
    }

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        **resources: Any,
    ) -> None:
        super().__init__(default_settings("payments", settings), transport=transport)
        self._rng = rng or random.Random()
        url = postgres_url(self.settings.env, "payments")
        self.db = self.use(PostgresResource(url, migrations=MIGRATIONS, create_database=True))
        self.outbox = self.use(PostgresOutbox(self.db, self.bus))
        self.inbox = self.use(PostgresInbox(self.db))

    @handles(TOPICS.PAYMENTS_COMMANDS)
    async def on_authorize(
        self, command: AuthorizePayment, message: Message[AuthorizePayment]
    ) -> None:
        async with self.db.transaction() as tx:
            if await self.inbox.record(tx, message):
                await self._authorize_once(tx, command)
            row = await self._payment(tx, command.order_id)
            await self._answer(tx, message, command.order_id, authorization_reply(row))

    @handles(TOPICS.PAYMENTS_COMMANDS)
    async def on_refund(self, command: RefundPayment, message: Message[RefundPayment]) -> None:
        async with self.db.transaction() as tx:
            if await self.inbox.record(tx, message):
                # Refund an authorization; with no row yet, leave a tombstone for a late one.
                await tx.execute(
                    "insert into payments (order_id, status, reason) values ($1, 'voided', $2) "
                    "on conflict (order_id) do update set status = 'refunded', updated_at = now() "
                    "where payments.status = 'authorized'",
                    command.order_id,
                    VOIDED_REASON,
                )
            row = await self._payment(tx, command.order_id)
            await self._answer(tx, message, command.order_id, refund_reply(row))

    async def _authorize_once(self, tx: Any, command: AuthorizePayment) -> None:
        """Decide and record the order's authorization, unless it has a row already."""
        decision = self._injected_decline(decide(command.card_number, command.amount_cents))
        status = await tx.execute(
            "insert into payments (order_id, payment_id, status, amount_cents, card_last4, reason)"
            " values ($1, $2, $3, $4, $5, $6) on conflict (order_id) do nothing",
            command.order_id,
            f"pay_{uuid.uuid4().hex}" if decision.approved else None,
            "authorized" if decision.approved else "declined",
            command.amount_cents,
            decision.last4,
            decision.reason,
        )
        if status == "INSERT 0 1":
            log.info("order %s: payment %s", command.order_id, decision.reason or "authorized")

    def _injected_decline(self, decision: Decision) -> Decision:
        """`decision`, or a decline when the `decline_rate` fault switch draws one."""
        rate = self.faults.current.rate(DECLINE_RATE) if self.faults is not None else 0.0
        if decision.approved and rate > 0 and self._rng.random() < rate:
            return Decision(False, FAULT_DECLINE_REASON, decision.last4)
        return decision

    async def _payment(self, conn: Any, order_id: str) -> Any:
        return await conn.fetchrow("select * from payments where order_id = $1", order_id)

    async def _answer(self, tx: Any, command: Message[Any], order_id: str, reply: Any) -> None:
        envelope = self.bus.envelope(reply, key=order_id)  # continues the command's correlation
        envelope.id = reply_id(command)
        await self.outbox.add_envelope(tx, TOPICS.PAYMENTS_EVENTS, envelope)

    @route("GET", "/payments/{order_id}", response=PaymentRecord)
    async def get_payment(self, request: web.Request) -> web.Response:
        """An order's payment record (admins only)."""
        require_admin(request)
        async with self.db.connection() as conn:
            row = await self._payment(conn, request.match_info["order_id"])
        if row is None:
            raise web.HTTPNotFound(text="no payment for this order")
        return json_response(PaymentRecord(**dict(row)))
