"""Shipping: shipments of confirmed orders, on MongoDB, driven by the orders saga's commands.

    shop.shipping.commands  CreateShipment  ->  ShipmentCreated    (on shop.shipping.events)
                            CancelShipment  ->  ShipmentCancelled  (the saga's compensation)
    every tick              created -> packed -> in_transit -> delivered, each a ShipmentTracked

    GET /shipments/{order_id}     the order's shipment with its tracking (any signed-in caller)
    GET /shipments?status=        admin: the latest 100 shipments, optionally of one status

**One document per order** (`_id` = order id): the shipment, its tracking history, the ids of
the commands it has applied (`MongoInbox`) and the events waiting to be published
(`MongoOutbox`). Handling a command is ONE guarded write of that document, which changes the
state, records the command's id and carries the reply, so they happen together or not at all;
the outbox relay publishes the reply afterwards. The write is guarded by the inbox (a
redelivered command matches nothing: no second effect, no second reply) and by the document's
`version` (a concurrent tracker step or command makes it re-read and decide again).

**Replies** are built while the command is handled, so the bus copies the command's correlation
id (the saga id) into them: that is how `SagaOrchestrator` finds its saga (see the "Correlation"
section of `framework.persistence.saga`). A *new* CreateShipment (another message id) for an
order that already has a shipment is answered with ShipmentCreated again, with the same
shipment id. CancelShipment is idempotent compensation: cancelling an unknown shipment stores a
cancelled placeholder (a CreateShipment arriving late then creates nothing and is not answered)
and answers ShipmentCancelled; cancelling a cancelled one answers ShipmentCancelled again. A
delivered shipment cannot be cancelled: the command is recorded, unanswered, and logged.

**Callers.** Shipping does not know who owns an order, so `GET /shipments/{order_id}` is open to
any signed-in caller (order ids are unguessable); the gateway or the orders service must check
ownership before exposing it to customers.

Environment: MONGO_URL (or SHIPPING_MONGO_URL / SHIPPING_MONGO_DB; database `shop_shipping` by
default, see `example_shop.common`), SHIPPING_TICK_SECONDS (default 5), MSA_HTTP_PORT (default
`PORTS["shipping"]`) and the `ServiceSettings` variables. `Shipping(mongo_client=...)` runs on a
given client instead, e.g. `mongomock_motor.AsyncMongoMockClient()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import BaseModel

from example_shop.common import caller, default_settings, mongo_target, require_admin
from example_shop.contracts import (
    TOPICS,
    CancelShipment,
    CreateShipment,
    OrderLine,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentTracked,
)
from example_shop.shipping.tracking import (
    CANCELLED,
    CREATED,
    DELIVERED,
    SHIPMENTS,
    ShipmentTracker,
)
from framework.bus import Message
from framework.errors import ConfigurationError, PersistenceError
from framework.http import json_response
from framework.messages import new_id, utc_now, validate_payload
from framework.persistence.mongo import (
    DuplicateKey,
    IndexSpec,
    MongoInbox,
    MongoOutbox,
    MongoResource,
    translate,
)
from framework.service import Service, ServiceSettings, handles, route
from framework.types import Transport

__all__ = ["Shipment", "ShipmentList", "ShipmentQuery", "Shipping", "TrackingStep"]

log = logging.getLogger("example_shop.shipping")
Document = dict[str, Any]
_DECISION_FIELDS = {"status": 1, "shipment_id": 1, "version": 1}
Status = Literal["created", "packed", "in_transit", "delivered", "cancelled"]


class TrackingStep(BaseModel):
    status: Status
    at: datetime


class Shipment(BaseModel):
    shipment_id: str
    order_id: str
    address: str
    lines: list[OrderLine]
    status: Status
    tracking: list[TrackingStep]


class ShipmentList(BaseModel):
    items: list[Shipment]


class ShipmentQuery(BaseModel):
    """The query string of `GET /shipments`."""

    status: Status | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a command does to the shipment document: an update and the reply it carries, if
    any. Without a document the update is an upsert that can only insert (it is guarded by
    `version` not existing), so it sets the initial fields with `$set`: FerretDB v1.24 drops
    empty arrays from `$setOnInsert`."""

    update: Document
    reply: BaseModel | None


class Shipping(Service):
    """Creates, tracks and cancels shipments on the orders saga's commands."""

    name = "shipping"
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {
        TOPICS.SHIPPING_EVENTS: [ShipmentCreated, ShipmentCancelled, ShipmentTracked]
    }

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        mongo_client: Any = None,
    ) -> None:
        """`mongo_client`: a ready client (pymongo or Motor-like) to use instead of MONGO_URL."""
        super().__init__(default_settings("shipping", settings), transport=transport)
        try:
            self.tick = float(self.settings.env.get("SHIPPING_TICK_SECONDS", "5"))
        except ValueError as exc:
            raise ConfigurationError(f"SHIPPING_TICK_SECONDS: {exc}") from exc
        url, database = mongo_target(self.settings.env, "shipping")
        self.db = self.use(
            MongoResource(
                url,
                database,
                indexes={SHIPMENTS: [IndexSpec("status"), IndexSpec("advance_at")]},
                client=mongo_client,
            )
        )
        # The saga waits at most its step timeout (30 s) for a reply, so the claims of a relay
        # killed mid-round must lapse well before that: 10 s, publishing bounded by 5 s.
        self.outbox = self.use(MongoOutbox(self.db, self.bus, collections=[SHIPMENTS], lease=10.0))
        self.inbox = MongoInbox(self.db)
        self.tracker = self.use(ShipmentTracker(self.db, self.outbox, tick=self.tick))

    # -- commands -------------------------------------------------------------------------------

    @handles(TOPICS.SHIPPING_COMMANDS)
    async def create_shipment(self, command: CreateShipment, message: Message[Any]) -> None:
        """Create the order's shipment (once) and answer ShipmentCreated."""

        def decide(doc: Document | None) -> Decision:
            now = utc_now()
            if doc is None:
                shipment_id = new_id()
                fields = {
                    "order_id": command.order_id,
                    "shipment_id": shipment_id,
                    "address": command.address,
                    "lines": [line.model_dump() for line in command.lines],
                    "status": CREATED,
                    "tracking": [{"status": CREATED, "at": now}],
                    "created_at": now,
                    "advance_at": now + timedelta(seconds=self.tick),
                }
                reply = ShipmentCreated(order_id=command.order_id, shipment_id=shipment_id)
                return Decision({"$set": fields}, reply)
            if doc["status"] == CANCELLED:  # cancelled before it existed: the saga moved on
                return Decision(_touch(now), None)
            return Decision(
                _touch(now),
                ShipmentCreated(order_id=command.order_id, shipment_id=doc["shipment_id"]),
            )

        await self._apply(message, command.order_id, decide)

    @handles(TOPICS.SHIPPING_COMMANDS)
    async def cancel_shipment(self, command: CancelShipment, message: Message[Any]) -> None:
        """Cancel the order's shipment (idempotently) and answer ShipmentCancelled."""
        cancelled = ShipmentCancelled(order_id=command.order_id)

        def decide(doc: Document | None) -> Decision:
            now = utc_now()
            step = {"status": CANCELLED, "at": now}
            if doc is None:  # nothing to undo; keep a placeholder so a late create is void
                fields = {
                    "order_id": command.order_id,
                    "shipment_id": new_id(),
                    "address": "",
                    "lines": [],
                    "status": CANCELLED,
                    "tracking": [step],
                    "created_at": now,
                }
                return Decision({"$set": fields}, cancelled)
            if doc["status"] == CANCELLED:
                return Decision(_touch(now), cancelled)
            if doc["status"] == DELIVERED:
                log.warning("order %s: a delivered shipment cannot be cancelled", command.order_id)
                return Decision(_touch(now), None)
            update = {
                "$set": {"status": CANCELLED, "updated_at": now},
                "$push": {"tracking": step},
                "$unset": {"advance_at": ""},
            }
            return Decision(update, cancelled)

        await self._apply(message, command.order_id, decide)

    async def _apply(
        self, message: Message[Any], order_id: str, decide: Callable[[Document | None], Decision]
    ) -> None:
        """Apply `message`'s decision to the order's shipment document exactly once.

        One write, guarded by the inbox and by the version the decision was made from; when the
        document changed meanwhile, decide again on the new state.
        """
        shipments = self.db.collection(SHIPMENTS)
        for _ in range(5):
            # Held while read, decided and written: the relay's removal of published events
            # never overlaps this write (FerretDB does not isolate updates).
            async with self.outbox.holding(SHIPMENTS, order_id):
                with translate():
                    doc = await shipments.find_one({"_id": order_id}, _DECISION_FIELDS)
                decision = decide(doc)
                entries = []
                if decision.reply is not None:
                    entries.append(
                        self.outbox.event(TOPICS.SHIPPING_EVENTS, decision.reply, key=order_id)
                    )
                version = {"$exists": False} if doc is None else doc["version"]
                filter, update = self.inbox.guard(
                    message,
                    {"_id": order_id, "version": version},
                    {**decision.update, "$inc": {"version": 1}},
                )
                try:
                    result = await self.outbox.update_one(
                        SHIPMENTS, filter, update, *entries, upsert=doc is None
                    )
                except DuplicateKey:  # created meanwhile (perhaps by this very message): re-read
                    continue
                if result.matched_count or result.upserted_id is not None:
                    await self.inbox.trim(SHIPMENTS, order_id)  # a write too: still held
                    return
            if await self.inbox.is_duplicate(SHIPMENTS, order_id, message):
                return  # applied already, reply included
        raise PersistenceError(f"shipment of order {order_id!r} kept changing; retry later")

    # -- HTTP -----------------------------------------------------------------------------------

    @route("GET", "/shipments/{order_id}", response=Shipment)
    async def get_shipment(self, request: web.Request) -> web.Response:
        """The order's shipment with its tracking (any signed-in caller)."""
        caller(request)
        order_id = request.match_info["order_id"]
        with translate():
            doc = await self.db.collection(SHIPMENTS).find_one({"_id": order_id})
        if doc is None:
            raise web.HTTPNotFound(text=f"no shipment for order {order_id!r}")
        return json_response(_shipment(doc))

    @route("GET", "/shipments", response=ShipmentList)
    async def list_shipments(self, request: web.Request) -> web.Response:
        """The latest 100 shipments, optionally of one status (admins)."""
        require_admin(request)
        query = validate_payload(dict(request.query), ShipmentQuery)
        filter = {"status": query.status} if query.status else {}
        with translate():
            docs = (
                await self.db.collection(SHIPMENTS)
                .find(filter)
                .sort("created_at", -1)
                .limit(100)
                .to_list(None)
            )
        return json_response(ShipmentList(items=[_shipment(d) for d in docs]))


def _touch(now: datetime) -> Document:
    """An update that changes nothing but records the command (and carries its reply)."""
    return {"$set": {"updated_at": now}}


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment  # BSON is naive UTC


def _shipment(doc: Document) -> Shipment:
    tracking = [{"status": t["status"], "at": _utc(t["at"])} for t in doc["tracking"]]
    return Shipment.model_validate({**doc, "tracking": tracking})
