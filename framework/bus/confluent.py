"""The Kafka transport on librdkafka: `ConfluentTransport` and its `ConfluentConsumer`.

    transport = ConfluentTransport(ConfluentSettings.from_env())    # KAFKA_CLIENT=confluent
    await transport.start()
    acked = await transport.send("orders", b"...", key=b"order-42")  # enqueued
    metadata = await acked                                            # acknowledged

The same contract as `framework.bus.kafka.KafkaTransport` (aiokafka), on confluent-kafka
(`pip install "msa-framework[kafka-confluent]"`), for throughput: librdkafka batches, compresses
and fetches in its own C threads, and Python sees records a batch at a time. Select it with
`KAFKA_CLIENT=confluent` next to `MSA_TRANSPORT=kafka` (`framework.bus.transports`); its `name`
is `"kafka"`, since it is the same broker and the same wire format, only another client.

How the two worlds meet (librdkafka's calls block; the event loop must not):

- **Producing** runs on the event loop, with no thread of ours: librdkafka's `produce` only
  copies the record into its queue and returns (a full queue waits for room, never blocks the
  loop), and its delivery reports are served with a non-blocking `poll(0)` every millisecond
  while records are in flight (and every thousand sends), settling the senders' futures right
  there. A thread serving them was measured slower: it contends with the loop for the GIL.
- **Consuming** runs every call to the librdkafka consumer on one thread of its own, in order,
  since confluent-kafka serializes callers of one consumer anyway (a call from another thread
  waits for the one in progress). When no call waits, that thread *fetches ahead*: it polls in
  slices of at most `_CONSUME_SLICE` seconds (so a commit never waits long) and buffers up to
  `max_poll_records` records, taking what librdkafka has queued in one `consume(n, 0)`; `fetch`
  takes from that buffer without a thread hop and waits on it only when it is empty. `pause`,
  `resume`, `assignment` and `lag` are synchronous and never wait for that thread: they read
  and write mirrors and the lock-guarded buffer, and the thread applies pauses before its next
  poll. A fetch its caller cancelled loses nothing: the records stay in the buffer.
- **Rebalance callbacks** run inside `poll`/`consume` on the consumer thread (fetching ahead
  serves them even while nobody fetches, until the buffer is full). The listener's
  coroutine is run on the event loop while that thread keeps serving the calls the listener
  makes (the commit in `on_revoked`), so nothing deadlocks and no call runs concurrently.

Promises, as for the aiokafka transport:

- **One idempotent producer per transport**, `acks=all`: librdkafka keeps per-partition order
  through its retries and bumps the producer epoch itself when the broker loses its state. A
  fatal producer error replaces the producer on the next send (a new producer id).
- **Keys pick partitions as the Java client does** (`murmur2_random`), not librdkafka's default
  CRC32, so both transports and every Java service agree on where a key lives.
- **Topics are created on purpose** (`auto_create_topics`), checked once per transport, and
  `declare` waits until every partition has a leader.
- **Offsets are committed explicitly, never automatically**; committing a partition not
  assigned now is a `CommitError`.
- **Classic (eager) group protocol, round-robin assignor**: every member first loses all its
  partitions (`on_revoked`), then receives its whole new assignment (`on_assigned`). An empty
  revocation is not announced; `stop()` announces what it still holds before it leaves. A
  listener's exception is logged and the group carries on.
- **Paused partitions come back unpaused after a rebalance.** Records of a partition paused
  while a fetch was under way are held back and come first after `resume`.
- **A group-less reader** (`group=None`) is assigned every partition, commits nothing, and with
  `start_from="latest"` starts at the ends asked of the partition leaders before `start()`
  returns, so it sees exactly the records sent after that.
- **librdkafka errors are translated in one place** (`_map_error`); its log lines go to the
  `framework.bus.confluent` logger, never to stderr.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast

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
    from confluent_kafka import (
        Consumer,
        KafkaError,
        KafkaException,
        Message,
        Producer,
    )
    from confluent_kafka import TopicPartition as KafkaTopicPartition
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported names
        AdminClient,
        NewTopic,
        OffsetSpec,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "The confluent-kafka transport needs confluent-kafka: "
        'pip install "msa-framework[kafka-confluent]"'
    ) from exc

__all__ = ["ConfluentConsumer", "ConfluentSettings", "ConfluentTransport"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Acks: TypeAlias = Literal["all", 0, 1]
Compression: TypeAlias = Literal["gzip", "lz4", "zstd", "snappy"]
SecurityProtocol: TypeAlias = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism: TypeAlias = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_COMPRESSIONS: Final = frozenset({"gzip", "lz4", "zstd", "snappy"})
_SECURITY_PROTOCOLS: Final = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
_SASL_MECHANISMS: Final = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})

_CONSUME_SLICE: Final = 0.05
"""The longest one wait for records lasts, in seconds: the longest a commit or pause waits
behind fetching ahead that finds nothing (librdkafka has no way to wake a waiting `poll`)."""

_POLL_EVERY: Final = 0.001
"""Seconds between two servings of a producer's delivery reports while records are in flight:
at most this is added to an acknowledgement's latency."""

_POLL_BATCH: Final = 1000
"""Sends after which their reports are served at once (a loop busy sending runs no timers)."""


@dataclass(kw_only=True, frozen=True)
class ConfluentSettings:
    """How to reach Kafka and how to produce and consume there, for librdkafka.

    The fields and the `KAFKA_*` variables are those of `framework.bus.kafka.KafkaSettings`
    (one environment describes a deployment whichever client it runs), plus `config`: any
    librdkafka property (https://docs.confluent.io/platform/current/clients/librdkafka/html/md_CONFIGURATION.html),
    applied last to every client, e.g. `{"queued.max.messages.kbytes": "16384"}`.
    Times are in milliseconds, as Kafka's own settings are.
    """

    bootstrap_servers: str
    client_id: str = "msa"

    # producing
    acks: Acks = "all"
    enable_idempotence: bool = True
    linger_ms: int = 5
    max_batch_size: int = 1024 * 1024
    compression_type: Compression | None = None
    max_request_size: int = 1024 * 1024
    request_timeout_ms: int = 30_000

    # topics
    auto_create_topics: bool = True
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
    ssl_ca_location: str | None = None
    """A CA bundle file for SSL/SASL_SSL; when None, librdkafka's default (`probe`)."""

    config: Mapping[str, str] = field(default_factory=dict)
    """librdkafka properties applied last, to every client this transport makes."""

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
            raise ConfigurationError("Invalid ConfluentSettings: " + "; ".join(problems))

    @classmethod
    def from_env(
        cls, prefix: str = "KAFKA_", environ: Mapping[str, str] | None = None
    ) -> ConfluentSettings:
        """Settings from `{prefix}BOOTSTRAP` (required) and, when set, `{prefix}CLIENT_ID`,
        `LINGER_MS`, `COMPRESSION` (`gzip`, `lz4`, `zstd`, `snappy` or `none`),
        `SECURITY_PROTOCOL`, `SASL_MECHANISM`, `SASL_USERNAME`, `SASL_PASSWORD` and
        `SSL_CA_LOCATION`. `environ` defaults to `os.environ`.
        Read and checked in `framework.bus.kafka_env`, shared by both Kafka clients.
        """
        return cls(**kafka_options_from_env(prefix, environ, ssl_ca_location=True))

    @property
    def request_timeout(self) -> float:
        """`request_timeout_ms` in seconds."""
        return self.request_timeout_ms / 1000

    def client_config(self) -> dict[str, Any]:
        """The librdkafka properties every client (producer, consumer, admin) takes."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
            "logger": log,
            "error_cb": _log_client_error,
        }
        if self.security_protocol.startswith("SASL"):
            config["sasl.mechanisms"] = self.sasl_mechanism or "PLAIN"
            if self.sasl_plain_username is not None:
                config["sasl.username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                config["sasl.password"] = self.sasl_plain_password
        if self.ssl_ca_location is not None:
            config["ssl.ca.location"] = self.ssl_ca_location
        return config

    def producer_config(self, *, linger_ms: int | None = None) -> dict[str, Any]:
        config = self.client_config()
        config.update(
            {
                "acks": self.acks,
                "enable.idempotence": self.enable_idempotence,
                "linger.ms": self.linger_ms if linger_ms is None else linger_ms,
                "batch.size": self.max_batch_size,
                "compression.type": self.compression_type or "none",
                "message.max.bytes": self.max_request_size,
                "request.timeout.ms": self.request_timeout_ms,
                "message.timeout.ms": self.request_timeout_ms,
                "partitioner": "murmur2_random",  # the Java client's: keys land where theirs do
            }
        )
        config.update(self.config)
        return config

    def consumer_config(self, *, group: str | None, start_from: StartFrom) -> dict[str, Any]:
        config = self.client_config()
        config.update(
            {
                # librdkafka wants a group id even for a reader that only assigns; it never
                # joins that group (no subscribe) and never commits to it.
                "group.id": group if group is not None else f"msa-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": start_from,
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": self.heartbeat_interval_ms,
                "max.poll.interval.ms": self.max_poll_interval_ms,
                "fetch.wait.max.ms": self.fetch_max_wait_ms,
                "partition.assignment.strategy": "roundrobin",
                "enable.partition.eof": False,
                "allow.auto.create.topics": False,
            }
        )
        config.update(self.config)
        return config

    def admin_config(self) -> dict[str, Any]:
        config = self.client_config()
        config.update(self.config)
        return config


# -- the one place librdkafka errors become framework errors -------------------------------------

_TOPIC_ERRORS: Final = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_EXCEPTION,
    }
)
_COMMIT_ERRORS: Final = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError._NO_OFFSET,
    }
)
_NOT_STARTED_ERRORS: Final = frozenset({KafkaError._DESTROY, KafkaError._STATE})
_NO_LEADER_YET: Final = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


def _kafka_error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def _map_error(
    exc: BaseException | KafkaError,
    *,
    doing: str,
    bootstrap: str,
    kind: type[TransportError] = TransportError,
) -> MsaError:
    """The framework error for `exc` (a `KafkaException`, a `KafkaError` or a timeout), met
    while `doing` something: a missing or forbidden topic is a `TopicError`; a commit refused
    by the group a `CommitError`; a closed client a `NotStartedError`; anything else a `kind`
    (`TransportError`, or `PublishError` for sends and `CommitError` for commits)."""
    error = exc if isinstance(exc, KafkaError) else _kafka_error(exc)
    detail = error.str() if error is not None else f"{type(exc).__name__}: {exc}"
    name = f"{error.name()}: " if error is not None else ""
    message = f"Kafka at {bootstrap}: {doing} failed: {name}{detail}"
    code = error.code() if error is not None else None
    mapped: MsaError
    if code in _TOPIC_ERRORS:
        mapped = TopicError(message)
    elif code in _COMMIT_ERRORS:
        mapped = CommitError(message)
    elif code in _NOT_STARTED_ERRORS:
        mapped = NotStartedError(message)
    else:
        mapped = kind(message)
    if isinstance(exc, BaseException):
        mapped.__cause__ = exc
    return mapped


def _log_client_error(error: KafkaError) -> None:
    """librdkafka's error callback: its clients retry by themselves; say so unless fatal."""
    if error.fatal():
        log.error("librdkafka: fatal error: %s", error.str())
    elif error.code() == KafkaError._ALL_BROKERS_DOWN:
        log.warning("librdkafka: %s", error.str())
    else:
        log.info("librdkafka: %s", error.str())


# -- conversions between confluent-kafka's types and ours ----------------------------------------


def _ours(tp: KafkaTopicPartition) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _theirs(tp: TopicPartition, offset: int | None = None) -> KafkaTopicPartition:
    if offset is None:
        return KafkaTopicPartition(tp.topic, tp.partition)
    return KafkaTopicPartition(tp.topic, tp.partition, offset)


def _our_set(partitions: Iterable[KafkaTopicPartition]) -> frozenset[TopicPartition]:
    return frozenset(_ours(tp) for tp in partitions)


_ConsumedHeaders: TypeAlias = "list[tuple[str, bytes | None]] | None"
"""What a consumed message's `headers()` gives (values are bytes or None, never str)."""


def _record(message: Message, topic: str, partition: int) -> Record:
    """Our `Record` of a consumed message: the hot path of consuming, kept to plain calls
    (this runs once per record)."""
    raw_headers = cast(_ConsumedHeaders, message.headers())
    headers: Headers = ()
    if raw_headers:
        headers = tuple(raw_headers)  # type: ignore[arg-type]  # None values fixed below
        for _, header_value in raw_headers:
            if header_value is None:  # a null header value reads as empty, as our type says
                headers = tuple((name, value or b"") for name, value in raw_headers)
                break
    value = message.value()
    key = message.key()
    return Record(
        topic=topic,
        partition=partition,
        offset=message.offset() or 0,
        key=key if key is None or isinstance(key, bytes) else str(key).encode(),
        value=value if isinstance(value, bytes) else b"",  # a tombstone reads as empty
        headers=headers,
        timestamp_ms=message.timestamp()[1],
    )


def _settle(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """`call_soon_threadsafe`, from a librdkafka thread, to a loop that may have closed."""
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


# -- producing: librdkafka's queue, its delivery reports served on the event loop ---------------


class _Delivery(asyncio.Future[RecordMetadata]):
    """The future `send` returns, and itself the record's delivery callback (librdkafka calls
    it while `_serve` polls, on the loop): one object per record instead of a future and a
    `partial` of a bound method."""

    __slots__ = ("_pump",)

    def __init__(self, pump: _DeliveryPump) -> None:
        super().__init__(loop=pump._loop)
        self._pump = pump

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        pump = self._pump
        pump._in_flight -= 1
        if self.done():  # the caller cancelled it; the record was sent all the same
            return
        if error is not None:
            self.set_exception(
                _map_error(
                    error,
                    doing=f"sending to {message.topic()!r}",
                    bootstrap=pump._bootstrap,
                    kind=PublishError,
                )
            )
        else:
            self.set_result(
                RecordMetadata(
                    message.topic() or "", message.partition() or 0, message.offset() or 0
                )
            )


class _DeliveryPump:
    """One librdkafka producer, driven from the event loop.

    `produce` only enqueues, so `send` calls it on the loop. librdkafka queues a delivery
    report per record; `poll(0)` serves what is queued without waiting, here on the loop too, so
    each report settles its future directly (no thread, no lock, no hop): every `_POLL_EVERY`
    seconds while records are in flight, and every `_POLL_BATCH` sends when the loop is too busy
    sending to run timers. A thread serving them would contend with the loop for the GIL.
    """

    def __init__(self, config: dict[str, Any], *, bootstrap: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._bootstrap = bootstrap
        self._fatal: KafkaError | None = None
        config = dict(config)
        config["error_cb"] = self._on_error
        self.producer = Producer(config)
        self._in_flight = 0
        self._since_poll = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def fatal(self) -> bool:
        """librdkafka declared this producer unusable (its idempotence state is lost)."""
        return self._fatal is not None

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: Headers,
        partition: int | None,
    ) -> asyncio.Future[RecordMetadata]:
        acked = _Delivery(self)
        producer = self.producer
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    key,
                    partition=-1 if partition is None else partition,
                    on_delivery=acked,
                    headers=list(headers) if headers else None,
                )
            except BufferError:  # librdkafka's queue is full: serve reports, then wait
                if not producer.poll(0):
                    await asyncio.sleep(_POLL_EVERY)
                continue
            except KafkaException as exc:
                raise _map_error(
                    exc, doing=f"sending to {topic!r}", bootstrap=self._bootstrap, kind=PublishError
                ) from exc
            except RuntimeError as exc:  # closed by a concurrent stop()
                raise NotStartedError(f"ConfluentTransport stopped: {exc}") from exc
            break
        self._in_flight += 1
        self._since_poll += 1
        if self._since_poll >= _POLL_BATCH:
            self._serve()
        elif self._timer is None:
            self._timer = self._loop.call_later(_POLL_EVERY, self._serve)
        return acked

    async def close(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for every queued record's report, fail the others'
        futures, and close the producer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        producer = self.producer
        deadline = self._loop.time() + timeout
        while len(producer) and self._loop.time() < deadline:
            producer.poll(0)
            await asyncio.sleep(_POLL_EVERY)
        if len(producer):
            producer.purge()  # fails what is still queued: their senders hear so
        producer.poll(0)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        producer.close()

    def _serve(self) -> None:
        """Settle the futures of the records librdkafka has reports for (on the loop)."""
        self._timer = None
        self._since_poll = 0
        if self._closed:
            return
        self.producer.poll(0)
        if self._in_flight:
            self._timer = self._loop.call_later(_POLL_EVERY, self._serve)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
        _log_client_error(error)


# -- the transport -------------------------------------------------------------------------------


class ConfluentTransport:
    """Moves records through Apache Kafka with librdkafka. See the module docstring."""

    name = "kafka"

    def __init__(self, settings: ConfluentSettings) -> None:
        self.settings = settings
        self._pump: _DeliveryPump | None = None
        self._urgent: _DeliveryPump | None = None
        self._admin: AdminClient | None = None
        self._known_topics: set[str] = set()
        self._partition_counts: dict[str, int] = {}
        self._creating = asyncio.Lock()
        self._lifecycle = asyncio.Lock()

    @property
    def started(self) -> bool:
        return self._pump is not None

    async def start(self) -> None:
        """Connect: raises `TransportError` naming the bootstrap servers when no broker
        answers a metadata request within `request_timeout_ms`."""
        async with self._lifecycle:
            if self._pump is not None:
                return
            settings = self.settings
            admin = AdminClient(settings.admin_config())
            try:
                await self._blocking(
                    "connecting", lambda: admin.list_topics(timeout=settings.request_timeout)
                )
            finally:
                admin.poll(0)  # serve the log lines and errors of the attempt
            self._admin = admin
            self._pump = _DeliveryPump(
                settings.producer_config(), bootstrap=settings.bootstrap_servers
            )

    async def stop(self) -> None:
        """Wait until every queued record is acknowledged (or failed), then disconnect."""
        async with self._lifecycle:
            pump, urgent = self._pump, self._urgent
            if pump is None:
                return
            self._pump = self._urgent = self._admin = None
            self._known_topics.clear()
            self._partition_counts.clear()
            closings = [pump.close(self.settings.request_timeout)]
            if urgent is not None:
                closings.append(urgent.close(self.settings.request_timeout))
            await asyncio.gather(*closings)

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
        pump = self._running_pump()
        if pump.fatal:
            pump = await self._replace_producer(pump)
        if self.settings.auto_create_topics and topic not in self._known_topics:
            await self._create_missing([topic])
        if partition is not None and partition >= await self._partition_count(topic):
            raise TopicError(f"Topic {topic!r} has no partition {partition}")
        if immediate:
            pump = await self._urgent_pump()
        return await pump.send(topic, value, key, headers, partition)

    async def declare(self, topics: Sequence[TopicSpec]) -> None:
        self._running_pump()
        await self._create(
            [
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication_factor,
                    config=spec.configs(),
                )
                for spec in topics
            ]
        )

    async def delete_topics(self, names: Sequence[str]) -> None:
        """Delete the topics; names of topics that do not exist are ignored."""
        admin = self._running_admin()
        if not names:
            return
        futures = admin.delete_topics(list(names), operation_timeout=self.settings.request_timeout)
        self._known_topics.difference_update(names)
        for name in names:
            self._partition_counts.pop(name, None)
        failures = []
        for name, future in futures.items():
            try:
                await asyncio.wrap_future(future)
            except KafkaException as exc:
                error = _kafka_error(exc)
                if error is None or error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    failures.append(f"{name}: {error.name() if error else exc}")
        admin.poll(0)
        if failures:
            raise TopicError("Could not delete topics: " + "; ".join(failures))

    async def partitions_for(self, topic: str) -> int:
        self._running_pump()
        if self.settings.auto_create_topics and topic not in self._known_topics:
            await self._create_missing([topic])
        return await self._partition_count(topic)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> ConfluentConsumer:
        """A consumer in `group`, or a group-less reader of every partition (`group=None`).

        It connects on `start()`, which needs this transport to be started.
        """
        return ConfluentConsumer(
            self,
            topics,
            group=group,
            listener=listener,
            start_from=start_from,
            max_poll_records=max_poll_records,
        )

    # -- internals -------------------------------------------------------------------------------

    def _running_pump(self) -> _DeliveryPump:
        if self._pump is None:
            raise NotStartedError(
                "ConfluentTransport is not started: await transport.start() first"
            )
        return self._pump

    def _running_admin(self) -> AdminClient:
        if self._admin is None:
            raise NotStartedError(
                "ConfluentTransport is not started: await transport.start() first"
            )
        return self._admin

    async def _blocking(self, doing: str, call: Callable[[], T]) -> T:
        """Run a blocking librdkafka call (one with its own timeout) off the event loop."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, call)
        except KafkaException as exc:
            raise _map_error(exc, doing=doing, bootstrap=self.settings.bootstrap_servers) from exc

    async def _urgent_pump(self) -> _DeliveryPump:
        """A second producer that does not linger (`linger.ms=0`), for records someone waits
        on one by one (requests, replies). Ordering against records sent without `immediate`
        is not guaranteed."""
        if self._urgent is None:
            async with self._lifecycle:
                self._running_pump()
                if self._urgent is None:
                    self._urgent = _DeliveryPump(
                        self.settings.producer_config(linger_ms=0),
                        bootstrap=self.settings.bootstrap_servers,
                    )
        return self._urgent

    async def _replace_producer(self, broken: _DeliveryPump) -> _DeliveryPump:
        """Swap a producer librdkafka declared fatally broken for a new one (a new producer
        id). Records the old one still queued fail; their senders retry them (the outbox relay
        does), so they may be written twice, never lost."""
        async with self._lifecycle:
            if self._pump is broken:
                self._pump = _DeliveryPump(
                    self.settings.producer_config(), bootstrap=self.settings.bootstrap_servers
                )
        await broken.close(0)
        return self._running_pump()

    async def _create_missing(self, topics: Sequence[str]) -> None:
        async with self._creating:  # one creation at a time, so concurrent sends ask only once
            missing = [topic for topic in topics if topic not in self._known_topics]
            if missing:
                settings = self.settings
                await self._create(
                    [
                        NewTopic(
                            topic,
                            num_partitions=settings.default_partitions,
                            replication_factor=settings.default_replication_factor,
                        )
                        for topic in missing
                    ]
                )

    async def _create(self, new_topics: list[NewTopic]) -> None:
        """Create topics, treating those that exist already as created."""
        admin = self._running_admin()
        if not new_topics:
            return
        futures = admin.create_topics(
            new_topics,
            operation_timeout=self.settings.request_timeout,
            request_timeout=self.settings.request_timeout,
        )
        created, failures = [], []
        for name, future in futures.items():
            try:
                await asyncio.wrap_future(future)
            except KafkaException as exc:
                error = _kafka_error(exc)
                if error is not None and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    created.append(name)
                    continue
                if error is None:
                    failures.append(f"{name}: {exc}")
                else:
                    failures.append(f"{name}: {error.name()} ({error.str()})")
            else:
                created.append(name)
        admin.poll(0)
        if failures:
            raise TopicError("Could not create topics: " + "; ".join(failures))
        await self._await_leaders(created)
        self._known_topics.update(created)  # only now: a send may skip the checks above

    async def _await_leaders(self, names: Sequence[str]) -> None:
        """Wait until every partition of `names` has a leader, within `request_timeout_ms`,
        so nothing this transport declared is so new that a first send meets no leader."""
        admin = self._running_admin()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        waiting = list(names)
        while waiting:
            still = []
            for topic in waiting:
                metadata = await self._blocking(
                    f"looking up topic {topic!r}",
                    partial(admin.list_topics, topic, self.settings.request_timeout),
                )
                described = metadata.topics.get(topic)
                if (
                    described is None
                    or described.error is not None
                    or not described.partitions
                    or any(
                        p.error is not None or p.leader < 0 for p in described.partitions.values()
                    )
                ):
                    still.append(topic)
                else:
                    self._partition_counts[topic] = len(described.partitions)
            waiting = still
            if waiting and loop.time() > deadline:
                raise TopicError(
                    f"no leader was elected for every partition of {waiting} within "
                    f"{self.settings.request_timeout:.0f}s"
                )
            if waiting:
                await asyncio.sleep(0.05)

    async def _partition_count(self, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is not None:
            return count
        admin = self._running_admin()
        metadata = await self._blocking(
            f"looking up topic {topic!r}",
            partial(admin.list_topics, topic, self.settings.request_timeout),
        )
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            error = described.error if described is not None else None
            raise TopicError(
                f"Kafka at {self.settings.bootstrap_servers}: topic {topic!r} does not exist"
                + (f" ({error.str()})" if error is not None else "")
            )
        self._partition_counts[topic] = count = len(described.partitions)
        return count

    async def _all_partitions(self, topics: Sequence[str]) -> list[TopicPartition]:
        self._running_pump()
        partitions: list[TopicPartition] = []
        for topic in topics:
            if self.settings.auto_create_topics and topic not in self._known_topics:
                await self._create_missing([topic])
            count = await self._partition_count(topic)
            partitions.extend(TopicPartition(topic, number) for number in range(count))
        return partitions

    async def _end_offsets(
        self, partitions: Sequence[TopicPartition], *, start: bool = False
    ) -> dict[TopicPartition, int]:
        """The high watermark of each partition (with `start`, the low one: the offset of its
        first record still kept), asked of the partition leaders now."""
        admin = self._running_admin()
        if not partitions:
            return {}
        spec = OffsetSpec.earliest() if start else OffsetSpec.latest()  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        ends: dict[TopicPartition, int] = {}
        waiting = list(partitions)
        try:
            while waiting:
                futures = admin.list_offsets(
                    {_theirs(tp): spec for tp in waiting},
                    request_timeout=self.settings.request_timeout,
                )
                waiting = []
                for tp, future in futures.items():
                    try:
                        async with asyncio.timeout(max(0.0, deadline - loop.time()) + 1):
                            info = await asyncio.wrap_future(future)
                    except KafkaException as exc:
                        # A partition just created may have a leader in the metadata before
                        # that broker knows it leads: ask again until the deadline.
                        error = _kafka_error(exc)
                        if error is None or error.code() not in _NO_LEADER_YET:
                            raise
                        if loop.time() > deadline:
                            raise
                        waiting.append(_ours(tp))
                    else:
                        ends[_ours(tp)] = info.offset
                if waiting:
                    await asyncio.sleep(0.05)
        except (KafkaException, TimeoutError) as exc:
            raise _map_error(
                exc, doing="asking for end offsets", bootstrap=self.settings.bootstrap_servers
            ) from exc
        finally:
            admin.poll(0)
        return ends


# -- the consumer --------------------------------------------------------------------------------


_WAKE: Final = object()
_STOP: Final = object()


class _ConsumerThread:
    """The one thread that calls the librdkafka consumer: jobs run here one at a time, in the
    order they were posted; their results settle asyncio futures on the owning loop.

    Inside a rebalance callback (`run_coroutine`) it runs only the jobs marked `reentrant`
    (commits, pauses); the others (a fetch, the close) wait until the callback has returned.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._deferred: deque[Any] = deque()  # jobs a callback did not run; first after it
        self.idle: Callable[[], bool] = lambda: False
        """Work for the thread when no job waits (fetching ahead); False: none, sleep."""
        self._finished: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, job: Callable[[], T], *, reentrant: bool = False) -> asyncio.Future[T]:
        """Run `job` on the thread, after the jobs posted before; the future settles with its
        result (a caller that cancels it does not stop the job)."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((job, future, reentrant))
        return future

    def post(self, job: Callable[[], object]) -> None:
        """Run `job` (a pause or resume) on the thread, after the jobs posted before; nobody
        waits for it."""
        self._jobs.put((job, None, True))

    def wake(self) -> None:
        """Have a thread asleep for want of `idle` work look again."""
        self._jobs.put(_WAKE)

    def run_coroutine(self, coroutine: Any, what: str) -> None:
        """On the thread, inside a librdkafka callback: run `coroutine` on the loop and serve
        the reentrant jobs it posts meanwhile (its commits) until it ends. Its exception is
        logged, as aiokafka does: the group carries on."""
        done = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        done.add_done_callback(lambda _: self._jobs.put(_WAKE))
        while not done.done():
            job = self._jobs.get()
            if job is _WAKE:
                continue
            if job is _STOP or not job[2]:
                self._deferred.append(job)
                continue
            self._execute(job)
        try:
            done.result(timeout=0)
        except concurrent.futures.CancelledError:
            log.warning("the rebalance listener's %s was cancelled", what)
        except Exception:
            log.exception("the rebalance listener's %s failed; the group carries on", what)

    async def stop(self) -> None:
        """End the thread once the jobs posted before have run."""
        self._jobs.put(_STOP)
        await asyncio.shield(self._finished)
        self._thread.join()  # it has posted its last callback: it ends now

    def _run(self) -> None:
        try:
            while True:
                if self._deferred:
                    job = self._deferred.popleft()
                else:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        if self.idle():
                            continue
                        job = self._jobs.get()
                if job is _STOP:
                    return
                if job is not _WAKE:
                    self._execute(job)
        finally:
            _post(self._loop, _settle, self._finished, None)

    def _execute(self, job: tuple[Callable[[], Any], asyncio.Future[Any] | None, bool]) -> None:
        call, future, _ = job
        try:
            result = call()
        except BaseException as exc:
            if future is None:
                log.warning("a confluent-kafka consumer call failed: %s", exc)
            else:
                _post(self._loop, _fail, future, exc)
            return
        if future is not None:
            _post(self._loop, _settle, future, result)


class ConfluentConsumer:
    """A member of a Kafka consumer group (or a group-less reader) on librdkafka; see
    `ConfluentTransport.consumer`. `start()` returns once the first assignment is known and
    `on_assigned` has run."""

    def __init__(
        self,
        transport: ConfluentTransport,
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
        self._transport_loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        self._thread: _ConsumerThread | None = None
        self._stopping = False
        self._closing = False  # librdkafka's close revokes: announced already by stop()
        # Mirrors the event loop reads without waiting for the consumer thread; each is
        # replaced whole (a reference swap), never changed in place; both threads change
        # `_assigned` and `_paused` under `_buffer_lock`.
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._paused: frozenset[TopicPartition] = frozenset()
        self._lag: dict[TopicPartition, int] = {}  # from librdkafka's position, as last seen
        self._starts: dict[TopicPartition, int] = {}  # where partitions started, when known
        # Records librdkafka returned that no `fetch` handed out yet: those a join brought,
        # those of a fetch its caller cancelled, those beyond `max_records`; and, apart, those
        # of partitions paused meanwhile (handed out after `resume`). Both threads use them.
        self._buffer_lock = threading.Lock()
        self._ready: deque[Record] = deque()
        self._held: dict[TopicPartition, list[Record]] = {}
        self._arrived = asyncio.Event()  # `_ready` went from empty to not
        self._joined = asyncio.Event()  # the first assignment is known
        self._fetching = False  # the thread fetches ahead while `_ready` has room
        self._failure: BaseException | None = None  # of fetching ahead, for the next fetch

    async def start(self) -> None:
        if self._consumer is not None:
            return
        transport, settings = self._transport, self._transport.settings
        # Raises NotStartedError; creates the topics, so no metadata request of the consumer's
        # lets the broker create them with its defaults.
        partitions = await transport._all_partitions(self.topics)
        self._transport_loop = asyncio.get_running_loop()
        thread = _ConsumerThread(f"msa-confluent-consumer:{self.group or 'reader'}")
        try:
            config = settings.consumer_config(group=self.group, start_from=self.start_from)
            consumer = await thread.call(partial(Consumer, config))
            self._consumer, self._thread = consumer, thread
            self._stopping = self._closing = False
            if self.group is not None:
                await self._join(consumer, thread)
            else:
                await self._assign_all(consumer, thread, partitions)
        except BaseException:
            await self._close(self._consumer, thread)
            raise

    async def _join(self, consumer: Consumer, thread: _ConsumerThread) -> None:
        settings = self._transport.settings
        await thread.call(
            partial(
                consumer.subscribe,
                list(self.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        )
        self._start_fetching(thread)  # its polls join the group and run the callbacks
        try:
            async with asyncio.timeout(settings.max_poll_interval_ms / 1000):
                await self._joined.wait()
        except TimeoutError:
            raise TransportError(
                f"Kafka at {settings.bootstrap_servers}: joining group {self.group!r} "
                f"took longer than max_poll_interval_ms={settings.max_poll_interval_ms}"
            ) from None
        self._raise_failure()

    async def _assign_all(
        self, consumer: Consumer, thread: _ConsumerThread, partitions: list[TopicPartition]
    ) -> None:
        # Concrete offsets, not librdkafka's logical ones: they are what `lag()` counts from
        # before the first record, and "latest" must mean the end as it is now, not whenever
        # librdkafka gets round to resolving it.
        starts = await self._transport._end_offsets(partitions, start=self.start_from == "earliest")
        theirs = [_theirs(tp, starts[tp]) for tp in partitions]
        self._starts = starts
        with self._translating("assigning partitions"):
            await thread.call(partial(consumer.assign, theirs))
        self._assigned = frozenset(partitions)
        await self.listener.on_assigned(self._assigned)
        self._start_fetching(thread)

    async def fetch(self, *, timeout: float, max_records: int) -> list[Record]:
        """Up to `max_records` records, waiting at most `timeout` seconds for the first; in
        partition order, and in offset order within a partition."""
        _, thread = self._running()
        if not self._ready:
            self._arrived.clear()
            thread.wake()  # in case it slept with a full buffer we have emptied since
            if not self._ready:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()
        self._raise_failure()
        with self._buffer_lock:
            ready = self._ready
            full = len(ready) >= self._ahead
            count = min(max_records, len(ready))
            records = [ready.popleft() for _ in range(count)]
        if full and records:
            thread.wake()  # room again: fetch ahead
        records.sort(key=lambda r: (r.topic, r.partition))  # stable: offsets stay in order
        return records

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read.

        Raises `CommitError` when a partition is not assigned now (a rebalance revoked it) or
        the group moved on. A group-less reader has nothing to commit to.
        """
        consumer, thread = self._running()
        if self.group is None or not offsets:
            return
        foreign = sorted(
            f"{tp.topic}[{tp.partition}]" for tp in offsets if tp not in self._assigned
        )
        if foreign:
            raise CommitError(
                f"Kafka at {self._transport.settings.bootstrap_servers}: committing offsets "
                f"failed: {', '.join(foreign)} not assigned to this member (revoked)"
            )
        theirs = [_theirs(tp, offset) for tp, offset in offsets.items()]

        def commit_now() -> list[KafkaTopicPartition]:
            return consumer.commit(offsets=theirs, asynchronous=False)

        with self._translating("committing offsets", kind=CommitError):
            results = await thread.call(commit_now, reentrant=True)
        for tp in results:
            if tp.error is not None:
                raise _map_error(
                    tp.error,
                    doing=f"committing offsets of {tp.topic}[{tp.partition}]",
                    bootstrap=self._transport.settings.bootstrap_servers,
                    kind=CommitError,
                )

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching these partitions (ones not assigned any more are ignored)."""
        consumer, thread = self._running()
        chosen = [tp for tp in partitions if tp in self._assigned and tp not in self._paused]
        if not chosen:
            return
        with self._buffer_lock:  # what was fetched and not handed out waits for the resume
            self._paused = paused = self._paused | frozenset(chosen)
            kept: deque[Record] = deque()
            for record in self._ready:
                if record.topic_partition in paused:
                    self._held.setdefault(record.topic_partition, []).append(record)
                else:
                    kept.append(record)
            self._ready = kept
        thread.post(partial(self._pause_owned, consumer, [_theirs(tp) for tp in chosen]))

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        consumer, thread = self._running()
        chosen = [tp for tp in partitions if tp in self._paused]
        if not chosen:
            return
        with self._buffer_lock:
            self._paused = self._paused - frozenset(chosen)
            for tp in chosen:
                self._ready.extend(self._held.pop(tp, ()))
        thread.post(partial(self._resume_owned, consumer, chosen))

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions assigned now (none while not started or during a rebalance)."""
        if self._consumer is None:
            return frozenset()
        return self._assigned

    def lag(self) -> dict[TopicPartition, int]:
        """Records between the position and the end of each assigned partition, as of the last
        `fetch`; partitions no fetch response covered yet are left out. No network call."""
        if self._consumer is None:
            return {}
        assigned = self._assigned
        lag = {tp: n for tp, n in self._lag.items() if tp in assigned}
        with self._buffer_lock:  # fetched by librdkafka, not by our caller yet
            for record in self._ready:
                if record.topic_partition in lag:
                    lag[record.topic_partition] += 1
            for tp, held in self._held.items():
                if tp in lag:
                    lag[tp] += len(held)
        return lag

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The end of each partition (its high watermark), asked of the partition leaders now.

        Raises `TransportError` when they do not answer within `request_timeout_ms`."""
        self._running()
        return await self._transport._end_offsets(partitions)

    async def stop(self) -> None:
        """Announce the partitions still held as revoked (so they can be committed), then leave
        the group and disconnect. Safe to call twice."""
        consumer, thread = self._consumer, self._thread
        if consumer is None or thread is None or self._stopping:
            return
        self._stopping = True
        try:
            held = self.assignment()
            if held:
                await self.listener.on_revoked(held)
        finally:
            self._closing = True
            self._lag = {}
            await self._close(consumer, thread)

    # -- internals -------------------------------------------------------------------------------

    def _running(self) -> tuple[Consumer, _ConsumerThread]:
        if self._consumer is None or self._thread is None:
            raise NotStartedError("ConfluentConsumer is not started: await consumer.start() first")
        return self._consumer, self._thread

    def _translating(
        self, doing: str, *, kind: type[TransportError] = TransportError
    ) -> contextlib.AbstractContextManager[None]:
        return _translate_errors(
            doing, bootstrap=self._transport.settings.bootstrap_servers, kind=kind
        )

    async def _close(self, consumer: Consumer | None, thread: _ConsumerThread) -> None:
        self._closing = True
        self._consumer = self._thread = None
        self._assigned = self._paused = frozenset()
        with self._buffer_lock:
            self._ready, self._held = deque(), {}
        try:
            if consumer is not None:
                with self._translating("stopping a consumer"):
                    await thread.call(consumer.close)
        finally:
            await thread.stop()

    # -- on the consumer thread ------------------------------------------------------------------

    @property
    def _ahead(self) -> int:
        """How many records the thread fetches ahead of the caller."""
        return self.max_poll_records

    def _start_fetching(self, thread: _ConsumerThread) -> None:
        self._fetching = True
        thread.idle = self._fetch_ahead
        thread.wake()

    def _tell(self, event: asyncio.Event) -> None:
        """Set `event` on the loop (from the consumer thread)."""
        if self._transport_loop is not None:
            _post(self._transport_loop, event.set)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if isinstance(failure, KafkaException):
            raise _map_error(
                failure, doing="fetching", bootstrap=self._transport.settings.bootstrap_servers
            ) from failure
        if failure is not None:
            raise failure

    def _fetch_ahead(self) -> bool:
        """The thread's work when no call waits: wait (one slice) for records and buffer them,
        while the buffer has room. Its polls also run librdkafka's rebalance callbacks."""
        consumer = self._consumer
        if consumer is None or self._closing or not self._fetching or self._failure:
            return False
        if len(self._ready) >= self._ahead:
            return False
        try:
            messages = self._take(consumer, self._ahead, _CONSUME_SLICE)
            if self._accept(consumer, messages):
                self._tell(self._arrived)
        except Exception as exc:  # a fatal error: the next fetch raises it
            self._failure = exc
            self._tell(self._arrived)
            return False
        return True

    @staticmethod
    def _take(consumer: Consumer, max_records: int, wait: float) -> list[Message]:
        """Up to `max_records` messages, as soon as there is one: librdkafka's `consume`
        waits for all `max_records` or the whole `wait`, so wait with `poll` (one message,
        at once), then take what else is queued without waiting."""
        messages = consumer.consume(max_records, 0)
        if messages or wait <= 0:
            return messages
        first = consumer.poll(wait)
        if first is None:
            return []
        if max_records == 1:
            return [first]
        return [first, *consumer.consume(max_records - 1, 0)]

    def _accept(self, consumer: Consumer, messages: list[Message]) -> bool:
        """Buffer the records among `messages` (held back if their partition was paused
        while `consume` ran); whether the ready buffer went from empty to not, which is when
        a waiting `fetch` must be told. Judged under the lock, not before `consume` waited:
        the caller may have emptied the buffer meanwhile, and a reader told nothing then
        sleeps out its whole timeout with a record ready (a request's reply took 1 s)."""
        with self._buffer_lock:
            paused, assigned, ready = self._paused, self._assigned, self._ready
            was_empty = not ready
            # Where each partition's records go, worked out once per partition, not per record.
            routes: dict[tuple[str | None, int | None], tuple[TopicPartition, list[Record] | None]]
            routes = {}
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.info("librdkafka: consumer: %s", error.str())
                    continue
                topic, partition = message.topic(), message.partition()
                route = routes.get((topic, partition))
                if route is None:
                    tp = TopicPartition(topic or "", partition or 0)
                    if tp in paused:  # paused while `consume` ran: after the resume
                        route = (tp, self._held.setdefault(tp, []))
                    elif tp in assigned:
                        route = (tp, None)
                    else:  # revoked since librdkafka fetched it: the next owner reads it
                        continue
                    routes[topic, partition] = route
                tp, held = route
                record = _record(message, tp.topic, tp.partition)
                (ready if held is None else held).append(record)
            self._note_lag(consumer)  # with the buffer: `lag()` adds what it holds
            return was_empty and bool(ready)

    def _note_lag(self, consumer: Consumer) -> None:
        """Each assigned partition's lag for `lag()`: the end the last fetch response reported
        less the position (both known locally, no request). librdkafka knows a position only
        once it returned a record of the partition; before, it is where the partition started
        (its committed offset, or the end a reader from `latest` was assigned at)."""
        assigned = list(self._assigned)
        if not assigned:
            self._lag = {}
            return
        lag: dict[TopicPartition, int] = {}
        for position in consumer.position([_theirs(tp) for tp in assigned]):
            ours = _ours(position)
            offset = position.offset if position.offset >= 0 else self._starts.get(ours, -1)
            if offset < 0:
                continue
            _, high = consumer.get_watermark_offsets(_theirs(ours), cached=True)
            if high >= 0:
                lag[ours] = max(0, high - offset)
        self._lag = lag

    def _pause_owned(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        owned = self._assigned
        consumer.pause([tp for tp in partitions if _ours(tp) in owned])

    def _resume_owned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        owned = [tp for tp in partitions if tp in self._assigned]
        if owned:
            consumer.resume([_theirs(tp) for tp in owned])

    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        consumer.assign(partitions)  # eager protocol: the whole new assignment, fresh
        ours = _our_set(partitions)
        self._starts = {}
        if partitions:
            timeout = self._transport.settings.request_timeout
            try:
                committed = consumer.committed(partitions, timeout=timeout)
            except KafkaException as exc:  # only `lag()` misses it until the first record
                log.info("librdkafka: asking for committed offsets failed: %s", exc)
            else:
                self._starts = {_ours(tp): tp.offset for tp in committed if tp.offset >= 0}
        with self._buffer_lock:
            self._paused = self._paused - ours  # a rebalance forgets pauses, as Kafka does
            self._assigned = ours
        thread = self._thread
        if thread is not None and not self._closing:
            thread.run_coroutine(self.listener.on_assigned(ours), "on_assigned")
        self._tell(self._joined)  # `start()` returns once `on_assigned` has run

    def _on_revoke(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        ours = _our_set(partitions)
        thread = self._thread
        if ours and thread is not None and not self._closing:
            thread.run_coroutine(self.listener.on_revoked(ours), "on_revoked")
        self._forget(ours)
        consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        self._on_revoke(consumer, partitions)  # the listener's commit fails: redelivered

    def _forget(self, partitions: frozenset[TopicPartition]) -> None:
        with self._buffer_lock:  # not handed out: the next owner gets them
            self._assigned = self._assigned - partitions
            self._paused = self._paused - partitions
            for tp in partitions:
                self._held.pop(tp, None)
            self._ready = deque(r for r in self._ready if r.topic_partition not in partitions)
        self._lag = {tp: n for tp, n in self._lag.items() if tp not in partitions}


@contextlib.contextmanager
def _translate_errors(
    doing: str, *, bootstrap: str, kind: type[TransportError] = TransportError
) -> Iterator[None]:
    try:
        yield
    except KafkaException as exc:
        raise _map_error(exc, doing=doing, bootstrap=bootstrap, kind=kind) from exc
