"""The core contracts every other module imports: records, transports, handlers, middleware.

A *transport* moves bytes: it sends records and lets a consumer group fetch and commit them.
Everything above it (envelopes, typed payloads, per-key ordering, retries, dead letters,
request/reply) lives once in `framework.bus` and works the same on every transport. So the
in-memory transport and the Kafka transport only have to agree on this small surface, and one
contract suite (`tests/framework/bus/contract.py`) holds both to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

__all__ = [
    "NOT_PROCESSED",
    "Codec",
    "ConsumeMiddleware",
    "HandlerInfo",
    "Headers",
    "PublishMiddleware",
    "RebalanceListener",
    "Record",
    "RecordMetadata",
    "RouteInfo",
    "StartFrom",
    "TopicPartition",
    "TopicSpec",
    "Transport",
    "TransportConsumer",
]

T = TypeVar("T")

Headers: TypeAlias = tuple[tuple[str, bytes], ...]
"""Record headers in order, as Kafka keeps them (a name may repeat)."""

StartFrom: TypeAlias = Literal["earliest", "latest"]

NOT_PROCESSED = "X-MSA-Not-Processed"
"""HTTP response header (value `1`) of a 503 whose request no handler saw: a draining service's
refusal (`framework.http`). A client may send it again, whatever its method, to another
instance; `framework.resilience.UpstreamPool` does."""


@dataclass(frozen=True, slots=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One record as a transport delivers it to a consumer."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = ()
    timestamp_ms: int = 0

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        """The last value of header `name`, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where the broker stored a record it acknowledged."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    """An explicit topic declaration: partitions, replication and topic-level configs."""

    name: str
    partitions: int = 3
    replication_factor: int = 1
    retention_ms: int | None = None
    config: Mapping[str, str] = field(default_factory=dict)

    def configs(self) -> dict[str, str]:
        merged = dict(self.config)
        if self.retention_ms is not None:
            merged["retention.ms"] = str(self.retention_ms)
        return merged


@runtime_checkable
class RebalanceListener(Protocol):
    """Told by a consumer before it loses partitions and after it gains some."""

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Commit what is done on these partitions; work not done is dropped (redelivered)."""

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None: ...


class TransportConsumer(Protocol):
    """A member of a consumer group on one transport. Offsets are committed explicitly only."""

    async def start(self) -> None: ...

    async def fetch(self, *, timeout: float, max_records: int) -> Sequence[Record]:
        """Up to `max_records` records, waiting at most `timeout` seconds for the first."""

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read."""

    def pause(self, partitions: Sequence[TopicPartition]) -> None: ...

    def resume(self, partitions: Sequence[TopicPartition]) -> None: ...

    def assignment(self) -> frozenset[TopicPartition]: ...

    def lag(self) -> Mapping[TopicPartition, int]:
        """Records behind the end of each assigned partition, as last seen."""

    async def end_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, int]:
        """The end of each partition, asked now: the offset its next record will get.

        The partitions need not be assigned to this consumer; the position does not move.
        Reading a partition up to the end asked at some moment reads exactly what it held then.
        """

    async def stop(self) -> None: ...


class Transport(Protocol):
    """Moves records. Implementations: `MemoryTransport`, `KafkaTransport`."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

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
        """Enqueue a record; the returned future resolves when the broker acknowledged it.

        Awaiting `send` only waits for room in the send buffer, which lets callers pipeline
        many records; await the future to wait for the acknowledgement. `immediate` sends the
        record at once instead of letting it wait for a batch to fill (requests and replies,
        where someone is waiting on each record).
        """

    async def declare(self, topics: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist yet (existing ones are left as they are)."""

    async def delete_topics(self, names: Sequence[str]) -> None: ...

    async def partitions_for(self, topic: str) -> int:
        """How many partitions `topic` has (creating it per broker defaults if allowed)."""

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> TransportConsumer:
        """A consumer in `group` (None: a group-less reader of every partition)."""


ConsumeNext: TypeAlias = Callable[[Any], Awaitable[Any]]
ConsumeMiddleware: TypeAlias = Callable[[Any, ConsumeNext], Awaitable[Any]]
"""`async def mw(message, call_next)`: wraps handling of one incoming `Message`."""

PublishNext: TypeAlias = Callable[[Any], Awaitable[Any]]
PublishMiddleware: TypeAlias = Callable[[Any, PublishNext], Awaitable[Any]]
"""`async def mw(envelope, call_next)`: wraps publishing of one outgoing `Envelope`."""


@runtime_checkable
class Codec(Protocol):
    """Turns bodies of one media type into JSON-like values (dicts, lists, str, int, float,
    bool, None) and back. `decode` raises `TranslationError` (or a subclass) on bad input."""

    media_type: str
    """The content type it reads and writes, e.g. `application/xml`."""

    def decode(self, body: bytes) -> Any: ...

    def encode(self, value: Any) -> bytes: ...


@dataclass(frozen=True, kw_only=True)
class HandlerInfo:
    """What `@handles` recorded on a method (`framework.service`); the AsyncAPI document and
    the subscriptions are made from it."""

    topics: tuple[str, ...]
    type: str | None
    group: str | None
    options: Mapping[str, Any]
    payload_type: Any = None
    wants_message: bool = False
    attribute: str = ""


@dataclass(frozen=True, kw_only=True)
class RouteInfo:
    """What `@route` recorded on a method (`framework.service`); the HTTP side and the OpenAPI
    document are made from it."""

    method: str
    path: str
    summary: str = ""
    body: Any = None
    response: Any = None
    attribute: str = ""
