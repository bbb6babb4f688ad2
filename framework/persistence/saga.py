"""Orchestrated sagas with their state persisted in PostgreSQL or MongoDB.

A saga is a business transaction across services that cannot share one database transaction:
the orders service reserves stock (inventory), charges the payment (payments) and approves the
order, and undoes what was done when a later step fails. The orchestrator keeps each saga's
state in the service's database, sends commands through the transactional outbox, takes replies
through the idempotent inbox, and makes every transition ONE local transaction: on PostgreSQL a
row of `msa_saga` (`framework.persistence.saga_postgres`), on MongoDB a document of `msa_sagas`
that carries its pending commands and the ids of the replies it took
(`framework.persistence.saga_mongo`). The orchestrator is the same on both: it takes the
database resource with its `Outbox` and `Inbox` (`framework.persistence.contracts`).

    class OrderData(BaseModel):                      # the saga's own data, stored as JSON
        order_id: str
        amount: Decimal
        payment_id: str | None = None

    def reserve_stock(order: OrderData) -> ReserveStock:        # commands: typed payloads
        return ReserveStock(order_id=order.order_id)

    def record_payment(order: OrderData, paid: PaymentCaptured) -> OrderData:
        return order.model_copy(update={"payment_id": paid.payment_id})

    ...   # release_stock, charge, refund, approve_order alike

    class PlaceOrderSaga(SagaDefinition[OrderData]):
        name = "place-order"
        steps = (
            Step("reserve-stock", topic="inventory.commands", send=reserve_stock,
                 on_reply={StockReserved: ok, StockRejected: fail},
                 compensate=release_stock, timeout=30),
            Step("charge-payment", topic="payments.commands", send=charge,
                 on_reply={PaymentCaptured: ok(record_payment), PaymentDeclined: fail},
                 compensate=refund, on_compensate_reply={PaymentRefunded: ok}, timeout=30),
            Step("approve", topic="orders.commands", send=approve_order),  # no reply awaited
        )

        def key(self, saga_id: str, data: OrderData) -> str:
            return data.order_id                     # one order's commands stay in order

        async def on_compensated(self, tx: Any, saga_id: str, data: OrderData) -> None:
            await tx.execute("update orders set status = 'cancelled' where id = $1", data.order_id)

    class Orders(Service):
        def __init__(self, settings: ServiceSettings | None = None) -> None:
            super().__init__(settings)
            self.db = self.use(PostgresResource(self.settings.env["POSTGRES_URL"]))
            self.outbox = self.use(PostgresOutbox(self.db, self.bus))
            self.inbox = self.use(PostgresInbox(self.db))
            self.sagas = self.use(SagaOrchestrator(self.db, self.outbox, self.inbox,
                                                   definitions=[PlaceOrderSaga]))
            self.sagas.subscribe(self.bus, ["inventory", "payments"])     # the reply topics

        async def place_order(self, order: OrderData) -> None:
            async with self.db.transaction() as tx:   # the order and its saga commit together
                await tx.execute("insert into orders (id, status) values ($1, 'new')",
                                 order.order_id)
                await self.sagas.start_saga(tx, PlaceOrderSaga, order, saga_id=order.order_id)

On MongoDB the same service `use`s a `MongoResource`, `MongoOutbox` and `MongoInbox` and hands
them to the orchestrator (see **Transactions** for what changes).

Name the step functions rather than writing lambdas: `Step` infers the data type from them, so
mypy checks each one against `OrderData` (a lambda's parameter is `Any`).

**Steps.** Each step sends one command (`send(data)` returns its payload) to its `topic` (or the
definition's `topic`) and, when it declares `on_reply`, waits for one of those reply types: `ok`
moves to the next step, `fail` compensates. `ok(update)` / `fail(update)` also change the saga's
data from the reply (`update(data, reply)` returns the new data, or None after changing it in
place). A step without `on_reply` is fire-and-forget: it is done once its command is enqueued.
When the last step is done the saga is COMPLETED.

**Compensation.** When a step fails, the `compensate` commands of the steps *before* it run in
reverse order (status COMPENSATING, then COMPENSATED). A compensation is fire-and-forget unless
its step declares `on_compensate_reply`; then the saga waits for that confirmation (within the
step's timeout, resending the compensation up to `compensation_attempts` times) before the next
one. A compensation that cannot be built, is refused (`fail`) or is never confirmed leaves the
saga FAILED: a person must look at it (`error` says why).

**Timeouts.** A step with a `timeout` must be answered in time. A background timer (started by
`start()`) claims sagas whose `deadline` passed and that no one else holds (`FOR UPDATE SKIP
LOCKED`; on MongoDB a claim), so every replica can run one, and treats the timeout as a failure
of the current step whose outcome is unknown: the command may have taken effect, so *that step's
own* compensation runs too, first. Compensations must therefore be idempotent and accept
"nothing to undo". On PostgreSQL deadlines are computed by the database clock, never by a
replica's; on MongoDB by the clock of the replica that moved the saga.

**Correlation.** Every command's envelope carries the saga id as its CloudEvents
`correlationid` (and as the `sagaid` extension, with `sagastep`). A participant that publishes its
reply from inside the handler of the command (with `Bus.publish` or its own outbox) carries that
correlation id forward without knowing about sagas: the bus does it (`Bus.envelope`). A reply
published elsewhere must set `correlationid` (or a `sagaid` extension, which wins) to the saga
id. Which step a reply answers is told by its type: a reply whose type the saga's current step
does not expect (a late one, for a step already decided) is ignored and noted in the history.
So give each step its own reply types.

**Transactions.** `start_saga(tx, ...)` runs inside the caller's transaction ("create the order
and start its saga" is atomic; a rollback leaves neither saga nor command). Each later transition
is one transaction: lock the saga row (`FOR UPDATE`), record the reply in the inbox (a
redelivered reply is a no-op), check the status and step, update the row (guarded by its
`version`), append to `msa_saga_history`, and enqueue the next command or compensation in the
outbox. State lives in the database only: an orchestrator started after a crash or a deploy
continues every saga where it stood. The `on_completed` / `on_compensated` / `on_failed` hooks
of a definition run inside the final transition's transaction (mark the order approved or
cancelled); if a hook raises, the transition rolls back and the reply is retried by the bus.
`send`, `compensate` and update functions must be pure: an exception there is not retried but
recorded, and fails the step (or, in a compensation, the saga).

On MongoDB (and FerretDB: no multi-document transactions) the saga's document is the
transaction: a transition holds it (`MongoOutbox.holding`, a claim that keeps the outbox relay
and other transitions off it), reads it, and writes state, history, the reply's id (inbox) and
the new commands (outbox entries) in ONE update guarded by the version it read. `tx` is that
`DocumentChange`: a hook keeps fields on the saga's document with `tx.set({...})` and emits
events with `await outbox.add(tx, ...)`, atomically with the transition; a write of its own to
another document is not atomic with it, so make it idempotent (it runs again when the
transition is retried). `start_saga` takes `tx=None` there: a saga starts in a document of its
own; start it with a deterministic `saga_id` (the order's id) and treat `DuplicateSaga` as
"started already" when the caller's own write and the start may be repeated.

Errors:

    MsaError
    └── SagaError                      a saga operation was refused
        ├── SagaNotFound(LookupError)  `get()` of an unknown saga id
        └── DuplicateSaga              `start_saga` with an id already in use
    ConfigurationError(ValueError)     a definition is malformed or not registered
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    TypeVar,
    get_args,
    get_origin,
)

import orjson

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message, Subscription
from framework.errors import ConfigurationError, PersistenceError
from framework.messages import decode_payload, encode_payload, new_id, type_name
from framework.persistence.contracts import Inbox, Outbox
from framework.persistence.saga_store import (
    DuplicateSaga,
    SagaChange,
    SagaError,
    SagaEvent,
    SagaNote,
    SagaNotFound,
    SagaStatus,
    SagaStore,
    StoredSaga,
)
from framework.resilience import Backoff
from framework.tasks import finish_task

if TYPE_CHECKING:
    from framework.persistence.mongo import MongoResource
    from framework.persistence.postgres import PostgresResource

__all__ = [
    "DuplicateSaga",
    "Outcome",
    "SagaChange",
    "SagaDefinition",
    "SagaError",
    "SagaEvent",
    "SagaNotFound",
    "SagaNote",
    "SagaOrchestrator",
    "SagaState",
    "SagaStatus",
    "SagaStore",
    "Step",
    "StoredSaga",
    "fail",
    "ok",
]

D = TypeVar("D")
E = TypeVar("E")
log = logging.getLogger("framework.persistence.saga")


# -- declaring sagas ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome(Generic[D]):
    """What a reply means: success (`ok`) or failure (`fail`), optionally updating the data.

    `ok` and `fail` are the two outcomes; call one with an update function to also take data
    from the reply: `ok(record_payment)` where `record_payment(data, reply)` returns the new
    data (or None after changing `data` in place).
    """

    succeeded: bool
    update: Callable[[D, Any], D | None] | None = None

    def __call__(self, update: Callable[[E, Any], E | None]) -> Outcome[E]:
        return Outcome(self.succeeded, update)


ok: Final[Outcome[Any]] = Outcome(True)
"""The reply means the step succeeded."""
fail: Final[Outcome[Any]] = Outcome(False)
"""The reply means the step failed: compensate the steps before it."""


@dataclass(frozen=True)
class Step(Generic[D]):
    """One step of a saga: a command, the replies that decide it, and how to undo it.

    - `send(data)` returns the command payload, sent to `topic` (default: the definition's);
    - `on_reply` maps reply payload types to `ok` / `fail`; empty means fire-and-forget;
    - `compensate(data)` returns the payload that undoes the step, sent to the same topic when a
      later step fails (or this one times out);
    - `on_compensate_reply`: wait for one of these replies to the compensation (empty: don't);
    - `timeout`: seconds to wait for a reply (and for a compensation's confirmation).
    """

    name: str
    _: KW_ONLY
    send: Callable[[D], Any]
    topic: str | None = None
    on_reply: Mapping[type[Any], Outcome[D]] = field(default_factory=dict)
    compensate: Callable[[D], Any] | None = None
    on_compensate_reply: Mapping[type[Any], Outcome[D]] = field(default_factory=dict)
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigurationError("a saga step needs a name")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigurationError(f"step {self.name!r}: timeout must be positive")
        if self.timeout is not None and not (self.on_reply or self.on_compensate_reply):
            raise ConfigurationError(
                f"step {self.name!r}: a timeout needs replies to wait for (on_reply)"
            )
        if self.on_compensate_reply and self.compensate is None:
            raise ConfigurationError(
                f"step {self.name!r}: on_compensate_reply without a compensate command"
            )
        for reply in (*self.on_reply, *self.on_compensate_reply):
            if not isinstance(reply, type):
                raise ConfigurationError(
                    f"step {self.name!r}: reply keys are payload classes, not {reply!r}"
                )

    @property
    def awaits_reply(self) -> bool:
        return bool(self.on_reply)

    def replies(self, compensating: bool) -> dict[str, tuple[type[Any], Outcome[D]]]:
        table = self.on_compensate_reply if compensating else self.on_reply
        return {type_name(cls): (cls, outcome) for cls, outcome in table.items()}


class SagaDefinition(Generic[D]):
    """A saga type: a `name`, ordered `steps`, and the type of its data (the class argument).

    Subclass it as `class PlaceOrderSaga(SagaDefinition[OrderData])`; the data type (a pydantic
    model or a dataclass) is taken from the argument, or from `data_type` when set. Override
    `key` to choose the partition key of the commands (default: the saga id), and the async
    `on_completed` / `on_compensated` / `on_failed` hooks to change local state in the final
    transition's transaction.
    """

    name: ClassVar[str] = ""
    steps: ClassVar[Sequence[Step[Any]]] = ()
    topic: ClassVar[str | None] = None
    """The command topic of steps that do not name their own."""
    data_type: ClassVar[Any] = None
    compensation_attempts: ClassVar[int] = 3
    """How often an unconfirmed compensation is sent before the saga is FAILED."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "data_type" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, SagaDefinition):
                args = get_args(base)
                if args and not isinstance(args[0], TypeVar):
                    cls.data_type = args[0]

    @classmethod
    def validate(cls) -> None:
        """Refuse a malformed definition with a `ConfigurationError` naming the problem."""
        where = f"saga {cls.__qualname__}"
        if not cls.name:
            raise ConfigurationError(f"{where}: set `name`")
        if cls.data_type is None:
            raise ConfigurationError(
                f"{where}: no data type; subclass SagaDefinition[YourData] or set data_type"
            )
        if not cls.steps:
            raise ConfigurationError(f"{where}: a saga needs at least one step")
        names = [step.name for step in cls.steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigurationError(f"{where}: step names used twice: {duplicates}")
        for step in cls.steps:
            if not isinstance(step, Step):
                raise ConfigurationError(f"{where}: {step!r} is not a Step")
            if (step.topic or cls.topic) is None:
                raise ConfigurationError(
                    f"{where}: step {step.name!r} has no topic (set Step(topic=...) or topic)"
                )
        if cls.compensation_attempts < 1:
            raise ConfigurationError(f"{where}: compensation_attempts must be at least 1")

    def key(self, saga_id: str, data: D) -> str:
        """The partition key of this saga's commands: one saga's commands stay in order."""
        return saga_id

    async def on_completed(self, tx: Any, saga_id: str, data: D) -> None:
        """Runs in the transaction that completes the saga."""

    async def on_compensated(self, tx: Any, saga_id: str, data: D) -> None:
        """Runs in the transaction that finishes compensating the saga."""

    async def on_failed(self, tx: Any, saga_id: str, data: D, error: str) -> None:
        """Runs in the transaction that marks the saga FAILED."""


# -- reading sagas --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SagaState(Generic[D]):
    """A saga as stored: status, position, data and history.

    `step` is the index of the step being run (RUNNING) or compensated (COMPENSATING);
    `len(steps)` once COMPLETED, -1 once COMPENSATED.
    """

    id: str
    type: str
    status: SagaStatus
    step: int
    step_name: str | None
    data: D
    version: int
    attempts: int
    failed_step: str | None
    error: str | None
    created: datetime
    updated: datetime
    deadline: datetime | None
    history: tuple[SagaEvent, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status.finished


# -- where sagas are kept -------------------------------------------------------------------------


def _store_for(db: Any, outbox: Outbox, inbox: Inbox) -> SagaStore:
    """The saga store of a database resource. A resource's module is imported once the resource
    exists, so looking it up in `sys.modules` imports neither database's driver needlessly."""
    postgres = sys.modules.get("framework.persistence.postgres")
    if postgres is not None and isinstance(db, postgres.PostgresResource):
        from framework.persistence.saga_postgres import PostgresSagaStore

        return PostgresSagaStore(db)
    mongo = sys.modules.get("framework.persistence.mongo")
    if mongo is not None and isinstance(db, mongo.MongoResource):
        from framework.persistence.saga_mongo import MongoSagaStore

        return MongoSagaStore(db, outbox, inbox)
    raise ConfigurationError(
        f"SagaOrchestrator keeps sagas in a PostgresResource or a MongoResource, "
        f"not in a {type(db).__qualname__}"
    )


# -- the orchestrator -----------------------------------------------------------------------------

TIMER_RETRY = Backoff(initial=0.4, maximum=5.0)
"""Between rounds of the timeout timer that failed on the database."""


class SagaOrchestrator:
    """Runs sagas: starts them, moves them on replies and timeouts, answers queries.

    A `Resource`: `use` it after the database resource, outbox and inbox it is given: a
    `PostgresResource` with a `PostgresOutbox` and `PostgresInbox`, or a `MongoResource` with a
    `MongoOutbox` and `MongoInbox`. `start()` starts the timeout timer (unless
    `run_timers=False`); `stop()` stops it. Replies reach `handle_reply`, through `subscribe` or
    a service's own `@handles` handler (see the module docstring).
    """

    def __init__(
        self,
        db: PostgresResource | MongoResource,
        outbox: Outbox,
        inbox: Inbox,
        definitions: Iterable[SagaDefinition[Any] | type[SagaDefinition[Any]]] = (),
        *,
        run_timers: bool = True,
        timer_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.inbox = inbox
        self.run_timers = run_timers
        self.timer_interval = timer_interval
        self._definitions: dict[str, SagaDefinition[Any]] = {}
        for definition in definitions:
            self._register(definition)
        self.store = _store_for(db, outbox, inbox)
        self._stopping = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        registry = outbox.bus.metrics.registry
        self._m_finished = registry.counter(
            "msa_sagas_finished_total", "Sagas that reached a final status.", ("saga", "status")
        )
        self._m_timeouts = registry.counter(
            "msa_saga_timeouts_total", "Saga steps or compensations that timed out.", ("saga",)
        )

    def _register(self, definition: SagaDefinition[Any] | type[SagaDefinition[Any]]) -> None:
        instance = definition() if isinstance(definition, type) else definition
        type(instance).validate()
        known = self._definitions.get(instance.name)
        if known is not None and type(known) is not type(instance):
            raise ConfigurationError(
                f"two saga definitions are named {instance.name!r}: "
                f"{type(known).__qualname__} and {type(instance).__qualname__}"
            )
        self._definitions[instance.name] = instance

    @property
    def definitions(self) -> Mapping[str, SagaDefinition[Any]]:
        return dict(self._definitions)

    def definition(
        self, which: SagaDefinition[D] | type[SagaDefinition[D]] | str
    ) -> SagaDefinition[D]:
        """The registered definition for a name, class or instance."""
        name = which if isinstance(which, str) else which.name
        found = self._definitions.get(name)
        if found is None or (not isinstance(which, str) and not isinstance(found, _cls(which))):
            raise ConfigurationError(
                f"saga {name!r} is not registered with this orchestrator "
                f"(known: {sorted(self._definitions)})"
            )
        return found

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.run_timers and self._timer is None:
            self._stopping.clear()
            self._timer = asyncio.create_task(self._timer_loop(), name="saga-timer")

    async def stop(self) -> None:
        self._stopping.set()
        task, self._timer = self._timer, None
        await finish_task(task)

    # -- replies --------------------------------------------------------------------------------

    def handlers(self) -> dict[str, HandlerSpec]:
        """Handlers of every reply type of the registered sagas, for `Bus.subscribe`."""
        spec = HandlerSpec(payload_type=bytes, call=self._on_message, name="saga-reply")
        return {
            type_name(cls): spec
            for definition in self._definitions.values()
            for step in definition.steps
            for cls in (*step.on_reply, *step.on_compensate_reply)
        }

    def subscribe(
        self, bus: Bus, topics: Sequence[str], *, group: str | None = None, **options: Any
    ) -> Subscription:
        """Subscribe (before the bus starts) to the topics the replies arrive on.

        The group defaults to `<source>.sagas`: a group of its own, because two subscriptions
        of one group on one topic would split its partitions, each ignoring the other's types.
        `options` are further `ConsumerOptions` fields. Reply topics are usually the
        participants' event topics, which carry more than replies, so types the sagas do not
        wait for are skipped (`unhandled="skip"`) unless `options` say otherwise.
        """
        options.setdefault("unhandled", "skip")
        return bus.subscribe(
            topics,
            self.handlers(),
            ConsumerOptions(group=group or f"{bus.source}.sagas", **options),
        )

    async def _on_message(self, message: Message[Any]) -> None:
        await self.handle_reply(message)

    async def handle_reply(self, message: Message[Any]) -> bool:
        """Take a reply; True when it moved its saga, False when it was not for a saga, a
        duplicate, or late (the saga's current step does not expect its type)."""
        envelope = message.envelope
        saga_id = envelope.extensions.get("sagaid") or envelope.correlationid
        if not saga_id:
            return False
        async with self.store.locked(saga_id) as held:
            if held is None:
                return False
            tx, stored = held
            definition = self._definitions.get(stored.type)
            if definition is None:
                log.warning("saga %s: reply for unknown saga type %r", saga_id, stored.type)
                return False
            if not await self.inbox.record(tx, message):
                log.debug("saga %s: duplicate reply %s ignored", saga_id, envelope.id)
                return False
            run = _Transition.load(self, tx, definition, stored)
            moved = await run.on_reply(message)
            await run.save()
        return moved

    # -- starting -------------------------------------------------------------------------------

    async def start_saga(
        self,
        tx: Any | None,
        definition: SagaDefinition[D] | type[SagaDefinition[D]] | str,
        data: D,
        *,
        saga_id: str | None = None,
    ) -> str:
        """Start a saga inside transaction `tx` (or a new one when None); returns its id.

        Its first command is enqueued in the same transaction, so it is sent if and only if
        the transaction commits. Raises `DuplicateSaga` for an id in use (the transaction
        stays usable). On MongoDB `tx` must be None: the saga's document is its transaction.
        """
        found = self.definition(definition)
        data_type = found.data_type
        if isinstance(data_type, type) and not isinstance(data, data_type):
            raise ConfigurationError(
                f"saga {found.name!r} takes {data_type.__qualname__} data, "
                f"not {type(data).__qualname__}"
            )
        saga_id = saga_id or new_id()
        stored = StoredSaga(
            id=saga_id,
            type=found.name,
            status=SagaStatus.RUNNING,
            step=0,
            data=encode_payload(data),
            version=0,
        )
        async with self.store.creating(tx, stored) as saga_tx:
            run = _Transition(self, saga_tx, found, id=saga_id, data=data, version=0)
            run.note("started", detail=found.name)
            await run.run_from(0)
            await run.save()
        return saga_id

    # -- timeouts -------------------------------------------------------------------------------

    async def run_timeouts(self) -> int:
        """Handle every saga whose deadline passed, one transaction each; returns how many."""
        handled = 0
        names = list(self._definitions)
        while not self._stopping.is_set():
            async with self.store.expired(names) as held:
                if held is None:
                    return handled
                tx, stored = held
                run = _Transition.load(self, tx, self._definitions[stored.type], stored)
                await run.on_timeout()
                await run.save()
            handled += 1
        return handled

    async def _timer_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            wait = self.timer_interval
            try:
                await self.run_timeouts()
                until = await self.store.seconds_to_next_deadline(list(self._definitions))
                if until is not None:
                    wait = min(wait, max(0.01, until))
                failures = 0
            except PersistenceError as exc:
                failures += 1
                wait = TIMER_RETRY.delay(failures)
                log.warning("saga timer: database problem (%s); retrying in %.1fs", exc, wait)
            except Exception:
                log.exception("saga timer failed; continuing")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopping.wait()

    # -- queries --------------------------------------------------------------------------------

    async def get(self, saga_id: str) -> SagaState[Any]:
        """The saga's current state and history; `SagaNotFound` for an unknown id."""
        stored = await self.store.load(saga_id)
        if stored is None:
            raise SagaNotFound(f"no saga with id {saga_id!r}")
        assert stored.created is not None  # `load` reads the times
        assert stored.updated is not None
        definition = self._definitions.get(stored.type)
        step_name = None
        if definition is not None and 0 <= stored.step < len(definition.steps):
            step_name = definition.steps[stored.step].name
        data = stored.data
        return SagaState(
            id=stored.id,
            type=stored.type,
            status=stored.status,
            step=stored.step,
            step_name=step_name,
            data=decode_payload(data, definition.data_type) if definition else orjson.loads(data),
            version=stored.version,
            attempts=stored.attempts,
            failed_step=stored.failed_step,
            error=stored.error,
            created=stored.created,
            updated=stored.updated,
            deadline=stored.deadline,
            history=stored.history,
        )


def _cls(which: SagaDefinition[Any] | type[SagaDefinition[Any]]) -> type[SagaDefinition[Any]]:
    return which if isinstance(which, type) else type(which)


class _Transition:
    """One saga's state while one transaction moves it. Nothing is visible until `save()`."""

    def __init__(
        self,
        orchestrator: SagaOrchestrator,
        tx: Any,
        definition: SagaDefinition[Any],
        *,
        id: str,
        data: Any,
        version: int,
        status: SagaStatus = SagaStatus.RUNNING,
        step: int = 0,
        attempts: int = 0,
        failed_step: str | None = None,
        error: str | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.tx = tx
        self.definition = definition
        self.id = id
        self.data = data
        self.version = version
        self.status = status
        self.step = step
        self.attempts = attempts
        self.failed_step = failed_step
        self.error = error
        self.timeout: float | None = None
        self.moved = False
        self.notes: list[SagaNote] = []

    @classmethod
    def load(
        cls,
        orchestrator: SagaOrchestrator,
        tx: Any,
        definition: SagaDefinition[Any],
        stored: StoredSaga,
    ) -> _Transition:
        return cls(
            orchestrator,
            tx,
            definition,
            id=stored.id,
            data=decode_payload(stored.data, definition.data_type),
            version=stored.version,
            status=stored.status,
            step=stored.step,
            attempts=stored.attempts,
            failed_step=stored.failed_step,
            error=stored.error,
        )

    @property
    def steps(self) -> Sequence[Step[Any]]:
        return self.definition.steps

    def note(
        self,
        event: str,
        *,
        step: str | None = None,
        message_type: str | None = None,
        message_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.notes.append(
            SagaNote(event, self.status.value, step, message_type, message_id, detail)
        )

    async def save(self) -> None:
        change = SagaChange(
            id=self.id,
            version=self.version,
            moved=self.moved,
            status=self.status,
            step=self.step,
            data=encode_payload(self.data),
            attempts=self.attempts,
            failed_step=self.failed_step,
            error=self.error,
            timeout=self.timeout,
            notes=tuple(self.notes),
        )
        await self.orchestrator.store.save(self.tx, change)
        if self.moved and self.status.finished:
            self.orchestrator._m_finished.labels(
                saga=self.definition.name, status=self.status.value
            ).inc()
            log.info("saga %s (%s) %s", self.id, self.definition.name, self.status.value)

    # -- moving forward -------------------------------------------------------------------------

    async def run_from(self, index: int) -> None:
        """Send step `index`'s command, and the next ones' while no reply is awaited."""
        self.moved = True
        for position in range(index, len(self.steps)):
            step = self.steps[position]
            self.step = position
            self.status = SagaStatus.RUNNING
            if not await self.send(step, compensation=False):
                self.failed_step = step.name
                await self.compensate_from(position - 1)
                return
            if step.awaits_reply:
                self.timeout = step.timeout
                return
        self.status, self.step, self.timeout = SagaStatus.COMPLETED, len(self.steps), None
        self.note("completed")
        await self.definition.on_completed(self.tx, self.id, self.data)

    async def compensate_from(self, index: int) -> None:
        """Send the compensations of steps `index`, `index - 1`, ... 0, in that order."""
        self.moved = True
        self.status, self.attempts, self.timeout = SagaStatus.COMPENSATING, 0, None
        for position in range(index, -1, -1):
            step = self.steps[position]
            if step.compensate is None:
                continue
            self.step = position
            if not await self.send(step, compensation=True):
                await self.give_up(f"compensation of {step.name!r} could not be sent")
                return
            if step.on_compensate_reply:
                self.attempts, self.timeout = 1, step.timeout
                return
        self.status, self.step, self.timeout = SagaStatus.COMPENSATED, -1, None
        self.note("compensated")
        await self.definition.on_compensated(self.tx, self.id, self.data)

    async def give_up(self, error: str) -> None:
        self.moved = True
        self.status, self.timeout, self.error = SagaStatus.FAILED, None, error
        self.note("failed", detail=error)
        log.error("saga %s (%s) FAILED: %s", self.id, self.definition.name, error)
        await self.definition.on_failed(self.tx, self.id, self.data, error)

    async def send(self, step: Step[Any], *, compensation: bool) -> bool:
        """Enqueue the step's command (or compensation) in the outbox; False if it could not
        be built (the error is noted)."""
        build = step.compensate if compensation else step.send
        assert build is not None
        try:
            payload = build(self.data)
            key = self.definition.key(self.id, self.data)
        except Exception as exc:
            self.fail_with(step, "compensation" if compensation else "command", exc)
            return False
        topic = step.topic or self.definition.topic
        assert topic is not None  # SagaDefinition.validate
        bus = self.orchestrator.outbox.bus
        envelope = bus.envelope(
            payload, key=key, extensions={"sagaid": self.id, "sagastep": step.name}
        )
        envelope.correlationid = self.id
        await self.orchestrator.outbox.add_envelope(self.tx, topic, envelope)
        self.note(
            "compensation-sent" if compensation else "command-sent",
            step=step.name,
            message_type=envelope.type,
            message_id=envelope.id,
            detail=topic,
        )
        return True

    def fail_with(self, step: Step[Any], what: str, exc: Exception) -> None:
        self.error = f"{step.name}: {what} failed: {type(exc).__name__}: {exc}"
        self.note("error", step=step.name, detail=self.error)
        log.warning("saga %s (%s): %s", self.id, self.definition.name, self.error)

    # -- replies and timeouts -------------------------------------------------------------------

    async def on_reply(self, message: Message[Any]) -> bool:
        envelope = message.envelope
        compensating = self.status is SagaStatus.COMPENSATING
        step = self.steps[self.step] if 0 <= self.step < len(self.steps) else None
        expected = step.replies(compensating) if step is not None else {}
        match = expected.get(envelope.type) if not self.status.finished else None
        if step is None or match is None:
            self.note(
                "ignored",
                step=step.name if step is not None else None,
                message_type=envelope.type,
                message_id=envelope.id,
                detail=f"not expected while {self.status.value}",
            )
            return False
        reply_type, outcome = match
        reply = _decode(envelope.data, reply_type)
        updated = self.apply(step, outcome, reply)
        if compensating:
            event = "compensation-ok" if outcome.succeeded else "compensation-refused"
        elif outcome.succeeded:
            event = "reply-ok"
        else:
            event, self.status = "reply-failed", SagaStatus.COMPENSATING
        self.note(event, step=step.name, message_type=envelope.type, message_id=envelope.id)
        if compensating:
            if outcome.succeeded:
                await self.compensate_from(self.step - 1)
            else:
                await self.give_up(f"compensation of {step.name!r} refused: {envelope.type}")
        elif not outcome.succeeded:
            self.failed_step, self.error = step.name, f"{step.name}: {envelope.type}"
            await self.compensate_from(self.step - 1)
        elif not updated:  # the step took effect but its result cannot be taken: undo it too
            self.failed_step = step.name
            await self.compensate_from(self.step)
        else:
            await self.run_from(self.step + 1)
        return True

    def apply(self, step: Step[Any], outcome: Outcome[Any], reply: Any) -> bool:
        if outcome.update is None:
            return True
        try:
            result = outcome.update(self.data, reply)
        except Exception as exc:
            self.fail_with(step, "update from the reply", exc)
            return False
        if result is not None:
            self.data = result
        return True

    async def on_timeout(self) -> None:
        step = self.steps[self.step]
        self.orchestrator._m_timeouts.labels(saga=self.definition.name).inc()
        if self.status is SagaStatus.RUNNING:
            self.failed_step = step.name
            self.error = f"{step.name}: no reply within {step.timeout}s"
            self.status = SagaStatus.COMPENSATING
            self.note("timed-out", step=step.name, detail=self.error)
            await self.compensate_from(self.step)  # the command may have taken effect
            return
        self.note("compensation-timed-out", step=step.name, detail=f"attempt {self.attempts}")
        if self.attempts >= self.definition.compensation_attempts:
            await self.give_up(
                f"compensation of {step.name!r} not confirmed after {self.attempts} attempt(s)"
            )
            return
        self.moved = True
        if not await self.send(step, compensation=True):
            await self.give_up(f"compensation of {step.name!r} could not be sent")
            return
        self.attempts += 1
        self.timeout = step.timeout


def _decode(data: Any, cls: type[Any]) -> Any:
    """A reply's payload as `cls`, whether the subscription left it raw or decoded it."""
    if isinstance(data, cls):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return decode_payload(bytes(data), cls)
    return decode_payload(encode_payload(data), cls)
