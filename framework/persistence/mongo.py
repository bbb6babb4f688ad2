"""MongoDB (and FerretDB) as a service resource, with an in-document outbox and inbox.

    db = service.use(MongoResource(settings.env["MONGO_URL"], "shop", indexes={
        "orders": [IndexSpec("customer_id"), IndexSpec("number", unique=True)],
    }))
    outbox = service.use(MongoOutbox(db, service.bus, collections=["orders"]))
    inbox = MongoInbox(db)
    sagas = service.use(SagaOrchestrator(db, outbox, inbox, definitions=[...]))  # optional

Without multi-document transactions there is one unit of atomicity: the document. So the
events a state change emits live *inside the aggregate document* until the relay published them,
and the ids of the messages a document's effects came from live inside it too.

**Outbox.** Build an entry with `outbox.event(...)` and write it with the state change, in the
same single-document update (or insert):

    paid = outbox.event("orders", OrderPaid(order_id=oid), key=oid)
    await outbox.update_one("orders", {"_id": oid, "status": "new"},
                            {"$set": {"status": "paid"}}, paid)     # writes, then wakes the relay
    # the same by hand:
    await db.collection("orders").update_one(
        {"_id": oid, "status": "new"}, outbox.push({"$set": {"status": "paid"}}, paid))
    outbox.wake()
    placed = outbox.event("orders", OrderPlaced(order_id=oid), key=oid)   # a new aggregate:
    await db.collection("orders").insert_one(outbox.attach({"_id": oid, "status": "new"}, placed))

`push` adds `$push: {msa_outbox: {$each: [...]}}` and `$min: {msa_pending: <created_at>}`: the
entries (id, topic, key bytes, headers as `[{name, value}]`, value bytes, created_at) and an
indexed "pending since" marker. An update that does not match writes neither the state nor the
event: nothing is published.

The relay (a resource: `start`/`stop`; every replica runs one) repeatedly

1. finds documents with a marker, oldest first, in each registered collection;
2. *claims* them by inserting `{_id: {collection, id}, owner, token, until}` into
   `msa_outbox_claims`: a duplicate `_id` means another relay holds the document. Claims older
   than their lease (`until`) are deleted first, so a crashed relay's documents are taken over;
3. re-reads the claimed documents and publishes their entries in array order through the bus
   (`Bus.publish_stored`: the publish middleware sees each event, the bus's metrics count it;
   per-aggregate order; pipelined, then awaits every broker acknowledgement, bounded by half
   the lease);
4. for each document whose entries were all acknowledged, removes exactly those entries: one
   update with the exact array as filter that unsets `msa_outbox` and the marker, or, when new
   entries arrived meanwhile, a `$pullAll` of the published ones (the marker stays);
5. deletes its claims.

A crash anywhere leaves the entries in place for the next claim: duplicates on the bus are
possible, lost events are not (the stable CloudEvents `id` and the inbox make duplicates
harmless).

**Wake-ups, not scans.** The outbox's own writes (`update_one`, `insert_one`, `add` through a
`DocumentChange`) tell the relay which document they gave events to, and wake it: such a round
claims exactly those documents by `_id`. A full round - the scan of the pending marker over
every collection, in marker order - runs at start, after a failure, when `wake()` is called
(for events written by other means) and every `poll_interval` (1 s; 30 s where
`MongoResource.indexed` is false), for documents whose writer died before its relay published
them. On MongoDB the scan is an indexed query; mongomock (the embedded engine) and FerretDB v1
test every document instead, so before the wake-ups every round, several per order, read every
document of every collection: the shop's cost per order grew with its stored shipments.

**One document's change as a transaction.** `DocumentChange` collects what several hands add
to one document (fields, outbox entries, the inbox's record of a message) and writes it in one
update (or one insert): it is the `tx` the outbox's `add` and the inbox's `record` take, as a
PostgreSQL connection is theirs (`framework.persistence.contracts`). The saga orchestrator
moves a saga this way (`framework.persistence.saga_mongo`).

    order = await db.collection("orders").find_one({"_id": oid})
    change = DocumentChange(db.collection("orders"), order, guard={"status": "new"})
    if not await inbox.record(change, message):
        return                                       # a redelivery: the effect happened already
    change.set({"status": "paid"})
    await outbox.add(change, "orders", OrderPaid(order_id=oid), key=oid)
    await change.commit()                            # one update; wakes the relay

**Holding a document.** A read-modify-write of a document the relay also writes (a saga's:
the orchestrator reads it, decides, writes it) holds it with `async with outbox.holding(name,
doc_id)`: a claim like the relay's own, so that the relay's removal of published entries and
the write never overlap (see FerretDB below).

**Inbox.** `await inbox.apply(collection, doc_id, message, update)` runs `update` on the document
only if the message's id is not among the last `keep` (default 1000) recorded in its
`msa_inbox` array, recording it in the same update; False means a duplicate (the effect happened
already), `DocumentNotFound` a missing document. For effects that create a document, either give
it a deterministic `_id` (derived from the message id or the business key) and treat
`DuplicateKey` on insert as "done", or `apply(..., upsert=True)` with `$setOnInsert` for the
initial fields (a duplicate then surfaces as a duplicate `_id`, reported as False). Composing a
guard into an update of your own: `filter, update = inbox.guard(message, filter, update)`.

    async def on_payment(self, event: PaymentCaptured, message: Message) -> None:
        update = outbox.push({"$set": {"status": "paid"}}, outbox.event("orders", OrderPaid(...)))
        if await inbox.apply("orders", event.order_id, message, update):
            outbox.wake()

**FerretDB v1.24 (checked against the server, not assumed):**

- `update` and `findAndModify` are NOT isolated: the server reads the document, applies the
  operators in Go and writes the whole document back by `_id` (100 concurrent `$inc` of one
  document left it at 6; ten concurrent guarded `findAndModify` claims had several winners).
  Inserts (a duplicate `_id` is refused) and deletes (the deleted count) are atomic. Hence the
  claims are inserts into their own collection, not a `msa_claim` field set by
  `find_one_and_update`, and the relay writes an aggregate document only once per round (the
  removal in step 4). Every write of FerretDB replaces the document with one consistent state, so
  a lost update loses a state change *together with* its events; but concurrent writers of one
  document (the application's, or the application's and the relay's removal) can lose each
  other's updates on FerretDB, and two *concurrent* deliveries of one message may both pass the
  inbox guard there (sequential redeliveries are recognised). On MongoDB every operation used
  here is atomic. FerretDB serves development and tests; run production on MongoDB.
- Nested arrays are refused: headers are stored as `[{name, value}]`, not `[[name, value]]`.
- `$pull` with a condition (`{id: {$in: [...]}}`, even `{id: "x"}`) matches and silently removes
  nothing; `$pullAll` with the exact entries and filters on the exact array work, so they are used.
- `$push` with `$slice` is silently ignored: on FerretDB (detected from `buildInfo`) the inbox
  trims its array in a separate step (`MongoInbox.trim`), on MongoDB `$slice` does it in the
  same update.
- `createIndexes` with two or more indexes that all exist already drops the connection (the
  handler fails); one index per call is idempotent, so the resource creates them one by one.
- Not implemented (so never used): `arrayFilters`, `partialFilterExpression`, a projection on
  `findAndModify`, the `$size` aggregation operator. `sparse` is accepted and ignored.
- Only filters on `_id` are pushed down to SQLite: the relay's marker query scans the collection
  there; on MongoDB the sparse `msa_pending` index serves it.
- Working as on MongoDB: `$push` + `$each`, `$min`, `$set`/`$unset`, `$pop`, `$pullAll`,
  upserts with `$setOnInsert`, `$exists` on `field.0`, `$size` in filters, exact-array equality,
  sort + limit, `insert_many(ordered=False)` write errors, `$match`/`$unwind`/`$count`.

pymongo errors are translated to `PersistenceError` subclasses at this one edge (`translate`):
`DatabaseUnavailable` (from `framework.errors`, shared with PostgreSQL), and `DuplicateKey` and
`DocumentNotFound`, defined here so that MongoDB users do not need asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from framework.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    MsaError,
    NotStartedError,
    PersistenceError,
    PublishError,
)
from framework.messages import Envelope, new_id, to_binary
from framework.resilience import Backoff
from framework.tasks import finish_task

try:
    import pymongo.errors as mongo_errors
    from pymongo import ASCENDING, AsyncMongoClient, IndexModel
    from pymongo.asynchronous.collection import AsyncCollection
    from pymongo.asynchronous.database import AsyncDatabase
    from pymongo.results import UpdateResult
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        'framework.persistence.mongo needs pymongo: pip install "msa-framework[mongo]"'
    ) from exc

if TYPE_CHECKING:
    from framework.bus import Bus, Message

__all__ = [
    "DatabaseUnavailable",
    "DocumentChange",
    "DocumentNotFound",
    "DuplicateKey",
    "IndexSpec",
    "MongoInbox",
    "MongoOutbox",
    "MongoResource",
    "translate",
]

log = logging.getLogger("framework.persistence.mongo")

Document = dict[str, Any]
OUTBOX_FIELD = "msa_outbox"
PENDING_FIELD = "msa_pending"
INDEXED_POLL_INTERVAL = 1.0
"""The relay's default scan interval where the pending marker's index is used."""
UNINDEXED_POLL_INTERVAL = 30.0
"""The relay's scan interval on an engine without indexes (mongomock, FerretDB v1), where the
scan tests every document (mongomock: 81 ms of CPU at 20,000 shipments; FerretDB v1 on SQLite:
117 ms at 554). Leftovers come only from a writer that died: the outbox's own writes are
relayed on wake-up, and a restarted relay scans at once."""
INBOX_FIELD = "msa_inbox"
CLAIMS_COLLECTION = "msa_outbox_claims"
_DUPLICATE_KEY = 11000
RELAY_RETRY = Backoff(initial=0.1, maximum=5.0)
"""Between relay rounds that failed (the database or the broker)."""
HOLD_RETRY = Backoff(initial=0.005, maximum=0.2)
"""Between attempts to hold a document that someone else holds (`MongoOutbox.holding`)."""


class DuplicateKey(PersistenceError):
    """A unique index (or `_id`) refused a document."""


class DocumentNotFound(PersistenceError, LookupError):
    """The document an inbox-guarded update targets does not exist."""


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Map pymongo and connection errors to the framework's persistence errors."""
    try:
        yield
    except PersistenceError:
        raise
    except mongo_errors.DuplicateKeyError as exc:
        raise DuplicateKey(str(exc)) from exc
    except mongo_errors.BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if errors and all(e.get("code") == _DUPLICATE_KEY for e in errors):
            raise DuplicateKey(str(exc)) from exc
        raise PersistenceError(f"BulkWriteError: {exc}") from exc
    except mongo_errors.ConfigurationError as exc:
        raise ConfigurationError(f"MongoDB: {exc}") from exc
    except (
        mongo_errors.ConnectionFailure,  # AutoReconnect, NotPrimaryError, ServerSelectionTimeout...
        mongo_errors.ExecutionTimeout,
        OSError,
        TimeoutError,
    ) as exc:
        raise DatabaseUnavailable(f"MongoDB unavailable: {exc}") from exc
    except mongo_errors.PyMongoError as exc:
        raise PersistenceError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class IndexSpec:
    """An index declaration: `IndexSpec("sku", unique=True)`, `IndexSpec([("a", 1), ("b", -1)])`."""

    keys: str | Sequence[tuple[str, int]]
    name: str | None = None
    unique: bool = False
    sparse: bool = False
    expire_after_seconds: int | None = None

    def model(self) -> IndexModel:
        keys = [(self.keys, ASCENDING)] if isinstance(self.keys, str) else list(self.keys)
        options: dict[str, Any] = {}
        if self.name is not None:
            options["name"] = self.name
        if self.unique:
            options["unique"] = True
        if self.sparse:
            options["sparse"] = True
        if self.expire_after_seconds is not None:
            options["expireAfterSeconds"] = self.expire_after_seconds
        return IndexModel(keys, **options)


class MongoResource:
    """A MongoDB client owned by a service: started before its bus, stopped after it.

    `client` may be a ready `AsyncMongoClient` or a Motor `AsyncIOMotorClient` (whose collection
    methods are awaited the same way); a given client is used as it is and not closed at `stop`.
    With a Motor client, `db` and `collection()` return Motor's objects.
    """

    def __init__(
        self,
        url: str,
        database: str,
        *,
        indexes: Mapping[str, Sequence[IndexSpec | IndexModel]] | None = None,
        client: Any = None,
        server_selection_timeout: float = 10.0,
    ) -> None:
        if not url and client is None:
            raise ConfigurationError("MongoResource needs a URL (MONGO_URL) or a client")
        if not database:
            raise ConfigurationError("MongoResource needs a database name")
        self.url = url
        self.database = database
        self.server_selection_timeout = server_selection_timeout
        self.ferretdb = False
        self.server_version = ""
        self.indexed = client is None or not any(
            cls.__module__.startswith("mongomock") for cls in type(client).__mro__
        )  # (mongomock_motor's client calls itself motor.motor_asyncio.AsyncIOMotorClient)
        """False for mongomock's in-memory engine, which answers every query by testing every
        document, and (once started) for FerretDB v1, which pushes only `_id` lookups down to
        its backend and tests the other filters on every document it reads (117 ms for the
        outbox's pending-marker scan of 554 shipments on SQLite here): the outbox relay then
        scans for leftovers less often."""
        self._given = client
        self._client: Any = None
        self._indexes: dict[str, dict[str, IndexModel]] = {}
        for collection, specs in (indexes or {}).items():
            self.add_indexes(collection, specs)

    def add_indexes(self, collection: str, specs: Sequence[IndexSpec | IndexModel]) -> None:
        """Declare more indexes of `collection` (the outbox adds its marker index)."""
        if self._client is not None:
            raise ConfigurationError("add indexes before the resource starts")
        declared = self._indexes.setdefault(collection, {})
        for spec in specs:
            model = spec.model() if isinstance(spec, IndexSpec) else spec
            name = model.document["name"]
            known = declared.get(name)
            if known is not None and known.document != model.document:
                raise ConfigurationError(
                    f"two different indexes named {name!r} on collection {collection!r}"
                )
            declared[name] = model

    @property
    def client(self) -> Any:
        """The `AsyncMongoClient` (or the Motor client that was given)."""
        if self._client is None:
            raise NotStartedError("MongoResource used before start()")
        return self._client

    @property
    def db(self) -> AsyncDatabase[Document]:
        return cast("AsyncDatabase[Document]", self.client[self.database])

    def collection(self, name: str) -> AsyncCollection[Document]:
        return self.db[name]

    async def start(self) -> None:
        """Connect, ping, detect FerretDB and create the declared indexes (idempotent)."""
        if self._client is not None:
            return
        with translate():
            client = self._given or AsyncMongoClient(
                self.url, serverSelectionTimeoutMS=int(self.server_selection_timeout * 1000)
            )
        self._client = client
        try:
            with translate():
                info = await client[self.database].command("buildInfo")
                self.server_version = str(info.get("version", ""))
                self.ferretdb = "ferretdbVersion" in info
                if str(info.get("ferretdbVersion", "")).startswith("v1."):
                    self.indexed = False  # its SQLite and PostgreSQL backends filter in Go
                await client[self.database].command("ping")
                for collection, models in self._indexes.items():
                    for model in models.values():  # one per call: see the module docstring
                        await client[self.database][collection].create_indexes([model])
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Forget the client; close it only if this resource created it."""
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            with contextlib.suppress(Exception):
                await client.close()

    async def check(self) -> bool:
        """Readiness: one `ping` round trip."""
        try:
            with translate():
                async with asyncio.timeout(2):
                    await self.client[self.database].command("ping")
        except (PersistenceError, NotStartedError):
            return False
        return True


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    """BSON dates come back naive (UTC) unless the client is `tz_aware`."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _with_operator(update: Mapping[str, Any], operator: str, field: str, value: Any) -> Document:
    """A copy of `update` with `operator: {field: value}` added next to the caller's operators."""
    if not isinstance(update, Mapping) or any(not k.startswith("$") for k in update):
        raise ConfigurationError(
            "an outbox/inbox update must be a document of update operators ($set, $inc, ...)"
        )
    merged: Document = dict(update)
    section = dict(merged.get(operator) or {})
    if field in section:
        raise ConfigurationError(f"the update already sets {operator} {field!r}")
    section[field] = value
    merged[operator] = section
    return merged


async def _to_list(cursor: Any) -> list[Document]:
    if inspect.isawaitable(cursor):  # PyMongo's aggregate() is a coroutine, Motor's is not
        cursor = await cursor
    return cast("list[Document]", await cursor.to_list(None))


class DocumentChange:
    """One document's change, collected from several hands and written in ONE update: on
    MongoDB without multi-document transactions, what a transaction is on PostgreSQL. It is
    the `tx` of `MongoOutbox.add` / `add_envelope` and `MongoInbox.record` (module docstring).

    `document` is the document as read (the inbox looks for the message's id in it); `guard`
    adds conditions to the `_id` filter (`{"version": 3}`), so that the update applies only to
    the state that was read: `commit()` returns False when it did not match. With `new=True`
    the document does not exist yet and `commit()` inserts it (`DuplicateKey` if its `_id` is
    taken). Callbacks registered with `after_commit` (waking the relay, trimming the inbox) run
    once the write succeeded.
    """

    def __init__(
        self,
        collection: AsyncCollection[Document],
        document: Mapping[str, Any],
        *,
        guard: Mapping[str, Any] | None = None,
        new: bool = False,
    ) -> None:
        if "_id" not in document:
            raise ConfigurationError("a DocumentChange needs the document with its _id")
        self.collection = collection
        self.document = document
        self.new = new
        self.filter: Document = {"_id": document["_id"], **(guard or {})}
        self._set: Document = {}
        self._unset: list[str] = []
        self._push: dict[str, tuple[list[Any], int | None]] = {}
        self._min: Document = {}
        self._after_commit: list[Callable[[], Awaitable[None] | None]] = []

    @property
    def id(self) -> Any:
        return self.document["_id"]

    def set(self, fields: Mapping[str, Any]) -> None:
        """`$set` these fields."""
        self._set.update(fields)
        self._unset = [name for name in self._unset if name not in fields]

    def unset(self, *names: str) -> None:
        """`$unset` these fields."""
        for name in names:
            self._set.pop(name, None)
            if name not in self._unset:
                self._unset.append(name)

    def push(self, field: str, *values: Any, keep: int | None = None) -> None:
        """Append `values` to the array `field` (after what was pushed before); with `keep`,
        only the last `keep` elements stay (`$slice`, which FerretDB ignores)."""
        pushed, known = self._push.get(field, ([], None))
        self._push[field] = ([*pushed, *values], keep if keep is not None else known)

    def set_min(self, field: str, value: Any) -> None:
        """`$min`: set `field` to `value` unless it holds a smaller one."""
        known = self._min.get(field)
        self._min[field] = value if known is None else min(known, value)

    def require(self, field: str, condition: Any) -> None:
        """Apply the change only if `field` matches `condition` (a filter on the document)."""
        if field in self.filter:
            raise ConfigurationError(f"the change already requires {field!r}")
        self.filter[field] = condition

    def after_commit(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        self._after_commit.append(callback)

    def update(self) -> Document:
        """The update operators of everything added so far."""
        update: Document = {}
        if self._set:
            update["$set"] = dict(self._set)
        if self._unset:
            update["$unset"] = dict.fromkeys(self._unset, "")
        if self._push:
            pushes: Document = {}
            for field, (values, keep) in self._push.items():
                pushes[field] = {"$each": values}
                if keep is not None:
                    pushes[field]["$slice"] = -keep
            update["$push"] = pushes
        if self._min:
            update["$min"] = dict(self._min)
        return update

    def inserted(self) -> Document:
        """The new document with everything added (for `new=True`)."""
        created = dict(self.document)
        created.update(self._set)
        for name in self._unset:
            created.pop(name, None)
        for field, (values, keep) in self._push.items():
            merged = [*created.get(field, ()), *values]
            created[field] = merged[-keep:] if keep is not None else merged
        for field, value in self._min.items():
            known = created.get(field)
            created[field] = value if known is None else min(known, value)
        return created

    async def write(self) -> bool:
        """Write the change without running the callbacks; False when the filter did not match.
        A change with nothing to write counts as written."""
        with translate():
            if self.new:
                await self.collection.insert_one(self.inserted())
                return True
            update = self.update()
            if not update:
                return True
            result = await self.collection.update_one(self.filter, update)
        return bool(result.matched_count)

    async def committed(self) -> None:
        """Run the `after_commit` callbacks (once the change was written)."""
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            outcome = callback()
            if outcome is not None:
                await outcome

    async def commit(self) -> bool:
        """`write()`, then the callbacks when it applied; False when the filter did not match."""
        if not await self.write():
            return False
        await self.committed()
        return True


class MongoOutbox:
    """Pending events inside aggregate documents, and the relay that publishes them.

    See the module docstring for the write pattern and the relay's rounds. `collections` are
    those whose documents carry events (`add_collection` adds more before the start; a saga
    orchestrator adds its own). `batch_size` is the number of documents a relay claims per
    collection and round; `lease` how long a claim holds before another relay may take the
    documents over (publishing is bounded by half of it); `hold_lease` the same for `holding`,
    a read-modify-write that takes milliseconds, so a holder killed mid-way blocks the document
    for seconds, not a relay's lease.
    """

    def __init__(
        self,
        resource: MongoResource,
        bus: Bus,
        *,
        collections: Sequence[str] = (),
        relay: bool = True,
        poll_interval: float | None = None,
        lease: float = 30.0,
        hold_lease: float = 5.0,
        batch_size: int = 100,
        claims_collection: str = CLAIMS_COLLECTION,
    ) -> None:
        if isinstance(collections, str):
            raise ConfigurationError("MongoOutbox needs the list of collections holding events")
        self._default_poll = poll_interval is None
        if poll_interval is None:  # decided again at start, once the server is known
            poll_interval = self._default_poll_interval(resource)
        if lease <= 0 or hold_lease <= 0 or poll_interval <= 0 or batch_size < 1:
            raise ConfigurationError(
                "lease, hold_lease and poll_interval must be > 0, batch_size >= 1"
            )
        self.resource = resource
        self.bus = bus
        self.collections: tuple[str, ...] = ()
        self.relay_enabled = relay
        self.poll_interval = poll_interval
        self.lease = lease
        self.hold_lease = hold_lease
        self.batch_size = batch_size
        self.claims_collection = claims_collection
        self.owner = f"{bus.source}/{bus.instance_id}/{new_id()[:8]}"
        self.published = 0
        """Events this relay published and removed from their documents."""
        self.rounds = 0
        """Full relay rounds (scans) finished, whether they published, found nothing or failed.
        The round under way when this is read may have begun earlier; once it grew by two, the
        relay has looked at everything written before it was read (tests await that, not a
        sleep; `wake()` starts a full round at once)."""
        self._wake = asyncio.Event()
        self._scan_requested = True  # the first round scans
        self._next_scan = 0.0
        self._hinted: dict[str, dict[Any, None]] = {}
        """Per collection, the `_id`s this outbox wrote events to since the relay looked (an
        ordered set: the order they were written in)."""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._saturated = False
        for name in collections:
            self.add_collection(name)
        metrics = bus.metrics.registry
        self._m_published = metrics.counter(
            "msa_outbox_published_total", "Outbox events published by the relay.", ("topic",)
        )
        self._m_latency = metrics.histogram(
            "msa_outbox_commit_to_publish_seconds",
            "Time from the outbox row's creation to the broker's acknowledgement.",
        )

    @staticmethod
    def _default_poll_interval(resource: MongoResource) -> float:
        return INDEXED_POLL_INTERVAL if resource.indexed else UNINDEXED_POLL_INTERVAL

    def add_collection(self, name: str) -> None:
        """Relay the events of the documents of collection `name` too (before `start`)."""
        if name in self.collections:
            return
        if self._task is not None:
            raise ConfigurationError("add collections to the outbox before it starts")
        self.resource.add_indexes(name, [IndexSpec(PENDING_FIELD, name=PENDING_FIELD, sparse=True)])
        self.collections = (*self.collections, name)

    # -- writing events ---------------------------------------------------------------------------

    async def add(
        self,
        tx: DocumentChange,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
    ) -> Envelope[Any]:
        """Add an event to the document that `tx` changes, written with it; returns its envelope."""
        envelope = self.bus.envelope(data, key=key, type=type, subject=subject)
        await self.add_envelope(tx, topic, envelope)
        return envelope

    async def add_envelope(self, tx: DocumentChange, topic: str, envelope: Envelope[Any]) -> None:
        """Add an envelope built elsewhere to the document that `tx` changes."""
        if tx.collection.name not in self.collections:
            raise ConfigurationError(
                f"the outbox relays no events of collection {tx.collection.name!r}: "
                "add it to MongoOutbox(collections=...)"
            )
        entry = self.entry(topic, envelope)
        tx.push(OUTBOX_FIELD, entry)
        tx.set_min(PENDING_FIELD, entry["created_at"])
        name, doc_id = tx.collection.name, tx.id
        tx.after_commit(lambda: self._written(name, doc_id))

    def event(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
    ) -> Document:
        """An encoded outbox entry for `data` (an envelope of this bus); write it with `push`."""
        return self.entry(topic, self.bus.envelope(data, key=key, type=type, subject=subject))

    def entry(self, topic: str, envelope: Envelope[Any]) -> Document:
        """The outbox entry of an envelope built elsewhere."""
        record_key, value, headers = to_binary(envelope)
        return {
            "id": envelope.id,
            "topic": topic,
            "key": record_key,
            "headers": [{"name": name, "value": raw.decode()} for name, raw in headers],
            "value": value,
            "created_at": _now(),
        }

    def push(self, update: Mapping[str, Any], *entries: Document) -> Document:
        """`update` plus `$push` of the entries (in order) and the pending marker."""
        if not entries:
            return dict(update)
        merged = _with_operator(update, "$push", OUTBOX_FIELD, {"$each": list(entries)})
        return _with_operator(merged, "$min", PENDING_FIELD, min(e["created_at"] for e in entries))

    def attach(self, document: Mapping[str, Any], *entries: Document) -> Document:
        """A copy of a new `document` carrying the entries, for `insert_one`."""
        attached = dict(document)
        if entries:
            attached[OUTBOX_FIELD] = [*attached.get(OUTBOX_FIELD, ()), *entries]
            attached[PENDING_FIELD] = min(e["created_at"] for e in entries)
        return attached

    async def insert_one(
        self, collection: str, document: Mapping[str, Any], *entries: Document
    ) -> Any:
        """Insert `document` with `entries` and wake the relay; returns the inserted `_id`."""
        with translate():
            result = await self.resource.collection(collection).insert_one(
                self.attach(document, *entries)
            )
        if entries:
            self._written(collection, result.inserted_id)
        return result.inserted_id

    async def update_one(
        self,
        collection: str,
        filter: Mapping[str, Any],
        update: Mapping[str, Any],
        *entries: Document,
        upsert: bool = False,
    ) -> UpdateResult:
        """Apply `update` and the entries in one write; wakes the relay when it matched."""
        with translate():
            result = await self.resource.collection(collection).update_one(
                filter, self.push(update, *entries), upsert=upsert
            )
        if entries and (result.matched_count or result.upserted_id is not None):
            doc_id = result.upserted_id if result.upserted_id is not None else filter.get("_id")
            if doc_id is None:
                self.wake()  # which document is not known: a full round
            else:  # an operator such as `{"$in": [...]}` is a dict: `_written` scans for it
                self._written(collection, doc_id)
        return result

    def wake(self) -> None:
        """Start a full relay round now (after writing events by other means than this
        outbox's methods), instead of at the next poll."""
        self._scan_requested = True
        self._wake.set()

    def _written(self, collection: str, doc_id: Any) -> None:
        """Events were written to document `doc_id`: relay it at once (no scan)."""
        try:
            self._hinted.setdefault(collection, {})[doc_id] = None
        except TypeError:  # an unhashable `_id` (a document, an operator): a full round finds it
            self._scan_requested = True
        self._wake.set()

    async def pending(self) -> int:
        """Events written but not published yet, over the registered collections."""
        total = 0
        pipeline: list[Document] = [
            {"$match": {PENDING_FIELD: {"$exists": True}}},
            {"$unwind": f"${OUTBOX_FIELD}"},
            {"$count": "n"},
        ]
        with translate():
            for name in self.collections:
                rows = await _to_list(self.resource.collection(name).aggregate(pipeline))
                total += int(rows[0]["n"]) if rows else 0
        return total

    # -- the relay ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def holding(
        self, collection: str, doc_id: Any, *, wait: bool = True
    ) -> AsyncIterator[bool]:
        """Hold document `doc_id` of `collection` as a relay holds the documents it publishes
        from: until the block ends no relay removes entries from it, and no other holder
        holds it. For a read-modify-write of a document the relay also writes (FerretDB does
        not isolate updates: module docstring).

        Waits while another holds it (backing off), at most `lease` seconds, then raises
        `PersistenceError`; with `wait=False` the block gets False at once instead (and holds
        nothing). The hold lasts at most `hold_lease` seconds. Its end wakes the relay, which
        skipped the document meanwhile.
        """
        token = new_id()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.lease
        attempts = 0
        while not await self._claim(collection, [doc_id], token, lease=self.hold_lease):
            if not wait:
                yield False
                return
            attempts += 1
            if loop.time() >= give_up:
                raise PersistenceError(
                    f"document {doc_id!r} of {collection!r} was held by another for {self.lease}s"
                )
            await asyncio.sleep(HOLD_RETRY.delay(attempts))
        try:
            yield True
        finally:
            await self._release(collection, [doc_id], token)
            self._written(collection, doc_id)  # the relay skipped it meanwhile

    async def start(self) -> None:
        if self._default_poll:
            self.poll_interval = self._default_poll_interval(self.resource)
        if self.relay_enabled and self._task is None:
            if not self.collections:
                raise ConfigurationError("MongoOutbox has no collections to relay events from")
            self._stopping.clear()
            self._task = asyncio.create_task(self._relay(), name="mongo-outbox-relay")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        task, self._task = self._task, None
        await finish_task(task)

    async def _relay(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            if not self.bus.started:  # a Service starts its resources before its bus
                await self._pause(0.05)  # and stops them after it: nothing to publish with
                continue
            self._wake.clear()
            loop = asyncio.get_running_loop()
            scan = self._scan_requested or failures > 0 or loop.time() >= self._next_scan
            if scan:
                self._scan_requested = False
                self._next_scan = loop.time() + self.poll_interval
            try:
                await self.publish_once(scan=scan)
                failures = 0
            except MsaError as exc:  # database or broker trouble: keep the events, back off
                failures += 1
                log.warning("mongo outbox relay: %s; will retry", exc)
            except Exception:
                failures += 1
                log.exception("mongo outbox relay failed; retrying")
            if scan:
                self.rounds += 1
            if failures:
                await self._pause(RELAY_RETRY.delay(failures))
            elif not self._saturated:
                wait = max(0.0, self._next_scan - loop.time())
                if any(self._hinted.values()):  # held by another: retry once a hold lapses
                    wait = min(wait, self.hold_lease)
                await self._pause(wait, wake=True)

    async def _pause(self, seconds: float, *, wake: bool = False) -> None:
        waiters = [asyncio.ensure_future(self._stopping.wait())]
        if wake:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def publish_once(self, *, scan: bool = True) -> int:
        """One relay round over every collection; returns how many events it published. It
        relays the documents this outbox wrote events to, and with `scan` every document with
        the pending marker.

        Raises (after settling what was acknowledged and releasing its claims) when publishing
        or the database failed, so that the relay backs off.
        """
        published = 0
        failure: BaseException | None = None
        saturated = False
        for name in self.collections:
            try:
                count, full = await self._publish_collection(name, scan=scan)
            except MsaError as exc:
                failure = failure or exc
                continue
            published += count
            saturated = saturated or full
        self._saturated = saturated
        if failure is not None:
            raise failure
        return published

    async def _publish_collection(self, name: str, *, scan: bool = True) -> tuple[int, bool]:
        collection = self.resource.collection(name)
        hinted = self._hinted.get(name, {})
        ids = list(itertools.islice(hinted, self.batch_size))
        for doc_id in ids:
            del hinted[doc_id]
        full = bool(hinted)
        if scan and len(ids) < self.batch_size:
            with translate():
                candidates = (
                    await collection.find({PENDING_FIELD: {"$exists": True}}, {"_id": 1})
                    .sort(PENDING_FIELD, ASCENDING)
                    .limit(self.batch_size)
                    .to_list(None)
                )
            full = full or len(candidates) >= self.batch_size
            known = set(ids)
            ids.extend(c["_id"] for c in candidates if c["_id"] not in known)
        if not ids:
            return 0, full
        token = new_id()
        claimed = await self._claim(name, ids, token)
        taken = set(claimed)
        for doc_id in ids:  # held by a holder or another relay: try again at the next wake
            if doc_id not in taken:
                self._hinted.setdefault(name, {})[doc_id] = None
        if not claimed:
            return 0, full
        try:
            with translate():  # re-read: another relay may have published since the scan
                docs = [
                    doc
                    for doc in await collection.find(
                        {"_id": {"$in": claimed}}, {OUTBOX_FIELD: 1, PENDING_FIELD: 1}
                    ).to_list(None)
                    if OUTBOX_FIELD in doc or PENDING_FIELD in doc
                ]
            acknowledged, failure = await self._publish(docs)
            published = 0
            with translate():
                for doc in acknowledged:
                    published += await self._settle(collection, doc)
        finally:
            await self._release(name, claimed, token)
        if failure is not None:
            if isinstance(failure, MsaError):
                raise failure
            raise PublishError(f"outbox relay could not publish: {failure}") from failure
        return published, full

    async def _claim(
        self, name: str, ids: list[Any], token: str, *, lease: float | None = None
    ) -> list[Any]:
        """Claim the documents no other relay holds (for `lease`, else the relay's); returns
        their ids."""
        claims = self.resource.collection(self.claims_collection)
        now = _now()
        docs = [
            {
                "_id": {"collection": name, "id": doc_id},
                "owner": self.owner,
                "token": token,
                "until": now + timedelta(seconds=self.lease if lease is None else lease),
            }
            for doc_id in ids
        ]
        with translate():
            await claims.delete_many({"until": {"$lt": now}})  # leases of crashed relays
            try:
                await claims.insert_many(docs, ordered=False)
            except mongo_errors.BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                    raise
                taken = {e["index"] for e in errors}
                return [doc_id for n, doc_id in enumerate(ids) if n not in taken]
        return ids

    async def _release(self, name: str, ids: list[Any], token: str) -> None:
        try:
            with translate():
                await self.resource.collection(self.claims_collection).delete_many(
                    {"_id": {"$in": [{"collection": name, "id": i} for i in ids]}, "token": token}
                )
        except PersistenceError as exc:  # the claims expire after the lease anyway
            log.warning("mongo outbox relay: releasing claims failed (%s)", exc)

    async def _publish(self, docs: list[Document]) -> tuple[list[Document], BaseException | None]:
        """Send every document's entries in order; the documents fully acknowledged."""
        sent: list[tuple[Document, list[asyncio.Future[Any]]]] = []
        failure: BaseException | None = None
        acknowledged: list[Document] = []
        try:
            async with asyncio.timeout(self.lease / 2):
                for doc in docs:
                    futures: list[asyncio.Future[Any]] = []
                    try:
                        for entry in doc.get(OUTBOX_FIELD) or ():
                            headers = tuple(
                                (h["name"], h["value"].encode()) for h in entry["headers"]
                            )
                            futures.append(
                                await self.bus.publish_stored(
                                    entry["topic"],
                                    entry["value"],
                                    key=entry["key"],
                                    headers=headers,
                                )
                            )
                    except Exception as exc:  # the broker is down: stop sending this round
                        failure = exc
                        for future in futures:
                            future.cancel()
                        break
                    sent.append((doc, futures))
                for doc, futures in sent:
                    results = await asyncio.gather(*futures, return_exceptions=True)
                    errors = [r for r in results if isinstance(r, BaseException)]
                    if errors:
                        failure = failure or errors[0]
                    else:
                        acknowledged.append(doc)
        except TimeoutError as exc:
            if failure is None:
                failure = PublishError(
                    f"outbox relay: no broker acknowledgement within {self.lease / 2:.1f}s"
                )
                failure.__cause__ = exc
        return acknowledged, failure

    async def _settle(self, collection: AsyncCollection[Document], doc: Document) -> int:
        """Remove the published entries of one document; returns how many."""
        entries = doc.get(OUTBOX_FIELD) or []
        if not entries:  # nothing left (published by another relay): just drop the marker
            await collection.update_one(
                {"_id": doc["_id"], f"{OUTBOX_FIELD}.0": {"$exists": False}},
                {"$unset": {PENDING_FIELD: ""}},
            )
            return 0
        done = await collection.update_one(
            {"_id": doc["_id"], OUTBOX_FIELD: entries},
            {"$unset": {OUTBOX_FIELD: "", PENDING_FIELD: ""}},
        )
        if not done.matched_count:  # entries were added meanwhile: keep them and the marker
            await collection.update_one({"_id": doc["_id"]}, {"$pullAll": {OUTBOX_FIELD: entries}})
        now = _now()
        for entry in entries:
            self._m_published.labels(topic=entry["topic"]).inc()
            self._m_latency.observe(max(0.0, (now - _as_utc(entry["created_at"])).total_seconds()))
        self.published += len(entries)
        return len(entries)


class MongoInbox:
    """Processed message ids kept inside the documents their effects changed.

    Each document keeps the ids of the last `keep` messages applied to it (`group:id`), so the
    duplicate window is per document: a redelivery of a message older than the last `keep`
    applied to that same document is not recognised.
    """

    def __init__(self, resource: MongoResource, *, keep: int = 1000) -> None:
        if keep < 1:
            raise ConfigurationError("MongoInbox keep must be >= 1")
        self.resource = resource
        self.keep = keep

    @staticmethod
    def entry(message: Message[Any]) -> str:
        """What the inbox records for `message`: its consumer group and CloudEvents id."""
        return f"{message.group}:{message.envelope.id}"

    async def record(self, tx: DocumentChange, message: Message[Any]) -> bool:
        """Record `message` in the document that `tx` changes; False if the document (as `tx`
        read it) recorded it before. The change then applies only while it still has not (one
        message per change)."""
        entry = self.entry(message)
        if entry in (tx.document.get(INBOX_FIELD) or ()):
            return False
        tx.require(INBOX_FIELD, {"$ne": entry})
        tx.push(INBOX_FIELD, entry, keep=self.keep)
        if not tx.new:
            tx.after_commit(functools.partial(self.trim, tx.collection, tx.id))
        return True

    def guard(
        self, message: Message[Any], filter: Mapping[str, Any], update: Mapping[str, Any]
    ) -> tuple[Document, Document]:
        """`filter` and `update` that apply only if the document has not recorded `message`.

        After `update_one(*inbox.guard(...))` matched nothing, `is_duplicate` tells a duplicate
        from a document that does not exist (or no longer matches the rest of `filter`); on
        FerretDB call `trim` after a successful update.
        """
        entry = self.entry(message)
        if INBOX_FIELD in filter:
            raise ConfigurationError(f"the filter already tests {INBOX_FIELD!r}")
        guarded_filter: Document = {**filter, INBOX_FIELD: {"$ne": entry}}
        guarded_update = _with_operator(
            update, "$push", INBOX_FIELD, {"$each": [entry], "$slice": -self.keep}
        )
        return guarded_filter, guarded_update

    async def apply(
        self,
        collection: str | AsyncCollection[Document],
        doc_id: Any,
        message: Message[Any],
        update: Mapping[str, Any],
        *,
        upsert: bool = False,
    ) -> bool:
        """Apply `update` to document `doc_id` unless it recorded `message`; False: a duplicate.

        Raises `DocumentNotFound` when there is no such document (and `upsert` is False).
        """
        target = self._collection(collection)
        filter, guarded = self.guard(message, {"_id": doc_id}, update)
        for _ in range(3):
            try:
                with translate():
                    result = await target.update_one(filter, guarded, upsert=upsert)
            except DuplicateKey:
                # an upsert whose filter did not match an existing _id: a duplicate, or some
                # other unique index refused the new document
                if await self._recorded(target, doc_id, message):
                    return False
                raise
            if result.matched_count or result.upserted_id is not None:
                await self.trim(target, doc_id)
                return True
            if await self.is_duplicate(target, doc_id, message):
                return False
            # the document appeared between the update and the check: try again
        raise PersistenceError(f"inbox: document {doc_id!r} neither matched nor recorded")

    async def is_duplicate(
        self, collection: str | AsyncCollection[Document], doc_id: Any, message: Message[Any]
    ) -> bool:
        """Whether document `doc_id` recorded `message`; `DocumentNotFound` if it is missing."""
        target = self._collection(collection)
        with translate():
            doc = await target.find_one({"_id": doc_id}, {INBOX_FIELD: 1})
        if doc is None:
            raise DocumentNotFound(f"no document {doc_id!r} in {target.name!r}")
        return self.entry(message) in (doc.get(INBOX_FIELD) or ())

    async def trim(self, collection: str | AsyncCollection[Document], doc_id: Any) -> None:
        """Cut the document's inbox to the last `keep` ids (only needed on FerretDB).

        MongoDB applies the guard's `$slice` in the same update; FerretDB v1 ignores `$slice`,
        so the array is cut here in a second write.
        """
        if not self.resource.ferretdb:
            return
        target = self._collection(collection)
        with translate():
            doc = await target.find_one(
                {"_id": doc_id, f"{INBOX_FIELD}.{self.keep}": {"$exists": True}}, {INBOX_FIELD: 1}
            )
            if doc is not None:
                ids = doc[INBOX_FIELD]
                await target.update_one(
                    {"_id": doc_id, INBOX_FIELD: ids}, {"$set": {INBOX_FIELD: ids[-self.keep :]}}
                )

    async def _recorded(
        self, target: AsyncCollection[Document], doc_id: Any, message: Message[Any]
    ) -> bool:
        with contextlib.suppress(DocumentNotFound):
            return await self.is_duplicate(target, doc_id, message)
        return False

    def _collection(self, collection: str | AsyncCollection[Document]) -> AsyncCollection[Document]:
        return self.resource.collection(collection) if isinstance(collection, str) else collection
