"""ConfluentTransport and ConfluentConsumer (librdkafka) against the real Apache Kafka broker.

The bus contract runs on this transport too (`test_contract.py`, `[confluent]`); these are the
transport's own promises, the same as `test_kafka_transport.py` holds the aiokafka one to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from framework.bus.confluent import ConfluentConsumer, ConfluentSettings, ConfluentTransport
from framework.bus.kafka import KafkaTransport
from framework.bus.memory import partition_for_key
from framework.bus.transports import kafka_client, transport_from_env
from framework.errors import (
    CommitError,
    ConfigurationError,
    NotStartedError,
    PublishError,
    TopicError,
    TransportError,
)
from framework.types import Record, RecordMetadata, TopicPartition, TopicSpec


def fast_settings(bootstrap: str, **overrides: object) -> ConfluentSettings:
    """Settings that notice rebalances within a fraction of a second."""
    options: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "session_timeout_ms": 6_000,  # the broker's group.min.session.timeout.ms
        "heartbeat_interval_ms": 200,
        "request_timeout_ms": 10_000,
    }
    options.update(overrides)
    return ConfluentSettings(**options)  # type: ignore[arg-type]


@pytest.fixture
async def transport(kafka_bootstrap: str) -> AsyncIterator[ConfluentTransport]:
    transport = ConfluentTransport(fast_settings(kafka_bootstrap))
    await transport.start()
    yield transport
    await transport.stop()


class RecordingListener:
    def __init__(self) -> None:
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []
        self.changed = asyncio.Event()

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("revoked", partitions))
        self.changed.set()

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("assigned", partitions))
        self.changed.set()

    async def wait_for(self, count: int, within: float = 15.0) -> None:
        async with asyncio.timeout(within):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()


async def send_all(
    transport: ConfluentTransport, topic: str, values: list[bytes], **options: object
) -> list[RecordMetadata]:
    acks = [await transport.send(topic, value, **options) for value in values]  # type: ignore[arg-type]
    return list(await asyncio.gather(*acks))


async def fetch_at_least(
    consumer: ConfluentConsumer, count: int, within: float = 10.0
) -> list[Record]:
    records: list[Record] = []
    deadline = time.monotonic() + within
    while len(records) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(records)} of {count} records arrived"
        records.extend(await consumer.fetch(timeout=min(left, 1.0), max_records=count))
    return records


def partitions(topic: str, count: int) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(topic, number) for number in range(count))


def librdkafka_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("msa-confluent")}


# -- selection -----------------------------------------------------------------------------------


def test_kafka_client_confluent_selects_this_transport() -> None:
    env = {"MSA_TRANSPORT": "kafka", "KAFKA_BOOTSTRAP": "k:9092", "KAFKA_CLIENT": "confluent"}
    transport = transport_from_env(env)
    assert isinstance(transport, ConfluentTransport)
    assert transport.name == "kafka"
    assert transport.settings.bootstrap_servers == "k:9092"
    assert isinstance(transport_from_env({**env, "KAFKA_CLIENT": ""}), KafkaTransport)
    assert kafka_client({}) == "aiokafka"
    with pytest.raises(ConfigurationError, match="KAFKA_CLIENT"):
        transport_from_env({**env, "KAFKA_CLIENT": "kafka-python"})


def test_settings_from_env_read_the_same_variables_as_the_aiokafka_transport() -> None:
    settings = ConfluentSettings.from_env(
        prefix="ORDERS_KAFKA_",
        environ={
            "ORDERS_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "ORDERS_KAFKA_CLIENT_ID": "orders",
            "ORDERS_KAFKA_LINGER_MS": "20",
            "ORDERS_KAFKA_COMPRESSION": "zstd",
            "ORDERS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "ORDERS_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "ORDERS_KAFKA_SASL_USERNAME": "orders",
            "ORDERS_KAFKA_SASL_PASSWORD": "s3cret",
        },
    )
    assert "s3cret" not in repr(settings)
    config = settings.producer_config()
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    assert (config["client.id"], config["linger.ms"], config["compression.type"]) == (
        "orders",
        20,
        "zstd",
    )
    assert (config["security.protocol"], config["sasl.mechanisms"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (config["sasl.username"], config["sasl.password"]) == ("orders", "s3cret")
    assert (config["acks"], config["enable.idempotence"]) == ("all", True)
    assert config["partitioner"] == "murmur2_random"
    consumer = settings.consumer_config(group="billing", start_from="latest")
    assert (consumer["group.id"], consumer["auto.offset.reset"]) == ("billing", "latest")
    assert consumer["enable.auto.commit"] is False


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("KAFKA_LINGER_MS", "soon", "LINGER_MS"),
        ("KAFKA_COMPRESSION", "brotli", "compression_type"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS", "security_protocol"),
        ("KAFKA_BOOTSTRAP", "nohost", "not host:port"),
    ],
)
def test_settings_from_env_reject_bad_values(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        ConfluentSettings.from_env(environ={"KAFKA_BOOTSTRAP": "k:9092", variable: value})


# -- producing and topics ------------------------------------------------------------------------


@pytest.mark.kafka
async def test_send_enqueues_and_the_future_resolves_to_our_record_metadata(
    transport: ConfluentTransport, topic_name: str
) -> None:
    acked = await transport.send(topic_name, b"first", key=b"k", partition=1)
    assert isinstance(acked, asyncio.Future)
    assert await acked == RecordMetadata(topic_name, 1, 0)

    metadata = await send_all(transport, topic_name, [b"a", b"b", b"c"], partition=1)
    assert metadata == [RecordMetadata(topic_name, 1, offset) for offset in (1, 2, 3)]
    assert all(type(m) is RecordMetadata for m in metadata)
    urgent = await (await transport.send(topic_name, b"now", partition=1, immediate=True))
    assert urgent == RecordMetadata(topic_name, 1, 4)


@pytest.mark.kafka
async def test_unknown_topics_are_created_with_the_transport_defaults(
    kafka_bootstrap: str, topic_name: str
) -> None:
    # The broker's own num.partitions is 3: two partitions prove the transport created it.
    transport = ConfluentTransport(
        fast_settings(kafka_bootstrap, default_partitions=2, compression_type="gzip")
    )
    await transport.start()
    try:
        assert await transport.partitions_for(topic_name) == 2
        acked = await transport.send(topic_name + "-sent", b"v")
        assert (await acked).partition in {0, 1}
        assert await transport.partitions_for(topic_name + "-sent") == 2
        await transport.delete_topics([topic_name, topic_name + "-sent"])
    finally:
        await transport.stop()


@pytest.mark.kafka
async def test_declare_creates_topics_with_partitions_and_configs(
    kafka_bootstrap: str, transport: ConfluentTransport, topic_name: str
) -> None:
    spec = TopicSpec(
        name=topic_name,
        partitions=4,
        retention_ms=3_600_000,
        config={"cleanup.policy": "compact"},
    )
    await transport.declare([spec])
    await transport.declare([TopicSpec(name=topic_name, partitions=6)])  # exists: left alone

    assert await transport.partitions_for(topic_name) == 4
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic_name)]
        )
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    assert configs["retention.ms"] == "3600000"
    assert configs["cleanup.policy"] == "compact"


@pytest.mark.kafka
async def test_declare_reports_a_topic_the_broker_refuses(
    transport: ConfluentTransport, topic_name: str
) -> None:
    with pytest.raises(TopicError, match=topic_name):
        await transport.declare([TopicSpec(name=topic_name, replication_factor=3)])  # 1 broker


@pytest.mark.kafka
async def test_delete_topics_removes_them_and_ignores_missing_ones(
    kafka_bootstrap: str, transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=1)])
    await transport.delete_topics([topic_name, topic_name + "-never-existed"])

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topic_name not in await admin.list_topics()
    finally:
        await admin.close()


@pytest.mark.kafka
async def test_send_failures_become_framework_errors(
    transport: ConfluentTransport, topic_name: str
) -> None:
    too_big = b"x" * (transport.settings.max_request_size + 1)
    with pytest.raises(PublishError, match="MSG_SIZE_TOO_LARGE") as raised:
        await transport.send(topic_name, too_big)
    assert raised.value.__cause__ is not None
    with pytest.raises(TopicError, match="no partition 7"):
        await transport.send(topic_name, b"v", partition=7)


@pytest.mark.kafka
async def test_keyed_sends_land_where_aiokafka_and_the_java_client_put_them(
    kafka_bootstrap: str, transport: ConfluentTransport, topic_name: str
) -> None:
    """murmur2, as the Java client and aiokafka: keys partition alike whichever client wrote
    them (librdkafka's own default would hash with CRC32)."""
    await transport.declare([TopicSpec(name=topic_name, partitions=5)])
    keys = [f"key-{n}".encode() for n in range(40)]
    ours = await asyncio.gather(
        *[
            await transport.send(topic_name, b"%d" % n, key=key, headers=(("h", b"%d" % n),))
            for n, key in enumerate(keys)
        ]
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        theirs = await asyncio.gather(
            *[await producer.send(topic_name, b"x", key=key) for key in keys]
        )
    finally:
        await producer.stop()
    assert [m.partition for m in ours] == [m.partition for m in theirs]
    assert [m.partition for m in ours] == [partition_for_key(key, 5) for key in keys]
    assert len({m.partition for m in ours}) > 1


# -- consuming -----------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_a_restarted_group_member_resumes_after_the_committed_offset(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=1)])
    values = [f"value-{i}".encode() for i in range(10)]
    sending_ms = time.time_ns() // 1_000_000
    await send_all(transport, topic_name, values, key=b"key", headers=(("h", b"1"), ("h", b"2")))
    sent_ms = time.time_ns() // 1_000_000 + 1
    group = topic_name + "-group"

    first = transport.consumer([topic_name], group=group, listener=RecordingListener())
    await first.start()
    try:
        taken = (await fetch_at_least(first, 4))[:4]
        await first.commit({taken[-1].topic_partition: taken[-1].offset + 1})
    finally:
        await first.stop()

    assert [r.value for r in taken] == values[:4]
    record = taken[0]
    assert (record.topic, record.partition, record.offset) == (topic_name, 0, 0)
    assert record.key == b"key"
    assert record.headers == (("h", b"1"), ("h", b"2"))
    assert sending_ms <= record.timestamp_ms <= sent_ms  # the producer's time of sending

    second = transport.consumer([topic_name], group=group, listener=RecordingListener())
    await second.start()
    try:
        rest = await fetch_at_least(second, 6)
    finally:
        await second.stop()
    assert [r.offset for r in rest] == list(range(4, 10))
    assert [r.value for r in rest] == values[4:]


@pytest.mark.kafka
async def test_fetch_orders_records_by_partition_then_offset(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=3)])
    for i in range(12):
        await (await transport.send(topic_name, str(i).encode(), partition=2 - i % 3))
    reader = transport.consumer([topic_name], group=None, listener=RecordingListener())
    await reader.start()
    try:
        records = await fetch_at_least(reader, 12)
    finally:
        await reader.stop()
    order = [(r.partition, r.offset) for r in records]
    assert sorted(order) == [(p, o) for p in range(3) for o in range(4)]
    for partition in range(3):
        offsets = [o for p, o in order if p == partition]
        assert offsets == sorted(offsets)


@pytest.mark.kafka
async def test_a_waiting_fetch_is_woken_by_each_record_of_a_ping_pong(
    transport: ConfluentTransport, topic_name: str
) -> None:
    """One record at a time, each sent after the previous one was fetched (what a request's
    reply reader sees): every fetch returns as its record arrives. The fetch timeout is an
    hour, so a lost wake-up hangs here until the guard fails the test; it used to cost each
    reply the reader's whole timeout (1 s) instead."""
    reader = transport.consumer(
        [topic_name], group=None, listener=RecordingListener(), start_from="latest"
    )
    await reader.start()
    try:
        async with asyncio.timeout(60):
            for n in range(20):
                await (await transport.send(topic_name, b"%d" % n))
                records = await reader.fetch(timeout=3600, max_records=10)
                assert [record.value for record in records] == [b"%d" % n]
    finally:
        await reader.stop()


async def test_null_header_values_become_empty(
    kafka_bootstrap: str, transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=1)])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)  # a foreign producer
    await producer.start()
    try:
        await producer.send_and_wait(topic_name, b"b", headers=[("x", None), ("y", b"2")])
    finally:
        await producer.stop()
    reader = transport.consumer([topic_name], group=None, listener=RecordingListener())
    await reader.start()
    try:
        [record] = await fetch_at_least(reader, 1)
    finally:
        await reader.stop()
    assert record.headers == (("x", b""), ("y", b"2"))


@pytest.mark.kafka
async def test_rebalance_listener_sees_our_partitions_on_assign_and_revoke(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=4)])
    everything = partitions(topic_name, 4)
    group = topic_name + "-group"
    first_listener, second_listener = RecordingListener(), RecordingListener()
    first = transport.consumer([topic_name], group=group, listener=first_listener)
    second = transport.consumer([topic_name], group=group, listener=second_listener)

    await first.start()
    try:
        assert first_listener.events == [("assigned", everything)]
        assert first.assignment() == everything

        # Nobody fetches: the consumer thread's polls run librdkafka's rebalance callbacks.
        await second.start()  # joining makes the first member give up everything, then share
        await first_listener.wait_for(3)
        try:
            assert first_listener.events[1] == ("revoked", everything)
            kind, kept = first_listener.events[2]
            [(_, taken)] = second_listener.events
            assert kind == "assigned"
            assert kept | taken == everything
            assert not kept & taken
            assert len(kept) == len(taken) == 2
            assert first.assignment() == kept
            assert second.assignment() == taken

            # The first member no longer owns `taken`: committing it is refused.
            with pytest.raises(CommitError):
                await first.commit({next(iter(taken)): 0})
        finally:
            await second.stop()  # announces what it held, then leaves
        assert second_listener.events[-1] == ("revoked", taken)

        await first_listener.wait_for(5)  # the group shrinks back to one member
        assert first_listener.events[3:] == [("revoked", kept), ("assigned", everything)]
    finally:
        await first.stop()
    assert first_listener.events[-1] == ("revoked", everything)


@pytest.mark.kafka
async def test_a_listener_commits_inside_on_revoked(
    transport: ConfluentTransport, topic_name: str
) -> None:
    """The listener's coroutine runs on the loop while librdkafka's callback waits on the
    consumer thread; the commit it makes there is served there, not deadlocked."""
    await transport.declare([TopicSpec(name=topic_name, partitions=1)])
    await send_all(transport, topic_name, [b"a", b"b", b"c"])
    group = topic_name + "-group"
    tp = TopicPartition(topic_name, 0)

    class CommittingListener(RecordingListener):
        consumer: ConfluentConsumer | None = None

        async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
            assert self.consumer is not None
            await self.consumer.commit({tp: 2})
            await super().on_revoked(partitions)

    listener = CommittingListener()
    consumer = transport.consumer([topic_name], group=group, listener=listener)
    listener.consumer = consumer
    await consumer.start()
    await fetch_at_least(consumer, 3)
    await consumer.stop()
    assert listener.events[-1] == ("revoked", frozenset({tp}))

    again = transport.consumer([topic_name], group=group, listener=RecordingListener())
    await again.start()
    try:
        [record] = await fetch_at_least(again, 1)
    finally:
        await again.stop()
    assert (record.offset, record.value) == (2, b"c")


@pytest.mark.kafka
async def test_group_less_reader_from_latest_sees_only_records_sent_after_it_started(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await send_all(transport, topic_name, [b"old-1", b"old-2", b"old-3"], key=b"a")
    listener = RecordingListener()
    reader = transport.consumer([topic_name], group=None, listener=listener, start_from="latest")
    await reader.start()
    try:
        assert listener.events == [("assigned", partitions(topic_name, 3))]
        assert reader.assignment() == partitions(topic_name, 3)
        new = [f"new-{i}".encode() for i in range(6)]
        for i, value in enumerate(new):  # acknowledged before the reader's first fetch
            await (await transport.send(topic_name, value, key=str(i).encode()))
        markers = [f"marker-{p}".encode() for p in range(3)]
        for p, marker in enumerate(markers):
            await (await transport.send(topic_name, marker, partition=p))
        records = await fetch_at_least(reader, len(new) + len(markers))
        await reader.commit({records[0].topic_partition: records[0].offset + 1})  # no group: no-op
    finally:
        await reader.stop()
    assert sorted(r.value for r in records) == sorted(new + markers)  # none of the old ones


@pytest.mark.kafka
async def test_lag_counts_the_records_not_fetched_yet(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=1)])
    await send_all(transport, topic_name, [str(i).encode() for i in range(10)])
    consumer = transport.consumer(
        [topic_name], group=topic_name + "-group", listener=RecordingListener()
    )
    await consumer.start()
    try:
        first = await consumer.fetch(timeout=5.0, max_records=3)
        assert len(first) == 3
        assert consumer.lag() == {TopicPartition(topic_name, 0): 7}
        await fetch_at_least(consumer, 7)
        assert consumer.lag() == {TopicPartition(topic_name, 0): 0}
        ends = await consumer.end_offsets([TopicPartition(topic_name, 0)])
        assert ends == {TopicPartition(topic_name, 0): 10}
    finally:
        await consumer.stop()
    assert consumer.lag() == {}
    with pytest.raises(NotStartedError):
        await consumer.fetch(timeout=0.1, max_records=1)


@pytest.mark.kafka
async def test_paused_partitions_are_not_fetched_until_resumed(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=2)])
    for partition in (0, 1):
        await send_all(transport, topic_name, [b"a", b"b"], partition=partition)
    reader = transport.consumer([topic_name], group=None, listener=RecordingListener())
    await reader.start()
    try:
        paused = TopicPartition(topic_name, 0)
        reader.pause([paused, TopicPartition("not-assigned", 0)])  # unknown ones are ignored
        await send_all(transport, topic_name, [b"marker"], partition=1)
        records = await fetch_at_least(reader, 3)
        assert [r.value for r in records] == [b"a", b"b", b"marker"]
        assert {r.partition for r in records} == {1}
        reader.resume([paused])
        resumed = await fetch_at_least(reader, 2)
        assert {r.partition for r in resumed} == {0}
        assert [r.offset for r in resumed] == [0, 1]
    finally:
        await reader.stop()


@pytest.mark.kafka
async def test_a_fetch_cancelled_midway_loses_no_records(
    transport: ConfluentTransport, topic_name: str
) -> None:
    await transport.declare([TopicSpec(name=topic_name, partitions=1)])
    reader = transport.consumer([topic_name], group=None, listener=RecordingListener())
    await reader.start()
    try:
        waiting = asyncio.create_task(reader.fetch(timeout=5.0, max_records=10))
        await send_all(transport, topic_name, [b"a", b"b"])
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        records = [] if waiting.cancelled() else waiting.result()
        records += await fetch_at_least(reader, 2 - len(records))
    finally:
        await reader.stop()
    assert [r.value for r in records] == [b"a", b"b"]


# -- failures, misuse and clean-up ---------------------------------------------------------------


async def test_an_unreachable_bootstrap_fails_with_a_transport_error() -> None:
    transport = ConfluentTransport(
        ConfluentSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000)
    )
    with pytest.raises(TransportError, match=r"127\.0\.0\.1:1"):
        async with asyncio.timeout(30):  # only bounds a hang
            await transport.start()
    with pytest.raises(NotStartedError):  # a failed start leaves it unstarted
        await transport.send("topic", b"v")


@pytest.mark.kafka
async def test_using_the_transport_or_a_consumer_before_start_raises_not_started(
    kafka_bootstrap: str, topic_name: str
) -> None:
    transport = ConfluentTransport(fast_settings(kafka_bootstrap))
    with pytest.raises(NotStartedError):
        await transport.send(topic_name, b"v")
    with pytest.raises(NotStartedError):
        await transport.partitions_for(topic_name)
    with pytest.raises(NotStartedError):
        await transport.declare([TopicSpec(name=topic_name)])
    consumer = transport.consumer([topic_name], group="g", listener=RecordingListener())
    with pytest.raises(NotStartedError):
        await consumer.start()
    with pytest.raises(NotStartedError):
        await consumer.fetch(timeout=0.1, max_records=1)
    with pytest.raises(NotStartedError):
        await consumer.commit({TopicPartition(topic_name, 0): 1})
    assert consumer.assignment() == frozenset()

    await transport.start()
    await transport.stop()
    await transport.stop()  # idempotent
    with pytest.raises(NotStartedError):  # and unusable again after stop
        await transport.send(topic_name, b"v")


@pytest.mark.kafka
async def test_stop_ends_every_thread_it_started(kafka_bootstrap: str, topic_name: str) -> None:
    before = librdkafka_threads()
    transport = ConfluentTransport(fast_settings(kafka_bootstrap))
    await transport.start()
    await (await transport.send(topic_name, b"v", immediate=True))
    consumer = transport.consumer([topic_name], group=None, listener=RecordingListener())
    await consumer.start()
    assert len(librdkafka_threads() - before) == 1  # the consumer's; producing needs none
    await consumer.stop()
    await transport.stop()
    assert librdkafka_threads() == before
