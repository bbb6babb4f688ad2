"""The broker the suite runs against is a real Apache Kafka, and behaves like one."""

from __future__ import annotations

import os

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

pytestmark = pytest.mark.kafka


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def test_broker_is_apache_kafka_in_kraft_mode(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        broker_id = str(cluster["brokers"][0]["node_id"])
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.BROKER, broker_id)]
        )
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    # Only a real Kafka broker in KRaft combined mode reports these broker configs.
    assert configs["process.roles"] == "broker,controller"
    assert configs["controller.listener.names"] == "CONTROLLER"
    print(
        f"Apache Kafka {os.environ.get('KAFKA_VERSION', '?')} at {kafka_bootstrap}, "
        f"cluster {cluster['cluster_id']}, broker {broker_id}"
    )


async def test_consumer_group_resumes_from_committed_offsets(
    kafka_bootstrap: str, topic_name: str
) -> None:
    await create_topic(kafka_bootstrap, topic_name, partitions=3)
    sent = [(f"key-{i % 4}".encode(), f"value-{i}".encode()) for i in range(40)]
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for key, value in sent:
            await producer.send_and_wait(topic_name, value, key=key)
    finally:
        await producer.stop()

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic_name,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"{topic_name}-group",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    # First member: takes 15 records one at a time, committing each, then leaves the group.
    first = consumer()
    await first.start()
    seen: list[tuple[bytes, bytes]] = []
    committed: dict[TopicPartition, int] = {}
    try:
        while len(seen) < 15:
            batch = await first.getmany(timeout_ms=2000, max_records=1)
            for tp, records in batch.items():
                for record in records:
                    assert record.key is not None
                    assert record.value is not None
                    seen.append((record.key, record.value))
                    committed[tp] = record.offset + 1
                    await first.commit({tp: record.offset + 1})
        for tp, offset in committed.items():
            assert await first.committed(tp) == offset
    finally:
        await first.stop()

    # A restarted member of the same group resumes exactly after the committed offsets.
    second = consumer()
    await second.start()
    try:
        while len(seen) < len(sent):
            batch = await second.getmany(timeout_ms=5000)
            assert batch, f"no more records after {len(seen)} of {len(sent)}"
            for records in batch.values():
                seen.extend((r.key, r.value) for r in records)
    finally:
        await second.stop()

    assert sorted(seen) == sorted(sent), "every record exactly once across the restart"
    for key in {k for k, _ in sent}:  # per-key order survives partitioning and the restart
        assert [v for k, v in seen if k == key] == [v for k, v in sent if k == key]
