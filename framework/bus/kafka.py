"""The Kafka transport: `KafkaTransport` and its `KafkaConsumer`, on aiokafka.

    transport = KafkaTransport(KafkaSettings.from_env())
    await transport.start()
    acked = await transport.send("orders", b"...", key=b"order-42")  # enqueued
    metadata = await acked                                            # acknowledged
    consumer = transport.consumer(["orders"], group="billing", listener=listener)
    await consumer.start()
    records = await consumer.fetch(timeout=1.0, max_records=100)
    await consumer.commit({records[-1].topic_partition: records[-1].offset + 1})

Choices, and the promises that follow from them:

- **One idempotent producer per transport**, `acks="all"`. The broker drops the duplicates its
  own retries would create, and keeps per-partition order through them, so a record is written
  once and in order even when a connection breaks mid-batch. `send` returns as soon as the
  record is in the send buffer; the returned future settles on the broker's acknowledgement,
  which lets a caller pipeline thousands of records and await them together.
- **Topics are created on purpose.** With `auto_create_topics` (the default) the first `send`
  or `partitions_for` on a topic this transport has not seen creates it through the admin
  client with `default_partitions` and `default_replication_factor` (an existing topic is left
  as it is), instead of leaving it to the broker's `auto.create.topics.enable` and
  `num.partitions`. Each topic is checked once per transport; `declare` creates topics with
  explicit partitions and configs such as `retention.ms`.
- **Offsets are committed explicitly, never automatically** (`enable_auto_commit=False`): the
  bus commits an offset only after every record below it was handled, which is what makes
  delivery at-least-once.
- **Rebalances are announced through the `RebalanceListener`**, with framework
  `TopicPartition`s. aiokafka speaks Kafka's classic (eager) group protocol: when the group
  changes, every member first loses all its partitions (`on_revoked`, the last moment to commit
  them), then receives its whole new assignment (`on_assigned`, possibly the same partitions
  again). Fetching is stopped during both callbacks. An empty revocation (the first join) is not
  announced. `KafkaConsumer.stop()` also calls `on_revoked` with what it still holds before it
  leaves the group, as the Java client does on close, so the owner can commit. aiokafka logs and
  swallows an exception raised by a listener during a rebalance; the group carries on.
- **Paused partitions come back unpaused after a rebalance** (Kafka forgets pauses with the
  assignment); pause them again in `on_assigned` if needed.
- **A group-less reader** (`group=None`) is assigned every partition of its topics, joins no
  group and commits nothing (`commit` is a no-op); with `start_from="latest"` it seeks to the
  end before `start()` returns, so it sees exactly the records sent after that. Each service
  instance reads its own reply topic this way: no group coordination, no rebalance delay.
- **aiokafka errors are translated in one place** (`_map_error`) into the framework's tree in
  `framework.errors`, with the aiokafka error as `__cause__`. Callers never import aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, cast

from framework.bus.kafka_env import kafka_options_from_env, malformed_brokers
from framework.errors import (
    CommitError,
    ConfigurationError,
    MsaError,
    NotStartedError,
    PublishError,
    TopicError,
    TransportError,
)
from framework.types import (
    Headers,
    RebalanceListener,
    Record,
    RecordMetadata,
    StartFrom,
    TopicPartition,
    TopicSpec,
)

try:
    from aiokafka import (
        AIOKafkaConsumer,
        AIOKafkaProducer,
        ConsumerRebalanceListener,
    )
    from aiokafka import TopicPartition as KafkaTopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.codec import has_lz4, has_snappy, has_zstd
    from aiokafka.errors import (
        CommitFailedError,
        ConsumerStoppedError,
        IllegalStateError,
        InvalidProducerEpoch,
        KafkaError,
        OutOfOrderSequenceNumber,
        TopicAlreadyExistsError,
        TopicAuthorizationFailedError,
        UnknownProducerId,
        UnknownTopicOrPartitionError,
        for_code,
    )
    from aiokafka.helpers import create_ssl_context
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        'The Kafka transport needs aiokafka: pip install "msa-framework[kafka]"'
    ) from exc

__all__ = ["KafkaConsumer", "KafkaSettings", "KafkaTransport"]

Acks: TypeAlias = Literal["all", 0, 1]
Compression: TypeAlias = Literal["gzip", "lz4", "zstd", "snappy"]
SecurityProtocol: TypeAlias = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism: TypeAlias = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_COMPRESSIONS: Final = frozenset({"gzip", "lz4", "zstd", "snappy"})
_SECURITY_PROTOCOLS: Final = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
_SASL_MECHANISMS: Final = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})
_CODEC_AVAILABLE: Final = {"lz4": has_lz4, "zstd": has_zstd, "snappy": has_snappy}


@dataclass(kw_only=True, frozen=True)
class KafkaSettings:
    """How to reach Kafka and how to produce and consume there.

    Build it in code, or from `KAFKA_*` environment variables with `KafkaSettings.from_env()`.
    Times are in milliseconds, as Kafka's own settings are.
    """

    bootstrap_servers: str
    """`host:port[,host:port...]` of one or more brokers."""
    client_id: str = "msa"

    # producing
    acks: Acks = "all"
    enable_idempotence: bool = True
    linger_ms: int = 5
    max_batch_size: int = 256 * 1024
    compression_type: Compression | None = None
    max_request_size: int = 1024 * 1024
    request_timeout_ms: int = 30_000

    # topics
    auto_create_topics: bool = True
    """Create an unknown topic (with the defaults below) on its first `send`/`partitions_for`."""
    default_partitions: int = 3
    default_replication_factor: int = 1

    # consuming
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    fetch_max_wait_ms: int = 100

    # security
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    """For SSL/SASL_SSL; when None, one is made from the system's trusted certificates."""

    def __post_init__(self) -> None:
        problems = []
        if not self.bootstrap_servers.strip():
            problems.append("bootstrap_servers is empty")
        problems += [
            f"bootstrap_servers: {entry!r} is not host:port (a port from 1 to 65535)"
            for entry in malformed_brokers(self.bootstrap_servers)
        ]
        if self.acks not in ("all", 0, 1):
            problems.append(f"acks must be 'all', 0 or 1, not {self.acks!r}")
        elif self.enable_idempotence and self.acks != "all":
            problems.append("enable_idempotence needs acks='all'")
        if self.compression_type is not None and self.compression_type not in _COMPRESSIONS:
            problems.append(
                f"compression_type must be one of {sorted(_COMPRESSIONS)} or None, "
                f"not {self.compression_type!r}"
            )
        if self.security_protocol not in _SECURITY_PROTOCOLS:
            problems.append(
                f"security_protocol must be one of {sorted(_SECURITY_PROTOCOLS)}, "
                f"not {self.security_protocol!r}"
            )
        if self.sasl_mechanism is not None and self.sasl_mechanism not in _SASL_MECHANISMS:
            problems.append(
                f"sasl_mechanism must be one of {sorted(_SASL_MECHANISMS)}, "
                f"not {self.sasl_mechanism!r}"
            )
        if self.default_partitions < 1 or self.default_replication_factor < 1:
            problems.append("default_partitions and default_replication_factor must be >= 1")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            problems.append("heartbeat_interval_ms must be below session_timeout_ms")
        if problems:
            raise ConfigurationError("Invalid KafkaSettings: " + "; ".join(problems))

    @classmethod
    def from_env(
        cls, prefix: str = "KAFKA_", environ: Mapping[str, str] | None = None
    ) -> KafkaSettings:
        """Settings from `{prefix}BOOTSTRAP` (required) and, when set, `{prefix}CLIENT_ID`,
        `LINGER_MS`, `COMPRESSION` (`gzip`, `lz4`, `zstd`, `snappy` or `none`),
        `SECURITY_PROTOCOL`, `SASL_MECHANISM`, `SASL_USERNAME` and `SASL_PASSWORD`.
        `environ` defaults to `os.environ`.
        Read and checked in `framework.bus.kafka_env`, shared by both Kafka clients.
        """
        return cls(**kafka_options_from_env(prefix, environ))

    @property
    def request_timeout(self) -> float:
        """`request_timeout_ms` in seconds."""
        return self.request_timeout_ms / 1000

    def client_options(self) -> dict[str, Any]:
        """The connection options every aiokafka client (producer, consumer, admin) takes."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.ssl_context or create_ssl_context()
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = self.sasl_plain_username
            options["sasl_plain_password"] = self.sasl_plain_password
        return options


# -- the one place aiokafka errors become framework errors ---------------------------------------


def _map_error(
    exc: BaseException, *, doing: str, bootstrap: str, kind: type[TransportError] = TransportError
) -> MsaError:
    """The framework error for `exc`, raised by aiokafka while `doing` something.

    Missing or forbidden topics are `TopicError`s; a commit refused after a rebalance is a
    `CommitError`; a consumer stopped under a call is a `NotStartedError`; everything else
    (unreachable brokers, timeouts, refusals) is a `kind`: `TransportError`, or `PublishError`
    for sends and `CommitError` for commits.
    """
    detail = str(exc) if type(exc).__name__ in str(exc) else f"{type(exc).__name__}: {exc}"
    message = f"Kafka at {bootstrap}: {doing} failed: {detail}"
    error: MsaError
    if isinstance(exc, UnknownTopicOrPartitionError | TopicAuthorizationFailedError):
        error = TopicError(message)
    elif isinstance(exc, CommitFailedError):
        error = CommitError(message)
    elif isinstance(exc, ConsumerStoppedError):
        error = NotStartedError(message)
    else:
        error = kind(message)
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def _translate_errors(
    doing: str, *, bootstrap: str, kind: type[TransportError] = TransportError
) -> Iterator[None]:
    try:
        yield
    except (KafkaError, ConsumerStoppedError, TimeoutError) as exc:
        raise _map_error(exc, doing=doing, bootstrap=bootstrap, kind=kind) from exc


# -- conversions between aiokafka's types and ours -----------------------------------------------


def _ours(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _theirs(tp: TopicPartition) -> Any:
    return KafkaTopicPartition(tp.topic, tp.partition)


def _our_set(partitions: Iterable[Any]) -> frozenset[TopicPartition]:
    return frozenset(_ours(tp) for tp in partitions)


def _record(message: Any) -> Record:
    headers: tuple[tuple[str, bytes | None], ...] = tuple(message.headers)  # pairs already
    for _, header_value in headers:
        if header_value is None:  # a null header value: make it empty, as our type says
            headers = tuple((name, value or b"") for name, value in headers)
            break
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value if message.value is not None else b"",  # tombstone
        headers=cast(Headers, headers),
        timestamp_ms=message.timestamp,
    )


_PRODUCER_STATE_LOST: Final = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)
"""Broker answers after which an idempotent producer can never write to the partition again:
its sequence numbers no longer match the broker's (aiokafka consumes the sequence numbers of a
batch it expires locally, e.g. while a restarting broker had no leader), and aiokafka, unlike
the Java client, never bumps the epoch or takes a new producer id."""


class _Acknowledgement(asyncio.Future[RecordMetadata]):
    """The future `KafkaTransport.send` returns: it settles when aiokafka's delivery future
    does, with our `RecordMetadata` or the error mapped to `PublishError`.

    A Future whose own bound method is the delivery callback, rather than a closure over a
    plain future: one object per record instead of five (a function and its cells), which the
    garbage collector then need not walk while thousands of records are in flight
    (`benchmarks/bus.py`, publish: about 5 us less CPU per record)."""

    __slots__ = ("_transport",)

    def __init__(self, delivery: asyncio.Future[Any], transport: KafkaTransport) -> None:
        super().__init__(loop=delivery.get_loop())
        self._transport = transport
        delivery.add_done_callback(self._settle)

    def _settle(self, done: asyncio.Future[Any]) -> None:
        if self.done():  # the caller cancelled it; the record is still sent
            return
        if done.cancelled():
            bootstrap = self._transport.settings.bootstrap_servers
            self.set_exception(
                PublishError(f"Kafka at {bootstrap}: the send was cancelled before its ack")
            )
            return
        exc = done.exception()
        if exc is not None:
            if isinstance(exc, _PRODUCER_STATE_LOST):
                self._transport._state_lost()
            self.set_exception(
                _map_error(
                    exc,
                    doing="sending",
                    bootstrap=self._transport.settings.bootstrap_servers,
                    kind=PublishError,
                )
            )
            return
        metadata = done.result()
        self.set_result(RecordMetadata(metadata.topic, metadata.partition, metadata.offset))


async def _close_all(*closings: Any) -> None:
    """Await every closing coroutine, even when an earlier one fails; re-raise the first error."""
    results = await asyncio.gather(*closings, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- the send fast path --------------------------------------------------------------------------


# -- the transport -------------------------------------------------------------------------------


class KafkaTransport:
    """Moves records through Apache Kafka. See the module docstring for its promises."""

    name = "kafka"

    def __init__(self, settings: KafkaSettings) -> None:
        compression = settings.compression_type
        if compression in _CODEC_AVAILABLE and not _CODEC_AVAILABLE[compression]():
            raise ConfigurationError(
                f"compression_type={compression!r} needs cramjam: "
                f'pip install "aiokafka[{compression}]"'
            )
        self.settings = settings
        self._producer: Any = None
        self._admin: Any = None
        self._known_topics: set[str] = set()
        self._creating = asyncio.Lock()
        self._lifecycle = asyncio.Lock()
        self._producer_state_lost = False
        self._urgent_producer: Any = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Connect the producer and the admin client. Raises `TransportError` naming the
        bootstrap servers when they cannot be reached within `request_timeout_ms`."""
        async with self._lifecycle:
            if self._producer is None:
                await self._connect()

    async def stop(self) -> None:
        """Wait until every buffered record is acknowledged (or failed), then disconnect."""
        async with self._lifecycle:
            producer, admin = self._producer, self._admin
            if producer is None:
                return
            urgent, self._urgent_producer = self._urgent_producer, None
            self._producer = self._admin = None
            self._known_topics.clear()
            closings = [producer.stop(), admin.close()]
            if urgent is not None:
                closings.append(urgent.stop())
            with self._translating("stopping"):
                await _close_all(*closings)

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
        immediate: bool = False,
    ) -> asyncio.Future[RecordMetadata]:
        if self._producer_state_lost:
            await self._replace_producer()
        producer = self._running_producer()
        if self.settings.auto_create_topics and topic not in self._known_topics:
            await self._create_missing([topic])
        try:  # inline rather than `_translating`: this runs once per record
            if partition is not None and partition not in await producer.partitions_for(topic):
                raise TopicError(f"Topic {topic!r} has no partition {partition}")
            delivery: asyncio.Future[Any]
            if immediate:
                delivery = await self._send_now(producer, topic, value, key, headers, partition)
            else:
                delivery = await producer.send(
                    topic, value, key=key, partition=partition, headers=list(headers) or None
                )
        except (KafkaError, ConsumerStoppedError, TimeoutError) as exc:
            raise _map_error(
                exc,
                doing=f"sending to {topic!r}",
                bootstrap=self.settings.bootstrap_servers,
                kind=PublishError,
            ) from exc
        return _Acknowledgement(delivery, self)

    async def _send_now(
        self,
        producer: Any,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: Headers,
        partition: int | None,
    ) -> asyncio.Future[Any]:
        """Send through a second producer that does not linger (`linger_ms=0`), for records
        someone waits on one by one (requests, replies). A second producer, not a closed
        one-record batch on the first: aiokafka lets only one batch per partition wait at a
        time, and concurrent replies to one reply partition then time out queueing behind each
        other. Ordering against records sent without `immediate` is not guaranteed."""
        urgent = self._urgent_producer
        if urgent is None:
            async with self._lifecycle:
                if self._urgent_producer is None:
                    candidate = self._new_producer(linger_ms=0)
                    async with asyncio.timeout(self.settings.request_timeout):
                        await candidate.start()
                    self._urgent_producer = candidate
                urgent = self._urgent_producer
        delivery: asyncio.Future[Any] = await urgent.send(
            topic, value, key=key, partition=partition, headers=list(headers) or None
        )
        return delivery

    async def declare(self, topics: Sequence[TopicSpec]) -> None:
        self._running_producer()
        await self._create(
            [
                NewTopic(
                    spec.name,
                    spec.partitions,
                    spec.replication_factor,
                    topic_configs=spec.configs(),
                )
                for spec in topics
            ]
        )

    async def delete_topics(self, names: Sequence[str]) -> None:
        """Delete the topics; names of topics that do not exist are ignored."""
        self._running_producer()
        if not names:
            return
        with self._translating("deleting topics"):
            response = await self._admin.delete_topics(list(names))
        self._known_topics.difference_update(names)
        failures = [
            f"{name}: {for_code(code).__name__}"
            for name, code in response.topic_error_codes
            if code not in (0, UnknownTopicOrPartitionError.errno)
        ]
        if failures:
            raise TopicError("Could not delete topics: " + "; ".join(failures))

    async def partitions_for(self, topic: str) -> int:
        producer = self._running_producer()
        if self.settings.auto_create_topics and topic not in self._known_topics:
            await self._create_missing([topic])
        with self._translating(f"looking up topic {topic!r}"):
            return len(await producer.partitions_for(topic))

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> KafkaConsumer:
        """A consumer in `group`, or a group-less reader of every partition (`group=None`).

        It connects on `start()`, which needs this transport to be started.
        """
        return KafkaConsumer(
            self,
            topics,
            group=group,
            listener=listener,
            start_from=start_from,
            max_poll_records=max_poll_records,
        )

    # -- internals -------------------------------------------------------------------------------

    def _state_lost(self) -> None:
        self._producer_state_lost = True

    async def _replace_producer(self) -> None:
        """Swap a producer whose idempotence state the broker rejected for a new one (a new
        producer id, sequences from 0). Records the old one still buffers fail; their senders
        retry them (the outbox relay does), so they may be written twice, never lost."""
        async with self._lifecycle:
            if not self._producer_state_lost or self._producer is None:
                return
            old = self._producer
            producer = self._new_producer()
            with self._translating("replacing the producer"):
                async with asyncio.timeout(self.settings.request_timeout):
                    await producer.start()
            self._producer, self._producer_state_lost = producer, False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.request_timeout):
                await old.stop()

    def _new_producer(self, *, linger_ms: int | None = None) -> Any:
        settings = self.settings
        return AIOKafkaProducer(
            **settings.client_options(),
            acks=settings.acks,
            enable_idempotence=settings.enable_idempotence,
            linger_ms=settings.linger_ms if linger_ms is None else linger_ms,
            max_batch_size=settings.max_batch_size,
            max_request_size=settings.max_request_size,
            compression_type=settings.compression_type,
        )

    async def _connect(self) -> None:
        settings = self.settings
        producer = self._new_producer()
        admin = AIOKafkaAdminClient(**settings.client_options())
        try:
            with self._translating("connecting"):
                async with asyncio.timeout(settings.request_timeout):
                    await producer.start()
                    await admin.start()
        except BaseException:
            await _close_all(producer.stop(), admin.close())
            raise
        self._producer, self._admin = producer, admin

    def _running_producer(self) -> Any:
        if self._producer is None:
            raise NotStartedError("KafkaTransport is not started: await transport.start() first")
        return self._producer

    def _translating(
        self, doing: str, *, kind: type[TransportError] = TransportError
    ) -> contextlib.AbstractContextManager[None]:
        return _translate_errors(doing, bootstrap=self.settings.bootstrap_servers, kind=kind)

    async def _create_missing(self, topics: Sequence[str]) -> None:
        async with self._creating:  # one creation at a time, so concurrent sends ask only once
            missing = [topic for topic in topics if topic not in self._known_topics]
            if missing:
                settings = self.settings
                await self._create(
                    [
                        NewTopic(
                            topic, settings.default_partitions, settings.default_replication_factor
                        )
                        for topic in missing
                    ]
                )

    async def _create(self, new_topics: list[Any]) -> None:
        """Create topics, treating those that exist already as created."""
        if not new_topics:
            return
        with self._translating("creating topics"):
            response = await self._admin.create_topics(new_topics)
        failures = []
        created = []
        for name, code, *message in response.topic_errors:
            if code in (0, TopicAlreadyExistsError.errno):
                created.append(name)
            else:
                detail = f" ({message[0]})" if message and message[0] else ""
                failures.append(f"{name}: {for_code(code).__name__}{detail}")
        if failures:
            raise TopicError("Could not create topics: " + "; ".join(failures))
        await self._await_leaders(created)
        self._known_topics.update(created)  # only now: a send may skip the checks above

    async def _await_leaders(self, names: Sequence[str]) -> None:
        """Wait until every partition of `names` has a leader and our producer knows them.

        A topic the controller has just created may not have leaders yet; a first send to it
        then meets `NotLeaderForPartition` or `UnknownTopicOrPartition`. Waiting here, within
        `request_timeout_ms`, means nothing this transport declared is that new when it is used.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        waiting = list(names)
        while waiting:
            with self._translating("describing topics"):
                described = await self._admin.describe_topics(waiting)
            waiting = [
                topic["topic"]
                for topic in described
                if topic["error_code"] != 0
                or not topic["partitions"]
                or any(p["error_code"] != 0 or p["leader"] < 0 for p in topic["partitions"])
            ]
            if waiting and loop.time() > deadline:
                raise TopicError(
                    f"no leader was elected for every partition of {waiting} within "
                    f"{self.settings.request_timeout:.0f}s"
                )
            if waiting:
                await asyncio.sleep(0.05)
        producer = self._running_producer()
        for name in names:
            with self._translating(f"looking up topic {name!r}"):
                await producer.partitions_for(name)

    async def _all_partitions(self, topics: Sequence[str]) -> list[Any]:
        producer = self._running_producer()
        partitions: list[Any] = []
        for topic in topics:
            if self.settings.auto_create_topics and topic not in self._known_topics:
                await self._create_missing([topic])
            with self._translating(f"looking up topic {topic!r}"):
                numbers = await producer.partitions_for(topic)
            partitions.extend(KafkaTopicPartition(topic, number) for number in sorted(numbers))
        return partitions


# -- the consumer --------------------------------------------------------------------------------


class _RebalanceBridge(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells our listener, in our types, what aiokafka's group coordinator decided."""

    def __init__(self, listener: RebalanceListener) -> None:
        self.listener = listener

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        partitions = _our_set(revoked)
        if partitions:  # the first join "revokes" nothing: not worth announcing
            await self.listener.on_revoked(partitions)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        await self.listener.on_assigned(_our_set(assigned))


class KafkaConsumer:
    """A member of a Kafka consumer group (or a group-less reader); see `KafkaTransport.consumer`.

    `start()` returns once the first assignment is known and `on_assigned` has run.
    """

    def __init__(
        self,
        transport: KafkaTransport,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> None:
        if not topics:
            raise ConfigurationError("A consumer needs at least one topic")
        if start_from not in ("earliest", "latest"):
            raise ConfigurationError(f"start_from must be 'earliest' or 'latest': {start_from!r}")
        if max_poll_records < 1:
            raise ConfigurationError(f"max_poll_records must be >= 1: {max_poll_records}")
        self.topics = tuple(topics)
        self.group = group
        self.listener = listener
        self.start_from = start_from
        self.max_poll_records = max_poll_records
        self._transport = transport
        self._consumer: Any = None
        self._stopping = False
        self._lag: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        if self._consumer is not None:
            return
        transport, settings = self._transport, self._transport.settings
        # Raises NotStartedError; creates the topics, so the consumer's own metadata requests
        # never let the broker create them with its defaults.
        partitions = await transport._all_partitions(self.topics)
        consumer = AIOKafkaConsumer(
            **settings.client_options(),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=self.start_from,
            max_poll_records=self.max_poll_records,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        try:
            with transport._translating(f"starting a consumer of {', '.join(self.topics)}"):
                if self.group is not None:
                    consumer.subscribe(list(self.topics), listener=_RebalanceBridge(self.listener))
                    await consumer.start()  # joins the group; on_assigned has run
                else:
                    await consumer.start()
                    consumer.assign(partitions)
                    if self.start_from == "latest" and not await consumer.seek_to_end():
                        raise TimeoutError("seeking to the end of the partitions timed out")
                    await self.listener.on_assigned(_our_set(partitions))
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._stopping = False

    async def fetch(
        self,
        *,
        timeout: float,
        max_records: int,
    ) -> list[Record]:
        """Up to `max_records` records, waiting at most `timeout` seconds for the first; in
        partition order, and in offset order within a partition."""
        consumer = self._running()
        with self._transport._translating("fetching"):
            batches = await consumer.getmany(
                timeout_ms=max(0, round(timeout * 1000)), max_records=max_records
            )
        await self._note_lag(consumer)
        return [
            _record(message)
            for tp in sorted(batches, key=lambda tp: (tp.topic, tp.partition))
            for message in batches[tp]
        ]

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read.

        Raises `CommitError` when a partition is no longer assigned (it was revoked by a
        rebalance) or the group moved on. A group-less reader has nothing to commit to.
        """
        consumer = self._running()
        if self.group is None or not offsets:
            return
        with self._transport._translating("committing offsets", kind=CommitError):
            await consumer.commit({_theirs(tp): offset for tp, offset in offsets.items()})

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching these partitions (ones not assigned any more are ignored)."""
        consumer = self._running()
        owned = consumer.assignment()
        consumer.pause(*(tp for tp in map(_theirs, partitions) if tp in owned))

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        consumer = self._running()
        owned = consumer.assignment()
        consumer.resume(*(tp for tp in map(_theirs, partitions) if tp in owned))

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions assigned now (none while not started or during a rebalance)."""
        if self._consumer is None:
            return frozenset()
        return _our_set(self._consumer.assignment())

    def lag(self) -> dict[TopicPartition, int]:
        """Records between the position and the end of each assigned partition, as of the last
        `fetch`; partitions no fetch response covered yet are left out. No network call."""
        if self._consumer is None:
            return {}
        assigned = self.assignment()
        return {tp: lag for tp, lag in self._lag.items() if tp in assigned}

    async def _note_lag(self, consumer: Any) -> None:
        """Remember each assigned partition's lag for `lag()`, which must not wait: the end the
        last fetch response reported (`highwater`) less the `position`. A partition with a known
        end has been fetched from, so its position is valid and `position` answers at once; the
        wait is bounded all the same (the position of a partition being reset is unknown)."""
        ends = {tp: consumer.highwater(tp) for tp in consumer.assignment()}
        lag: dict[TopicPartition, int] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._transport.settings.request_timeout):
                for tp, end in ends.items():
                    if end is None:
                        continue
                    try:
                        position = await consumer.position(tp)
                    except IllegalStateError:  # revoked by a rebalance meanwhile
                        continue
                    lag[_ours(tp)] = max(0, end - position)
        self._lag = lag

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The end of each partition (its high watermark), asked of the partition leaders now.

        Raises `TransportError` when they do not answer within `request_timeout_ms` (aiokafka
        would wait forever for a partition that does not exist).
        """
        consumer = self._running()
        if not partitions:
            return {}
        with self._transport._translating("asking for end offsets"):
            async with asyncio.timeout(self._transport.settings.request_timeout):
                ends = await consumer.end_offsets([_theirs(tp) for tp in partitions])
        return {_ours(tp): offset for tp, offset in ends.items()}

    async def stop(self) -> None:
        """Announce the partitions still held as revoked (so they can be committed), then leave
        the group and disconnect. Safe to call twice."""
        consumer = self._consumer
        if consumer is None or self._stopping:
            return
        self._stopping = True
        try:
            held = self.assignment()
            if held:
                await self.listener.on_revoked(held)
        finally:
            self._consumer = None
            self._lag = {}
            with self._transport._translating("stopping a consumer"):
                await consumer.stop()

    def _running(self) -> Any:
        if self._consumer is None:
            raise NotStartedError("KafkaConsumer is not started: await consumer.start() first")
        return self._consumer
