"""What the outboxes and inboxes of both databases promise: the code that uses them (the saga
orchestrator, a service's handlers) is written once for PostgreSQL and MongoDB.

Each database has its own unit of atomicity, which the methods take as `tx`:

    PostgreSQL   tx: the connection of `PostgresResource.transaction()`
                 PostgresOutbox: a row of `msa_outbox`; PostgresInbox: a row of `msa_inbox`
    MongoDB      tx: a `DocumentChange`, one document's update (FerretDB: no transactions)
                 MongoOutbox: an entry in the document; MongoInbox: an id in its `msa_inbox`

    async def on_payment(self, tx: Any, message: Message[PaymentCaptured]) -> None:
        if not await self.inbox.record(tx, message):
            return                                   # a redelivery: the effect happened already
        await self.outbox.add(tx, "orders", OrderPaid(order_id=...), key=...)

The state change, the event and the record of the message commit together or not at all; the
outbox's relay publishes the event once it committed (through `Bus.publish_stored`, so the
publish middleware sees it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from framework.bus import Bus, Message
    from framework.messages import Envelope

__all__ = ["Inbox", "Outbox"]


class Outbox(Protocol):
    """Events written with a state change, published by a relay once they committed."""

    bus: Bus
    """Builds the events (`Bus.envelope`: source, correlation, trace) and publishes them."""

    async def add(
        self,
        tx: Any,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
    ) -> Envelope[Any]:
        """Add the event `data` for `topic` inside `tx`; returns its envelope."""
        ...

    async def add_envelope(self, tx: Any, topic: str, envelope: Envelope[Any]) -> None:
        """Add an envelope built elsewhere (a saga's command, carrying the saga's ids)."""
        ...

    def wake(self) -> None:
        """Start a relay round now instead of at the next poll (after a commit)."""
        ...

    async def pending(self) -> int:
        """Events committed but not published yet."""
        ...


class Inbox(Protocol):
    """The ids of the messages whose effects were committed, recorded with those effects."""

    async def record(self, tx: Any, message: Message[Any]) -> bool:
        """Record `message` as processed inside `tx`; False when it was processed before (a
        redelivery: skip the effect)."""
        ...
