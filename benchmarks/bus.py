"""The message bus against raw aiokafka, FastStream and faust-streaming, on one real Kafka broker.

    eval "$(scripts/devservices env)"            # KAFKA_BOOTSTRAP (and KAFKA_VERSION)
    .venv/bin/python benchmarks/bus.py            # full run, about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bus.py --quick    # a smoke run, under a minute

Scenarios (1 KiB JSON payloads, fresh 3-partition topics, uvloop for everyone, one process):

1. publish   - pipelined sends awaited together at the end, then one-at-a-time awaited sends.
2. consume   - read N pre-filled CloudEvents records, no-op handler, offsets committed.
3. request   - request/reply round trips: sequential (latency) and 32 in flight (throughput).
4. envelope  - CloudEvent encode + decode of a typed event, no broker.

Every producer uses our `KafkaSettings` defaults (acks=all, idempotence, linger_ms,
max_batch_size) unless its row says otherwise, so the comparisons measure the libraries, not
their configuration. README.md in this folder explains each scenario's delivery semantics and
holds a dated table. Each measurement is bounded in time; if the broker goes away the remaining
broker measurements are skipped, and the exit status is 1 whenever a row is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import uvloop
from _common import Check, Clock, Result, environment, median, render, require_env
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import (
    Envelope,
    decode_payload,
    from_binary,
    from_structured,
    message_type,
    to_binary,
    to_structured,
    type_name,
)
from framework.types import Record, TopicSpec

log = logging.getLogger("benchmarks.bus")

PAYLOAD_BYTES = 1024
KEYS = 1024
"""Distinct partition keys (entity ids), cycled through: a realistic spread of keys."""

OURS = "our Bus"
OURS_BYTES = "our Bus, bytes handler"
OURS_NO_LINGER = "our Bus, linger_ms=0"
RAW = "raw aiokafka"
FASTSTREAM = "FastStream"
FASTSTREAM_OWN = "FastStream, own defaults"
FAUST = "faust-streaming"
STDLIB = "stdlib json"


# -- the payload -------------------------------------------------------------------------------


class Line(BaseModel):
    sku: str
    name: str
    quantity: int
    unit_price_cents: int


class Address(BaseModel):
    street: str
    city: str
    postcode: str
    country: str


@message_type("bench.order.placed")
class OrderPlaced(BaseModel):
    order_id: str
    customer_id: str
    placed_at: datetime
    currency: str
    total_cents: int
    shipping: Address
    lines: list[Line]
    note: str


@message_type("bench.order.quoted")
class Quote(BaseModel):
    order_id: str
    total_cents: int
    currency: str


def make_order(i: int) -> OrderPlaced:
    """An order whose JSON encoding is exactly `PAYLOAD_BYTES` long (the note pads it)."""
    lines = [
        Line(
            sku=f"SKU-{i % 97:05d}-{n}",
            name=f"Stoneware mug, glaze {n}",
            quantity=n + 1,
            unit_price_cents=1250 + 10 * n,
        )
        for n in range(4)
    ]
    order = OrderPlaced(
        order_id=f"order-{i:08d}",
        customer_id=f"customer-{i % 5000:06d}",
        placed_at=datetime(2026, 11, 25, 8, 0, i % 60, 123000, tzinfo=UTC),
        currency="EUR",
        total_cents=sum(line.quantity * line.unit_price_cents for line in lines),
        shipping=Address(
            street="Keizersgracht 123", city="Amsterdam", postcode="1015 CJ", country="NL"
        ),
        lines=lines,
        note="",
    )
    pad = PAYLOAD_BYTES - len(order.model_dump_json())
    return order.model_copy(update={"note": "n" * pad})


class Pool:
    """`KEYS` orders, their keys, and the exact records our Bus writes for them."""

    def __init__(self) -> None:
        self.orders = [make_order(i) for i in range(KEYS)]
        self.keys = [order.order_id for order in self.orders]
        self.key_bytes = [key.encode() for key in self.keys]
        shaper = Bus(MemoryTransport(), source="bench.publisher")
        self.records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
        for order, key in zip(self.orders, self.keys, strict=True):
            k, value, headers = to_binary(shaper.envelope(order, key=key))
            self.records.append((k, value, list(headers)))
        assert all(len(value) == PAYLOAD_BYTES for _, value, _ in self.records)


def quote(order: OrderPlaced) -> Quote:
    return Quote(order_id=order.order_id, total_cents=order.total_cents, currency="EUR")


# -- plumbing -----------------------------------------------------------------------------------


class Progress:
    """Counts handled messages; the clock runs from the `warm`-th to the `total`-th."""

    def __init__(self, warm: int, total: int) -> None:
        self.warm, self.total = warm, total
        self.seen = 0
        self.clock = Clock()
        self.handled_at: float | None = None
        self.committed_at: float | None = None
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.seen += 1
        if self.seen == self.warm:
            self.clock.start()
        if self.seen == self.total:
            self.clock.stop()
            self.handled_at = time.perf_counter()
            self.done.set()

    def commit_landed(self) -> None:
        if self.committed_at is None:
            self.committed_at = time.perf_counter()

    @property
    def measured(self) -> int:
        return self.total - self.warm


class BrokerUnreachable(Exception):
    pass


async def broker_alive(bootstrap: str) -> bool:
    """Whether the first bootstrap server accepts a TCP connection within 3 s."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        async with asyncio.timeout(3):
            _, writer = await asyncio.open_connection(host or "127.0.0.1", int(port))
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


async def quietly(closing: Awaitable[Any], what: str) -> None:
    """Await a stop/close, bounded: a broker that went away must not hang the run."""
    try:
        async with asyncio.timeout(15):
            await closing
    except Exception as exc:  # the measurement is over; a failed close only gets logged
        log.warning("%s: %s", what, exc)


class Topics:
    """Creates fresh topics for the run and deletes them (and only them) at the end."""

    def __init__(self, bootstrap: str, run: str) -> None:
        self.bootstrap, self.run = bootstrap, run
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")

    async def __aenter__(self) -> Topics:
        """Connect, waiting up to 30 s for a broker that is (re)starting."""
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.admin.start()
                return self
            except KafkaError as exc:
                await self.admin.close()
                if time.monotonic() > deadline:
                    raise BrokerUnreachable(
                        f"cannot reach Kafka at {self.bootstrap} ({exc}); is it running? "
                        'eval "$(scripts/devservices up)"'
                    ) from exc
                self.admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.bootstrap, client_id="bench-admin"
                )
                await asyncio.sleep(1)

    async def __aexit__(self, *exc: object) -> None:
        async def delete() -> None:
            prefix = f"bench-{self.run}-"
            names = [t for t in await self.admin.list_topics() if t.startswith(prefix)]
            if names:
                await self.admin.delete_topics(names)

        await quietly(delete(), "deleting the run's topics")
        await quietly(self.admin.close(), "closing the admin client")

    async def cluster_id(self) -> str | None:
        """The broker's cluster id; devservices formats a new one on every (re)start."""
        try:
            async with asyncio.timeout(10):
                description = await self.admin.describe_cluster()
        except Exception:  # asked only to notice a restart; unreachable is caught elsewhere
            return None
        return str(description.get("cluster_id"))

    async def fresh(self, name: str, partitions: int = 3) -> str:
        topic = f"bench-{self.run}-{name}"
        await self.admin.create_topics([NewTopic(topic, partitions, 1)])
        await asyncio.sleep(0.2)  # let the new partitions get their leader before first use
        return topic


def producer_options(settings: KafkaSettings) -> dict[str, Any]:
    """Our KafkaSettings' producer defaults, for the raw and FastStream producers."""
    return {
        "acks": settings.acks,
        "enable_idempotence": settings.enable_idempotence,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size,
        "max_request_size": settings.max_request_size,
        "request_timeout_ms": settings.request_timeout_ms,
    }


def faststream_broker(settings: KafkaSettings, *, own_defaults: bool = False) -> Any:
    """A FastStream broker producing with our settings (or with its own defaults: linger_ms=0,
    acks=1, no idempotence, 16 KiB batches)."""
    from faststream.kafka import KafkaBroker

    # logger=None: FastStream's access log writes two lines per message by default; our bus
    # logs nothing per message, so leaving it on would measure logging, not the framework.
    return KafkaBroker(
        settings.bootstrap_servers,
        client_id="bench-faststream",
        logger=None,
        **({} if own_defaults else producer_options(settings)),
    )


class Bench:
    """One run: what every measurement needs, the results so far, and the time limits."""

    def __init__(self, settings: KafkaSettings, pool: Pool, topics: Topics) -> None:
        self.settings, self.pool, self.topics = settings, pool, topics
        self.results: list[Result] = []
        self.broker_down = False
        self.warnings: list[str] = []

    @property
    def run(self) -> str:
        return self.topics.run

    async def measure(
        self,
        scenario: str,
        implementation: str,
        seconds: float,
        work: Callable[[], Awaitable[Result | list[Result]]],
        unit: str = "msg/s",
    ) -> None:
        """Run `work` within `seconds`; a failure becomes an error row, and a broker that no
        longer answers turns every later broker measurement into a skipped row."""
        if self.broker_down:
            error = "skipped: the broker went away"
        else:
            try:
                async with asyncio.timeout(seconds):
                    measured = await work()
                measured = measured if isinstance(measured, list) else [measured]
                self.results += measured
                _report(measured)
                return
            except TimeoutError:
                error = f"timed out after {seconds:.0f}s"
            except Exception as exc:  # report it and carry on with the next measurement
                log.warning("%s / %s failed", scenario, implementation, exc_info=True)
                error = f"{type(exc).__name__}: {exc}"
            if not await broker_alive(self.settings.bootstrap_servers):
                self.broker_down = True
                error += " (broker unreachable)"
        failed = Result(
            scenario=scenario, implementation=implementation, semantics="", rate=0.0, unit=unit
        )
        failed.error = error
        self.results.append(failed)
        _report([failed])


def _report(results: Sequence[Result]) -> None:
    for result in results:
        rate = result.error or f"{result.rate:>10,.0f} {result.unit}"
        print(f"  {result.scenario:<30} {result.implementation:<24} {rate}", flush=True)


# -- 0. broker warm-up ----------------------------------------------------------------------------


async def warm_up_broker(bench: Bench, *, n: int) -> None:
    """Produce and consume `n` records once, untimed: the broker's JIT, page cache and group
    coordinator are then as warm for the first measurement as for the last."""
    topic = await bench.topics.fresh("warm-up")
    settings = bench.settings
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, **producer_options(settings)
    )
    await producer.start()
    try:
        acks = []
        for i in range(n):
            key, value, headers = bench.pool.records[i % KEYS]
            acks.append(await producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*acks)
    finally:
        await quietly(producer.stop(), "stopping the warm-up producer")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=f"bench-{bench.run}-warm-up",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            seen += sum(len(batch) for batch in batches.values())
            await consumer.commit()
    finally:
        await quietly(consumer.stop(), "stopping the warm-up consumer")


# -- 1. publish -----------------------------------------------------------------------------------

SendOne = Callable[[int], Awaitable[Any]]


async def drive_publish(
    send: SendOne, *, n: int, warm: int, awaited: bool
) -> tuple[Clock, list[float]]:
    """Warm up, then time `n` sends: pipelined (each send returns an ack future; all awaited
    at the end) or awaited one at a time (latency per send)."""
    if awaited:
        for i in range(warm // 10):
            await send(i)
    else:
        await asyncio.gather(*[await send(i) for i in range(warm)])
    clock, latencies = Clock(), []
    clock.start()
    if awaited:
        for i in range(n):
            began = time.perf_counter()
            await send(i)
            latencies.append((time.perf_counter() - began) * 1000)
    else:
        acks = [await send(i) for i in range(n)]
        await asyncio.gather(*acks)
    clock.stop()
    return clock, latencies


async def publish_scenario(bench: Bench, *, n: int, n_awaited: int) -> None:
    settings, pool = bench.settings, bench.pool
    orders, keys, key_bytes, records = pool.orders, pool.keys, pool.key_bytes, pool.records

    async def ours(awaited: bool, count: int) -> Result:
        topic = await bench.topics.fresh(f"pub-{count}-ours")
        bus = Bus(KafkaTransport(settings), source="bench.publisher")
        await bus.start()
        try:
            await bus.transport.declare([TopicSpec(name=topic)])

            def send(i: int) -> Awaitable[Any]:
                return bus.publish(topic, orders[i % KEYS], key=keys[i % KEYS], confirm=awaited)

            clock, latencies = await drive_publish(send, n=count, warm=500, awaited=awaited)
        finally:
            await quietly(bus.stop(), "stopping the bus")
        return Result(
            scenario="",
            implementation=OURS,
            semantics="publish() each" if awaited else "publish(confirm=False), gather",
            rate=count / clock.wall,
            latencies_ms=latencies,
            cpu_us_per_op=clock.us_per(count),
            checks=() if awaited else (Check(baseline=RAW, minimum=0.9),),
        )

    async def raw(awaited: bool, count: int) -> Result:
        topic = await bench.topics.fresh(f"pub-{count}-raw")
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="bench-raw",
            **producer_options(settings),
        )
        await producer.start()
        try:

            def send(i: int) -> Awaitable[Any]:
                key, value, headers = records[i % KEYS]
                if awaited:
                    return producer.send_and_wait(topic, value, key=key, headers=headers)
                return producer.send(topic, value, key=key, headers=headers)

            clock, latencies = await drive_publish(send, n=count, warm=500, awaited=awaited)
        finally:
            await quietly(producer.stop(), "stopping the producer")
        return Result(
            scenario="",
            implementation=RAW,
            semantics="send_and_wait() each" if awaited else "send(), gather",
            rate=count / clock.wall,
            latencies_ms=latencies,
            cpu_us_per_op=clock.us_per(count),
            baseline=True,
        )

    async def faststream(awaited: bool, count: int) -> Result:
        topic = await bench.topics.fresh(f"pub-{count}-faststream")
        broker = faststream_broker(settings)
        await broker.start()
        try:

            def send(i: int) -> Awaitable[Any]:
                return broker.publish(
                    orders[i % KEYS], topic, key=key_bytes[i % KEYS], no_confirm=not awaited
                )

            clock, latencies = await drive_publish(send, n=count, warm=500, awaited=awaited)
        finally:
            await quietly(broker.stop(), "stopping the FastStream broker")
        return Result(
            scenario="",
            implementation=FASTSTREAM,
            semantics="publish() each" if awaited else "publish(no_confirm=True), gather",
            rate=count / clock.wall,
            latencies_ms=latencies,
            cpu_us_per_op=clock.us_per(count),
        )

    for awaited, count in ((False, n), (True, n_awaited)):
        scenario = f"1. publish, {'awaited' if awaited else 'pipelined'}"
        for name, run in ((RAW, raw), (OURS, ours), (FASTSTREAM, faststream)):

            async def work(
                run: Any = run,
                awaited: bool = awaited,
                count: int = count,
                scenario: str = scenario,
            ) -> Result:
                result: Result = await run(awaited, count)
                result.scenario = scenario
                return result

            await bench.measure(scenario, name, 90, work)


# -- 2. consume -----------------------------------------------------------------------------------


class _CommitProbe:
    """A `TransportConsumer` that tells `progress` when its commits cover `total` records.

    The Bus decides itself when to commit; wrapping the transport's consumer is how the
    benchmark sees the moment a commit covering everything has been acknowledged.
    """

    def __init__(self, inner: Any, progress: Progress) -> None:
        self._inner, self._progress = inner, progress
        self._committed: dict[Any, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def commit(self, offsets: Any) -> None:
        await self._inner.commit(offsets)
        self._committed.update(offsets)
        if sum(self._committed.values()) >= self._progress.total:
            self._progress.commit_landed()


class _ProbedKafkaTransport(KafkaTransport):
    progress: Progress | None = None

    def consumer(self, topics: Sequence[str], **options: Any) -> Any:
        inner = super().consumer(topics, **options)
        return inner if self.progress is None else _CommitProbe(inner, self.progress)


CONSUME = "2. consume+commit"


def consume_result(
    implementation: str, semantics: str, progress: Progress, *, committed: bool, **extra: Any
) -> Result:
    assert progress.handled_at is not None
    clock = progress.clock
    end = progress.committed_at if committed else progress.handled_at
    assert end is not None
    if committed:
        extra.setdefault(
            "note",
            f"handled-only rate {progress.measured / clock.wall:,.0f} msg/s; the commit "
            f"covering the last record landed {(end - progress.handled_at) * 1000:.0f} ms "
            f"after it was handled",
        )
    return Result(
        scenario=CONSUME,
        implementation=implementation,
        semantics=semantics,
        rate=progress.measured / (end - clock.wall0),
        cpu_us_per_op=clock.us_per(progress.measured),
        **extra,
    )


async def consume_scenario(bench: Bench, *, n: int) -> None:
    settings, pool = bench.settings, bench.pool
    warm = max(1, min(1000, n // 10))
    total = warm + n
    topic = await bench.topics.fresh("consume")
    filler = Bus(KafkaTransport(settings), source="bench.publisher")
    await filler.start()
    try:
        acks = [
            await filler.publish(
                topic, pool.orders[i % KEYS], key=pool.keys[i % KEYS], confirm=False
            )
            for i in range(total)
        ]
        await asyncio.gather(*acks)
    finally:
        await quietly(filler.stop(), "stopping the filler bus")
    group = f"bench-{bench.run}-consume"

    async def raw() -> Result:
        progress = Progress(warm, total)
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.bootstrap_servers,
            client_id="bench-raw",
            group_id=f"{group}-raw",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            while progress.committed_at is None:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for messages in batches.values():
                    for _ in messages:
                        progress.tick()
                if batches:
                    await consumer.commit()
                    if progress.seen >= total:
                        progress.commit_landed()
        finally:
            await quietly(consumer.stop(), "stopping the consumer")
        return consume_result(
            RAW, "commit() after each getmany batch", progress, committed=True, baseline=True
        )

    async def ours(payload_type: type[Any] = OrderPlaced) -> Result:
        typed = payload_type is not bytes
        progress = Progress(warm, total)
        transport = _ProbedKafkaTransport(settings)
        transport.progress = progress
        bus = Bus(transport, source="bench.consumer")

        async def on_order(message: Message[Any]) -> None:
            progress.tick()

        bus.subscribe(
            [topic],
            {type_name(OrderPlaced): HandlerSpec(payload_type, on_order)},
            ConsumerOptions(group=f"{group}-ours{'' if typed else '-bytes'}"),
        )
        await bus.start()
        try:
            await progress.done.wait()
        finally:
            await quietly(bus.stop(), "stopping the bus")
        if progress.committed_at is None:
            raise RuntimeError("the bus stopped without committing the last offsets")
        if not typed:
            return consume_result(
                OURS_BYTES, "bytes handler, commit landed (ref.)", progress, committed=True
            )
        return consume_result(
            OURS,
            "typed handler, commit landed (at-least-once)",
            progress,
            committed=True,
            checks=(Check(baseline=RAW, minimum=0.8), Check(baseline=FASTSTREAM, minimum=1.2)),
        )

    async def faststream() -> Result:
        progress = Progress(warm, total)
        broker = faststream_broker(settings)

        @broker.subscriber(topic, group_id=f"{group}-faststream", auto_offset_reset="earliest")
        async def on_order(body: OrderPlaced) -> None:
            progress.tick()

        await broker.start()
        try:
            await progress.done.wait()
        finally:
            began = time.perf_counter()
            await quietly(broker.stop(), "stopping the FastStream broker")
            stopped = (time.perf_counter() - began) * 1000
        return consume_result(
            FASTSTREAM,
            "typed handler, default ACK_FIRST",
            progress,
            committed=False,
            note="default AckPolicy.ACK_FIRST = aiokafka auto-commit every 5 s, before "
            "handling (at-most-once); the rate counts handling only, no commit is waited "
            f"for; stop() (which commits) took {stopped:.0f} ms",
        )

    async def faust_agent() -> Result:
        import faust

        progress = Progress(warm, total)
        app = faust.App(
            f"bench-{bench.run}-faust",
            broker=f"kafka://{settings.bootstrap_servers}",
            store="memory://",
            web_enabled=False,
            value_serializer="raw",
            consumer_auto_offset_reset="earliest",
            topic_partitions=3,
        )
        channel = app.topic(topic, key_serializer="raw", value_serializer="raw")

        @app.agent(channel)
        async def on_order(stream: Any) -> None:
            async for _ in stream:
                progress.tick()

        await app.start()
        try:
            await progress.done.wait()
        finally:
            began = time.perf_counter()
            await quietly(app.stop(), "stopping the faust app")
            stopped = (time.perf_counter() - began) * 1000
        return consume_result(
            FAUST,
            "raw bytes agent, default acks",
            progress,
            committed=False,
            note="faust acks each event once the agent took the next one and commits acked "
            "offsets every 2.8 s (broker_commit_interval) or 10,000 events; the rate counts "
            f"handling only; app.stop() (which commits) took {stopped:.0f} ms",
        )

    variants: list[tuple[str, Callable[[], Awaitable[Result]]]] = [
        (RAW, raw),
        (OURS, ours),
        (FASTSTREAM, faststream),
        (FAUST, faust_agent),
        (OURS_BYTES, lambda: ours(bytes)),
    ]
    for name, run in variants:
        await bench.measure(CONSUME, name, 90, run)


# -- 3. request/reply -----------------------------------------------------------------------------

REQUEST = "3. request/reply"
Request = Callable[[int], Awaitable[Any]]


async def drive_requests(
    request: Request,
    implementation: str,
    semantics: str,
    *,
    sequential: int,
    concurrent: int,
    in_flight: int,
    checks: Sequence[Check] = (),
    baseline: bool = False,
    note: str = "",
) -> list[Result]:
    for i in range(20):  # warm up (the first ones also wait for the group to form)
        await request(i)
    latencies: list[float] = []
    clock = Clock()
    clock.start()
    for i in range(sequential):
        began = time.perf_counter()
        await request(i)
        latencies.append((time.perf_counter() - began) * 1000)
    clock.stop()
    one_by_one = Result(
        scenario=f"{REQUEST}, sequential",
        implementation=implementation,
        semantics=semantics,
        rate=sequential / clock.wall,
        unit="req/s",
        latencies_ms=latencies,
        cpu_us_per_op=clock.us_per(sequential),
        checks=checks,
        baseline=baseline,
        note=note,
    )
    latencies = []
    counter = iter(range(concurrent))

    async def worker() -> None:
        for i in counter:
            began = time.perf_counter()
            await request(i)
            latencies.append((time.perf_counter() - began) * 1000)

    clock = Clock()
    clock.start()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    clock.stop()
    together = Result(
        scenario=f"{REQUEST}, {in_flight} in flight",
        implementation=implementation,
        semantics=semantics,
        rate=concurrent / clock.wall,
        unit="req/s",
        latencies_ms=latencies,
        cpu_us_per_op=clock.us_per(concurrent),
        checks=checks,
        baseline=baseline,
    )
    return [one_by_one, together]


async def request_scenario(
    bench: Bench, *, sequential: int, concurrent: int, in_flight: int
) -> None:
    """Ours and FastStream with the same producer settings (the checked pair), then both as a
    user gets them with `linger_ms=0` (FastStream's own producer defaults; ours configured so),
    for reference: on one broker over loopback a round trip is mostly linger time."""
    settings, pool = bench.settings, bench.pool
    orders, keys, key_bytes = pool.orders, pool.keys, pool.key_bytes
    counts = {"sequential": sequential, "concurrent": concurrent, "in_flight": in_flight}

    async def ours(name: str, settings: KafkaSettings, tag: str, **extra: Any) -> list[Result]:
        topic = await bench.topics.fresh(f"rpc-ours{tag}")
        server = Bus(KafkaTransport(settings), source="bench.pricing")

        async def on_order(message: Message[OrderPlaced]) -> Quote:
            return quote(message.data)

        server.subscribe(
            [topic],
            {type_name(OrderPlaced): HandlerSpec(OrderPlaced, on_order)},
            ConsumerOptions(group=f"bench-{bench.run}-rpc-ours{tag}"),
        )
        client = Bus(KafkaTransport(settings), source=f"bench-{bench.run}-client{tag}")
        await server.start()
        await client.start()
        try:

            async def request(i: int) -> Quote:
                return await client.request(
                    topic, orders[i % KEYS], key=keys[i % KEYS], reply_type=Quote, timeout=10
                )

            return await drive_requests(
                request, name, "Bus.request -> handler return", **counts, **extra
            )
        finally:
            await quietly(client.stop(), "stopping the client bus")
            await quietly(server.stop(), "stopping the server bus")

    async def faststream(name: str, own_defaults: bool, tag: str, **extra: Any) -> list[Result]:
        from faststream.exceptions import FeatureNotSupportedException
        from faststream.kafka.annotations import KafkaMessage

        topic = await bench.topics.fresh(f"rpc-faststream{tag}")
        reply_topic = await bench.topics.fresh(f"rpc-faststream{tag}-replies", partitions=1)
        server = faststream_broker(settings, own_defaults=own_defaults)
        client = faststream_broker(settings, own_defaults=own_defaults)
        pending: dict[str, asyncio.Future[Quote]] = {}

        @server.subscriber(
            topic, group_id=f"bench-{bench.run}-rpc-fs{tag}", auto_offset_reset="earliest"
        )
        async def on_order(body: OrderPlaced) -> Quote:
            return quote(body)

        @client.subscriber(reply_topic, auto_offset_reset="latest")  # no group, like ours
        async def on_reply(body: Quote, message: KafkaMessage) -> None:
            future = pending.get(message.correlation_id)
            if future is not None and not future.done():
                future.set_result(body)

        await server.start()
        await client.start()
        try:
            if not own_defaults:
                try:
                    await client.request(orders[0], topic, timeout=1)
                    native = "broker.request() worked"
                except FeatureNotSupportedException as exc:
                    native = f"broker.request() raises FeatureNotSupportedException: {exc}"
                extra["note"] = (
                    f"{native} (on a real broker; only its TestKafkaBroker answers it). "
                    "Measured instead: the Kafka RPC pattern FastStream's maintainers recommend - "
                    "publish "
                    "with reply_to and correlation_id, the subscriber's return value is "
                    "published to reply_to, a reply subscriber resolves the caller's future"
                )

            async def request(i: int) -> Quote:
                correlation = uuid.uuid4().hex
                future: asyncio.Future[Quote] = asyncio.get_running_loop().create_future()
                pending[correlation] = future
                try:
                    await client.publish(
                        orders[i % KEYS],
                        topic,
                        key=key_bytes[i % KEYS],
                        reply_to=reply_topic,
                        correlation_id=correlation,
                    )
                    async with asyncio.timeout(10):
                        return await future
                finally:
                    pending.pop(correlation, None)

            return await drive_requests(
                request, name, "publish(reply_to) -> return", **counts, **extra
            )
        finally:
            await quietly(client.stop(), "stopping the FastStream client")
            await quietly(server.stop(), "stopping the FastStream server")

    no_linger = replace(settings, linger_ms=0)
    variants: list[tuple[str, Callable[[], Awaitable[list[Result]]]]] = [
        (FASTSTREAM, lambda: faststream(FASTSTREAM, False, "", baseline=True)),
        (OURS, lambda: ours(OURS, settings, "", checks=(Check(baseline=FASTSTREAM, minimum=2),))),
        (FASTSTREAM_OWN, lambda: faststream(FASTSTREAM_OWN, True, "-own")),
        (OURS_NO_LINGER, lambda: ours(OURS_NO_LINGER, no_linger, "-nolinger")),
    ]
    first = len(bench.results)
    for name, run in variants:
        await bench.measure(f"{REQUEST}, sequential", name, 150, run, unit="req/s")
    # group the rows by scenario (sequential first) so each block compares like with like
    mine = bench.results[first:]
    order = [name for name, _ in variants]
    mine.sort(key=lambda r: ("in flight" in r.scenario, order.index(r.implementation)))
    bench.results[first:] = mine


# -- 4. envelope ----------------------------------------------------------------------------------


def envelope_scenario(bench: Bench, *, iterations: int) -> None:
    pool = bench.pool
    order = pool.orders[0]
    envelope = Bus(MemoryTransport(), source="bench.publisher").envelope(order, key=pool.keys[0])

    def ours_binary() -> Any:
        key, value, headers = to_binary(envelope)
        record = Record(
            topic="orders", partition=0, offset=0, key=key, value=value, headers=headers
        )
        received = from_binary(record)
        return decode_payload(received.data, OrderPlaced)

    def ours_structured() -> Any:
        received = from_structured(to_structured(envelope))
        return decode_payload(received.data, OrderPlaced)

    def stdlib() -> Any:
        event = {
            "specversion": envelope.specversion,
            "id": envelope.id,
            "source": envelope.source,
            "type": envelope.type,
            "time": envelope.time.isoformat().replace("+00:00", "Z"),
            "datacontenttype": envelope.datacontenttype,
            "traceparent": envelope.traceparent,
            "partitionkey": envelope.partitionkey,
            "data": envelope.data.model_dump(mode="json"),
        }
        raw = json.dumps(event, separators=(",", ":")).encode()
        parsed = json.loads(raw)
        received = Envelope(
            id=parsed["id"],
            source=parsed["source"],
            type=parsed["type"],
            time=datetime.fromisoformat(parsed["time"]),
            traceparent=parsed.get("traceparent"),
            partitionkey=parsed.get("partitionkey"),
            data=parsed["data"],
        )
        return OrderPlaced.model_validate(received.data)

    assert ours_binary() == ours_structured() == stdlib() == order

    def rate(work: Callable[[], Any]) -> tuple[float, float]:
        for _ in range(iterations // 10):
            work()
        walls, cpus = [], []
        # The broker scenarios left a large heap behind; freezing it keeps the collector from
        # re-scanning it, so each candidate pays for collecting its own garbage only.
        gc.collect()
        gc.freeze()
        try:
            for _ in range(5):
                clock = Clock()
                clock.start()
                for _ in range(iterations):
                    work()
                clock.stop()
                walls.append(clock.wall)
                cpus.append(clock.us_per(iterations))
        finally:
            gc.unfreeze()
        return iterations / median(walls), median(cpus)

    scenario = "4. envelope enc+dec"
    for name, work, semantics, extra in (
        (STDLIB, stdlib, "json.dumps/loads + model_validate", {"baseline": True}),
        (
            f"{OURS} binary",
            ours_binary,
            "to/from_binary + decode_payload",
            {"checks": (Check(baseline=STDLIB, minimum=5.0),)},
        ),
        (f"{OURS} structured", ours_structured, "orjson to/from_structured (ref.)", {}),
    ):
        ops, cpu = rate(work)
        result = Result(
            scenario=scenario,
            implementation=name,
            semantics=semantics,
            rate=ops,
            unit="op/s",
            cpu_us_per_op=cpu,
            **extra,
        )
        bench.results.append(result)
        _report([result])


# -- main -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, bootstrap: str) -> Bench:
    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="bench-ours")
    pool = Pool()
    async with Topics(bootstrap, f"{int(time.time())}-{os.getpid()}") as topics:
        bench = Bench(settings, pool, topics)
        cluster = await topics.cluster_id()
        print("broker warm-up ...", flush=True)
        try:
            async with asyncio.timeout(60):
                await warm_up_broker(bench, n=args.messages)
        except Exception as exc:  # measure anyway; a dead broker is caught right below
            print(f"  warm-up failed: {type(exc).__name__}: {exc}", flush=True)
            if not await broker_alive(bootstrap):
                raise BrokerUnreachable(f"Kafka at {bootstrap} went away during warm-up") from exc
        print("publish ...", flush=True)
        await publish_scenario(bench, n=args.messages, n_awaited=args.awaited)
        print("consume ...", flush=True)
        await consume_scenario(bench, n=args.messages)
        print("request/reply ...", flush=True)
        await request_scenario(
            bench, sequential=args.requests, concurrent=args.requests, in_flight=args.in_flight
        )
        if not bench.broker_down and await topics.cluster_id() != cluster:
            bench.warnings.append(
                "the broker was restarted during the run (its cluster id changed): the broker "
                "rows are not comparable; run again"
            )
    print("envelope ...", flush=True)
    envelope_scenario(bench, iterations=args.iterations)
    return bench


def _revision() -> str:
    """The repository's commit, and whether framework/ differs from it (numbers move with it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "framework")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit}" + (" + uncommitted changes in framework/" if dirty else "")


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--messages", type=int, help="publish/consume count (default 20000)")
    parser.add_argument("--requests", type=int, help="round trips per mode (default 2000)")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent requests")
    args = parser.parse_args(argv)
    args.messages = args.messages or (3000 if args.quick else 20000)
    args.requests = args.requests or (200 if args.quick else 2000)
    args.awaited = max(100, args.messages // 20)
    args.iterations = 2000 if args.quick else 20000

    bootstrap = require_env(
        "KAFKA_BOOTSTRAP",
        'Start the dev broker and export its address: eval "$(scripts/devservices up)"',
    )
    defaults = KafkaSettings(bootstrap_servers=bootstrap)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The clients' own retry chatter (leader elections on new topics, reconnects) would bury
    # the table; failures still surface as error rows.
    for noisy in ("aiokafka", "faust", "mode", "faststream"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    print(f"benchmarks/bus.py - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        environment(
            [
                "msa-framework",
                "aiokafka",
                "faststream",
                "faust-streaming",
                "pydantic",
                "orjson",
                "uvloop",
            ],
            extra=[
                ("Framework", f"msa-framework at {_revision()}"),
                ("Kafka", f"{os.environ.get('KAFKA_VERSION', 'unknown version')} at {bootstrap}"),
                ("Loop", f"uvloop {uvloop.__version__} for every implementation"),
                (
                    "Producers",
                    f"acks={defaults.acks}, enable_idempotence={defaults.enable_idempotence}, "
                    f"linger_ms={defaults.linger_ms}, max_batch_size="
                    f"{defaults.max_batch_size // 1024} KiB (our KafkaSettings defaults) for "
                    f"every producer unless a row says otherwise",
                ),
                ("Load", f"{_load()} at start (other processes share these cores)"),
                (
                    "Counts",
                    f"{args.messages} msgs pipelined/consumed, {args.awaited} awaited sends, "
                    f"{args.requests} sequential + {args.requests} concurrent requests "
                    f"({args.in_flight} in flight), payload {PAYLOAD_BYTES} B",
                ),
            ],
        )
    )
    began = time.perf_counter()
    try:
        bench = uvloop.run(run(args, bootstrap))
    except BrokerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render(bench.results))
    for warning in bench.warnings:
        print(f"\nWARNING: {warning}")
    print(f"\n(total {time.perf_counter() - began:.0f} s; load average {_load()} at the end)")
    return 1 if bench.warnings or any(r.error for r in bench.results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
