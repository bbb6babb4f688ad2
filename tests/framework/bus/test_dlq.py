"""Replaying dead letters (`framework.bus.dlq`), on the in-memory transport and on a real Kafka.

A replay ends at the end offsets the dead-letter topic had when it started, even while every
replayed record fails again at once; `until_empty` follows new dead letters for a bounded number
of rounds; each replay counts itself in `msa-replay-count`, and a dead letter replayed
`max_replays` times is parked in `<dlq>.parked` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.consumer import DLQ_PREFIX
from framework.bus.dlq import REPLAY_COUNT, ReplayReport, parked_topic, replay
from framework.errors import Reject
from framework.messages import message_type, type_name
from framework.types import (
    Headers,
    RebalanceListener,
    Record,
    RecordMetadata,
    StartFrom,
    TopicPartition,
    TopicSpec,
    Transport,
    TransportConsumer,
)

TransportFactory = Callable[[], Transport]
WITHIN = 60.0
"""Seconds a replay gets before the test calls it endless (one that ends takes well under 10)."""


@message_type("test.dlq.item")
class Item(BaseModel):
    n: int


class _Quiet:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


class Tail:
    """Every record of a topic, from its start, as a group-less reader receives them."""

    def __init__(self, transport: Transport, topic: str) -> None:
        self.consumer: TransportConsumer = transport.consumer(
            [topic], group=None, listener=_Quiet(), start_from="earliest"
        )
        self.records: list[Record] = []

    async def __aenter__(self) -> Tail:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def read(self, count: int) -> list[Record]:
        """The first `count` records (waiting for them); fails if there are more already."""
        async with asyncio.timeout(30):
            while len(self.records) < count:
                self.records += await self.consumer.fetch(timeout=0.5, max_records=500)
        assert len(self.records) == count, [(r.partition, r.offset) for r in self.records]
        return self.records


def where(records: Sequence[Record]) -> list[tuple[int, int]]:
    return sorted((r.partition, r.offset) for r in records)


def counts(report: ReplayReport) -> tuple[int, int]:
    return report.count, len(report.parked)


@pytest.fixture
async def bus(make_transport: TransportFactory) -> AsyncIterator[Bus]:
    bus = Bus(make_transport(), source="dlq-tests")
    yield bus
    await bus.stop(grace=1)


def always_failing(bus: Bus, topic: str, handled: list[int]) -> None:
    """Subscribe a handler that rejects everything it receives (into `<topic>.dlq`)."""

    async def reject(message: Message[Item]) -> None:
        handled.append(message.data.n)
        raise Reject(f"item {message.data.n} is broken")

    bus.subscribe(
        [topic],
        {type_name(Item): HandlerSpec(Item, reject)},
        ConsumerOptions(group=f"{topic}-g", commit_interval=0.05),
    )


# -- the end-offsets query of the transport contract ----------------------------------------------


async def test_end_offsets_are_the_offsets_the_next_records_get(
    make_transport: TransportFactory, topic_name: str
) -> None:
    transport = make_transport()
    await transport.start()
    consumer = transport.consumer([topic_name], group=f"{topic_name}-g", listener=_Quiet())
    try:
        await transport.declare([TopicSpec(name=topic_name, partitions=2)])
        acks = [await transport.send(topic_name, b"a", partition=0) for _ in range(3)]
        acks.append(await transport.send(topic_name, b"b", partition=1))
        await asyncio.gather(*acks)
        await consumer.start()
        first, second = TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)

        assert dict(await consumer.end_offsets([first, second])) == {first: 3, second: 1}
        records: list[Record] = []
        async with asyncio.timeout(30):
            while len(records) < 4:
                records += await consumer.fetch(timeout=0.5, max_records=10)
        assert where(records) == [(0, 0), (0, 1), (0, 2), (1, 0)], "the position did not move"
        await (await transport.send(topic_name, b"c", partition=1))
        assert dict(await consumer.end_offsets([second])) == {second: 2}
    finally:
        await consumer.stop()
        await transport.stop()


# -- replay with a real consumer that keeps failing -----------------------------------------------


async def test_replay_ends_with_the_dead_letters_present_at_start_while_the_handler_keeps_failing(
    bus: Bus, topic_name: str
) -> None:
    dlq = f"{topic_name}.dlq"
    handled: list[int] = []
    always_failing(bus, topic_name, handled)
    await bus.start()
    for n in range(3):
        await bus.publish(topic_name, Item(n=n), key=str(n))
    async with Tail(bus.transport, dlq) as dead:
        present = list(await dead.read(3))

        report = await asyncio.wait_for(replay(bus.transport, dlq), WITHIN)

        assert counts(report) == (3, 0)
        assert where([letter.record for letter in report.replayed]) == where(present)
        assert {letter.original_topic for letter in report.replayed} == {topic_name}
        assert [letter.replays for letter in report.replayed] == [0, 0, 0]
        # each replayed record failed again: three new dead letters, after the end it stopped at
        again = [r for r in await dead.read(6) if (r.partition, r.offset) not in where(present)]
        assert len(again) == 3
        # the consumer's dead-lettering kept the replay count the replay added
        assert [r.header(REPLAY_COUNT) for r in again] == [b"1", b"1", b"1"]
        assert all(r.header(DLQ_PREFIX + "error-type") == b"framework.errors.Reject" for r in again)
    assert sorted(handled) == [0, 0, 1, 1, 2, 2]


async def test_a_dead_letter_replayed_max_replays_times_is_parked_with_its_reasons(
    bus: Bus, topic_name: str
) -> None:
    dlq = f"{topic_name}.dlq"
    handled: list[int] = []
    always_failing(bus, topic_name, handled)
    await bus.start()
    await bus.publish(topic_name, Item(n=7), key="seven")
    async with Tail(bus.transport, dlq) as dead, Tail(bus.transport, parked_topic(dlq)) as parked:
        [original] = await dead.read(1)
        for replays in (1, 2):
            report = await asyncio.wait_for(replay(bus.transport, dlq, max_replays=2), WITHIN)
            assert counts(report) == (1, 0)
            newest = max(await dead.read(1 + replays), key=lambda r: r.offset)
            assert newest.header(REPLAY_COUNT) == str(replays).encode()

        report = await asyncio.wait_for(replay(bus.transport, dlq, max_replays=2), WITHIN)

        assert counts(report) == (0, 1)
        assert report.parked_topic == f"{topic_name}.dlq.parked"
        [letter] = report.parked
        assert letter.replays == 2
        [kept] = await parked.read(1)
        assert (kept.key, kept.value) == (original.key, original.value)
        assert kept.header(REPLAY_COUNT) == b"2"
        assert kept.header(DLQ_PREFIX + "error-message") == b"item 7 is broken"
        assert kept.header(DLQ_PREFIX + "original-topic") == topic_name.encode()
        nothing = await asyncio.wait_for(replay(bus.transport, dlq, max_replays=2), WITHIN)
        assert counts(nothing) == (0, 0)
    assert handled == [7, 7, 7], "the original and two replays, then parked"


# -- replay when every replayed record fails at once -----------------------------------------------


class InstantFailures:
    """A transport on which every record sent to `topic` fails at once: before `send` returns,
    its dead letter is in `<topic>.dlq`, as the consumer writes it (headers kept, plus reasons).
    The fastest possible feedback loop, so a replay that reads past its start never ends."""

    def __init__(self, inner: Transport, topic: str) -> None:
        self.inner, self.topic = inner, topic

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

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
        acknowledged = await self.inner.send(
            topic, value, key=key, headers=headers, partition=partition, immediate=immediate
        )
        if topic == self.topic:
            await acknowledged
            await self.failed(value, key=key, headers=headers)
        return acknowledged

    async def failed(self, value: bytes, *, key: bytes | None, headers: Headers) -> None:
        await self.dead_letter(value, key=key, headers=headers)

    async def dead_letter(
        self, value: bytes, *, key: bytes | None, headers: Headers, partition: int | None = None
    ) -> None:
        reasons = (
            (DLQ_PREFIX + "error-type", b"test.Broken"),
            (DLQ_PREFIX + "original-topic", self.topic.encode()),
        )
        dlq = f"{self.topic}.dlq"
        await (
            await self.inner.send(
                dlq, value, key=key, headers=headers + reasons, partition=partition
            )
        )


@pytest.fixture
async def failing(make_transport: TransportFactory, topic_name: str) -> AsyncIterator[Transport]:
    """A started `InstantFailures` on `topic_name`, with three dead letters in its DLQ."""
    transport = make_transport()
    await transport.start()
    try:
        failing = InstantFailures(transport, topic_name)
        for n in range(3):
            await failing.dead_letter(str(n).encode(), key=str(n).encode(), headers=())
        yield failing
    finally:
        await transport.stop()


async def test_replay_stops_at_the_end_it_saw_at_start_while_new_dead_letters_arrive(
    failing: Transport, topic_name: str
) -> None:
    report = await asyncio.wait_for(replay(failing, f"{topic_name}.dlq"), WITHIN)

    assert counts(report) == (3, 0)
    assert report.rounds == 1
    assert sorted(letter.record.value for letter in report.replayed) == [b"0", b"1", b"2"]
    assert [letter.replays for letter in report.replayed] == [0, 0, 0]


async def test_until_empty_follows_new_dead_letters_for_at_most_max_rounds(
    failing: Transport, topic_name: str
) -> None:
    dlq = f"{topic_name}.dlq"
    two_rounds = await asyncio.wait_for(
        replay(failing, dlq, until_empty=True, max_rounds=2, max_replays=10), WITHIN
    )
    assert counts(two_rounds) == (6, 0)
    assert two_rounds.rounds == 2
    assert sorted(letter.replays for letter in two_rounds.replayed) == [0, 0, 0, 1, 1, 1]

    # Round 1 replays the three (their 3rd replay), round 2 parks what that made, round 3 finds
    # nothing new: the replay ends before max_rounds.
    until_parked = await asyncio.wait_for(
        replay(failing, dlq, until_empty=True, max_rounds=10, max_replays=3), WITHIN
    )
    assert counts(until_parked) == (3, 3)
    assert until_parked.rounds == 2
    assert [letter.replays for letter in until_parked.replayed] == [2, 2, 2]
    assert [letter.replays for letter in until_parked.parked] == [3, 3, 3]


class FailuresBetweenRounds(InstantFailures):
    """Like `InstantFailures`, but the dead letter of a record sent to `topic` lands on DLQ
    partition `partition` only when the replay next asks for end offsets: between its rounds,
    after the round that sent the record paused every partition it had read to the end."""

    def __init__(self, inner: Transport, topic: str, *, partition: int) -> None:
        super().__init__(inner, topic)
        self.partition = partition
        self.pending: list[tuple[bytes, bytes | None, Headers]] = []

    async def failed(self, value: bytes, *, key: bytes | None, headers: Headers) -> None:
        self.pending.append((value, key, headers))

    async def flush(self) -> None:
        pending, self.pending = self.pending, []
        for value, key, headers in pending:
            await self.dead_letter(value, key=key, headers=headers, partition=self.partition)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> TransportConsumer:
        inner = self.inner.consumer(
            topics,
            group=group,
            listener=listener,
            start_from=start_from,
            max_poll_records=max_poll_records,
        )
        return _FlushFirst(inner, self.flush)


@dataclass
class _FlushFirst:
    inner: TransportConsumer
    flush: Callable[[], Awaitable[None]]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def end_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> Mapping[TopicPartition, int]:
        await self.flush()
        return await self.inner.end_offsets(partitions)


async def test_until_empty_reads_new_dead_letters_on_a_partition_it_had_read_to_the_end(
    make_transport: TransportFactory, topic_name: str
) -> None:
    dlq = f"{topic_name}.dlq"
    transport = make_transport()
    await transport.start()
    try:
        failing = FailuresBetweenRounds(transport, topic_name, partition=1)
        await failing.dead_letter(b"old", key=None, headers=(), partition=1)
        parked = await asyncio.wait_for(replay(failing, dlq, max_replays=0), WITHIN)
        assert counts(parked) == (0, 1)  # partition 1 is read to its end, and committed there
        await failing.dead_letter(b"new", key=None, headers=(), partition=0)

        # round 1 replays "new" from partition 0 and finds nothing on partition 1; before round
        # 2, the dead letter of "new" lands on partition 1, and round 2 parks it
        report = await asyncio.wait_for(
            replay(failing, dlq, until_empty=True, max_rounds=3, max_replays=1), WITHIN
        )

        assert counts(report) == (1, 1)
        [replayed], [parked_again] = report.replayed, report.parked
        assert (replayed.record.partition, replayed.record.value) == (0, b"new")
        assert (parked_again.record.partition, parked_again.record.value) == (1, b"new")
        assert report.rounds == 2
    finally:
        await transport.stop()


async def test_dry_run_and_limit_take_only_what_they_say(
    failing: Transport, topic_name: str
) -> None:
    dlq = f"{topic_name}.dlq"
    dry = await asyncio.wait_for(replay(failing, dlq, dry_run=True, until_empty=True), WITHIN)
    assert counts(dry) == (3, 0)
    assert dry.rounds == 1, "a dry run publishes nothing, so nothing new arrives"

    one = await asyncio.wait_for(replay(failing, dlq, limit=1), WITHIN)
    assert counts(one) == (1, 0)
    rest = await asyncio.wait_for(replay(failing, dlq, max_replays=0), WITHIN)
    assert counts(rest) == (0, 3), "the two left, and the one the first replay made, parked"
