"""An in-memory transport that behaves like a Kafka cluster of one broker.

It is the embedded default (a modular monolith in one process) and the transport of fast unit
tests, and it passes the same contract suite as `KafkaTransport`. What it keeps from Kafka:

- topics with partitions; a record's partition is Kafka's default for its key (murmur2), so a
  key lands on the same partition number on both transports; keyless records go round-robin;
- per-partition logs with offsets that only grow; nothing is deleted while the process lives;
- consumer groups with committed offsets; a new member resumes from the group's commit;
- rebalancing when members join or leave, cooperative like Kafka's incremental protocol: a
  partition moves only after its old owner's `on_revoked` ran (and committed what was done);
- committing a partition the member no longer owns raises `CommitError`, as Kafka does;
- group-less readers (for reply topics) that see every partition from the end or the start.

What it does not keep: durability across process restarts, retention, transactions.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from framework.errors import CommitError, NotStartedError, TopicError
from framework.types import (
    Headers,
    RebalanceListener,
    Record,
    RecordMetadata,
    StartFrom,
    TopicPartition,
    TopicSpec,
)

__all__ = ["MemoryTransport", "murmur2", "partition_for_key"]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (as in the Java client's `Utils.murmur2`), as an unsigned int."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & ~3
    extra = length % 4
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class _Topic:
    name: str
    logs: list[list[Record]]
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class _Group:
    name: str
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    members: list[MemoryConsumer] = field(default_factory=list)
    owner: dict[TopicPartition, MemoryConsumer] = field(default_factory=dict)

    def rebalance(self, cluster: MemoryTransport) -> None:
        """Compute the target assignment; moves happen as owners revoke (see module doc)."""
        partitions = sorted(
            {
                TopicPartition(t, p)
                for member in self.members
                for t in member.topics
                for p in range(len(cluster.topic(t).logs))
            },
            key=lambda tp: (tp.topic, tp.partition),
        )
        target: dict[MemoryConsumer, set[TopicPartition]] = {m: set() for m in self.members}
        interested = {tp: [m for m in self.members if tp.topic in m.topics] for tp in partitions}
        counters: dict[str, itertools.cycle[MemoryConsumer]] = {}
        for tp in partitions:
            members = interested[tp]
            if not members:
                continue
            cycle = counters.setdefault(tp.topic, itertools.cycle(members))
            target[next(cycle)].add(tp)
        for member in self.members:
            member.target = frozenset(target[member])
        cluster.wake()


class MemoryConsumer:
    """A consumer-group member (or a group-less reader) on a `MemoryTransport`."""

    def __init__(
        self,
        cluster: MemoryTransport,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom,
        max_poll_records: int,
    ) -> None:
        self.cluster = cluster
        self.topics = tuple(topics)
        self.group_name = group
        self.listener = listener
        self.start_from = start_from
        self.max_poll_records = max_poll_records
        self.owned: frozenset[TopicPartition] = frozenset()
        self.target: frozenset[TopicPartition] = frozenset()
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.running = False

    @property
    def group(self) -> _Group | None:
        return self.cluster.groups.get(self.group_name) if self.group_name else None

    async def start(self) -> None:
        self.cluster.require_started()
        for topic in self.topics:
            self.cluster.topic(topic)
        self.running = True
        group = self.group
        if self.group_name is None:
            self.target = frozenset(
                TopicPartition(t, p)
                for t in self.topics
                for p in range(len(self.cluster.topic(t).logs))
            )
            await self._apply_assignment()
            return
        if group is None:
            group = self.cluster.groups[self.group_name] = _Group(self.group_name)
        group.members.append(self)
        group.rebalance(self.cluster)
        await self._apply_assignment()

    async def _apply_assignment(self) -> None:
        """Give up what is no longer ours (after on_revoked), then take what is free."""
        group = self.group
        lost = self.owned - self.target
        if lost:
            await self.listener.on_revoked(lost)
            self.owned -= lost
            for tp in lost:
                self.positions.pop(tp, None)
                self.paused.discard(tp)
                if group is not None and group.owner.get(tp) is self:
                    del group.owner[tp]
            self.cluster.wake()
        gained = frozenset(
            tp
            for tp in self.target - self.owned
            if group is None or group.owner.get(tp) in (None, self)
        )
        if gained:
            for tp in gained:
                if group is not None:
                    group.owner[tp] = self
                committed = group.committed.get(tp) if group is not None else None
                if committed is not None:
                    self.positions[tp] = committed
                elif self.start_from == "latest":
                    self.positions[tp] = len(self.cluster.topic(tp.topic).logs[tp.partition])
                else:
                    self.positions[tp] = 0
            self.owned |= gained
            await self.listener.on_assigned(gained)

    def _available(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for tp in sorted(self.owned, key=lambda t: (t.topic, t.partition)):
            if tp in self.paused:
                continue
            log = self.cluster.topic(tp.topic).logs[tp.partition]
            position = self.positions[tp]
            if position < len(log):
                take = log[position : position + max_records - len(out)]
                out.extend(take)
                self.positions[tp] = position + len(take)
                if len(out) >= max_records:
                    break
        return out

    async def fetch(self, *, timeout: float, max_records: int) -> Sequence[Record]:
        if not self.running:
            raise NotStartedError("consumer is not running")
        deadline = time.monotonic() + timeout
        max_records = min(max_records, self.max_poll_records)
        while True:
            if self.owned != self.target:
                await self._apply_assignment()
            records = self._available(max_records)
            remaining = deadline - time.monotonic()
            if records or remaining <= 0 or not self.running:
                return records
            await self.cluster.wait_for_change(remaining)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        group = self.group
        if group is None:
            return
        for tp, offset in offsets.items():
            if group.owner.get(tp) is not self:
                raise CommitError(
                    f"cannot commit {tp.topic}[{tp.partition}]: the partition was reassigned "
                    f"in group {group.name!r}"
                )
            group.committed[tp] = offset

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self.paused.update(partitions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self.paused.difference_update(partitions)
        self.cluster.wake()

    def assignment(self) -> frozenset[TopicPartition]:
        return self.owned

    def lag(self) -> Mapping[TopicPartition, int]:
        return {
            tp: len(self.cluster.topic(tp.topic).logs[tp.partition]) - position
            for tp, position in self.positions.items()
        }

    async def end_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, int]:
        if not self.running:
            raise NotStartedError("consumer is not running")
        ends = {}
        for tp in partitions:
            logs = self.cluster.topic(tp.topic).logs
            if not 0 <= tp.partition < len(logs):
                raise TopicError(f"topic {tp.topic!r} has no partition {tp.partition}")
            ends[tp] = len(logs[tp.partition])
        return ends

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        group = self.group
        if group is not None and self in group.members:
            group.members.remove(self)
            for tp in self.owned:
                if group.owner.get(tp) is self:
                    del group.owner[tp]
            group.rebalance(self.cluster)
        self.owned = frozenset()
        self.cluster.wake()


class MemoryTransport:
    """The in-memory transport. One instance is one "cluster": share it between services."""

    name = "memory"

    def __init__(self, *, default_partitions: int = 3, auto_create_topics: bool = True) -> None:
        self.default_partitions = default_partitions
        self.auto_create_topics = auto_create_topics
        self.topics: dict[str, _Topic] = {}
        self.groups: dict[str, _Group] = {}
        self._round_robin = itertools.count()
        self._changed = asyncio.Event()
        self._started = 0

    async def start(self) -> None:
        # Reference-counted: several services in one process share one in-memory "cluster".
        self._started += 1

    async def stop(self) -> None:
        self._started = max(0, self._started - 1)

    def require_started(self) -> None:
        if not self._started:
            raise NotStartedError("MemoryTransport used before start()")

    def topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            if not self.auto_create_topics:
                raise TopicError(f"topic {name!r} does not exist (auto-creation is off)")
            topic = self.topics[name] = _Topic(name, [[] for _ in range(self.default_partitions)])
        return topic

    def wake(self) -> None:
        self._changed.set()

    async def wait_for_change(self, timeout: float) -> None:
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return
        if self._changed is event:  # the first waiter to wake arms a new event for the next round
            self._changed = asyncio.Event()

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
        self.require_started()
        logs = self.topic(topic).logs
        if partition is None:
            if key is not None:
                partition = partition_for_key(key, len(logs))
            else:
                partition = next(self._round_robin) % len(logs)
        elif not 0 <= partition < len(logs):
            raise TopicError(f"topic {topic!r} has no partition {partition}")
        log = logs[partition]
        offset = len(log)
        log.append(
            Record(
                topic=topic,
                partition=partition,
                offset=offset,
                key=key,
                value=value,
                headers=headers,
                timestamp_ms=int(time.time() * 1000),
            )
        )
        self.wake()
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        future.set_result(RecordMetadata(topic, partition, offset))
        return future

    async def declare(self, topics: Sequence[TopicSpec]) -> None:
        for spec in topics:
            if spec.name not in self.topics:
                self.topics[spec.name] = _Topic(
                    spec.name, [[] for _ in range(spec.partitions)], spec.configs()
                )

    async def delete_topics(self, names: Sequence[str]) -> None:
        for name in names:
            self.topics.pop(name, None)

    async def partitions_for(self, topic: str) -> int:
        return len(self.topic(topic).logs)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> MemoryConsumer:
        return MemoryConsumer(
            self,
            topics,
            group=group,
            listener=listener,
            start_from=start_from,
            max_poll_records=max_poll_records,
        )

    def records(self, topic: str) -> list[Record]:
        """Every record of `topic`, partition by partition (for tests and inspection)."""
        found = self.topics.get(topic)
        return [r for log in found.logs for r in log] if found is not None else []

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        """The group's committed offset for a partition (for tests and the DLQ tooling)."""
        found = self.groups.get(group)
        return found.committed.get(tp) if found is not None else None
