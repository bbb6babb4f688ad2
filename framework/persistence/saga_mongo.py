"""Sagas kept in MongoDB (or FerretDB): one document per saga, and nothing else to write.

Without multi-document transactions the saga's document is the transaction. It carries, next to
the saga's state:

    {_id: <saga id>, type, status, step, data: "<JSON>", version, attempts, failed_step, error,
     created, updated, deadline,                       # deadline absent while none is due
     history: [{at, version, event, status, step, message_type, message_id, detail}, ...],
     msa_outbox: [<pending commands>], msa_pending,    # MongoOutbox entries and marker
     msa_inbox: ["<group>:<reply id>", ...]}           # MongoInbox: the replies it took

A transition holds the document (`MongoOutbox.holding`: a claim in the relay's claims
collection, so neither the relay's removal of published commands nor another transition
overlaps it: FerretDB does not isolate updates), reads it, and writes the new state, history
lines, the reply's id and the new commands in ONE update guarded by the version it read. The
outbox relay publishes the commands from the document as from any aggregate's (the orchestrator
adds the collection to the outbox's). The timer finds documents whose `deadline` passed and
moves those it can hold at once, skipping those held elsewhere. Deadlines and times come from
the clock of the replica that writes them. `SagaOrchestrator` builds this store for a
`MongoResource` (`framework.persistence.saga`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING

from framework.errors import ConfigurationError, PersistenceError
from framework.persistence.contracts import Inbox, Outbox
from framework.persistence.mongo import (
    INBOX_FIELD,
    Document,
    DocumentChange,
    DuplicateKey,
    IndexSpec,
    MongoInbox,
    MongoOutbox,
    MongoResource,
    translate,
)
from framework.persistence.saga_store import (
    DuplicateSaga,
    SagaChange,
    SagaEvent,
    SagaStatus,
    StoredSaga,
)

__all__ = ["SAGAS_COLLECTION", "MongoSagaStore"]

SAGAS_COLLECTION = "msa_sagas"
_STATE = ("type", "status", "step", "data", "version", "attempts", "failed_step", "error")
_TRANSITION = dict.fromkeys((*_STATE, INBOX_FIELD), 1)
"""What a transition reads: the state, and the replies taken (the inbox looks there)."""
_QUERY = dict.fromkeys((*_STATE, "created", "updated", "deadline", "history"), 1)
_EXPIRED_BATCH = 20


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    """BSON dates come back naive (UTC) unless the client is `tz_aware`."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class MongoSagaStore:
    """The `SagaStore` of a `MongoResource`; `tx` is the saga document's `DocumentChange`."""

    def __init__(
        self,
        resource: MongoResource,
        outbox: Outbox,
        inbox: Inbox,
        *,
        collection: str = SAGAS_COLLECTION,
    ) -> None:
        if not isinstance(outbox, MongoOutbox) or not isinstance(inbox, MongoInbox):
            raise ConfigurationError(
                "sagas on MongoDB need the MongoOutbox and MongoInbox of the same database, "
                f"not {type(outbox).__qualname__} and {type(inbox).__qualname__}"
            )
        self.resource = resource
        self.outbox = outbox
        self.inbox = inbox
        self.name = collection
        outbox.add_collection(collection)  # its relay publishes the sagas' commands
        resource.add_indexes(collection, [IndexSpec("deadline", name="msa_saga_deadline")])

    @property
    def collection(self) -> Any:
        return self.resource.collection(self.name)

    @contextlib.asynccontextmanager
    async def creating(self, tx: Any | None, saga: StoredSaga) -> AsyncIterator[Any]:
        if tx is not None:
            raise ConfigurationError(
                "on MongoDB a saga starts in a document of its own: start_saga(None, ...)"
            )
        collection = self.collection
        with translate():
            taken = await collection.find_one({"_id": saga.id}, {"_id": 1})
        if taken is not None:
            raise DuplicateSaga(f"a saga with id {saga.id!r} exists already")
        now = _now()
        document: Document = {
            "_id": saga.id,
            "type": saga.type,
            "status": saga.status.value,
            "step": saga.step,
            "data": saga.data.decode(),
            "version": saga.version,
            "attempts": saga.attempts,
            "failed_step": saga.failed_step,
            "error": saga.error,
            "created": now,
            "updated": now,
            "history": [],
        }
        change = DocumentChange(collection, document, new=True)
        yield change
        try:
            await change.write()
        except DuplicateKey as exc:  # started concurrently
            raise DuplicateSaga(f"a saga with id {saga.id!r} exists already") from exc
        await change.committed()

    @contextlib.asynccontextmanager
    async def locked(self, saga_id: str) -> AsyncIterator[tuple[Any, StoredSaga] | None]:
        with translate():  # most messages with a correlation id are for no saga: no hold then
            known = await self.collection.find_one({"_id": saga_id}, {"_id": 1})
        if known is None:
            yield None
            return
        async with self.outbox.holding(self.name, saga_id):
            with translate():  # read what the last holder wrote
                document = await self.collection.find_one({"_id": saga_id}, _TRANSITION)
            assert document is not None  # sagas are never deleted
            async with self._moving(document) as held:
                yield held

    @contextlib.asynccontextmanager
    async def expired(self, types: Sequence[str]) -> AsyncIterator[tuple[Any, StoredSaga] | None]:
        now = _now()
        due = {"type": {"$in": list(types)}, "deadline": {"$lte": now}}
        with translate():
            candidates = (
                await self.collection.find(due, {"_id": 1})
                .sort("deadline", ASCENDING)
                .limit(_EXPIRED_BATCH)
                .to_list(None)
            )
        for candidate in candidates:
            async with self.outbox.holding(self.name, candidate["_id"], wait=False) as held:
                if not held:
                    continue  # another replica's timer, a reply or the relay has it now
                with translate():  # re-read: it may have moved on before it was held
                    document = await self.collection.find_one(
                        {**due, "_id": candidate["_id"]}, _TRANSITION
                    )
                if document is None:
                    continue
                async with self._moving(document) as moving:
                    yield moving
                return
        yield None

    @contextlib.asynccontextmanager
    async def _moving(self, document: Document) -> AsyncIterator[tuple[Any, StoredSaga]]:
        """The change of a held saga document, written when the block ends."""
        change = DocumentChange(self.collection, document, guard={"version": document["version"]})
        yield change, _stored(document)
        if not await change.write():  # only a writer that does not hold the document can
            raise PersistenceError(f"saga {document['_id']!r} changed while it was held")
        await change.committed()

    async def save(self, tx: DocumentChange, change: SagaChange) -> None:
        now = _now()
        version = change.version
        if change.moved:
            version += 1
            tx.set(
                {
                    "status": change.status.value,
                    "step": change.step,
                    "data": change.data.decode(),
                    "version": version,
                    "attempts": change.attempts,
                    "failed_step": change.failed_step,
                    "error": change.error,
                    "updated": now,
                }
            )
            if change.timeout is None:
                tx.unset("deadline")
            else:
                tx.set({"deadline": now + timedelta(seconds=change.timeout)})
        if change.notes:
            tx.push(
                "history",
                *({"at": now, "version": version, **note._asdict()} for note in change.notes),
            )

    async def seconds_to_next_deadline(self, types: Sequence[str]) -> float | None:
        with translate():
            first = (
                await self.collection.find(
                    {"type": {"$in": list(types)}, "deadline": {"$exists": True}}, {"deadline": 1}
                )
                .sort("deadline", ASCENDING)
                .limit(1)
                .to_list(None)
            )
        if not first:
            return None
        return (_utc(first[0]["deadline"]) - _now()).total_seconds()

    async def load(self, saga_id: str) -> StoredSaga | None:
        with translate():
            document = await self.collection.find_one({"_id": saga_id}, _QUERY)
        if document is None:
            return None
        history = tuple(
            SagaEvent(
                at=_utc(line["at"]),
                event=line["event"],
                status=SagaStatus(line["status"]),
                version=line["version"],
                step=line.get("step"),
                message_type=line.get("message_type"),
                message_id=line.get("message_id"),
                detail=line.get("detail"),
            )
            for line in document.get("history") or ()
        )
        deadline = document.get("deadline")
        return _stored(
            document,
            created=_utc(document["created"]),
            updated=_utc(document["updated"]),
            deadline=None if deadline is None else _utc(deadline),
            history=history,
        )


def _stored(document: Document, **read: Any) -> StoredSaga:
    """A saga of a document; `read`: what `load` read besides (times, history)."""
    return StoredSaga(
        id=document["_id"],
        type=document["type"],
        status=SagaStatus(document["status"]),
        step=document["step"],
        data=document["data"].encode(),
        version=document["version"],
        attempts=document.get("attempts", 0),
        failed_step=document.get("failed_step"),
        error=document.get("error"),
        **read,
    )
