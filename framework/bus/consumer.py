"""Consuming: ordered concurrency, at-least-once commits, retries and dead letters.

One `Subscription` is one consumer-group member on one transport. It fetches records, and:

**Ordered concurrency.** Records are split into *lanes*: by default one lane per (partition, key),
so one key is handled strictly in order while different keys, even inside one partition, run
concurrently up to `ConsumerOptions.concurrency` handlers at once (the approach of Confluent's
Parallel Consumer). `ordering="partition"` makes one lane per partition; `ordering="none"` one lane
per record. Keyless records share their partition's lane in `"key"` mode.

**At-least-once.** Each partition tracks the offsets it fetched; the committed offset is the lowest
one not yet done, so a crash never skips a record whose handler had not finished. Commits happen
every `commit_interval` seconds, on rebalance (for the partitions being revoked) and at stop.

**Retries.** A handler that raises is retried with exponential backoff and jitter
(`RetryPolicy`), up to `max_attempts`; then the record goes to the dead-letter topic. Two modes:

- `retry_mode="in_place"` (default): the record's lane waits and retries. Other keys keep flowing;
  the same key waits, so per-key order holds, which is what keyed aggregates (an order's events)
  need. The partition's committed offset stays below the record until it is resolved.
- `retry_mode="retry_topic"`: the record is re-published to `<topic>.retry.<group>` with the
  attempt count and a not-before time in headers, and the original is committed at once. Nothing
  waits, but later records of the same key may overtake the retried one. Choose it for
  independent records (notifications, analytics). The retry topic is per group so that one
  group's retries never reach another group.

**Unhandled types are never silent.** A record whose CloudEvents `type` no handler of the
subscription takes (a payload class without `@message_type`, a handler annotated with the wrong
model, another producer's new event) is, by `ConsumerOptions.unhandled`:

- `"dead-letter"` (default): published to the dead-letter topic with error type `unhandled-type`
  and a warning naming the type and the types the handlers take;
- `"skip"`: committed and dropped with a warning (once per type; later ones at debug level), for
  topics that carry more types than this group wants;
- `"fail"`: not committed; the subscription stops fetching and the service reports not ready
  (`/ready` 503), so an orchestrator restarts it and nothing is lost while someone looks.

Every such record counts in `msa_messages_in_total{outcome="unhandled"}`.

**Dead letters.** A payload that fails validation, an envelope that cannot be decoded, a
`Reject` from the handler, or a record out of attempts is published to `<topic>.dlq` with its
original key, value and headers, plus `msa-dlq-*` headers: error type, error message, attempts,
original topic/partition/offset, group and time. `msa dlq replay` publishes them back. Once the
transport acknowledged a dead letter, the bus tells its `on_dead_letter` listeners (the testing
kit's `ServiceHarness.dead_letters` is one); a record refused before any handler ran (it cannot be
decoded, fails validation, or no handler takes its type) is told to `on_rejected` listeners.

**Attempts and context.** Each attempt gets a `Message` of its own (`attempt` is 1, 2, 3, ...;
nothing mutates a message a middleware may have kept). All attempts of one message share its
trace id: that of its `traceparent`, or of one new trace when it has none; each attempt is a
span of its own. The consumer's own lines about a message (a retry, a dead letter, an unhandled
type) are logged inside the message's correlation id and trace, like its handler's lines, and
every task of a subscription runs as its service (`current_service`), so each line says which
service wrote it.

**Requests.** A record whose envelope has a `replyto` extension is a request: the handler's
return value is published to that topic as the reply; a failure is replied as an error at once
(the caller is waiting with a timeout, so retrying past it would help nobody).

**Graceful stop.** `stop(grace)` stops fetching, lets handlers already running finish within
`grace` seconds, abandons records not started (they are redelivered), commits and leaves.

**Pausing.** `pause()` stops fetching without leaving the group (the transport's partition
pause, renewed after every rebalance); `resume()` goes on from where it stopped. Records already
fetched are still handled. `framework.faults` pauses a service's subscriptions this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Generic, Literal, Protocol, TypeVar

from framework.bus.metrics import BusMetrics
from framework.errors import (
    CommitError,
    ConfigurationError,
    DecodeError,
    MessageError,
    MsaError,
    NotStartedError,
    Reject,
    RetryLater,
    TransportError,
    UnknownMessageType,
)
from framework.messages import CE_PREFIX, Envelope, decode_payload, from_binary
from framework.observability.metrics import CounterChild, HistogramChild
from framework.observability.tracing import (
    TraceContext,
    use_correlation_id,
    use_service,
    use_trace,
)
from framework.resilience import Backoff
from framework.tasks import finish_task
from framework.types import Headers, Record, RecordMetadata, TopicPartition, TopicSpec, Transport

__all__ = [
    "UNHANDLED_TYPE",
    "ConsumerOptions",
    "HandlerSpec",
    "Message",
    "RejectedRecord",
    "RetryPolicy",
    "Subscription",
    "SubscriptionBus",
    "Unhandled",
]

T = TypeVar("T")
log = logging.getLogger("framework.bus")

DLQ_PREFIX = "msa-dlq-"
RETRY_ATTEMPT = "msa-retry-attempt"
RETRY_NOT_BEFORE = "msa-retry-not-before"
RETRY_ORIGIN = "msa-retry-original-"
_TRACEPARENT_HEADER = CE_PREFIX + "traceparent"
FETCH_BACKOFF = Backoff(initial=0.2, maximum=5.0)
"""Between fetches that failed (the broker is away): the group waits, then asks again."""
PUBLISH_BACKOFF = Backoff(initial=0.4, maximum=10.0)
"""Between attempts to publish a dead letter or a retry record; the offset waits for it."""
UNHANDLED_TYPE = "unhandled-type"
"""The `msa-dlq-error-type` of a record whose type no handler of its subscription takes."""

Unhandled = Literal["dead-letter", "skip", "fail"]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff: `initial * multiplier**(attempt-1)`, capped, with +-jitter."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    multiplier: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 0.1

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, delay)


@dataclass(frozen=True, kw_only=True)
class ConsumerOptions:
    """How one subscription consumes. Every field has a production-sensible default."""

    group: str
    concurrency: int = 16
    ordering: Literal["key", "partition", "none"] = "key"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_mode: Literal["in_place", "retry_topic"] = "in_place"
    unhandled: Unhandled = "dead-letter"
    dead_letter: bool = True
    start_from: Literal["earliest", "latest"] = "earliest"
    max_poll_records: int = 500
    max_buffered: int = 2000
    commit_interval: float = 0.2
    fetch_timeout: float = 0.2
    revoke_grace: float = 10.0
    """How long a rebalance waits for the handlers running on the partitions it takes away
    before committing them (those still running then are redelivered to the new owner)."""

    def dlq_topic(self, topic: str) -> str:
        return f"{topic}.dlq"

    def retry_topic(self, topic: str) -> str:
        return f"{topic}.retry.{self.group}"


@dataclass(slots=True, kw_only=True)
class Message(Generic[T]):
    """What a handler receives: the typed envelope plus where and how often it was delivered.

    One per attempt: a retry is a new `Message` with the next `attempt`, so one kept by a
    middleware (or the testing kit) still tells which attempt it was.
    """

    envelope: Envelope[T]
    record: Record
    attempt: int
    group: str
    handler: str = ""
    """The name of the handler it is delivered to (for a service's handler, its method)."""

    @property
    def data(self) -> T:
        return self.envelope.data

    @property
    def key(self) -> str | None:
        return self.envelope.partitionkey

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def reply_to(self) -> str | None:
        return self.envelope.extensions.get("replyto")


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A handler for one CloudEvents type: its payload class and the coroutine to call."""

    payload_type: Any
    call: Callable[[Message[Any]], Awaitable[Any]]
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedRecord:
    """A record refused before any handler ran, and why (`error`):

    - `DecodeError`: it is not a CloudEvent the bus can read (`envelope` is None);
    - `PayloadValidationError`: its data does not validate as the handler's payload type;
    - `UnknownMessageType`: no handler of the subscription takes its type.

    What happens to it next is the subscription's choice (a dead letter, or for an unhandled type
    whatever `ConsumerOptions.unhandled` says); `Bus.on_rejected` listeners hear of it either way.
    """

    record: Record
    envelope: Envelope[bytes] | None
    error: MessageError
    group: str


class _PartitionState:
    """Offsets fetched but not done yet, in fetch order; what may be committed."""

    __slots__ = ("closing", "committed", "done", "next_offset", "pending", "revoked", "running")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.done: set[int] = set()
        self.next_offset: int | None = None
        self.committed: int | None = None
        self.revoked = False
        self.closing = False
        """Being revoked: no record of it starts; the running ones finish and are committed."""
        self.running = 0
        """Records of it being handled by a worker now."""

    def track(self, offset: int) -> None:
        self.pending.append(offset)
        self.next_offset = offset + 1

    def finish(self, offset: int) -> None:
        pending = self.pending
        if pending and pending[0] == offset:
            pending.popleft()
            done = self.done
            while pending and pending[0] in done:
                done.remove(pending.popleft())
        else:
            self.done.add(offset)

    def committable(self) -> int | None:
        offset = self.pending[0] if self.pending else self.next_offset
        return None if offset is None or offset == self.committed else offset


_Item = tuple[_PartitionState, Record]
_STOP = object()


@dataclass(frozen=True, slots=True)
class _Deferred:
    """A record that must wait `delay` seconds, then `resume()` to reach its outcome."""

    delay: float
    resume: Callable[[], Awaitable[bool | _Deferred]]


class SubscriptionBus(Protocol):
    """What a `Subscription` needs of the bus that made it (`framework.bus.Bus` is the one);
    a protocol, so that this module does not import the bus module, which imports it."""

    @property
    def transport(self) -> Transport: ...

    @property
    def source(self) -> str:
        """The service the subscription's work runs as (its log lines name it)."""

    @property
    def metrics(self) -> BusMetrics: ...

    async def dispatch(
        self, handler: HandlerSpec, message: Message[Any], *, trace: TraceContext | None = None
    ) -> Any:
        """Run `handler` on `message` through the consume middleware, in its context."""

    async def reply(self, message: Message[Any], result: Any) -> None: ...

    async def reply_error(self, message: Message[Any], error: BaseException) -> None: ...

    async def announce_dead_letter(self, record: Record) -> None: ...

    async def announce_rejected(self, rejected: RejectedRecord) -> None: ...


class Subscription:
    """A running consumer-group member. Created and started by `Bus.subscribe`."""

    def __init__(
        self,
        bus: SubscriptionBus,
        topics: Sequence[str],
        handlers: Mapping[str, HandlerSpec],
        options: ConsumerOptions,
    ) -> None:
        self.bus = bus
        self.topics = tuple(topics)
        self.handlers = dict(handlers)
        self._types_taken = ", ".join(repr(t) for t in sorted(self.handlers)) or "none"
        """The handlers' types, for the message about a record none of them takes."""
        self.options = options
        self.group = options.group
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._lanes: dict[object, deque[_Item]] = {}
        self._ready: asyncio.Queue[object] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(options.concurrency)
        self._buffered = 0
        self._space = asyncio.Event()
        self._stopping = asyncio.Event()
        self._draining = False
        self._aborting = False
        self._settled = asyncio.Event()  # a worker finished a record (on_revoked waits)
        self._fetch_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._retry_origin = {options.retry_topic(t): t for t in self.topics}
        self._consumer: Any = None
        metrics = bus.metrics
        self._m_in = metrics.messages_in
        self._m_latency = metrics.handler_seconds
        self._m_retries = metrics.retries
        self._m_dlq = metrics.dead_letters
        self._ok_children: dict[tuple[str, str], tuple[CounterChild, HistogramChild]] = {}
        self._skipped_types: set[str] = set()
        self._isolated = False
        self._floors: dict[TopicPartition, int] = {}
        """Isolated: each partition's end when it started; the records below are not ours."""
        self.failure: UnknownMessageType | None = None
        """Set when `unhandled="fail"` stopped this subscription (the service is not ready)."""
        self._paused = False

    # -- lifecycle ------------------------------------------------------------------------------

    def isolate(self, group: str) -> None:
        """Consume as `group`, a consumer group of this instance's own, from the end of the
        topics as they are when it starts: the records already there belong to the groups that
        were consuming them (they are passed over and committed, not handled). Before start.

        The testing kit isolates a service's groups on a real broker; see `Bus.isolate_groups`.
        """
        if self._consumer is not None:
            raise ConfigurationError("a running subscription cannot change its group")
        self.options = replace(self.options, group=group)
        self.group = group
        self._retry_origin = {self.options.retry_topic(t): t for t in self.topics}
        self._isolated = True

    def all_topics(self) -> list[str]:
        topics = list(self.topics)
        if self.options.retry_mode == "retry_topic":
            topics += [self.options.retry_topic(t) for t in self.topics]
        return topics

    async def start(self) -> None:
        with use_service(self.bus.source):  # the tasks made here keep it: their lines name it
            await self._start()

    async def _start(self) -> None:
        transport = self.bus.transport
        declared = self.all_topics()
        if self.options.dead_letter:
            declared += [self.options.dlq_topic(t) for t in self.topics]
        await transport.declare([TopicSpec(name=name) for name in declared])
        self._consumer = transport.consumer(
            self.all_topics(),
            group=self.group,
            listener=self,
            start_from=self.options.start_from,
            max_poll_records=self.options.max_poll_records,
        )
        await self._consumer.start()
        if self._isolated:
            partitions = [
                TopicPartition(topic, partition)
                for topic in self.all_topics()
                for partition in range(await transport.partitions_for(topic))
            ]
            self._floors = dict(await self._consumer.end_offsets(partitions))
        self._workers = [
            asyncio.create_task(self._work(), name=f"worker:{self.group}:{n}")
            for n in range(self.options.concurrency)
        ]
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name=f"fetch:{self.group}")
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"commit:{self.group}")

    async def stop(self, grace: float = 30.0) -> None:
        """Stop fetching, finish running handlers within `grace`, commit, leave the group."""
        if self._consumer is None:
            return
        with use_service(self.bus.source):
            await self._stop(grace)

    async def _stop(self, grace: float) -> None:
        self._stopping.set()
        self._draining = True
        self._space.set()
        for task in (self._fetch_task, self._commit_task):
            await finish_task(task)
        for _ in self._workers:
            self._ready.put_nowait(_STOP)  # after the queued lanes, which draining drops
        running = {*self._workers, *self._retry_tasks}
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning(
                    "group %s: %d handler(s) still running after the %.1fs grace period were "
                    "cancelled; their records will be redelivered",
                    self.group,
                    len(late),
                    grace,
                )
                await asyncio.wait(late)
        await self._commit(list(self._partitions))
        consumer, self._consumer = self._consumer, None
        await consumer.stop()

    async def abort(self) -> None:
        """Stop at once, like a crash: cancel handlers, commit nothing, leave the group."""
        if self._consumer is None:
            return
        self._aborting = True
        self._stopping.set()
        self._draining = True
        tasks = [t for t in (self._fetch_task, self._commit_task) if t is not None]
        tasks += [*self._workers, *self._retry_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        with contextlib.suppress(Exception):
            await consumer.stop()

    def pause(self) -> None:
        """Stop fetching, until `resume()`: records fetched already are still handled, the
        others wait on the broker (the group's lag grows), and the group keeps its partitions.
        A partition assigned while paused is paused too. Fault injection's `paused` switch."""
        self._paused = True
        self._pause_assigned()

    def resume(self) -> None:
        """Fetch again after `pause()`, from where the subscription stopped."""
        self._paused = False
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(NotStartedError):
                consumer.resume(list(consumer.assignment()))

    @property
    def paused(self) -> bool:
        return self._paused

    def _pause_assigned(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        with contextlib.suppress(NotStartedError):  # not started yet, or stopping
            consumer.pause(list(consumer.assignment() if partitions is None else partitions))

    @property
    def in_flight(self) -> int:
        return self._buffered

    def lag(self) -> Mapping[TopicPartition, int]:
        return self._consumer.lag() if self._consumer is not None else {}

    # -- rebalance listener -------------------------------------------------------------------

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[tp] = _PartitionState()
        if self._paused:  # a rebalance forgets pauses (the fetch loop pauses them again too)
            self._pause_assigned(partitions)

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Before the partitions move: no more of their records start, the running ones finish
        (within `revoke_grace`) and everything handled is committed, so the next owner gets
        none of it again. Without the wait, a record handled during the rebalance was
        redelivered: the rolling-upgrade test saw events handled twice."""
        states = [self._partitions[tp] for tp in partitions if tp in self._partitions]
        for state in states:
            state.closing = True
        if not self._aborting:
            deadline = asyncio.get_running_loop().time() + self.options.revoke_grace
            while any(state.running for state in states):
                self._settled.clear()
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), left)
            await self._commit([tp for tp in partitions if tp in self._partitions])
        for tp in partitions:
            gone = self._partitions.pop(tp, None)
            if gone is not None:
                gone.revoked = True  # queued records are dropped; late ones won't commit

    # -- fetching -------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        options = self.options
        consumer = self._consumer
        failures = 0
        while not self._stopping.is_set():
            room = options.max_buffered - self._buffered
            if room <= 0:
                self._space.clear()
                await self._space.wait()
                continue
            if self._paused:  # again before each fetch: a rebalance may have unpaused some
                self._pause_assigned()
            try:
                records = await consumer.fetch(
                    timeout=options.fetch_timeout, max_records=min(room, options.max_poll_records)
                )
                failures = 0
            except TransportError as exc:
                failures += 1
                log.warning("group %s: fetch failed (%s); retrying", self.group, exc)
                await self._sleep(FETCH_BACKOFF.delay(failures))
                continue
            if self._stopping.is_set():
                break  # not started: the group's committed offset still points before them
            self._accept(records)

    def _accept(self, records: Sequence[Record]) -> None:
        """Queue fetched records on their lanes. A fetch is in partition order, so the state
        of a partition is looked up once per run of its records, and lane keys are plain
        tuples (hashed in C, unlike `TopicPartition`)."""
        ordering = self.options.ordering
        floors = self._floors
        lanes, ready = self._lanes, self._ready
        run: tuple[str, int] | None = None
        state: _PartitionState | None = None
        floor = 0
        for record in records:
            topic, partition = record.topic, record.partition
            if run is None or run[0] != topic or run[1] != partition:
                run = (topic, partition)
                tp = TopicPartition(topic, partition)
                state = self._partitions.get(tp)
                floor = floors.get(tp, 0) if floors else 0
            if state is None:
                continue
            offset = record.offset
            state.track(offset)
            if offset < floor:
                state.finish(offset)  # there before an isolated group started: not its own
                continue
            lane_key: tuple[object, ...]
            if ordering == "key":
                lane_key = (topic, partition, record.key)
            elif ordering == "partition":
                lane_key = run
            else:
                lane_key = (topic, partition, offset)
            self._buffered += 1
            lane = lanes.get(lane_key)
            if lane is not None:
                lane.append((state, record))  # its owner (a worker or a retry) takes it in turn
                continue
            lanes[lane_key] = deque([(state, record)])
            ready.put_nowait(lane_key)

    async def _work(self) -> None:
        """One of `concurrency` workers: take a ready lane, handle its next record, repeat.

        A lane is owned by at most one worker (or one retry) at a time, which keeps a key in
        order; a lane with more records goes to the back of the queue, so keys take turns.
        """
        ready = self._ready
        while True:
            lane_key = await ready.get()
            if lane_key is _STOP:
                return
            lane = self._lanes[lane_key]
            state, record = lane[0]
            if state.revoked or state.closing or self._draining:
                self._drop(lane_key)
                continue
            state.running += 1
            try:
                outcome = await self._process(record, state)
                if isinstance(outcome, _Deferred):
                    task = asyncio.create_task(self._resume(lane_key, outcome))
                    self._retry_tasks.add(task)
                    task.add_done_callback(self._retry_tasks.discard)
                    continue
                self._settle(lane_key, outcome)
            finally:
                state.running -= 1
                self._settled.set()

    async def _resume(self, lane_key: object, deferred: _Deferred) -> None:
        """A lane waiting to retry its head record: off the workers, so others keep going."""
        outcome: bool | _Deferred = deferred
        try:
            while isinstance(outcome, _Deferred):
                if not await self._sleep(outcome.delay):
                    outcome = False  # stopping: the record is redelivered
                    break
                outcome = await outcome.resume()
        except BaseException:
            self._drop(lane_key)
            raise
        self._settle(lane_key, outcome)

    def _settle(self, lane_key: object, done: bool) -> None:
        """The lane's head record reached an outcome: mark it, then requeue or retire the lane."""
        lane = self._lanes[lane_key]
        state, record = lane.popleft()
        self._release(1)
        if not done:
            self._drop(lane_key)  # abandoned: this and the rest are redelivered
            return
        if not state.revoked:
            state.finish(record.offset)
        if lane:
            self._ready.put_nowait(lane_key)
        else:
            del self._lanes[lane_key]

    def _drop(self, lane_key: object) -> None:
        lane = self._lanes.pop(lane_key, None)
        if lane:
            self._release(len(lane))

    def _release(self, count: int) -> None:
        self._buffered -= count
        self._space.set()

    # -- handling -------------------------------------------------------------------------------

    async def _process(
        self, record: Record, state: _PartitionState, *, waited: bool = False
    ) -> bool | _Deferred:
        """Handle one record to a final outcome (False: abandoned while stopping), or defer it
        when it must wait (a retry's backoff, a retry-topic record's not-before time)."""
        attempt = 1
        origin = self._retry_origin.get(record.topic)
        if origin is not None:
            attempt = int(record.header(RETRY_ATTEMPT) or b"2")
            not_before = int(record.header(RETRY_NOT_BEFORE) or b"0") / 1000
            wait = not_before - time.time()
            if wait > 0 and not waited:
                return _Deferred(wait, partial(self._process, record, state, waited=True))
        topic = origin or record.topic
        try:
            envelope = self._envelope(record)
        except MessageError as exc:
            return await self._invalid(record, None, exc, topic, attempt)
        handler = self.handlers.get(envelope.type) or self.handlers.get("*")
        if handler is None:
            return await self._unhandled(record, envelope, topic, attempt)
        try:
            raw = handler.payload_type is bytes
            data = envelope.data if raw else decode_payload(envelope.data, handler.payload_type)
        except MessageError as exc:
            return await self._invalid(record, envelope, exc, topic, attempt)
        # The sender's span, or one new trace for a message that came without: every attempt
        # is a child of it, so all attempts share one trace id.
        sender = TraceContext.parse(envelope.traceparent) or TraceContext.new_root()
        envelope.data = data  # ours, freshly decoded: now typed
        message: Message[Any] = Message(
            envelope=envelope,
            record=record,
            attempt=attempt,
            group=self.group,
            handler=handler.name,
        )
        return await self._attempt(message, handler, state, topic, sender)

    async def _attempt(
        self,
        message: Message[Any],
        handler: HandlerSpec,
        state: _PartitionState,
        topic: str,
        sender: TraceContext,
    ) -> bool | _Deferred:
        """Run the handler once: to success, a dead letter, or the wait before the next attempt
        (returned as `_Deferred`). The attempt is a span of its own in the message's trace; what
        follows it (a reply, a retry, a dead letter) runs in that span and the message's
        correlation id too, so the lines logged about it carry them as the handler's lines do."""
        if state.revoked:
            return False
        envelope = message.envelope
        span = sender.child()
        async with self._slots:
            if self._draining:
                return False  # waited for a slot while stopping: leave it to redelivery
            began = time.perf_counter()
            try:
                result = await self.bus.dispatch(handler, message, trace=span)
            except Exception as exc:  # the handler's failure decides what happens next
                error: BaseException = exc
            else:
                handled, latency = self._ok_metrics(topic, envelope.type)
                latency.observe(time.perf_counter() - began)
                handled.inc()
                if message.reply_to is not None:
                    with _message_context(envelope, span):
                        await self.bus.reply(message, result)
                return True
        with _message_context(envelope, span):
            return await self._failed(message, handler, state, topic, sender, error)

    async def _failed(
        self,
        message: Message[Any],
        handler: HandlerSpec,
        state: _PartitionState,
        topic: str,
        sender: TraceContext,
        error: BaseException,
    ) -> bool | _Deferred:
        """An attempt raised: reply, dead-letter, or retry (now deferred, or via the topic)."""
        record, envelope, attempt = message.record, message.envelope, message.attempt
        self._m_in.labels(topic=topic, type=envelope.type, outcome="error").inc()
        if message.reply_to is not None:
            await self.bus.reply_error(message, error)
            return True
        if isinstance(error, Reject | MessageError):
            return await self._dead_letter(record, error, attempt)
        if attempt >= self.options.retry.max_attempts:
            log.error(
                "group %s: %s failed %d time(s), dead-lettering: %r",
                self.group,
                _where(record),
                attempt,
                error,
                exc_info=error,
            )
            return await self._dead_letter(record, error, attempt)
        delay = self.options.retry.backoff(attempt)
        if isinstance(error, RetryLater) and error.delay is not None:
            delay = error.delay
        self._m_retries.labels(topic=topic, type=envelope.type).inc()
        if self.options.retry_mode == "retry_topic":
            # A message that came without a valid traceparent takes the trace its attempts
            # here had along, so that its attempts from the retry topic share it too.
            came_traced = TraceContext.parse(envelope.traceparent) is not None
            traceparent = None if came_traced else sender.to_header()
            return await self._to_retry_topic(record, topic, attempt + 1, delay, traceparent)
        log.info(
            "group %s: %s attempt %d failed (%r); retrying in %.2fs",
            self.group,
            _where(record),
            attempt,
            error,
            delay,
        )
        retry = replace(message, attempt=attempt + 1)
        return _Deferred(delay, partial(self._attempt, retry, handler, state, topic, sender))

    async def _invalid(
        self,
        record: Record,
        envelope: Envelope[bytes] | None,
        error: MessageError,
        topic: str,
        attempt: int,
    ) -> bool:
        """A record that cannot be decoded, or whose payload fails validation: dead-letter it."""
        self._m_in.labels(topic=topic, type="?", outcome="invalid").inc()
        with _message_context(envelope):
            log.warning("group %s: dead-lettering %s: %s", self.group, _where(record), error)
            await self.bus.announce_rejected(
                RejectedRecord(record=record, envelope=envelope, error=error, group=self.group)
            )
            return await self._dead_letter(record, error, attempt)

    async def _unhandled(
        self, record: Record, envelope: Envelope[bytes], topic: str, attempt: int
    ) -> bool:
        """A record no handler takes: dead-letter, skip or fail (`ConsumerOptions.unhandled`)."""
        self._m_in.labels(topic=topic, type=envelope.type, outcome="unhandled").inc()
        problem = (
            f"no handler of group {self.group} takes type {envelope.type!r} on {topic} "
            f"(its handlers take {self._types_taken}); a payload class without @message_type is "
            "known by its class name"
        )
        error = UnknownMessageType(problem)
        with _message_context(envelope):
            await self.bus.announce_rejected(
                RejectedRecord(record=record, envelope=envelope, error=error, group=self.group)
            )
            mode = self.options.unhandled
            if mode == "skip":
                first = envelope.type not in self._skipped_types
                self._skipped_types.add(envelope.type)
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%s: skipping %s (unhandled='skip')",
                    problem,
                    _where(record),
                )
                return True
            if mode == "fail":
                log.error(
                    "%s: stopping the subscription at %s (unhandled='fail'); the service is not "
                    "ready until it is restarted",
                    problem,
                    _where(record),
                )
                self.failure = error
                self._stopping.set()
                return False
            log.warning("%s: dead-lettering %s", problem, _where(record))
            return await self._dead_letter(record, error, attempt, error_type=UNHANDLED_TYPE)

    def _ok_metrics(self, topic: str, event_type: str) -> tuple[CounterChild, HistogramChild]:
        """The success counter and latency histogram children, looked up once per type."""
        found = self._ok_children.get((topic, event_type))
        if found is None:
            found = (
                self._m_in.labels(topic=topic, type=event_type, outcome="ok"),
                self._m_latency.labels(topic=topic, type=event_type),
            )
            self._ok_children[(topic, event_type)] = found
        return found

    def _envelope(self, record: Record) -> Envelope[bytes]:
        """The record's envelope; a raw catch-all handler (`"*"` taking `bytes`) also gets
        records that are not CloudEvents at all, under a synthetic envelope."""
        try:
            return from_binary(record)
        except DecodeError:
            catch_all = self.handlers.get("*")
            if catch_all is None or catch_all.payload_type is not bytes:
                raise
            return Envelope(
                id=f"{record.topic}-{record.partition}-{record.offset}",
                type="",
                source="",
                data=record.value,
                datacontenttype="application/octet-stream",
            )

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True if the full time passed."""
        if seconds <= 0:
            return not self._draining
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return not self._stopping.is_set()

    async def _publish_until_done(
        self, topic: str, record: Record, headers: Headers
    ) -> RecordMetadata | None:
        """Publish `record`'s key and value with `headers` until acknowledged (None: stopping)."""
        failures = 0
        while True:
            try:
                future = await self.bus.transport.send(
                    topic, record.value, key=record.key, headers=headers
                )
                return await future
            except MsaError as exc:
                failures += 1
                log.warning("group %s: publishing to %s failed (%s)", self.group, topic, exc)
                if not await self._sleep(PUBLISH_BACKOFF.delay(failures)):
                    return None

    async def _dead_letter(
        self,
        record: Record,
        error: BaseException,
        attempts: int,
        *,
        error_type: str | None = None,
    ) -> bool:
        origin_topic, origin_partition, origin_offset = _origin(record)
        if not self.options.dead_letter:
            log.error(
                "group %s: dropping %s (dead letters off): %r", self.group, _where(record), error
            )
            return True
        message = str(error.reason if isinstance(error, Reject) else error)
        headers = _strip(
            record.headers, (DLQ_PREFIX, RETRY_ATTEMPT, RETRY_NOT_BEFORE, RETRY_ORIGIN)
        )
        failed_at = int(time.time() * 1000)
        headers += (
            (DLQ_PREFIX + "error-type", (error_type or _error_type(error)).encode()),
            (DLQ_PREFIX + "error-message", message[:4000].encode(errors="replace")),
            (DLQ_PREFIX + "attempts", str(attempts).encode()),
            (DLQ_PREFIX + "original-topic", origin_topic.encode()),
            (DLQ_PREFIX + "original-partition", str(origin_partition).encode()),
            (DLQ_PREFIX + "original-offset", str(origin_offset).encode()),
            (DLQ_PREFIX + "group", self.group.encode()),
            (DLQ_PREFIX + "failed-at", str(failed_at).encode()),
        )
        acked = await self._publish_until_done(
            self.options.dlq_topic(origin_topic), record, headers
        )
        if acked is None:
            return False
        self._m_dlq.labels(topic=origin_topic).inc()
        await self.bus.announce_dead_letter(
            Record(
                topic=acked.topic,
                partition=acked.partition,
                offset=acked.offset,
                key=record.key,
                value=record.value,
                headers=headers,
                timestamp_ms=failed_at,
            )
        )
        return True

    async def _to_retry_topic(
        self, record: Record, topic: str, attempt: int, delay: float, traceparent: str | None
    ) -> bool:
        """Re-publish `record` for its next attempt; with `traceparent` (for a record that came
        without a valid one) the retried record carries it."""
        origin_topic, origin_partition, origin_offset = _origin(record)
        strip: tuple[str, ...] = (RETRY_ATTEMPT, RETRY_NOT_BEFORE, RETRY_ORIGIN)
        if traceparent is not None:
            strip += (_TRACEPARENT_HEADER,)
        headers = _strip(record.headers, strip)
        headers += (
            (RETRY_ATTEMPT, str(attempt).encode()),
            (RETRY_NOT_BEFORE, str(int((time.time() + delay) * 1000)).encode()),
            (RETRY_ORIGIN + "topic", origin_topic.encode()),
            (RETRY_ORIGIN + "partition", str(origin_partition).encode()),
            (RETRY_ORIGIN + "offset", str(origin_offset).encode()),
        )
        if traceparent is not None:
            headers += ((_TRACEPARENT_HEADER, traceparent.encode()),)
        acked = await self._publish_until_done(self.options.retry_topic(topic), record, headers)
        return acked is not None

    # -- committing -----------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while not self._stopping.is_set():
            await self._sleep(self.options.commit_interval)
            await self._commit(list(self._partitions))

    async def _commit(self, partitions: list[TopicPartition]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            state = self._partitions.get(tp)
            if state is None:
                continue
            offset = state.committable()
            if offset is not None:
                offsets[tp] = offset
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitError, TransportError) as exc:
            log.warning("group %s: commit failed (%s); records may be redelivered", self.group, exc)
            return
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = offset


@contextlib.contextmanager
def _message_context(
    envelope: Envelope[Any] | None, span: TraceContext | None = None
) -> Iterator[None]:
    """`envelope`'s correlation id and `span` (else a new span of its trace) for the lines
    logged about it outside its handler (nothing for a record that is not a CloudEvent)."""
    if envelope is None:
        yield
        return
    with (
        use_correlation_id(envelope.correlationid or envelope.id),
        use_trace(span or TraceContext.continue_from(envelope.traceparent)),
    ):
        yield


def _where(record: Record) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"


def _origin(record: Record) -> tuple[str, int, int]:
    topic = record.header(RETRY_ORIGIN + "topic")
    if topic is None:
        return record.topic, record.partition, record.offset
    return (
        topic.decode(),
        int(record.header(RETRY_ORIGIN + "partition") or b"-1"),
        int(record.header(RETRY_ORIGIN + "offset") or b"-1"),
    )


def _strip(headers: Headers, prefixes: tuple[str, ...]) -> Headers:
    return tuple((k, v) for k, v in headers if not k.startswith(prefixes))


def _error_type(error: BaseException) -> str:
    cls = type(error)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
