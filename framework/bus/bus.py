"""The message bus: typed publish, subscriptions, request/reply and middleware on any transport.

    bus = Bus(KafkaTransport(KafkaSettings.from_env()), source="orders")   # or MemoryTransport()
    await bus.start()
    await bus.publish("orders", OrderPlaced(order_id="o-1", total=12.5), key="o-1")
    bus.subscribe(["payments"], {"payment.captured": HandlerSpec(PaymentCaptured, on_captured)},
                  ConsumerOptions(group="orders"))
    price = await bus.request("pricing.quotes", Quote(sku="mug"), reply_type=Price, timeout=2)
    await bus.stop(grace=30)

Publishing inside a handler carries the handled message's correlation id forward and sets the
causation id to its id; the W3C trace context continues as a child span. Middleware wraps the
next callable, one shape for both directions, and the chains are built once at `start()`:

    async def audit(outgoing: Outgoing, call_next):      # publish side
        outgoing.envelope.extensions["tenant"] = "acme"
        return await call_next(outgoing)

    async def timing(message: Message, call_next):       # consume side
        began = time.perf_counter()
        try:
            return await call_next(message)
        finally:
            log.info("handled in %.3fs", time.perf_counter() - began)

Hearing of what went wrong: `bus.on_dead_letter` listeners are awaited with each dead letter
(a `framework.bus.dlq.DeadLetter` of the record as the transport acknowledged it on the
dead-letter topic), `bus.on_rejected` listeners with each record refused before any handler ran
(`RejectedRecord`: undecodable, invalid payload, unhandled type). A listener that raises is
logged and ignored. The testing kit listens this way.

    async def page_on_call(letter: DeadLetter) -> None: ...
    bus.on_dead_letter.append(page_on_call)

`isolate_groups(suffix)` (before `start()`) makes every subscription consume in a group of this
bus's own, `<group><suffix>`, from the end of its topics as they are when it starts. The testing
kit does it on a real broker: a test never joins the group of a deployed instance of the same
service, and never handles (and acts on) the history of a shared topic.

Request/reply: each Bus instance owns a reply topic `<source>.replies.<instance>` (created on
the first request, deleted at stop) read without a consumer group from its end. A request is an
envelope with the `replyto` extension; the reply carries `correlationid` = the request's id and
`replystatus` = `ok` or `error` (with `errortype`). No reply in time raises `RequestTimeout`; an
error reply raises `RemoteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeVar, cast

import orjson

from framework.bus.consumer import (
    ConsumerOptions,
    HandlerSpec,
    Message,
    RejectedRecord,
    Subscription,
)
from framework.bus.dlq import DeadLetter
from framework.bus.metrics import BusMetrics
from framework.errors import (
    ConfigurationError,
    MsaError,
    NotStartedError,
    RemoteError,
    RequestTimeout,
)
from framework.messages import (
    JSON,
    Envelope,
    binary_headers,
    check_payload_type,
    decode_payload,
    encode_payload,
    from_binary,
    new_id,
    time_now,
    to_binary,
    type_name,
)
from framework.observability.metrics import CounterChild, MetricsRegistry
from framework.observability.tracing import (
    TraceContext,
    continue_from,
    current_correlation_id,
    current_trace,
    new_root_header,
    use_service,
)
from framework.types import (
    ConsumeMiddleware,
    PublishMiddleware,
    Record,
    RecordMetadata,
    TopicPartition,
    TopicSpec,
    Transport,
    TransportConsumer,
)

__all__ = [
    "Bus",
    "BusMetrics",
    "DeadLetterListener",
    "Outgoing",
    "RejectionListener",
    "current_message",
]

R = TypeVar("R")
log = logging.getLogger("framework.bus")

current_message: ContextVar[Message[Any] | None] = ContextVar("msa_current_message", default=None)
"""The message whose handler is running (None outside handlers)."""

DeadLetterListener: TypeAlias = Callable[[DeadLetter], Awaitable[None]]
"""Awaited with each dead letter once the transport acknowledged it (`Bus.on_dead_letter`)."""
RejectionListener: TypeAlias = Callable[[RejectedRecord], Awaitable[None]]
"""Awaited with each record refused before any handler ran (`Bus.on_rejected`)."""


@dataclass(slots=True)
class Outgoing:
    """What the publish middleware chain passes along: a topic and an envelope."""

    topic: str
    envelope: Envelope[Any]
    confirm: bool = True
    immediate: bool = False


class _ReplyListener:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


class Bus:
    """Typed messaging over a `Transport`. See the module docstring for a tour."""

    def __init__(
        self,
        transport: Transport,
        *,
        source: str,
        metrics: MetricsRegistry | None = None,
        publish_middleware: Sequence[PublishMiddleware] = (),
        consume_middleware: Sequence[ConsumeMiddleware] = (),
        instance_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.source = source
        self.instance_id = instance_id or new_id()[:12]
        self._group_suffix = ""
        self.on_dead_letter: list[DeadLetterListener] = []
        """Awaited with each dead letter this bus's subscriptions published (module docstring)."""
        self.on_rejected: list[RejectionListener] = []
        """Awaited with each record its subscriptions refused before any handler ran."""
        self.metrics = BusMetrics(metrics if metrics is not None else MetricsRegistry())
        self._publish_middleware = list(publish_middleware)
        self._consume_middleware = list(consume_middleware)
        self._publish_chain: Callable[[Outgoing], Awaitable[Any]] = self._send
        self._consume_chain: Callable[[HandlerSpec, Message[Any]], Awaitable[Any]] = _call
        self._subscriptions: list[Subscription] = []
        self._started = False
        self._reply_topic: str | None = None
        self._reply_consumer: TransportConsumer | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._reply_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[Envelope[bytes]]] = {}
        self._out_counters: dict[tuple[str, str], CounterChild] = {}

    # -- set-up ---------------------------------------------------------------------------------

    def isolate_groups(self, suffix: str) -> None:
        """Consume in consumer groups of this bus's own: each subscription's group gets `suffix`
        and starts at the end of its topics as they are when it starts (see
        `Subscription.isolate`). Before `start()`; for subscriptions made before and after."""
        if not suffix:
            raise ConfigurationError("isolate_groups needs a suffix")
        if self._started:
            raise ConfigurationError("isolate_groups before the bus starts")
        if self._group_suffix:
            raise ConfigurationError(f"the groups are isolated already ({self._group_suffix!r})")
        self._group_suffix = suffix
        for subscription in self._subscriptions:  # made before, not started yet
            subscription.isolate(subscription.group + suffix)

    @property
    def group_suffix(self) -> str:
        """The suffix of the isolated groups (`isolate_groups`); "" when they are not."""
        return self._group_suffix

    def add_publish_middleware(self, middleware: PublishMiddleware) -> None:
        self._refuse_after_start("publish middleware")
        self._publish_middleware.append(middleware)

    def add_consume_middleware(self, middleware: ConsumeMiddleware) -> None:
        self._refuse_after_start("consume middleware")
        self._consume_middleware.append(middleware)

    def _refuse_after_start(self, what: str) -> None:
        if self._started:
            raise ConfigurationError(f"{what} must be added before the bus starts")

    def _build_chains(self) -> None:
        publish: Callable[[Outgoing], Awaitable[Any]] = self._send
        for middleware in reversed(self._publish_middleware):
            publish = _wrap(middleware, publish)
        self._publish_chain = publish

        chains: dict[HandlerSpec, Callable[[Any], Awaitable[Any]]] = {}
        consume_middleware = list(self._consume_middleware)

        def consume_chain(handler: HandlerSpec, message: Message[Any]) -> Awaitable[Any]:
            call = chains.get(handler)
            if call is None:  # built once per handler, then reused
                call = handler.call
                for middleware in reversed(consume_middleware):
                    call = _wrap(middleware, call)
                chains[handler] = call
            return call(message)

        self._consume_chain = consume_chain if consume_middleware else _call

    async def start(self) -> None:
        if self._started:
            return
        self._build_chains()
        await self.transport.start()
        self._started = True
        for subscription in self._subscriptions:
            await self._start_subscription(subscription)

    async def stop(self, grace: float = 30.0) -> None:
        """Drain every subscription (see `Subscription.stop`), then close the transport."""
        if not self._started:
            return
        await asyncio.gather(*(s.stop(grace) for s in self._subscriptions))
        await self._stop_replies()
        self._started = False
        await self.transport.stop()

    async def abort(self) -> None:
        """Stop at once, committing nothing (crash-recovery tests; see `Subscription.abort`)."""
        if not self._started:
            return
        await asyncio.gather(*(s.abort() for s in self._subscriptions))
        await self._stop_replies()
        self._started = False
        with contextlib.suppress(Exception):
            await self.transport.stop()

    @property
    def started(self) -> bool:
        return self._started

    def failed_subscriptions(self) -> list[Subscription]:
        """Subscriptions that stopped on an unhandled type (`unhandled="fail"`)."""
        return [s for s in self._subscriptions if s.failure is not None]

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)

    # -- publishing -----------------------------------------------------------------------------

    def envelope(
        self,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> Envelope[Any]:
        """An envelope from this bus's source, continuing the current message and trace."""
        correlationid, causationid, traceparent = _lineage()
        return Envelope(
            type=type or type_name(data.__class__),
            source=self.source,
            data=data,
            subject=subject,
            partitionkey=key,
            correlationid=correlationid,
            causationid=causationid,
            traceparent=traceparent,
            extensions=dict(extensions) if extensions else {},
        )

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
        extensions: Mapping[str, str] | None = None,
        confirm: bool = True,
    ) -> RecordMetadata | asyncio.Future[RecordMetadata]:
        """Publish `data` as a CloudEvent on `topic`, partitioned by `key`.

        With `confirm=True` (the default) this returns once the broker acknowledged the record;
        with `confirm=False` it returns the acknowledgement future as soon as the record is in
        the send buffer, so a caller can pipeline many records and await them together.
        """
        if not self._started:
            raise NotStartedError("Bus.publish before Bus.start()")
        if self._publish_middleware:  # a middleware sees the envelope
            envelope = self.envelope(
                data, key=key, type=type, subject=subject, extensions=extensions
            )
            return await self.publish_envelope(topic, envelope, confirm=confirm)
        # No one sees an envelope, so none is built: the record is written straight from the
        # attributes, the same bytes `to_binary(self.envelope(...))` gives.
        correlationid, causationid, traceparent = _lineage()
        event_type = type or type_name(data.__class__)
        key_bytes = None if key is None else key.encode()
        headers = binary_headers(
            "1.0",
            new_id(),
            self.source,
            event_type,
            time_now(),
            JSON,
            subject,
            correlationid,
            causationid,
            traceparent,
            key_bytes,
            extensions,
        )
        future = await self.transport.send(
            topic, encode_payload(data), key=key_bytes, headers=headers
        )
        self._count_out(topic, event_type)
        return await future if confirm else future

    async def publish_envelope(
        self, topic: str, envelope: Envelope[Any], *, confirm: bool = True, immediate: bool = False
    ) -> RecordMetadata | asyncio.Future[RecordMetadata]:
        """Publish a ready envelope; `immediate` skips batching (see `Transport.send`)."""
        if not self._started:
            raise NotStartedError("Bus.publish before Bus.start()")
        return cast(
            "RecordMetadata | asyncio.Future[RecordMetadata]",
            await self._publish_chain(Outgoing(topic, envelope, confirm, immediate)),
        )

    async def publish_stored(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[RecordMetadata]:
        """Publish a record stored earlier in the binary content mode (an outbox row, a saga's
        command) through the publish middleware, counted like any publish; returns the
        acknowledgement future once the record is in the send buffer, so that a relay sends a
        batch in order and then awaits every acknowledgement.

        The stored event keeps its id, attributes, key and payload bytes; a middleware sees it
        as an `Outgoing` whose `envelope.data` is those bytes and may add to it (an extension
        becomes a header). A stored value that is not a CloudEvent raises `DecodeError`.
        """
        stored = Record(
            topic=topic, partition=-1, offset=-1, key=key, value=value, headers=tuple(headers)
        )
        sent = await self.publish_envelope(topic, from_binary(stored), confirm=False)
        if isinstance(sent, asyncio.Future):
            return sent
        acknowledged: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(sent)  # a middleware awaited the acknowledgement itself
        return acknowledged

    async def _send(self, outgoing: Outgoing) -> RecordMetadata | asyncio.Future[RecordMetadata]:
        return await self._send_envelope(
            outgoing.topic, outgoing.envelope, outgoing.confirm, outgoing.immediate
        )

    async def _send_envelope(
        self, topic: str, envelope: Envelope[Any], confirm: bool, immediate: bool = False
    ) -> RecordMetadata | asyncio.Future[RecordMetadata]:
        key, value, headers = to_binary(envelope)
        if immediate:
            future = await self.transport.send(
                topic, value, key=key, headers=headers, immediate=True
            )
        else:
            future = await self.transport.send(topic, value, key=key, headers=headers)
        self._count_out(topic, envelope.type)
        return await future if confirm else future

    def _count_out(self, topic: str, event_type: str) -> None:
        counter = self._out_counters.get((topic, event_type))
        if counter is None:
            counter = self.metrics.messages_out.labels(topic=topic, type=event_type)
            self._out_counters[(topic, event_type)] = counter
        counter.inc()

    # -- consuming ------------------------------------------------------------------------------

    def subscribe(
        self,
        topics: Sequence[str],
        handlers: Mapping[str, HandlerSpec],
        options: ConsumerOptions,
    ) -> Subscription:
        """Consume `topics` in `options.group`; `handlers` maps CloudEvents types ("*": any).

        Subscriptions made before `start()` start with the bus; afterwards use
        `subscribe_running`.
        """
        if self._started:
            raise ConfigurationError("subscribe() after start(): use subscribe_running()")
        return self._add_subscription(topics, handlers, options)

    async def subscribe_running(
        self,
        topics: Sequence[str],
        handlers: Mapping[str, HandlerSpec],
        options: ConsumerOptions,
    ) -> Subscription:
        """Subscribe on a bus that has already started, and start consuming now."""
        if not self._started:
            raise NotStartedError("subscribe_running() needs a started bus; use subscribe()")
        subscription = self._add_subscription(topics, handlers, options)
        await self._start_subscription(subscription)
        return subscription

    def _add_subscription(
        self,
        topics: Sequence[str],
        handlers: Mapping[str, HandlerSpec],
        options: ConsumerOptions,
    ) -> Subscription:
        if not handlers:
            raise ConfigurationError("a subscription needs at least one handler")
        if not topics:
            raise ConfigurationError("a subscription needs at least one topic")
        for event_type, spec in handlers.items():
            # Refused now, not when the first record arrives (which would stop its partition).
            if spec.payload_type is not bytes:
                try:
                    check_payload_type(spec.payload_type)
                except ConfigurationError as exc:
                    raise ConfigurationError(
                        f"the handler of {event_type!r} on {', '.join(topics)}: {exc}"
                    ) from exc.__cause__
        subscription = Subscription(self, topics, handlers, options)
        if self._group_suffix:
            subscription.isolate(options.group + self._group_suffix)
        self._subscriptions.append(subscription)
        return subscription

    async def _start_subscription(self, subscription: Subscription) -> None:
        for topic in subscription.topics:  # its group is final now
            self.metrics.lag.labels(group=subscription.group, topic=topic).set_function(
                partial(_topic_lag, subscription, topic)
            )
        await subscription.start()

    async def dispatch(
        self, handler: HandlerSpec, message: Message[Any], *, trace: TraceContext | None = None
    ) -> Any:
        """Run a handler through the consume middleware, inside the message's context: its
        correlation id, and `trace` (the consumer gives each attempt a span of the message's
        trace) or else a new child span of its `traceparent`."""
        envelope = message.envelope
        message_token = current_message.set(message)
        correlation_token = current_correlation_id.set(envelope.correlationid or envelope.id)
        trace_token = current_trace.set(trace or continue_from(envelope.traceparent))
        try:
            return await self._consume_chain(handler, message)
        finally:
            current_trace.reset(trace_token)
            current_correlation_id.reset(correlation_token)
            current_message.reset(message_token)

    async def announce_dead_letter(self, record: Record) -> None:
        """Tell the `on_dead_letter` listeners: `record` is a dead letter as acknowledged."""
        if self.on_dead_letter:
            letter = DeadLetter.from_record(record)
            for listener in list(self.on_dead_letter):
                await _tell(listener, letter)

    async def announce_rejected(self, rejected: RejectedRecord) -> None:
        """Tell the `on_rejected` listeners: a record was refused before any handler ran."""
        for listener in list(self.on_rejected):
            await _tell(listener, rejected)

    # -- request/reply --------------------------------------------------------------------------

    async def request(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        reply_type: type[R] | None = None,
        timeout: float = 10.0,
    ) -> R:
        """Send a request and wait for its reply (decoded as `reply_type`, else plain JSON)."""
        reply_topic = await self._ensure_replies()
        envelope = self.envelope(data, key=key, type=type, extensions={"replyto": reply_topic})
        future: asyncio.Future[Envelope[bytes]] = asyncio.get_running_loop().create_future()
        self._pending[envelope.id] = future
        try:
            await self.publish_envelope(topic, envelope, immediate=True)
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to {envelope.type} on {topic!r} within {timeout}s"
            ) from None
        finally:
            self._pending.pop(envelope.id, None)
        if reply.extensions.get("replystatus") == "error":
            error = orjson.loads(reply.data)
            raise RemoteError(reply.extensions.get("errortype", "Error"), str(error.get("message")))
        if reply_type is None:
            return cast(R, orjson.loads(reply.data))
        return decode_payload(reply.data, reply_type)

    async def reply(self, message: Message[Any], result: Any) -> None:
        await self._reply(message, result, {"replystatus": "ok"})

    async def reply_error(self, message: Message[Any], error: BaseException) -> None:
        error_type = type(error).__name__
        await self._reply(
            message,
            {"error": error_type, "message": str(error)},
            {"replystatus": "error", "errortype": error_type},
        )

    async def _reply(self, message: Message[Any], data: Any, extensions: dict[str, str]) -> None:
        reply_to = message.reply_to
        assert reply_to is not None
        request = message.envelope
        envelope = Envelope(
            type=f"{request.type}.reply",
            source=self.source,
            data=data,
            correlationid=request.id,
            causationid=request.id,
            traceparent=request.traceparent,
            extensions=extensions,
        )
        try:
            await self.publish_envelope(reply_to, envelope, immediate=True)
        except MsaError as exc:  # the requester times out; nothing else to do
            log.warning("reply to %s failed: %s", reply_to, exc)

    async def _ensure_replies(self) -> str:
        if self._reply_topic is not None:
            return self._reply_topic
        if not self._started:
            raise NotStartedError("Bus.request before Bus.start()")
        async with self._reply_lock:
            if self._reply_topic is None:
                topic = f"{self.source}.replies.{self.instance_id}"
                await self.transport.declare(
                    [TopicSpec(name=topic, partitions=1, retention_ms=3_600_000)]
                )
                consumer = self.transport.consumer(
                    [topic], group=None, listener=_ReplyListener(), start_from="latest"
                )
                await consumer.start()
                self._reply_consumer = consumer
                with use_service(self.source):
                    self._reply_task = asyncio.create_task(self._read_replies(consumer))
                self._reply_topic = topic
        return self._reply_topic

    async def _read_replies(self, consumer: TransportConsumer) -> None:
        while True:
            try:
                records = await consumer.fetch(timeout=1.0, max_records=500)
            except MsaError as exc:
                log.warning("reading replies failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for record in records:
                try:
                    envelope = from_binary(record)
                except MsaError:
                    continue
                future = self._pending.get(envelope.correlationid or "")
                if future is not None and not future.done():
                    future.set_result(envelope)

    async def _stop_replies(self) -> None:
        if self._reply_task is not None:
            self._reply_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply_task
        if self._reply_consumer is not None:
            await self._reply_consumer.stop()
        if self._reply_topic is not None:
            with contextlib.suppress(MsaError):
                await self.transport.delete_topics([self._reply_topic])
        self._reply_topic = self._reply_consumer = self._reply_task = None


def _lineage() -> tuple[str | None, str | None, str]:
    """The correlation id, causation id and `traceparent` of an event published now: caused by
    the message being handled (else in the current correlation), in a child span of the
    current trace (else a new one)."""
    handled = current_message.get()
    correlationid: str | None
    causationid: str | None = None
    if handled is not None:
        cause = handled.envelope
        correlationid, causationid = cause.correlationid or cause.id, cause.id
    else:
        correlationid = current_correlation_id.get()
    trace = current_trace.get()
    return (
        correlationid,
        causationid,
        trace.child_header() if trace is not None else new_root_header(),
    )


def _wrap(
    middleware: Callable[[Any, Callable[[Any], Awaitable[Any]]], Awaitable[Any]],
    call_next: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any], Awaitable[Any]]:
    async def call(item: Any) -> Any:
        return await middleware(item, call_next)

    return call


async def _tell(listener: Callable[[Any], Awaitable[None]], event: object) -> None:
    try:
        await listener(event)
    except Exception:  # a listener's bug must not stop consuming
        log.exception("listener %r failed on a %s", listener, type(event).__name__)


def _call(handler: HandlerSpec, message: Message[Any]) -> Awaitable[Any]:
    return handler.call(message)


def _topic_lag(subscription: Subscription, topic: str) -> float:
    return float(sum(n for tp, n in subscription.lag().items() if tp.topic == topic))
