"""Dead-letter topics: inspect and replay what the bus could not handle.

A dead-lettered record keeps its original key, value and CloudEvents headers, plus `msa-dlq-*`
headers saying why (see `framework.bus.consumer`). `replay` publishes dead letters back to their
original topic with those headers removed, as the consumer group `msa-dlq-replay` that commits as
it goes, so running it twice never replays a record twice. Every consumer group of the original
topic sees the replayed record again; handlers made idempotent by the inbox (see
`framework.persistence`) ignore what they had already done.

    msa dlq replay orders.dlq              # all dead letters not replayed yet
    msa dlq replay orders.dlq --limit 10 --dry-run
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from framework.bus.consumer import DLQ_PREFIX
from framework.types import Record, TopicPartition, Transport

__all__ = ["DeadLetter", "ReplayReport", "replay"]

REPLAY_GROUP = "msa-dlq-replay"


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One dead-lettered record and why it was dead-lettered."""

    record: Record
    error_type: str
    error_message: str
    attempts: int
    original_topic: str
    original_partition: int
    original_offset: int
    group: str

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
            attempts=int(header("attempts", "0") or 0),
            original_topic=topic,
            original_partition=int(header("original-partition", "-1") or -1),
            original_offset=int(header("original-offset", "-1") or -1),
            group=header("group"),
        )


@dataclass
class ReplayReport:
    replayed: list[DeadLetter] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.replayed)


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
    idle_timeout: float = 3.0,
) -> ReplayReport:
    """Publish dead letters from `dlq_topic` back to their original topics.

    Stops when `limit` records were replayed or no record arrived for `idle_timeout` seconds.
    With `dry_run`, nothing is published or committed: the report lists what would be.
    """
    report = ReplayReport()
    consumer = transport.consumer(
        [dlq_topic], group=REPLAY_GROUP, listener=_Listener(), start_from="earliest"
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + idle_timeout
        while limit is None or report.count < limit:
            want = 500 if limit is None else min(500, limit - report.count)
            records = await consumer.fetch(timeout=0.5, max_records=want)
            if not records:
                if time.monotonic() > deadline:
                    break
                continue
            deadline = time.monotonic() + idle_timeout
            offsets: dict[TopicPartition, int] = {}
            for record in records:
                letter = DeadLetter.from_record(record)
                if not dry_run:
                    headers = tuple(
                        (k, v) for k, v in record.headers if not k.startswith(DLQ_PREFIX)
                    )
                    future = await transport.send(
                        letter.original_topic, record.value, key=record.key, headers=headers
                    )
                    await future
                offsets[record.topic_partition] = record.offset + 1
                report.replayed.append(letter)
                if limit is not None and report.count >= limit:
                    break
            if not dry_run:
                await consumer.commit(offsets)
    finally:
        await consumer.stop()
    return report
