"""The message bus against raw aiokafka and FastStream at equal settings and equal work.

    source /tmp/devenv.sh   # or: eval "$(scripts/devservices env)"  -> KAFKA_BOOTSTRAP
    .venv/bin/python benchmarks/bus.py            # full run: 3 interleaved rounds, 3-4 minutes
    .venv/bin/python benchmarks/bus.py --quick    # smoke run: 1 round, small counts
    .venv/bin/python benchmarks/bus.py --only publish,consume --rounds 5

Scenarios (1 KiB JSON `OrderPlaced` payloads, fresh topics, uvloop for everyone):

1. publish         N pipelined sends, acknowledgements gathered at the end.
2. consume         N records written by our Bus, decoded + validated, offsets committed.
3. request/reply   M sequential round trips (p50/p99), then M with 32 in flight.
4. scale-out       1 vs 2 consumer processes in one group, 12 partitions, CPU-bound handler.

Rules the table keeps: rows that are compared run with the same producer settings (printed in
the `settings` column), the same delivery guarantee and the same encode/validate work (the
`work / delivery` and `payload` columns); a row that is not comparable says so (a ceiling, a
reference). Each row is the median of `--rounds` rounds, interleaved (round 1 of every row of a
scenario, then round 2, ...), with the process CPU time per operation beside the rate, because
the machine is shared. README.md in this folder explains every row.

Hooks for the framework's other transports and payload codecs: `--transports kafka,kafka-confluent`
(the default) measures our Bus on each (the confluent-kafka transport built with the same
settings; an "n/a" row where it is not installed), `--payload msgspec` runs the raw and our
rows with a `msgspec.Struct` payload (FastStream's rows stay pydantic and are then not compared).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import uvloop
from _common import Clock, environment, percentile, require_env
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from bus_table import Row, Sample, Target, Variant, render
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import (
    decode_payload,
    from_binary,
    from_structured,
    message_type,
    to_binary,
    to_structured,
    type_name,
)
from framework.types import Record, Transport

log = logging.getLogger("benchmarks.bus")

PAYLOAD_BYTES = 1024
KEYS = 1024
"""Distinct partition keys (order ids), cycled through."""

RAW = "raw aiokafka, encode each"
RAW_CEILING = "raw aiokafka, pre-encoded (ceiling)"
RAW_CONSUME = "raw aiokafka, decode+validate"
FS = "FastStream (aiokafka)"
FS_CONFLUENT = "FastStream (confluent)"
FS_ACK = "FastStream (aiokafka), AckPolicy.ACK"
FS_ACK_FIRST = "FastStream (aiokafka), default ACK_FIRST"
FSC_ACK = "FastStream (confluent), AckPolicy.ACK"
FSC_ACK_FIRST = "FastStream (confluent), default ACK_FIRST"


def ours(transport: str) -> str:
    return "our Bus" if transport == "kafka" else f"our Bus ({transport})"


class Unavailable(Exception):
    """A row that cannot run here (a library or transport is missing): an n/a row."""


class BrokerUnreachable(Exception):
    pass


# -- payloads ------------------------------------------------------------------------------------


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


@dataclass(frozen=True, kw_only=True)
class Codec:
    """One payload flavour: the order class, its instances, and how a hand-written client
    encodes one and decodes + validates one (what the raw aiokafka rows do per message)."""

    name: str
    cls: type[Any]
    orders: list[Any]
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


def pydantic_codec(orders: list[OrderPlaced]) -> Codec:
    serializer = OrderPlaced.__pydantic_serializer__
    return Codec(
        name="pydantic",
        cls=OrderPlaced,
        orders=orders,
        encode=serializer.to_json,  # = model_dump_json(), as bytes
        decode=OrderPlaced.model_validate_json,
    )


try:  # the --payload msgspec rows; module level, so msgspec can resolve the annotations
    import msgspec

    class LineStruct(msgspec.Struct):
        sku: str
        name: str
        quantity: int
        unit_price_cents: int

    class AddressStruct(msgspec.Struct):
        street: str
        city: str
        postcode: str
        country: str

    @message_type("bench.order.placed")
    class OrderPlacedStruct(msgspec.Struct):
        order_id: str
        customer_id: str
        placed_at: datetime
        currency: str
        total_cents: int
        shipping: AddressStruct
        lines: list[LineStruct]
        note: str

except ImportError:  # pragma: no cover - depends on what is installed
    msgspec = None  # type: ignore[assignment]


def msgspec_codec(orders: list[OrderPlaced]) -> Codec:
    """The same orders as `msgspec.Struct`s; `Unavailable` without msgspec."""
    if msgspec is None:
        raise Unavailable("msgspec is not installed")
    decoder = msgspec.json.Decoder(OrderPlacedStruct)
    structs = [decoder.decode(OrderPlaced.__pydantic_serializer__.to_json(o)) for o in orders]
    return Codec(
        name="msgspec",
        cls=OrderPlacedStruct,
        orders=structs,
        encode=msgspec.json.Encoder().encode,
        decode=decoder.decode,
    )


def quote(order: Any) -> Quote:
    return Quote(order_id=order.order_id, total_cents=order.total_cents, currency="EUR")


def ce_headers(key: bytes) -> list[tuple[str, bytes]]:
    """The CloudEvents binary-mode headers our Bus writes, built per message as a hand-written
    producer would: a fresh id, the time now, a new root trace."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", os.urandom(16).hex().encode()),
        ("ce_source", b"bench.publisher"),
        ("ce_type", b"bench.order.placed"),
        ("ce_time", datetime.now(UTC).isoformat().encode()),
        ("content-type", b"application/json"),
        ("ce_traceparent", f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()),
        ("ce_partitionkey", key),
    ]


# -- settings, transports, brokers ----------------------------------------------------------------


def settings_label(acks: Any, idempotence: bool, linger: int, batch: int, compression: Any) -> str:
    return (
        f"acks={acks} idem={'on' if idempotence else 'off'} linger={linger}ms "
        f"batch={batch // 1024}K compr={compression or 'none'}"
    )


def label_of(settings: KafkaSettings) -> str:
    return settings_label(
        settings.acks,
        settings.enable_idempotence,
        settings.linger_ms,
        settings.max_batch_size,
        settings.compression_type,
    )


def aiokafka_options(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "acks": settings.acks,
        "enable_idempotence": settings.enable_idempotence,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size,
        "compression_type": settings.compression_type,
    }


def make_transport(name: str, settings: KafkaSettings) -> Transport:
    """Our transport `name` built with `settings`.

    "kafka" is the aiokafka transport. "kafka-confluent" is the confluent-kafka one
    (`framework.bus.confluent`, chosen in deployments with `KAFKA_CLIENT=confluent`), given
    every field of `settings` its settings class shares, so both run with the same producer
    settings (its own default batch size is 1 MiB, ours 256 KiB). Any other name is looked up
    in `framework.bus.transports`. `Unavailable` if the transport is not there.
    """
    if name == "kafka":
        return KafkaTransport(settings)
    if "confluent" in name:
        try:
            module = importlib.import_module("framework.bus.confluent")
            settings_class, transport_class = module.ConfluentSettings, module.ConfluentTransport
        except (ImportError, AttributeError):
            raise Unavailable("n/a (transport not available)") from None
        shared = {f.name for f in fields(settings_class)} & {f.name for f in fields(settings)}
        shared.discard("ssl_context")
        built: Transport = transport_class(
            settings_class(**{name: getattr(settings, name) for name in shared})
        )
        return built
    from framework.bus import transports

    if name not in getattr(transports, "TRANSPORTS", ()):
        raise Unavailable("n/a (transport not available)")
    env = {
        "MSA_TRANSPORT": name,
        "KAFKA_BOOTSTRAP": settings.bootstrap_servers,
        "KAFKA_CLIENT_ID": settings.client_id,
        "KAFKA_LINGER_MS": str(settings.linger_ms),
    }
    return transports.transport_from_env(env, name=name)


def faststream_available(flavour: str) -> str | None:
    """Why FastStream on `flavour` ("kafka" or "confluent") cannot run, or None."""
    try:
        importlib.import_module(f"faststream.{flavour}")
    except ImportError as exc:
        return f"n/a (faststream.{flavour} does not import: {exc})"
    return None


def faststream_broker(flavour: str, settings: KafkaSettings | None) -> Any:
    """A FastStream broker producing with `settings`, or with its own defaults (None).

    logger=None: its access log writes two lines per message; our Bus logs none."""
    if flavour == "confluent":
        from faststream.confluent import KafkaBroker as ConfluentBroker

        if settings is None:
            return ConfluentBroker(settings_bootstrap(), client_id="bench-fs", logger=None)
        return ConfluentBroker(
            settings.bootstrap_servers,
            client_id="bench-fs",
            logger=None,
            acks=settings.acks,
            enable_idempotence=settings.enable_idempotence,
            linger_ms=settings.linger_ms,
            compression_type=settings.compression_type,
            config={"batch.size": settings.max_batch_size},
        )
    from faststream.kafka import KafkaBroker

    if settings is None:
        return KafkaBroker(settings_bootstrap(), client_id="bench-fs", logger=None)
    return KafkaBroker(
        settings.bootstrap_servers, client_id="bench-fs", logger=None, **aiokafka_options(settings)
    )


def settings_bootstrap() -> str:
    return os.environ["KAFKA_BOOTSTRAP"]


def faststream_defaults_label(flavour: str) -> str:
    """FastStream's own producer defaults, read from its signature."""
    import inspect

    module = importlib.import_module(f"faststream.{flavour}")
    parameters = inspect.signature(module.KafkaBroker.__init__).parameters

    def default(name: str, fallback: Any) -> Any:
        value = parameters[name].default if name in parameters else fallback
        return value if isinstance(value, int | str | bool | type(None)) else fallback

    linger = default("linger_ms", 0)
    idem = default("enable_idempotence", False)
    # unset acks: aiokafka's default (1, "all" with idempotence); FastStream's confluent
    # broker maps unset to -1, i.e. "all"
    acks = default("acks", None) or ("all" if idem or flavour == "confluent" else 1)
    batch = default("max_batch_size", 16384 if flavour == "kafka" else 1_000_000)
    return settings_label(
        acks, bool(idem), int(linger), int(batch), default("compression_type", None)
    )


def ack_policy(policy: str) -> dict[str, Any]:
    """FastStream's subscriber argument for `policy` ("ack" or "ack_first"): `ack_policy` on
    0.6+, `auto_commit` on 0.5."""
    try:
        from faststream import AckPolicy
    except ImportError:
        return {"auto_commit": policy == "ack_first"}
    return {"ack_policy": AckPolicy.ACK if policy == "ack" else AckPolicy.ACK_FIRST}


# -- plumbing -----------------------------------------------------------------------------------


async def broker_alive(bootstrap: str) -> bool:
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
        self.count = 0

    async def __aenter__(self) -> Topics:
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.admin.start()
                return self
            except KafkaError as exc:
                await self.admin.close()
                if time.monotonic() > deadline:
                    raise BrokerUnreachable(
                        f"cannot reach Kafka at {self.bootstrap} ({exc}); is it running?"
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

    async def fresh(self, name: str, partitions: int = 3) -> str:
        self.count += 1
        topic = f"bench-{self.run}-{name}-{self.count}"
        await self.admin.create_topics([NewTopic(topic, partitions, 1)])
        await asyncio.sleep(0.2)  # let the new partitions get their leader before first use
        return topic

    def group(self, name: str) -> str:
        self.count += 1
        return f"bench-{self.run}-{name}-{self.count}"


@dataclass(kw_only=True)
class Bench:
    settings: KafkaSettings
    topics: Topics
    codec: Codec
    transports: Sequence[str]
    orders: list[OrderPlaced]
    keys: list[str]
    key_bytes: list[bytes]
    broker_down: bool = False


async def run_rounds(bench: Bench, variants: Sequence[Variant], rounds: int, limit: float) -> None:
    """`rounds` interleaved rounds: every variant once per round, in order, each bounded."""
    for number in range(rounds):
        for variant in variants:
            if variant.run is None or bench.broker_down:
                continue
            names = ", ".join(r.implementation for r in variant.rows)
            try:
                async with asyncio.timeout(limit):
                    samples = await variant.run()
            except Exception as exc:  # a failed round is reported in the table; go on
                log.debug("round failed", exc_info=True)
                error = f"round {number + 1}: {type(exc).__name__}: {exc}"[:200]
                if not await broker_alive(bench.settings.bootstrap_servers):
                    bench.broker_down = True
                    error += " (broker unreachable; the rest is skipped)"
                for row in variant.rows:
                    row.errors.append(error)
                print(f"  {variant.rows[0].scenario:<22} {names:<44} {error}", flush=True)
                continue
            for row, sample in zip(variant.rows, samples, strict=True):
                row.samples.append(sample)
                print(
                    f"  {row.scenario:<22} {row.implementation:<44} round {number + 1}: "
                    f"{sample.rate:>9,.0f} {row.unit}  {sample.cpu_us:7,.1f} us/op",
                    flush=True,
                )


def unavailable(rows: list[Row], why: str) -> Variant:
    for row in rows:
        row.unavailable = why
    return Variant(rows=rows, run=None)


# -- 1. publish -----------------------------------------------------------------------------------

PUBLISH = "1. publish"


async def timed_sends(send: Callable[[int], Awaitable[Any]], n: int, warm: int) -> Sample:
    """`warm` untimed sends, then `n` timed ones; every send returns an acknowledgement future
    once the record is in the producer's batch, and all of them are awaited at the end."""
    await asyncio.gather(*[await send(i) for i in range(warm)])
    clock = Clock()
    clock.start()
    await asyncio.gather(*[await send(i) for i in range(n)])
    clock.stop()
    return Sample(rate=n / clock.wall, cpu_us=clock.us_per(n))


def publish_variants(bench: Bench, n: int) -> list[Variant]:
    settings, codec, keys, key_bytes = bench.settings, bench.codec, bench.keys, bench.key_bytes
    label = label_of(settings)
    warm = min(500, n)
    pipelined = "send, acks gathered at end"

    def raw_producer() -> Any:
        return AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="bench-raw",
            **aiokafka_options(settings),
        )

    async def raw(pre_encoded: bool) -> list[Sample]:
        topic = await bench.topics.fresh("pub-raw")
        producer = raw_producer()
        await producer.start()
        orders, encode = codec.orders, codec.encode
        shaper = Bus(MemoryTransport(), source="bench.publisher")
        records = [
            (k, v, list(h))
            for k, v, h in (
                to_binary(shaper.envelope(bench.orders[i], key=keys[i])) for i in range(KEYS)
            )
        ]
        try:

            async def send(i: int) -> Any:
                if pre_encoded:
                    key, value, headers = records[i % KEYS]
                    return await producer.send(topic, value, key=key, headers=headers)
                key = key_bytes[i % KEYS]
                return await producer.send(
                    topic, encode(orders[i % KEYS]), key=key, headers=ce_headers(key)
                )

            return [await timed_sends(send, n, warm)]
        finally:
            await quietly(producer.stop(), "stopping the producer")

    async def bus_publish(transport_name: str) -> list[Sample]:
        topic = await bench.topics.fresh("pub-ours")
        bus = Bus(make_transport(transport_name, settings), source="bench.publisher")
        await bus.start()
        orders = codec.orders
        try:

            def send(i: int) -> Awaitable[Any]:
                return bus.publish(topic, orders[i % KEYS], key=keys[i % KEYS], confirm=False)

            return [await timed_sends(send, n, warm)]
        finally:
            await quietly(bus.stop(), "stopping the bus")

    async def faststream(flavour: str) -> list[Sample]:
        topic = await bench.topics.fresh("pub-fs")
        broker = faststream_broker(flavour, settings)
        await broker.start()
        orders = bench.orders
        try:

            async def send(i: int) -> Any:
                return await broker.publish(
                    orders[i % KEYS], topic, key=key_bytes[i % KEYS], no_confirm=True
                )

            return [await timed_sends(send, n, warm)]
        finally:
            await quietly(broker.stop(), "stopping the FastStream broker")

    def row(name: str, semantics: str, **extra: Any) -> Row:
        extra.setdefault("payload", codec.name)
        return Row(
            scenario=PUBLISH, implementation=name, producer=label, semantics=semantics, **extra
        )

    variants = [
        Variant(
            rows=[
                row(
                    RAW,
                    f"{codec.name} encode + CE headers per msg; {pipelined}",
                    baseline=True,
                )
            ],
            run=lambda: raw(False),
        ),
        Variant(
            rows=[row(RAW_CEILING, f"our exact bytes built before timing; {pipelined}")],
            run=lambda: raw(True),
        ),
    ]
    for flavour, name in (("kafka", FS), ("confluent", FS_CONFLUENT)):
        rows = [row(name, f"publish(no_confirm=True); {pipelined}", payload="pydantic")]
        why = faststream_available(flavour)
        variants.append(
            unavailable(rows, why) if why else Variant(rows=rows, run=partial(faststream, flavour))
        )
    for transport_name in bench.transports:
        base = FS if transport_name == "kafka" else FS_CONFLUENT
        targets = [Target(baseline=base, minimum=1.3)]
        if transport_name == "kafka":
            targets.append(Target(baseline=RAW, minimum=0.9, label="raw encode-each"))
        rows = [
            row(
                ours(transport_name),
                f"publish(confirm=False): envelope + encode; {pipelined}",
                targets=targets,
            )
        ]
        try:
            make_transport(transport_name, settings)
        except Unavailable as exc:
            variants.append(unavailable(rows, str(exc)))
            continue
        variants.append(Variant(rows=rows, run=partial(bus_publish, transport_name)))
    return variants


# -- 2. consume -----------------------------------------------------------------------------------

CONSUME = "2. consume->validate->commit"


class Progress:
    """Counts handled messages; the clock runs from the `warm`-th to the `total`-th."""

    def __init__(self, warm: int, total: int) -> None:
        self.warm, self.total = warm, total
        self.seen = 0
        self.clock = Clock()
        self.handled_at: float | None = None
        self.committed_at: float | None = None
        self.done = asyncio.Event()
        self.committed = asyncio.Event()

    def tick(self) -> None:
        self.seen += 1
        if self.seen == self.warm:
            self.clock.start()
        if self.seen == self.total:
            self.clock.stop()
            self.handled_at = time.perf_counter()
            self.done.set()

    def commit_landed(self) -> None:
        if self.committed_at is None and self.seen >= self.total:
            self.committed_at = time.perf_counter()
            self.committed.set()

    def sample(self, note: str = "") -> Sample:
        measured = self.total - self.warm
        if self.committed_at is not None and self.handled_at is not None:
            tail = (self.committed_at - self.handled_at) * 1000
            note = note or f"last offsets committed {tail:.0f} ms after the last record handled"
        return Sample(
            rate=measured / self.clock.wall, cpu_us=self.clock.us_per(measured), note=note
        )


class _CommitProbe:
    """Wraps a transport's consumer to see when its commits cover every record."""

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


class _ProbedTransport:
    """Our transport, unchanged but for consumers wrapped in `_CommitProbe`."""

    def __init__(self, inner: Transport, progress: Progress) -> None:
        self._inner, self._progress = inner, progress

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def consumer(self, topics: Sequence[str], **options: Any) -> Any:
        return _CommitProbe(self._inner.consumer(topics, **options), self._progress)


async def fill(bench: Bench, topic: str, total: int) -> None:
    """`total` records as our Bus writes them (CloudEvents binary mode, pydantic JSON)."""
    filler = Bus(KafkaTransport(bench.settings), source="bench.publisher")
    await filler.start()
    try:
        orders, keys = bench.orders, bench.keys
        acks: list[Any] = [
            await filler.publish(topic, orders[i % KEYS], key=keys[i % KEYS], confirm=False)
            for i in range(total)
        ]
        await asyncio.gather(*acks)
    finally:
        await quietly(filler.stop(), "stopping the filler bus")


def consume_variants(bench: Bench, topic: str, n: int, warm: int) -> list[Variant]:
    settings, codec = bench.settings, bench.codec
    total = warm + n
    order_type = type_name(OrderPlaced).encode()

    async def raw() -> list[Sample]:
        progress = Progress(warm, total)
        decode = codec.decode
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.bootstrap_servers,
            client_id="bench-raw",
            group_id=bench.topics.group("consume-raw"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            while progress.committed_at is None:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for records in batches.values():
                    for record in records:
                        headers = dict(record.headers)
                        if headers.get("ce_type") == order_type:
                            decode(record.value)
                        progress.tick()
                if batches:
                    await consumer.commit()
                    progress.commit_landed()
        finally:
            await quietly(consumer.stop(), "stopping the consumer")
        return [progress.sample()]

    async def bus_consume(transport_name: str) -> list[Sample]:
        progress = Progress(warm, total)
        transport = _ProbedTransport(make_transport(transport_name, settings), progress)
        bus = Bus(transport, source="bench.consumer")

        async def on_order(message: Message[Any]) -> None:
            progress.tick()

        bus.subscribe(
            [topic],
            {type_name(OrderPlaced): HandlerSpec(codec.cls, on_order)},
            ConsumerOptions(group=bench.topics.group("consume-ours")),
        )
        await bus.start()
        try:
            await progress.done.wait()
            # the periodic commit (every 200 ms), not a forced one, is what is waited for
            async with asyncio.timeout(5):
                await progress.committed.wait()
        finally:
            await quietly(bus.stop(), "stopping the bus")
        return [progress.sample()]

    async def faststream(flavour: str, policy: str) -> list[Sample]:
        progress = Progress(warm, total)
        broker = faststream_broker(flavour, settings)

        @broker.subscriber(  # type: ignore[untyped-decorator]
            topic,
            group_id=bench.topics.group(f"consume-fs-{policy}"),
            auto_offset_reset="earliest",
            **ack_policy(policy),
        )
        async def on_order(body: OrderPlaced) -> None:
            progress.tick()

        await broker.start()
        try:
            await progress.done.wait()
        finally:
            began = time.perf_counter()
            await quietly(broker.stop(), "stopping the FastStream broker")
            stopped = (time.perf_counter() - began) * 1000
        note = (
            "commits each message's offset after its handler returned (at-least-once)"
            if policy == "ack"
            else "offsets auto-committed every 5 s regardless of handling, i.e. committed "
            f"BEFORE handling (at-most-once); stop() took {stopped:.0f} ms"
        )
        return [progress.sample(note)]

    def row(name: str, producer: str, semantics: str, **extra: Any) -> Row:
        extra.setdefault("payload", codec.name)
        return Row(
            scenario=CONSUME, implementation=name, producer=producer, semantics=semantics, **extra
        )

    variants = [
        Variant(
            rows=[
                row(
                    RAW_CONSUME,
                    "getmany(500), commit() per batch",
                    "ce_type check + validate JSON per msg; at-least-once",
                    baseline=True,
                )
            ],
            run=raw,
        )
    ]
    fs_rows = (
        ("kafka", "ack", FS_ACK, "commit per message after handler"),
        ("kafka", "ack_first", FS_ACK_FIRST, "auto-commit 5 s, before handling"),
        ("confluent", "ack", FSC_ACK, "commit per message after handler"),
        ("confluent", "ack_first", FSC_ACK_FIRST, "auto-commit 5 s, before handling"),
    )
    for flavour, policy, name, commits in fs_rows:
        delivery = "at-least-once" if policy == "ack" else "at-most-once"
        rows = [
            row(name, commits, f"typed handler (body: OrderPlaced); {delivery}", payload="pydantic")
        ]
        why = faststream_available(flavour)
        variants.append(
            unavailable(rows, why)
            if why
            else Variant(rows=rows, run=partial(faststream, flavour, policy))
        )
    for transport_name in bench.transports:
        prefix = "FastStream (aiokafka)" if transport_name == "kafka" else "FastStream (confluent)"
        targets = [
            Target(baseline=f"{prefix}, AckPolicy.ACK", minimum=2.5, label="FS ACK"),
            Target(baseline=f"{prefix}, default ACK_FIRST", minimum=1.5, label="FS ACK_FIRST"),
        ]
        if transport_name == "kafka":
            targets.insert(0, Target(baseline=RAW_CONSUME, minimum=0.8, label="raw"))
        rows = [
            row(
                ours(transport_name),
                "commit every 200 ms, after handling",
                "typed handler: envelope + validate; 16 lanes; at-least-once",
                targets=targets,
            )
        ]
        try:
            make_transport(transport_name, settings)
        except Unavailable as exc:
            variants.append(unavailable(rows, str(exc)))
            continue
        variants.append(Variant(rows=rows, run=partial(bus_consume, transport_name)))
    return variants


# -- 3. request/reply -----------------------------------------------------------------------------

SEQUENTIAL = "3. request/reply, 1 at a time"


def in_flight_scenario(in_flight: int) -> str:
    return f"3. request/reply, {in_flight} in flight"


async def round_trips(
    request: Callable[..., Awaitable[Any]],
    sequential: int,
    concurrent: int,
    in_flight: int,
) -> list[Sample]:
    # Warm up: the first requests also wait for the server's group and the reply reader to
    # be in place; a reply produced before a reader starting at "latest" is positioned is
    # lost, so a warm-up request may time out and is then sent again.
    deadline, answered = time.monotonic() + 40, 0
    while answered < 20:
        try:
            await request(answered, 3.0)
            answered += 1
        except Exception:
            if time.monotonic() > deadline:
                raise
    latencies: list[float] = []
    clock = Clock()
    clock.start()
    for i in range(sequential):
        began = time.perf_counter()
        await request(i)
        latencies.append((time.perf_counter() - began) * 1000)
    clock.stop()
    one = Sample(
        rate=sequential / clock.wall,
        cpu_us=clock.us_per(sequential),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
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
    many = Sample(
        rate=concurrent / clock.wall,
        cpu_us=clock.us_per(concurrent),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
    )
    return [one, many]


async def correlated_reply(
    pending: dict[Any, asyncio.Future[Quote]],
    correlation: Any,
    send: Awaitable[Any],
    timeout: float,
) -> Quote:
    """Send a request (`send`, not yet awaited) and wait up to `timeout` for the reply a reader
    puts in `pending` under `correlation` (the hand-written RPC rows: FastStream's, raw's)."""
    future: asyncio.Future[Quote] = asyncio.get_running_loop().create_future()
    pending[correlation] = future
    try:
        await send
        async with asyncio.timeout(timeout):
            return await future
    finally:
        pending.pop(correlation, None)


async def native_request(client: Any, order: OrderPlaced, topic: str) -> str:
    """Whether FastStream's own `broker.request()` works on a real broker (this version)."""
    try:
        await client.request(order, topic, timeout=2)
    except Exception as exc:  # what it raises is the finding
        return (
            f"broker.request() on a real broker: {type(exc).__name__}: {str(exc)[:80]}; "
            "measured: publish(reply_to=..., correlation_id=...), the subscriber's return value "
            "is published to reply_to, a group-less reply subscriber resolves the future"
        )
    return "broker.request() works on a real broker; measured: publish(reply_to) + reply subscriber"


def request_variants(
    bench: Bench, sequential: int, concurrent: int, in_flight: int
) -> list[Variant]:
    settings, codec = bench.settings, bench.codec
    counts = (sequential, concurrent, in_flight)

    async def bus_rpc(transport_name: str, rpc_settings: KafkaSettings) -> list[Sample]:
        topic = await bench.topics.fresh("rpc-ours")
        server = Bus(make_transport(transport_name, rpc_settings), source="bench.pricing")

        async def on_order(message: Message[Any]) -> Quote:
            return quote(message.data)

        server.subscribe(
            [topic],
            {type_name(OrderPlaced): HandlerSpec(codec.cls, on_order)},
            ConsumerOptions(group=bench.topics.group("rpc-ours")),
        )
        client = Bus(
            make_transport(transport_name, rpc_settings),
            source=bench.topics.group("bench-client"),
        )
        await server.start()
        await client.start()
        orders, keys = codec.orders, bench.keys
        try:

            async def request(i: int, timeout: float = 10.0) -> Quote:
                return await client.request(
                    topic, orders[i % KEYS], key=keys[i % KEYS], reply_type=Quote, timeout=timeout
                )

            return await round_trips(request, *counts)
        finally:
            await quietly(client.stop(), "stopping the client bus")
            await quietly(server.stop(), "stopping the server bus")

    async def faststream_rpc(flavour: str, rpc_settings: KafkaSettings | None) -> list[Sample]:
        from faststream import Context

        topic = await bench.topics.fresh("rpc-fs")
        reply_topic = await bench.topics.fresh("rpc-fs-replies", partitions=1)
        server = faststream_broker(flavour, rpc_settings)
        client = faststream_broker(flavour, rpc_settings)
        pending: dict[str, asyncio.Future[Quote]] = {}

        @server.subscriber(  # type: ignore[untyped-decorator]
            topic, group_id=bench.topics.group("rpc-fs"), auto_offset_reset="earliest"
        )
        async def on_order(body: OrderPlaced) -> Quote:
            return quote(body)

        @client.subscriber(reply_topic, auto_offset_reset="latest")  # type: ignore[untyped-decorator]
        async def on_reply(body: Quote, message: Any = Context()) -> None:  # noqa: B008
            future = pending.get(message.correlation_id)
            if future is not None and not future.done():
                future.set_result(body)

        await server.start()
        await client.start()
        orders, key_bytes = bench.orders, bench.key_bytes
        try:
            native = await native_request(client, orders[0], topic)

            async def request(i: int, timeout: float = 10.0) -> Quote:
                correlation = os.urandom(16).hex()
                send = client.publish(
                    orders[i % KEYS],
                    topic,
                    key=key_bytes[i % KEYS],
                    reply_to=reply_topic,
                    correlation_id=correlation,
                )
                return await correlated_reply(pending, correlation, send, timeout)

            samples = await round_trips(request, *counts)
            samples[0] = replace(samples[0], note=native)
            return samples
        finally:
            await quietly(client.stop(), "stopping the FastStream client")
            await quietly(server.stop(), "stopping the FastStream server")

    async def raw_rpc(rpc_settings: KafkaSettings) -> list[Sample]:
        """The floor: the same round trip written directly on aiokafka, with the same work
        (encode the order, validate it, encode the quote, validate the reply) and the same
        producer settings; the server handles one request at a time and awaits each reply's
        ack, commits at most every 200 ms like our Bus; replies are matched by a header."""
        topic = await bench.topics.fresh("rpc-raw")
        reply_topic = await bench.topics.fresh("rpc-raw-replies", partitions=1)
        bootstrap, options = rpc_settings.bootstrap_servers, aiokafka_options(rpc_settings)
        client_producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
        server_producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
        server_consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=bench.topics.group("rpc-raw"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=rpc_settings.fetch_max_wait_ms,
        )
        reply_consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, fetch_max_wait_ms=rpc_settings.fetch_max_wait_ms
        )
        pending: dict[bytes, asyncio.Future[Quote]] = {}
        encode = OrderPlaced.__pydantic_serializer__.to_json

        async def serve() -> None:
            committed = time.monotonic()
            while True:
                batches = await server_consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        answer = quote(OrderPlaced.model_validate_json(record.value))
                        await server_producer.send_and_wait(
                            reply_topic,
                            answer.__pydantic_serializer__.to_json(answer),
                            key=record.key,
                            headers=[("correlation", dict(record.headers)["correlation"])],
                        )
                if batches and time.monotonic() - committed >= 0.2:
                    await server_consumer.commit()
                    committed = time.monotonic()

        async def read_replies() -> None:
            while True:
                batches = await reply_consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        future = pending.get(dict(record.headers).get("correlation", b""))
                        if future is not None and not future.done():
                            future.set_result(Quote.model_validate_json(record.value))

        clients = (client_producer, server_producer, server_consumer, reply_consumer)
        for client in clients:
            await client.start()
        replies = KafkaTopicPartition(reply_topic, 0)
        reply_consumer.assign([replies])
        await reply_consumer.seek_to_end(replies)
        tasks = [asyncio.create_task(serve()), asyncio.create_task(read_replies())]
        orders, key_bytes = bench.orders, bench.key_bytes
        try:

            async def request(i: int, timeout: float = 10.0) -> Quote:
                correlation = os.urandom(16).hex().encode()
                send = client_producer.send_and_wait(
                    topic,
                    encode(orders[i % KEYS]),
                    key=key_bytes[i % KEYS],
                    headers=[("correlation", correlation)],
                )
                return await correlated_reply(pending, correlation, send, timeout)

            return await round_trips(request, *counts)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                await quietly(client.stop(), "stopping a raw aiokafka client")

    no_linger = replace(settings, linger_ms=0)
    raw_rows = [
        Row(
            scenario=scenario,
            implementation="raw aiokafka, linger 0 (floor)",
            producer=label_of(no_linger),
            semantics="send_and_wait -> validate, reply send_and_wait -> validate; 1 handler",
            payload="pydantic",
            unit="req/s",
        )
        for scenario in (SEQUENTIAL, in_flight_scenario(in_flight))
    ]
    floor = [Variant(rows=raw_rows, run=partial(raw_rpc, no_linger))]
    ours_default = (
        f"{label_of(settings)}; requests+replies via a 2nd producer at linger=0"
        if "kafka" in bench.transports
        else label_of(settings)
    )
    variants: list[Variant] = []
    for config in ("linger 0", "defaults"):
        for flavour, fs_name in (("kafka", FS), ("confluent", FS_CONFLUENT)):
            name = f"{fs_name}, {config}"
            why = faststream_available(flavour)
            producer = (
                label_of(no_linger)
                if config == "linger 0"
                else (faststream_defaults_label(flavour) + " (its defaults)" if not why else "-")
            )
            rows = [
                Row(
                    scenario=scenario,
                    implementation=name,
                    producer=producer,
                    semantics="publish(reply_to, correlation_id) -> return value",
                    payload="pydantic",
                    unit="req/s",
                )
                for scenario in (SEQUENTIAL, in_flight_scenario(in_flight))
            ]
            run_settings = no_linger if config == "linger 0" else None
            variants.append(
                unavailable(rows, why)
                if why
                else Variant(rows=rows, run=partial(faststream_rpc, flavour, run_settings))
            )
        for transport_name in bench.transports:
            fs_name = FS if transport_name == "kafka" else FS_CONFLUENT
            rpc_settings = no_linger if config == "linger 0" else settings
            rows = []
            for scenario in (SEQUENTIAL, in_flight_scenario(in_flight)):
                targets: list[Target] = []
                if config == "linger 0":
                    targets.append(Target(baseline=f"{fs_name}, linger 0", minimum=2.0))
                    if scenario == SEQUENTIAL:
                        targets.append(Target(max_p50_ms=5.0))
                rows.append(
                    Row(
                        scenario=scenario,
                        implementation=f"{ours(transport_name)}, {config}",
                        producer=label_of(no_linger) if config == "linger 0" else ours_default,
                        semantics="Bus.request -> handler return value",
                        payload=codec.name,
                        unit="req/s",
                        targets=targets,
                    )
                )
            try:
                make_transport(transport_name, settings)
            except Unavailable as exc:
                variants.append(unavailable(rows, str(exc)))
                continue
            variants.append(Variant(rows=rows, run=partial(bus_rpc, transport_name, rpc_settings)))
    return floor + variants


# -- 0. the envelope codec ------------------------------------------------------------------------

CODEC = "0. envelope encode+decode"
STDLIB = "stdlib json, structured CloudEvent"


def codec_variants(bench: Bench, n: int) -> list[Variant]:
    """In-process: one event (attributes + the 1 KiB order) encoded to bytes and decoded back,
    per operation; no broker. The stdlib row is the baseline the target names; it does less
    work than ours (its payload stays a dict, nothing is validated)."""
    import json

    orders = bench.orders
    structs: Codec | None
    try:
        structs = msgspec_codec(orders)
    except Unavailable:
        structs = None
    shaper = Bus(MemoryTransport(), source="bench.publisher")

    def timed(one: Callable[[int], object]) -> Sample:
        for i in range(min(n, 500)):
            one(i)
        clock = Clock()
        clock.start()
        for i in range(n):
            one(i)
        clock.stop()
        return Sample(rate=n / clock.wall, cpu_us=clock.us_per(n))

    def stdlib() -> Sample:
        attributes = [
            {
                "specversion": "1.0",
                "id": envelope.id,
                "source": envelope.source,
                "type": envelope.type,
                "time": envelope.time.isoformat(),
                "datacontenttype": "application/json",
                "traceparent": envelope.traceparent,
                "partitionkey": envelope.partitionkey,
            }
            for envelope in (shaper.envelope(o, key=o.order_id) for o in orders)
        ]
        payloads = [json.loads(o.model_dump_json()) for o in orders]

        def one(i: int) -> object:
            raw = json.dumps({**attributes[i % KEYS], "data": payloads[i % KEYS]}).encode()
            return json.loads(raw)

        return timed(one)

    def ours(cls: type[Any], payloads: list[Any], mode: str) -> Sample:
        envelopes = [shaper.envelope(p, key=p.order_id) for p in payloads]

        def binary(i: int) -> object:
            key, value, headers = to_binary(envelopes[i % KEYS])
            record = Record(topic="t", partition=0, offset=i, key=key, value=value, headers=headers)
            return decode_payload(from_binary(record).data, cls)

        def structured(i: int) -> object:
            return decode_payload(from_structured(to_structured(envelopes[i % KEYS])).data, cls)

        return timed(binary if mode == "binary" else structured)

    async def run_stdlib() -> list[Sample]:
        return [stdlib()]

    def row(name: str, semantics: str, payload: str, targets: Sequence[Target] = ()) -> Row:
        return Row(
            scenario=CODEC,
            implementation=name,
            producer="in-process, no broker",
            semantics=semantics,
            payload=payload,
            unit="op/s",
            targets=targets,
        )

    variants = [
        Variant(
            rows=[row(STDLIB, "json.dumps + json.loads; payload stays a dict", "dict")],
            run=run_stdlib,
        )
    ]
    for mode, semantics in (
        ("binary", "to_binary + from_binary + decode_payload (what the bus does)"),
        ("structured", "to_structured + from_structured + decode_payload"),
    ):
        for payload in ("msgspec", "pydantic"):
            targets = (
                [Target(baseline=STDLIB, minimum=5.0, across_payloads=True)]
                if (mode, payload) == ("binary", "msgspec")
                else []
            )
            rows = [row(f"our envelope, {mode} mode", semantics, payload, targets)]
            if payload == "msgspec" and structs is None:
                variants.append(unavailable(rows, "n/a (msgspec not installed)"))
                continue
            cls, payloads = (
                (OrderPlacedStruct, structs.orders)
                if payload == "msgspec" and structs is not None
                else (OrderPlaced, orders)
            )

            async def run_ours(
                cls: type[Any] = cls, payloads: list[Any] = payloads, mode: str = mode
            ) -> list[Sample]:
                return [ours(cls, payloads, mode)]

            variants.append(Variant(rows=rows, run=run_ours))
    return variants


# -- 4. scale-out ---------------------------------------------------------------------------------


def scale_out_variants(bench: Bench, messages: int, hash_rounds: int) -> list[Variant]:
    from bus_scaleout import SCALE_OUT, run_scale_out

    rows = [
        Row(
            scenario=SCALE_OUT,
            implementation=f"our Bus, {processes} consumer process{'es' if processes > 1 else ''}",
            producer="12 partitions, one group, commit every 200 ms",
            semantics=f"handler: sha256 of the payload x{hash_rounds}; at-least-once",
            payload=bench.codec.name,
            baseline=processes == 1,
            targets=()
            if processes == 1
            else (Target(baseline="our Bus, 1 consumer process", minimum=1.7, label="1 process"),),
        )
        for processes in (1, 2)
    ]

    def runner(processes: int) -> Callable[[], Awaitable[list[Sample]]]:
        async def run() -> list[Sample]:
            topic = await bench.topics.fresh("scale", partitions=12)
            sample = await run_scale_out(
                bench.settings,
                topic,
                bench.topics.group("scale"),
                processes=processes,
                messages=messages,
                hash_rounds=hash_rounds,
                payload=bench.codec.name,
                produce=lambda: fill(bench, topic, messages),
            )
            return [sample]

        return run

    return [Variant(rows=[rows[0]], run=runner(1)), Variant(rows=[rows[1]], run=runner(2))]


# -- main -----------------------------------------------------------------------------------------

SCENARIOS = ("codec", "publish", "consume", "request", "scale-out")


async def warm_up_broker(bench: Bench, n: int) -> None:
    """Produce and consume `n` records once, untimed (the broker's JIT, page cache, group
    coordinator are then as warm for the first row as for the last)."""
    topic = await bench.topics.fresh("warm-up")
    await fill(bench, topic, n)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bench.settings.bootstrap_servers,
        group_id=bench.topics.group("warm-up"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            seen += sum(len(b) for b in batches.values())
            await consumer.commit()
    finally:
        await quietly(consumer.stop(), "stopping the warm-up consumer")


async def run(args: argparse.Namespace, bootstrap: str) -> list[Row]:
    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="bench-ours")
    orders = [make_order(i) for i in range(KEYS)]
    codec = pydantic_codec(orders) if args.payload == "pydantic" else msgspec_codec(orders)
    rows: list[Row] = []
    async with Topics(bootstrap, f"{int(time.time())}-{os.getpid()}") as topics:
        bench = Bench(
            settings=settings,
            topics=topics,
            codec=codec,
            transports=args.transports,
            orders=orders,
            keys=[o.order_id for o in orders],
            key_bytes=[o.order_id.encode() for o in orders],
        )
        print("broker warm-up ...", flush=True)
        try:
            async with asyncio.timeout(60):
                await warm_up_broker(bench, min(args.messages, 5000))
        except Exception as exc:
            if not await broker_alive(bootstrap):
                raise BrokerUnreachable(f"Kafka at {bootstrap} went away during warm-up") from exc
            print(f"  warm-up failed: {type(exc).__name__}: {exc}", flush=True)

        async def scenario(name: str, variants: list[Variant], limit: float) -> None:
            print(f"{name} ...", flush=True)
            await run_rounds(bench, variants, args.rounds, limit)
            rows.extend(r for v in variants for r in v.rows)

        if "codec" in args.only:
            await scenario("envelope codec", codec_variants(bench, args.messages), 60)
        if "publish" in args.only:
            await scenario("publish", publish_variants(bench, args.messages), 90)
        if "consume" in args.only:
            warm = max(1, min(500, args.consume // 10))
            topic = await topics.fresh("consume")
            await fill(bench, topic, warm + args.consume)
            await scenario("consume", consume_variants(bench, topic, args.consume, warm), 120)
        if "request" in args.only:
            variants = request_variants(bench, args.requests, args.requests, args.in_flight)
            await scenario("request/reply", variants, 120)
            # sequential rows first, then the in-flight ones
            block = [r for r in rows if r.scenario.startswith("3.")]
            rest = [r for r in rows if not r.scenario.startswith("3.")]
            rows[:] = rest + sorted(block, key=lambda r: r.scenario != SEQUENTIAL)
        if "scale-out" in args.only:
            variants = scale_out_variants(bench, args.scale_messages, args.hash_rounds)
            await scenario("scale-out", variants, 180)
    return rows


def _revision() -> str:
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
    return commit + (" + uncommitted changes in framework/" if dirty else "")


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def default_transports() -> list[str]:
    """Our aiokafka transport and, where it is installed, the confluent-kafka one (an n/a
    row otherwise)."""
    return ["kafka", "kafka-confluent"]


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, small counts: a smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per row (default 3)")
    parser.add_argument("--messages", type=int, help="publish count per round (default 20000)")
    parser.add_argument("--consume", type=int, help="consume count per round (default 5000)")
    parser.add_argument("--requests", type=int, help="round trips per mode (default 300)")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent requests")
    parser.add_argument("--scale-messages", type=int, help="scale-out count (default 4000)")
    parser.add_argument(
        "--hash-rounds", type=int, default=800, help="sha256 rounds per message (~1 ms)"
    )
    parser.add_argument(
        "--transports",
        "--transport",
        type=_csv,
        default=None,
        help="our transports, comma-separated (default: kafka and the confluent one)",
    )
    parser.add_argument("--payload", choices=("pydantic", "msgspec"), default="pydantic")
    parser.add_argument(
        "--only", type=_csv, default=list(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}"
    )
    args = parser.parse_args(argv)
    args.transports = args.transports or default_transports()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.messages = args.messages or (300 if args.quick else 20000)
    args.consume = args.consume or (300 if args.quick else 5000)
    args.requests = args.requests or (50 if args.quick else 300)
    args.scale_messages = args.scale_messages or (200 if args.quick else 4000)
    if args.quick:
        args.hash_rounds = min(args.hash_rounds, 100)
    bootstrap = require_env(
        "KAFKA_BOOTSTRAP",
        'Start the dev broker and export its address: eval "$(scripts/devservices up)"',
    )
    os.environ["KAFKA_BOOTSTRAP"] = bootstrap
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "faststream", "confluent_kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    defaults = KafkaSettings(bootstrap_servers=bootstrap)
    print(f"benchmarks/bus.py - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        environment(
            [
                "msa-framework",
                "aiokafka",
                "confluent-kafka",
                "faststream",
                "pydantic",
                "msgspec",
                "orjson",
                "uvloop",
            ],
            extra=[
                ("Framework", f"msa-framework at {_revision()}"),
                ("Kafka", f"{os.environ.get('KAFKA_VERSION', 'unknown version')} at {bootstrap}"),
                (
                    "Loop",
                    f"uvloop {importlib.metadata.version('uvloop')}, one process "
                    "(scale-out: 1-2 workers)",
                ),
                ("Settings", f"our KafkaSettings defaults: {label_of(defaults)}"),
                ("Load", f"{_load()} at start (other processes share these cores)"),
                (
                    "Counts",
                    f"{args.rounds} interleaved round(s) per row; per round {args.messages} "
                    f"publishes, {args.consume} consumed, {args.requests} sequential + "
                    f"{args.requests} concurrent requests ({args.in_flight} in flight), "
                    f"{args.scale_messages} scale-out msgs x {args.hash_rounds} sha256; "
                    f"payload {PAYLOAD_BYTES} B {args.payload}",
                ),
            ],
        )
    )
    began = time.perf_counter()
    try:
        rows = uvloop.run(run(args, bootstrap))
    except BrokerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render(rows))
    print(f"\n(total {time.perf_counter() - began:.0f} s; load average {_load()} at the end)")
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
