"""The shipment document's statuses, and the tracker that moves shipments along them.

    created --> packed --> in_transit --> delivered        (one step per tick)
       \\__________\\___________\\--> cancelled              (CancelShipment, until delivered)

Each document carries a `version` (incremented by every write) and, while it can still move,
`advance_at`: when the tracker may take its next step. Every write is guarded by the version it
was computed from, so a tracker and a command handler (or two replicas' trackers) never apply
two decisions to the same state: the loser re-reads or waits for the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from example_shop.contracts import TOPICS, ShipmentTracked
from framework.errors import ConfigurationError, MsaError
from framework.messages import utc_now
from framework.persistence.mongo import MongoOutbox, MongoResource, translate
from framework.tasks import finish_task

__all__ = [
    "CANCELLED",
    "CREATED",
    "DELIVERED",
    "IN_TRANSIT",
    "NEXT_STATUS",
    "PACKED",
    "SHIPMENTS",
    "STATUSES",
    "ShipmentTracker",
]

log = logging.getLogger("example_shop.shipping")

SHIPMENTS = "shipments"
CREATED, PACKED, IN_TRANSIT, DELIVERED, CANCELLED = (
    "created",
    "packed",
    "in_transit",
    "delivered",
    "cancelled",
)
STATUSES = (CREATED, PACKED, IN_TRANSIT, DELIVERED, CANCELLED)
NEXT_STATUS = {CREATED: PACKED, PACKED: IN_TRANSIT, IN_TRANSIT: DELIVERED}


class ShipmentTracker:
    """A resource whose background task advances due shipments one status every `tick` seconds.

    Each step is one guarded write of the shipment document that also carries its
    `ShipmentTracked` event (the outbox), so the events of one shipment are published in order.
    Every replica may run one: the version guard lets only one of them take a given step.
    """

    def __init__(
        self, db: MongoResource, outbox: MongoOutbox, *, tick: float, batch_size: int = 500
    ) -> None:
        if tick <= 0:
            raise ConfigurationError("the shipping tick must be > 0 seconds")
        self.db = db
        self.outbox = outbox
        self.tick = tick
        self.batch_size = batch_size
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="shipment-tracker")

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        await finish_task(task)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.advance_due()
            except MsaError as exc:  # the database is away: try again at the next tick
                log.warning("shipment tracker: %s; will retry", exc)
            except Exception:
                log.exception("shipment tracker failed; will retry")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.tick)

    async def advance_due(self) -> int:
        """Take one step for every shipment that is due, `batch_size` at a time; returns how
        many moved. (One batch per tick moved at most 100 shipments every 5 s: at more than
        about seven orders a second the due shipments piled up, and each tick's query sorted
        the whole pile.)"""
        # One `now` per round: a step's next one is due exactly one tick later, at the next round.
        now = utc_now()
        moved = 0
        while True:
            due, stepped = await self._advance_batch(now)
            moved += stepped
            if due < self.batch_size or not stepped or self._stopping.is_set():
                return moved

    async def _advance_batch(self, now: datetime) -> tuple[int, int]:
        """One batch of the shipments due at `now`: how many were due in it, how many moved."""
        with translate():
            due = (
                await self.db.collection(SHIPMENTS)
                .find(
                    {"status": {"$in": list(NEXT_STATUS)}, "advance_at": {"$lte": now}},
                    {"order_id": 1, "shipment_id": 1, "status": 1, "version": 1},
                )
                .sort("advance_at", 1)
                .limit(self.batch_size)
                .to_list(None)
            )
        moved = 0
        for doc in due:
            moved += await self._advance(doc, now)
        return len(due), moved

    async def _advance(self, doc: dict[str, Any], now: datetime) -> int:
        status = NEXT_STATUS[doc["status"]]
        order_id = doc["order_id"]
        tracked = self.outbox.event(
            TOPICS.SHIPPING_EVENTS,
            ShipmentTracked(order_id=order_id, shipment_id=doc["shipment_id"], status=status),
            key=order_id,
        )
        update: dict[str, Any] = {
            "$set": {"status": status, "updated_at": now},
            "$push": {"tracking": {"status": status, "at": now}},
            "$inc": {"version": 1},
        }
        if status in NEXT_STATUS:
            update["$set"]["advance_at"] = now + timedelta(seconds=self.tick)
        else:
            update["$unset"] = {"advance_at": ""}
        # Held, so the relay's removal of published events never overlaps the step's write
        # (FerretDB does not isolate updates); the version guard catches a cancel meanwhile.
        async with self.outbox.holding(SHIPMENTS, doc["_id"]):
            result = await self.outbox.update_one(
                SHIPMENTS, {"_id": doc["_id"], "version": doc["version"]}, update, tracked
            )
        return result.matched_count
