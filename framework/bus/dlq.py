"""Dead-letter topics: inspect and replay what the bus could not handle.

A dead-lettered record keeps its original key, value and headers (CloudEvents and any others),
plus `msa-dlq-*` headers saying why (see `framework.bus.consumer`). `replay` publishes dead
letters back to their original topic with the `msa-dlq-*` headers removed, as the consumer group
`msa-dlq-replay` that commits as it goes, so running it twice never replays a record twice.
Every consumer group of the original topic sees the replayed record again; handlers made
idempotent by the inbox (see `framework.persistence`) ignore what they had already done.

    msa dlq replay orders.dlq                     # the dead letters there now, then stop
    msa dlq replay orders.dlq --limit 10 --dry-run
    msa dlq replay orders.dlq --until-empty --max-rounds 5
    msa dlq replay orders.dlq --max-replays 5     # allow more replays before parking

What a replay promises, so that it ends even while the cause of the failures persists:

- **It stops at the end it saw when it started.** It asks the transport for the end offsets of
  the dead-letter topic first and reads up to them only. A replayed record that fails again
  returns to the dead-letter topic *after* that end, and waits for the next replay.
- **`until_empty` (`--until-empty`) goes on with what arrived meanwhile, in rounds**: each round
  asks for the end offsets again and replays up to them; it stops after a round that found
  nothing new, or after `max_rounds` rounds (default 3).
- **Every replayed record carries `msa-replay-count`**: the dead letter's own count plus one
  (1 for the first replay). The consumer keeps this header when it dead-letters the record
  again, so the count survives the round trip.
- **A dead letter already replayed `max_replays` times (default 3) is parked**, not replayed:
  it is published, unchanged (with its `msa-dlq-*` reasons and its replay count), to
  `<dead-letter topic>.parked` (`orders.dlq.parked`), which nothing consumes. Look at it, fix
  the cause, then replay that topic by hand with a higher `--max-replays`.
- With `limit`, at most that many dead letters are taken (replayed or parked).
- With `dry_run`, nothing is published or committed: the report lists what would be.

A replay that loses partitions of the dead-letter topic to another replay running in the same
group leaves them to that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from framework.bus.consumer import DLQ_PREFIX
from framework.errors import ConfigurationError
from framework.types import Headers, Record, TopicPartition, Transport, TransportConsumer

__all__ = [
    "PARKED_SUFFIX",
    "REPLAY_COUNT",
    "REPLAY_GROUP",
    "DeadLetter",
    "ReplayReport",
    "parked_topic",
    "replay",
]

REPLAY_GROUP = "msa-dlq-replay"
REPLAY_COUNT = "msa-replay-count"
"""The header counting how many times a record was replayed from a dead-letter topic."""
PARKED_SUFFIX = ".parked"


def parked_topic(dlq_topic: str) -> str:
    """Where `replay` parks the dead letters of `dlq_topic` replayed too often."""
    return dlq_topic + PARKED_SUFFIX


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One dead-lettered record, why it was dead-lettered, and how often it was replayed."""

    record: Record
    error_type: str
    error_message: str
    attempts: int
    original_topic: str
    original_partition: int
    original_offset: int
    group: str
    replays: int
    """How many times this record was replayed before it became this dead letter."""

    @classmethod
    def from_record(cls, record: Record) -> DeadLetter:
        def header(name: str, default: str = "") -> str:
            value = record.header(DLQ_PREFIX + name)
            return value.decode(errors="replace") if value is not None else default

        topic = header("original-topic") or record.topic.removesuffix(".dlq")
        return cls(
            record=record,
            error_type=header("error-type"),
            error_message=header("error-message"),
            attempts=_int(header("attempts"), 0),
            original_topic=topic,
            original_partition=_int(header("original-partition"), -1),
            original_offset=_int(header("original-offset"), -1),
            group=header("group"),
            replays=_int((record.header(REPLAY_COUNT) or b"").decode(errors="replace"), 0),
        )

    def replay_headers(self) -> Headers:
        """The headers of the replayed record: the dead letter's, without `msa-dlq-*`, with the
        replay count one higher."""
        kept = tuple(
            (name, value)
            for name, value in self.record.headers
            if not name.startswith(DLQ_PREFIX) and name != REPLAY_COUNT
        )
        return (*kept, (REPLAY_COUNT, str(self.replays + 1).encode()))


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


@dataclass
class ReplayReport:
    """What a replay did (or, with `dry_run`, would do)."""

    parked_topic: str
    replayed: list[DeadLetter] = field(default_factory=list)
    parked: list[DeadLetter] = field(default_factory=list)
    rounds: int = 0
    """Rounds that found dead letters (always 1 or 0 without `until_empty`)."""

    @property
    def count(self) -> int:
        """How many dead letters were replayed."""
        return len(self.replayed)

    @property
    def taken(self) -> int:
        """How many dead letters were replayed or parked."""
        return len(self.replayed) + len(self.parked)


class _Listener:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


async def replay(
    transport: Transport,
    dlq_topic: str,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    until_empty: bool = False,
    max_rounds: int = 3,
    max_replays: int = 3,
    fetch_timeout: float = 0.5,
) -> ReplayReport:
    """Publish the dead letters of `dlq_topic` back to their original topics, up to the end
    the topic had when the replay started (see the module docstring for the promises).

    `fetch_timeout` bounds each wait for records; the replay itself ends at the end offsets,
    not after a quiet period.
    """
    if limit is not None and limit < 0:
        raise ConfigurationError(f"limit must be >= 0, not {limit}")
    if max_rounds < 1:
        raise ConfigurationError(f"max_rounds must be >= 1, not {max_rounds}")
    if max_replays < 0:
        raise ConfigurationError(f"max_replays must be >= 0, not {max_replays}")
    consumer = transport.consumer(
        [dlq_topic], group=REPLAY_GROUP, listener=_Listener(), start_from="earliest"
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(dlq_topic, p) for p in range(await transport.partitions_for(dlq_topic))
        ]
        run = _Replay(
            transport,
            consumer,
            partitions,
            report=ReplayReport(parked_topic=parked_topic(dlq_topic)),
            limit=limit,
            dry_run=dry_run,
            max_replays=max_replays,
            fetch_timeout=fetch_timeout,
        )
        for _ in range(max_rounds if until_empty else 1):
            if not await run.round() or run.limit_reached:
                break
        return run.report
    finally:
        await consumer.stop()


class _Replay:
    """The state of one replay across its rounds."""

    def __init__(
        self,
        transport: Transport,
        consumer: TransportConsumer,
        partitions: Sequence[TopicPartition],
        *,
        report: ReplayReport,
        limit: int | None,
        dry_run: bool,
        max_replays: int,
        fetch_timeout: float,
    ) -> None:
        self.transport = transport
        self.consumer = consumer
        self.partitions = partitions
        self.report = report
        self.limit = limit
        self.dry_run = dry_run
        self.max_replays = max_replays
        self.fetch_timeout = fetch_timeout
        self.next_offset: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record fetched (taken or held)."""
        self.held: list[Record] = []
        """Records fetched beyond a round's end: the next round takes them first."""

    @property
    def limit_reached(self) -> bool:
        return self.limit is not None and self.report.taken >= self.limit

    async def round(self) -> int:
        """Replay (or park) every dead letter below the end offsets asked now; how many."""
        ends = await self.consumer.end_offsets(self.partitions)
        taken = 0
        held, self.held = self.held, []
        taken += await self._take([r for r in held if r.offset < ends[r.topic_partition]])
        self.held = [r for r in held if r.offset >= ends[r.topic_partition]]
        paused: list[TopicPartition] = []
        try:
            while not self.limit_reached:
                done = [tp for tp in self.partitions if tp not in paused and self._done(tp, ends)]
                if done:
                    self.consumer.pause(done)
                    paused += done
                if len(paused) == len(self.partitions):
                    break
                want = 500 if self.limit is None else min(500, self.limit - self.report.taken)
                records = await self.consumer.fetch(timeout=self.fetch_timeout, max_records=want)
                below: list[Record] = []
                for record in records:
                    tp = record.topic_partition
                    self.next_offset[tp] = record.offset + 1
                    (below if record.offset < ends[tp] else self.held).append(record)
                taken += await self._take(below)
        finally:
            self.consumer.resume(paused)
        if taken:
            self.report.rounds += 1
        return taken

    def _done(self, tp: TopicPartition, ends: Mapping[TopicPartition, int]) -> bool:
        """Whether `tp` has been read up to its end (or is not ours to read)."""
        end = ends[tp]
        if tp not in self.next_offset and (end == 0 or self.consumer.lag().get(tp) == 0):
            # Nothing fetched from it and nothing to fetch: the position is the committed offset,
            # which is at most `end`, with no record after it, so it is `end`. Remember it: a
            # paused partition's lag is not updated, and the next round must fetch what arrives.
            # (Kafka's lag dates from the last fetch response: one that left before the end was
            # asked may miss records written just then, which are left for the next replay.)
            self.next_offset[tp] = end
        if self.next_offset.get(tp, -1) >= end:
            return True
        return tp not in self.consumer.assignment()  # another member of the group replays it

    async def _take(self, records: Sequence[Record]) -> int:
        """Replay or park `records` (up to the limit), then commit them."""
        if self.limit is not None:
            records = records[: max(0, self.limit - self.report.taken)]
        if not records:
            return 0
        acknowledgements = []
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            letter = DeadLetter.from_record(record)
            park = letter.replays >= self.max_replays
            if not self.dry_run:
                if park:
                    topic, headers = self.report.parked_topic, record.headers
                else:
                    topic, headers = letter.original_topic, letter.replay_headers()
                acknowledgements.append(
                    await self.transport.send(topic, record.value, key=record.key, headers=headers)
                )
            (self.report.parked if park else self.report.replayed).append(letter)
            offsets[record.topic_partition] = record.offset + 1
        if not self.dry_run:
            outcomes = await asyncio.gather(*acknowledgements, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome  # nothing committed: the batch is replayed again next time
            await self.consumer.commit(offsets)
        return len(records)
