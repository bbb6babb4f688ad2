"""The order saga: reserve the stock, authorize the payment, create the shipment, confirm.

    reserve-stock              ReserveStock -> inventory        StockReserved | StockRejected
    announce-stock-reserved    OrderStatusChanged("stock_reserved")       on shop.orders.events
    authorize-payment          AuthorizePayment -> payments     PaymentAuthorized | PaymentDeclined
    announce-payment-authorized  OrderStatusChanged("payment_authorized")
    create-shipment            CreateShipment -> shipping       ShipmentCreated
    announce-shipment-created  OrderStatusChanged("shipment_created")
    commit-stock               CommitStock -> inventory         (none: the reservation is sold)
    (completed)                order confirmed + OrderConfirmed, in the saga's final transaction

The last three are fire-and-forget and enqueued in one transaction with the order's
confirmation: a confirmed order's reservation always becomes a sale (inventory takes the units
off its shelves), and nothing after the shipment can fail and undo it.

A refusal (`StockRejected`, `PaymentDeclined`) or a step that does not answer within
`STEP_TIMEOUT` undoes what was done, newest first, each undo confirmed before the next:
CancelShipment (ShipmentCancelled), RefundPayment (PaymentRefunded), ReleaseStock
(StockReleased). A timed-out step is undone too, since its command may have taken effect; the
participants accept "nothing to undo". Once everything is undone the order is cancelled with the
reason (the participant's own words, or which service did not answer) and `OrderCancelled` is
published; if an undo is never confirmed the order is marked `failed` for a person to look at.

The `announce-*` steps are fire-and-forget steps whose "command" is a progress event on the
orders topic: they are enqueued in the very transaction that records the reply, so the browser
(the gateway streams `shop.orders.events` by order id over SSE) sees "stock reserved" exactly
when the saga moved past it, and in order with `OrderConfirmed` / `OrderCancelled`.

**Milestones.** The saga's data records each milestone the order reaches, with its time
(`OrderSagaData.milestones`): `stock_reserved`, `payment_authorized`, `shipment_created` as the
replies come, and, undoing, `shipment_cancelled`, `payment_refunded`, `stock_released` as each
undo is confirmed (an undo only of what the order's page showed done: a payment refunded is one
that was authorized, or that payments says it refunded). The order's page lists them between
"placed" and its outcome (`example_shop.orders.service`). The forward ones are announced by the
`announce-*` steps; the undone ones by the final hook, before `OrderCancelled` (or the `failed`
status): the framework has no step to run between two compensations, so an undo confirmed
before the last one is announced a little late, with the time it happened. Saga data written
before milestones were recorded still reads: its milestones are told by its fields, without
times.

The card number travels in the saga's data only to build `AuthorizePayment` (this shop
simulates payments); it is blanked as soon as payments answers and never stored with the order,
which keeps its last four digits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from example_shop.contracts import (
    TOPICS,
    AuthorizePayment,
    CancelShipment,
    CommitStock,
    CreateShipment,
    OrderCancelled,
    OrderConfirmed,
    OrderLine,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ShipmentCancelled,
    ShipmentCreated,
    StockRejected,
    StockReleased,
    StockReserved,
)
from framework.messages import message_type, utc_now
from framework.persistence.outbox import PostgresOutbox
from framework.persistence.saga import SagaDefinition, Step, fail, ok

__all__ = [
    "FORWARD_MILESTONES",
    "REFUSAL_MILESTONES",
    "STEP_TIMEOUT",
    "UNDO_MILESTONES",
    "Milestone",
    "OrderSagaData",
    "OrderStatusChanged",
    "PlaceOrderSaga",
]

STEP_TIMEOUT = float(os.environ.get("ORDERS_STEP_TIMEOUT", "30"))
"""Seconds each participant has to answer a command (and to confirm an undo): 30, or the orders
process's `ORDERS_STEP_TIMEOUT` (read when this module is imported)."""
FORWARD_MILESTONES = ("stock_reserved", "payment_authorized", "shipment_created")
"""What the saga does for an order, in order."""
REFUSAL_MILESTONES = ("stock_rejected", "payment_declined")
"""A participant's refusal, which turns the saga round (a timeout has none)."""
UNDO_MILESTONES = ("shipment_cancelled", "payment_refunded", "stock_released")
"""What it undoes when the order cannot be completed, in the order it undoes it."""


@message_type("shop.orders.status_changed")
class OrderStatusChanged(BaseModel):
    """Progress of an order between `OrderPlaced` and `OrderConfirmed` / `OrderCancelled`.

    `status` is a milestone (`FORWARD_MILESTONES`, then on the way to a cancellation
    `REFUSAL_MILESTONES` and `UNDO_MILESTONES`), or `failed` (an undo was never confirmed;
    `detail` says which). `at` is when the order reached it (None in events from before it
    was sent).
    """

    order_id: str
    status: str
    detail: str = ""
    at: datetime | None = None


class Milestone(BaseModel):
    """A milestone an order reached (a name of `FORWARD_MILESTONES`, `REFUSAL_MILESTONES` or
    `UNDO_MILESTONES`), and when (None: recorded before times were)."""

    step: str
    at: datetime | None = None


class OrderSagaData(BaseModel):
    """What the saga carries from step to step (stored as JSON with the saga)."""

    order_id: str
    customer_id: str
    lines: list[OrderLine]
    total_cents: int
    address: str
    card_number: str = ""
    stock_reserved: bool = False
    payment_id: str | None = None
    shipment_id: str | None = None
    reason: str | None = None
    milestones: list[Milestone] = Field(default_factory=list)

    @property
    def progress(self) -> list[str]:
        """The forward milestones reached (what they did, undone or not)."""
        reached = [
            ("stock_reserved", self.stock_reserved),
            ("payment_authorized", self.payment_id is not None),
            ("shipment_created", self.shipment_id is not None),
        ]
        return [name for name, done in reached if done]

    @property
    def reached(self) -> list[Milestone]:
        """Every milestone reached, in order, with its time; for data saved before milestones
        were recorded, the forward ones its fields tell, without times."""
        return self.milestones or [Milestone(step=name) for name in self.progress]

    def reach(self, step: str) -> OrderSagaData:
        """A copy that reached `step` now."""
        milestones = [*self.reached, Milestone(step=step, at=utc_now())]
        return self.model_copy(update={"milestones": milestones})

    def time_of(self, step: str) -> datetime | None:
        """When the order last reached `step` (None: not recorded)."""
        times = [m.at for m in self.reached if m.step == step]
        return times[-1] if times else None

    def turned_round(self) -> list[Milestone]:
        """The refusal and undo milestones reached, in order."""
        return [m for m in self.reached if m.step in (*REFUSAL_MILESTONES, *UNDO_MILESTONES)]

    def silent_participant(self) -> str:
        """Who did not answer, for a step that timed out."""
        if not self.stock_reserved:
            return "inventory"
        if self.payment_id is None:
            return "payments"
        return "shipping"


# -- commands -------------------------------------------------------------------------------------


def reserve_stock(order: OrderSagaData) -> ReserveStock:
    return ReserveStock(order_id=order.order_id, lines=order.lines)


def release_stock(order: OrderSagaData) -> ReleaseStock:
    return ReleaseStock(order_id=order.order_id)


def commit_stock(order: OrderSagaData) -> CommitStock:
    return CommitStock(order_id=order.order_id)


def authorize_payment(order: OrderSagaData) -> AuthorizePayment:
    return AuthorizePayment(
        order_id=order.order_id, amount_cents=order.total_cents, card_number=order.card_number
    )


def refund_payment(order: OrderSagaData) -> RefundPayment:
    return RefundPayment(order_id=order.order_id)


def create_shipment(order: OrderSagaData) -> CreateShipment:
    return CreateShipment(order_id=order.order_id, address=order.address, lines=order.lines)


def cancel_shipment(order: OrderSagaData) -> CancelShipment:
    return CancelShipment(order_id=order.order_id)


def announce(status: str) -> Callable[[OrderSagaData], OrderStatusChanged]:
    def status_changed(order: OrderSagaData) -> OrderStatusChanged:
        return OrderStatusChanged(order_id=order.order_id, status=status, at=order.time_of(status))

    return status_changed


# -- replies --------------------------------------------------------------------------------------


def record_reservation(order: OrderSagaData, reply: StockReserved) -> OrderSagaData:
    return order.reach("stock_reserved").model_copy(update={"stock_reserved": True})


def record_rejection(order: OrderSagaData, reply: StockRejected) -> OrderSagaData:
    return order.reach("stock_rejected").model_copy(update={"reason": reply.reason})


def record_payment(order: OrderSagaData, reply: PaymentAuthorized) -> OrderSagaData:
    return order.reach("payment_authorized").model_copy(
        update={"payment_id": reply.payment_id, "card_number": ""}
    )


def record_decline(order: OrderSagaData, reply: PaymentDeclined) -> OrderSagaData:
    return order.reach("payment_declined").model_copy(
        update={"reason": reply.reason, "card_number": ""}
    )


def record_shipment(order: OrderSagaData, reply: ShipmentCreated) -> OrderSagaData:
    return order.reach("shipment_created").model_copy(update={"shipment_id": reply.shipment_id})


# An undo confirmed for a step that timed out may have had nothing to undo: it is a milestone
# only when its step was one (payments also says whether it refunded a payment).


def record_shipment_cancelled(order: OrderSagaData, reply: ShipmentCancelled) -> OrderSagaData:
    return order.reach("shipment_cancelled") if order.shipment_id is not None else order


def record_refund(order: OrderSagaData, reply: PaymentRefunded) -> OrderSagaData:
    charged = order.payment_id is not None or reply.payment_id is not None
    return order.reach("payment_refunded") if charged else order


def record_release(order: OrderSagaData, reply: StockReleased) -> OrderSagaData:
    return order.reach("stock_released") if order.stock_reserved else order


def _steps(timeout: float) -> tuple[Step[OrderSagaData], ...]:
    return (
        Step(
            "reserve-stock",
            topic=TOPICS.INVENTORY_COMMANDS,
            send=reserve_stock,
            on_reply={StockReserved: ok(record_reservation), StockRejected: fail(record_rejection)},
            compensate=release_stock,
            on_compensate_reply={StockReleased: ok(record_release)},
            timeout=timeout,
        ),
        Step("announce-stock-reserved", send=announce("stock_reserved")),
        Step(
            "authorize-payment",
            topic=TOPICS.PAYMENTS_COMMANDS,
            send=authorize_payment,
            on_reply={PaymentAuthorized: ok(record_payment), PaymentDeclined: fail(record_decline)},
            compensate=refund_payment,
            on_compensate_reply={PaymentRefunded: ok(record_refund)},
            timeout=timeout,
        ),
        Step("announce-payment-authorized", send=announce("payment_authorized")),
        Step(
            "create-shipment",
            topic=TOPICS.SHIPPING_COMMANDS,
            send=create_shipment,
            on_reply={ShipmentCreated: ok(record_shipment)},
            compensate=cancel_shipment,
            on_compensate_reply={ShipmentCancelled: ok(record_shipment_cancelled)},
            timeout=timeout,
        ),
        Step("announce-shipment-created", send=announce("shipment_created")),
        Step("commit-stock", topic=TOPICS.INVENTORY_COMMANDS, send=commit_stock),
    )


class PlaceOrderSaga(SagaDefinition[OrderSagaData]):
    """The saga of one order; its id is the order id. Its final hooks change the order row and
    publish the order's outcome through `outbox`, in the saga's final transaction."""

    name = "place-order"
    topic = TOPICS.ORDERS_EVENTS  # where the announce-* steps publish
    steps = _steps(STEP_TIMEOUT)

    def __init__(self, outbox: PostgresOutbox) -> None:
        self.outbox = outbox

    def key(self, saga_id: str, data: OrderSagaData) -> str:
        return data.order_id

    async def on_completed(self, tx: Any, saga_id: str, data: OrderSagaData) -> None:
        await _set_status(tx, data.order_id, "confirmed")
        confirmed = OrderConfirmed(
            order_id=data.order_id,
            customer_id=data.customer_id,
            lines=data.lines,
            total_cents=data.total_cents,
        )
        await self.outbox.add(tx, TOPICS.ORDERS_EVENTS, confirmed, key=data.order_id)

    async def on_compensated(self, tx: Any, saga_id: str, data: OrderSagaData) -> None:
        reason = data.reason or f"{data.silent_participant()} did not answer in time"
        await _set_status(tx, data.order_id, "cancelled", reason)
        await self._announce_turning_round(tx, data)
        cancelled = OrderCancelled(
            order_id=data.order_id, customer_id=data.customer_id, reason=reason
        )
        await self.outbox.add(tx, TOPICS.ORDERS_EVENTS, cancelled, key=data.order_id)

    async def on_failed(self, tx: Any, saga_id: str, data: OrderSagaData, error: str) -> None:
        at = await _set_status(tx, data.order_id, "failed", error)
        await self._announce_turning_round(tx, data)
        failed = OrderStatusChanged(order_id=data.order_id, status="failed", detail=error, at=at)
        await self.outbox.add(tx, TOPICS.ORDERS_EVENTS, failed, key=data.order_id)

    async def _announce_turning_round(self, tx: Any, data: OrderSagaData) -> None:
        for milestone in data.turned_round():
            undone = OrderStatusChanged(
                order_id=data.order_id, status=milestone.step, at=milestone.at
            )
            await self.outbox.add(tx, TOPICS.ORDERS_EVENTS, undone, key=data.order_id)


async def _set_status(
    tx: Any, order_id: str, status: str, reason: str | None = None
) -> datetime | None:
    """Move the order to its outcome; returns when (None: no such order)."""
    at: datetime | None = await tx.fetchval(
        "update orders set status = $2, reason = $3, updated_at = clock_timestamp() "
        "where order_id = $1 returning updated_at",
        order_id,
        status,
        reason,
    )
    return at
