"""The bus contract: one suite, run against the in-memory transport and a real Apache Kafka.

Every test here runs twice (`[memory]` and `[kafka]`); a behaviour the in-memory fake has and
Kafka lacks (or the reverse) fails one of the two.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message, RetryPolicy
from framework.bus.dlq import replay
from framework.bus.memory import partition_for_key
from framework.errors import (
    PayloadValidationError,
    Reject,
    RemoteError,
    RequestTimeout,
)
from framework.messages import message_type, type_name
from framework.types import (
    RebalanceListener,
    RecordMetadata,
    StartFrom,
    TopicPartition,
    Transport,
    TransportConsumer,
)

TransportFactory = Callable[[], Transport]


@message_type("test.item")
class Item(BaseModel):
    key: str
    seq: int


@message_type("test.quote.requested")
@dataclass
class QuoteRequest:
    sku: str
    quantity: int


@dataclass
class Quote:
    sku: str
    total: float


@pytest.fixture
async def bus(make_transport: TransportFactory) -> AsyncIterator[Bus]:
    bus = Bus(make_transport(), source="contract")
    yield bus
    await bus.stop(grace=1)


FAST = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2, jitter=0)


def options(group: str, **overrides: Any) -> ConsumerOptions:
    return ConsumerOptions(group=group, commit_interval=0.05, retry=FAST, **overrides)


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


class CommitWatch:
    """A transport (any) whose consumers tell the test what they commit, per partition."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self.committed: dict[TopicPartition, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> TransportConsumer:
        inner = self._transport.consumer(
            topics,
            group=group,
            listener=listener,
            start_from=start_from,
            max_poll_records=max_poll_records,
        )
        return _WatchedConsumer(inner, self.committed)


@dataclass
class _WatchedConsumer:
    inner: TransportConsumer
    committed: dict[TopicPartition, int] = field(repr=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self.inner.commit(offsets)
        self.committed.update(offsets)


def handler(
    payload_type: Any, fn: Callable[[Message[Any]], Awaitable[Any]]
) -> dict[str, HandlerSpec]:
    return {type_name(payload_type): HandlerSpec(payload_type, fn)}


async def collect_dead_letters(bus: Bus, dlq: str, group: str) -> list[Message[Any]]:
    letters: list[Message[Any]] = []

    async def on_letter(message: Message[Any]) -> None:
        letters.append(message)

    await bus.subscribe_running(
        [dlq], {"*": HandlerSpec(bytes, on_letter)}, ConsumerOptions(group=group, dead_letter=False)
    )
    return letters


async def test_typed_roundtrip_carries_cloudevents_attributes(bus: Bus, topic_name: str) -> None:
    got: list[Message[Item]] = []

    async def on_item(message: Message[Item]) -> None:
        got.append(message)

    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g"))
    await bus.start()
    metadata = await bus.publish(topic_name, Item(key="a", seq=1), key="a", subject="items/a")
    await eventually(lambda: len(got) == 1)

    [message] = got
    assert message.data == Item(key="a", seq=1)
    envelope = message.envelope
    assert envelope.type == "test.item"
    assert envelope.source == "contract"
    assert envelope.subject == "items/a"
    assert envelope.partitionkey == "a"
    assert envelope.traceparent is not None
    assert message.record.offset == metadata.offset  # type: ignore[union-attr]
    assert message.record.key == b"a"
    assert message.record.header("ce_type") == b"test.item"
    assert message.attempt == 1


async def test_same_key_same_partition_as_kafka(bus: Bus, topic_name: str) -> None:
    await bus.start()
    partitions = await bus.transport.partitions_for(topic_name)
    for key in ["order-1", "order-2", "customer-77", "x", ""]:
        metadata = await bus.publish(topic_name, Item(key=key, seq=0), key=key)
        assert metadata.partition == partition_for_key(key.encode(), partitions)  # type: ignore[union-attr]


async def test_order_per_key_with_concurrency_across_keys(bus: Bus, topic_name: str) -> None:
    seen: dict[str, list[int]] = defaultdict(list)
    running = 0
    peak = 0

    async def on_item(message: Message[Item]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(random.uniform(0, 0.004))
        seen[message.data.key].append(message.data.seq)
        running -= 1

    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g", concurrency=8))
    await bus.start()
    keys = [f"k{i}" for i in range(8)]
    futures = [
        await bus.publish(topic_name, Item(key=k, seq=n), key=k, confirm=False)
        for n in range(25)
        for k in keys
    ]
    await asyncio.gather(*futures)  # type: ignore[arg-type]
    await eventually(lambda: sum(map(len, seen.values())) == 200, what="200 handled")
    for key in keys:
        assert seen[key] == list(range(25)), f"order broken for {key}"
    assert peak > 1, "different keys must be handled concurrently"
    assert peak <= 8, "the concurrency limit must hold"


@dataclass(frozen=True, kw_only=True)
class RecordedBackoff(RetryPolicy):
    """A retry policy that notes every backoff the consumer asks it for."""

    asked: list[float] = field(default_factory=list, compare=False)

    def backoff(self, attempt: int) -> float:
        delay = super().backoff(attempt)
        self.asked.append(delay)
        return delay


async def test_retry_with_backoff_does_not_block_other_keys(bus: Bus, topic_name: str) -> None:
    attempts: list[tuple[str, int]] = []
    handled: list[str] = []
    retry = RecordedBackoff(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2, jitter=0)

    async def on_item(message: Message[Item]) -> None:
        attempts.append((message.data.key, message.attempt))
        if message.data.key == "flaky" and (message.attempt < 3 or "steady" not in handled):
            raise ConnectionError("downstream not ready")  # twice, and until steady went ahead
        handled.append(message.data.key)

    group = ConsumerOptions(group=f"{topic_name}-g", commit_interval=0.05, retry=retry)
    bus.subscribe([topic_name], handler(Item, on_item), group)
    await bus.start()
    await bus.publish(topic_name, Item(key="flaky", seq=1), key="flaky")
    await eventually(lambda: ("flaky", 1) in attempts)
    await bus.publish(topic_name, Item(key="steady", seq=1), key="steady")
    await eventually(lambda: "flaky" in handled, what="the retried key handled at last")

    flaky = [attempt for key, attempt in attempts if key == "flaky"]
    assert flaky == list(range(1, len(flaky) + 1))
    assert len(flaky) >= 3
    assert handled == ["steady", "flaky"], "steady went ahead while flaky was retrying"
    assert attempts[0] == ("flaky", 1)
    assert len(retry.asked) == len(flaky) - 1, "a backoff before every retry"
    assert retry.asked[:2] == [0.05, 0.1], "the backoff grows"


async def test_exhausted_retries_go_to_the_dead_letter_topic(bus: Bus, topic_name: str) -> None:
    handled: list[int] = []

    async def on_item(message: Message[Item]) -> None:
        if message.data.key == "poison":
            raise ValueError(f"cannot handle seq {message.data.seq}")
        handled.append(message.data.seq)

    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g"))
    await bus.start()
    metadata = await bus.publish(topic_name, Item(key="poison", seq=7), key="poison")
    await bus.publish(topic_name, Item(key="healthy", seq=8), key="healthy")
    letters = await collect_dead_letters(bus, f"{topic_name}.dlq", f"{topic_name}-dlq-reader")
    await eventually(lambda: len(letters) == 1 and handled == [8], what="one dead letter")

    [letter] = letters
    record = letter.record
    assert record.key == b"poison"
    assert record.header("ce_type") == b"test.item"
    assert record.header("msa-dlq-error-type") == b"ValueError"
    assert record.header("msa-dlq-error-message") == b"cannot handle seq 7"
    assert record.header("msa-dlq-attempts") == b"3"
    assert record.header("msa-dlq-original-topic") == topic_name.encode()
    assert record.header("msa-dlq-original-partition") == str(metadata.partition).encode()  # type: ignore[union-attr]
    assert record.header("msa-dlq-original-offset") == str(metadata.offset).encode()  # type: ignore[union-attr]
    assert record.header("msa-dlq-group") == f"{topic_name}-g".encode()


async def test_invalid_payloads_and_foreign_records_are_dead_lettered_at_once(
    bus: Bus, topic_name: str
) -> None:
    handled: list[Item] = []

    async def on_item(message: Message[Item]) -> None:
        handled.append(message.data)

    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g"))
    await bus.start()
    bad = bus.envelope({"key": "a", "seq": "not a number"}, key="a", type="test.item")
    await bus.publish_envelope(topic_name, bad)
    future = await bus.transport.send(topic_name, b"\x00not json", key=b"a")
    await future
    await bus.publish(topic_name, Item(key="a", seq=2), key="a")
    letters = await collect_dead_letters(bus, f"{topic_name}.dlq", f"{topic_name}-dlq-reader")
    await eventually(lambda: len(letters) == 2 and len(handled) == 1, what="two dead letters")

    by_type = {m.record.header("msa-dlq-error-type"): m for m in letters}
    invalid = by_type[b"framework.errors.PayloadValidationError"]
    assert b"seq" in (invalid.record.header("msa-dlq-error-message") or b"")
    assert invalid.record.header("msa-dlq-attempts") == b"1"
    foreign = by_type[b"framework.errors.DecodeError"]
    assert foreign.record.value == b"\x00not json"
    assert handled == [Item(key="a", seq=2)], "the consumer kept going"


async def test_reject_dead_letters_without_retrying(bus: Bus, topic_name: str) -> None:
    attempts: list[int] = []

    async def on_item(message: Message[Item]) -> None:
        attempts.append(message.attempt)
        raise Reject("order references an unknown customer")

    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g"))
    await bus.start()
    await bus.publish(topic_name, Item(key="a", seq=1), key="a")
    letters = await collect_dead_letters(bus, f"{topic_name}.dlq", f"{topic_name}-dlq-reader")
    await eventually(lambda: len(letters) == 1)
    assert attempts == [1]
    assert (
        letters[0].record.header("msa-dlq-error-message") == b"order references an unknown customer"
    )


async def test_commit_only_after_success_and_redelivery_after_abandon(
    make_transport: TransportFactory, topic_name: str
) -> None:
    group = f"{topic_name}-g"
    first_seen: list[int] = []
    stuck = asyncio.Event()

    async def hangs_on_two(message: Message[Item]) -> None:
        first_seen.append(message.data.seq)
        if message.data.seq == 2:
            stuck.set()
            await asyncio.sleep(3600)

    watch = CommitWatch(make_transport())
    first = Bus(watch, source="contract")
    first.subscribe([topic_name], handler(Item, hangs_on_two), options(group))
    await first.start()
    sent: list[RecordMetadata] = []
    for seq in (1, 2, 3):
        metadata = await first.publish(topic_name, Item(key="k", seq=seq), key="k")
        assert isinstance(metadata, RecordMetadata)
        sent.append(metadata)
    await asyncio.wait_for(stuck.wait(), 20)
    two = TopicPartition(topic_name, sent[1].partition)
    # The commit loop runs while 2 is in flight: it commits 1 and stops short of 2.
    await eventually(
        lambda: watch.committed.get(two) == sent[1].offset, what="a commit while 2 is in flight"
    )
    await first.stop(grace=0.1)  # 2 is cancelled: not done, so not committed
    assert first_seen == [1, 2]
    assert watch.committed[two] == sent[1].offset

    second_seen: list[int] = []

    async def records(message: Message[Item]) -> None:
        second_seen.append(message.data.seq)

    second = Bus(make_transport(), source="contract")
    second.subscribe([topic_name], handler(Item, records), options(group))
    await second.start()
    try:
        # 4 goes after them on the same key: once it is here, anything redelivered came first.
        await second.publish(topic_name, Item(key="k", seq=4), key="k")
        await eventually(lambda: 4 in second_seen, what="redelivery of 2 and 3, then 4")
        assert second_seen == [2, 3, 4], "1 was committed; 2 was not"
    finally:
        await second.stop(grace=1)


async def test_graceful_stop_finishes_in_flight_work_and_commits_it(
    make_transport: TransportFactory, topic_name: str
) -> None:
    group = f"{topic_name}-g"
    started = asyncio.Event()
    finished: list[int] = []

    async def slow(message: Message[Item]) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(message.data.seq)

    first = Bus(make_transport(), source="contract")
    first.subscribe([topic_name], handler(Item, slow), options(group))
    await first.start()
    await first.publish(topic_name, Item(key="k", seq=1), key="k")
    await asyncio.wait_for(started.wait(), 20)
    # The grace is an upper bound: stop returns as soon as the handler is done, long before it.
    await asyncio.wait_for(first.stop(grace=3600), 20)
    assert finished == [1], "the in-flight handler finished before stop returned"

    again: list[int] = []

    async def records(message: Message[Item]) -> None:
        again.append(message.data.seq)

    second = Bus(make_transport(), source="contract")
    second.subscribe([topic_name], handler(Item, records), options(group))
    await second.start()
    try:
        await second.publish(topic_name, Item(key="k", seq=2), key="k")
        await eventually(lambda: again == [2], what="only the new record")
    finally:
        await second.stop(grace=1)


async def test_request_reply_typed_timeout_and_remote_error(bus: Bus, topic_name: str) -> None:
    async def quote(message: Message[QuoteRequest]) -> Quote:
        if message.data.quantity < 0:
            raise ValueError("quantity must be positive")
        return Quote(sku=message.data.sku, total=2.5 * message.data.quantity)

    bus.subscribe([topic_name], handler(QuoteRequest, quote), options(f"{topic_name}-g"))
    await bus.start()

    reply = await bus.request(topic_name, QuoteRequest(sku="mug", quantity=4), reply_type=Quote)
    assert reply == Quote(sku="mug", total=10.0)
    untyped: dict[str, Any] = await bus.request(topic_name, QuoteRequest(sku="cup", quantity=1))
    assert untyped == {"sku": "cup", "total": 2.5}

    with pytest.raises(RemoteError) as remote:
        await bus.request(topic_name, QuoteRequest(sku="mug", quantity=-1), reply_type=Quote)
    assert remote.value.error_type == "ValueError"
    assert "quantity must be positive" in str(remote.value)

    with pytest.raises(RequestTimeout, match=r"within 0\.5s"):
        await bus.request(f"{topic_name}-nobody", QuoteRequest(sku="mug", quantity=1), timeout=0.5)


async def test_publish_and_consume_middleware_wrap_the_next_callable(
    bus: Bus, topic_name: str
) -> None:
    calls: list[str] = []

    async def stamp(outgoing: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        calls.append("publish:before")
        outgoing.envelope.extensions["tenant"] = "acme"
        result = await call_next(outgoing)
        calls.append("publish:after")
        return result

    async def outer(message: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        calls.append("outer:before")
        try:
            return await call_next(message)
        finally:
            calls.append("outer:after")

    async def inner(message: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        calls.append(f"inner:{message.envelope.extensions.get('tenant')}")
        return await call_next(message)

    async def on_item(message: Message[Item]) -> None:
        calls.append("handler")

    bus.add_publish_middleware(stamp)
    bus.add_consume_middleware(outer)
    bus.add_consume_middleware(inner)
    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g"))
    await bus.start()
    await bus.publish(topic_name, Item(key="a", seq=1), key="a")
    await eventually(lambda: "outer:after" in calls)
    assert calls == [
        "publish:before",
        "publish:after",
        "outer:before",
        "inner:acme",
        "handler",
        "outer:after",
    ]
    with pytest.raises(Exception, match="before the bus starts"):
        bus.add_consume_middleware(inner)


async def test_retry_topic_mode_keeps_the_partition_moving(bus: Bus, topic_name: str) -> None:
    attempts: list[tuple[int, int, str]] = []

    async def on_item(message: Message[Item]) -> None:
        attempts.append((message.data.seq, message.attempt, message.record.topic))
        if message.data.seq == 1 and message.attempt == 1:
            raise TimeoutError("slow downstream")

    group = f"{topic_name}-g"
    bus.subscribe([topic_name], handler(Item, on_item), options(group, retry_mode="retry_topic"))
    await bus.start()
    await bus.publish(topic_name, Item(key="k", seq=1), key="k")
    await bus.publish(topic_name, Item(key="k", seq=2), key="k")
    await eventually(lambda: len(attempts) == 3, what="three attempts")
    assert attempts[0] == (1, 1, topic_name)
    assert (2, 1, topic_name) in attempts
    assert (1, 2, f"{topic_name}.retry.{group}") in attempts
    # seq 2 did not wait for seq 1's retry: it went first (the documented trade-off)
    assert attempts.index((2, 1, topic_name)) < attempts.index(
        (1, 2, f"{topic_name}.retry.{group}")
    )


async def test_dead_letters_replay_to_the_original_topic(bus: Bus, topic_name: str) -> None:
    broken = True
    handled: list[int] = []

    async def on_item(message: Message[Item]) -> None:
        if broken:
            raise Reject("not yet")
        handled.append(message.data.seq)

    bus.subscribe([topic_name], handler(Item, on_item), options(f"{topic_name}-g"))
    await bus.start()
    for seq in (1, 2):
        await bus.publish(topic_name, Item(key="k", seq=seq), key="k")
    letters = await collect_dead_letters(bus, f"{topic_name}.dlq", f"{topic_name}-dlq-reader")
    await eventually(lambda: len(letters) == 2)

    broken = False
    report = await replay(bus.transport, f"{topic_name}.dlq")
    assert report.count == 2
    assert {letter.original_topic for letter in report.replayed} == {topic_name}
    await eventually(lambda: sorted(handled) == [1, 2], what="replayed records handled")
    again = await replay(bus.transport, f"{topic_name}.dlq")
    assert again.count == 0, "a replay never replays the same dead letter twice"


async def test_validation_error_type_is_typed(bus: Bus) -> None:
    from framework.messages import decode_payload

    with pytest.raises(PayloadValidationError) as error:
        decode_payload(b'{"key": 1}', Item)
    assert {tuple(e["loc"]) for e in error.value.errors} == {("key",), ("seq",)}
