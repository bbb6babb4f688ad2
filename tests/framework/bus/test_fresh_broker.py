"""On a broker that has just started, nothing a service sends to a new topic is lost.

Seen twice by an adopter on a freshly started broker: a service's first publish to a topic it
created itself met `NotLeaderForPartition`, and its dead letters never arrived. These tests start
a Kafka of their own (`scripts/devservices up kafka` with a run folder and port of their own), so
every topic is new and the controller has just been elected.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from framework.bus.consumer import DLQ_PREFIX
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.errors import Reject
from framework.messages import message_type
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from framework.types import TopicSpec
from tests.readers import read_topic

pytestmark = pytest.mark.kafka  # the cached broker jars come with the dev servers

REPO = Path(__file__).resolve().parents[3]
DEVSERVICES = REPO / "scripts" / "devservices.py"


def _free_port_pair() -> int:
    """A port below the ephemeral range whose next port is free too (the controller's)."""
    for _ in range(200):
        port = random.randrange(20_000, 30_000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def fresh_bootstrap() -> Iterator[str]:
    """A Kafka broker started for this module alone, empty."""
    with tempfile.TemporaryDirectory(prefix="msa-fresh-kafka-") as run:
        env = {**os.environ, "MSA_RUN_DIR": run, "MSA_KAFKA_PORT": str(_free_port_pair())}
        up = subprocess.run(
            [sys.executable, str(DEVSERVICES), "up", "kafka"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert up.returncode == 0, up.stderr
        try:
            [line] = [x for x in up.stdout.splitlines() if "KAFKA_BOOTSTRAP=" in x]
            yield line.split("=", 1)[1]
        finally:
            subprocess.run(
                [sys.executable, str(DEVSERVICES), "down", "kafka"],
                env=env,
                capture_output=True,
                timeout=120,
            )


@message_type("fresh.order.placed")
class OrderPlaced(BaseModel):
    order_id: str


class Refuser(Service):
    """Dead-letters every order at once (`Reject`) onto `orders.dlq`."""

    name = "refuser"

    @handles("orders")
    async def on_order(self, event: OrderPlaced) -> None:
        raise Reject(f"order {event.order_id} refused")


@message_type("fresh.shipment.scheduled")
class ShipmentScheduled(BaseModel):
    order_id: str


class Shipper(Service):
    """Publishes to `shipments`, a topic nothing declared: its first send creates it."""

    name = "shipper"

    @handles("paid-orders")
    async def on_order(self, event: OrderPlaced) -> None:
        await self.publish("shipments", ShipmentScheduled(order_id=event.order_id), key="k")


def transport_for(bootstrap: str) -> KafkaTransport:
    return KafkaTransport(
        KafkaSettings(
            bootstrap_servers=bootstrap, session_timeout_ms=6_000, heartbeat_interval_ms=200
        )
    )


async def test_a_declared_topic_has_a_leader_for_every_partition_at_once(
    fresh_bootstrap: str,
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    transport = transport_for(fresh_bootstrap)
    await transport.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=fresh_bootstrap)
    await admin.start()
    try:
        await transport.declare([TopicSpec(name="declared-now", partitions=6)])
        [described] = await admin.describe_topics(["declared-now"])
        assert [p["leader"] >= 0 for p in described["partitions"]] == [True] * 6
        metadata = await (await transport.send("declared-now", b"first", key=b"k"))
        assert metadata.offset == 0
    finally:
        await admin.close()
        await transport.stop()


async def test_dead_letters_onto_new_topics_of_a_fresh_broker_all_arrive_before_the_commit(
    fresh_bootstrap: str,
) -> None:
    count = 20
    transport = transport_for(fresh_bootstrap)
    service = Refuser(ServiceSettings(http_port=-1), transport=transport)
    async with ServiceHarness(service) as harness:
        for n in range(count):
            await harness.publish("orders", OrderPlaced(order_id=f"o-{n}"), key=f"o-{n}")
        letters = await read_topic(transport, "orders.dlq", count=count)
    [subscription] = service.bus.subscriptions
    committed = await _committed(fresh_bootstrap, subscription.group, "orders")
    reasons = {(r.header(DLQ_PREFIX + "error-message") or b"").decode() for r in letters}
    assert reasons == {f"order o-{n} refused" for n in range(count)}
    assert committed == count, "every record is committed once its dead letter was acknowledged"


async def _committed(bootstrap: str, group: str, topic: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic)


async def test_a_handler_publishing_to_a_topic_it_creates_itself_loses_nothing(
    fresh_bootstrap: str,
) -> None:
    count = 20
    transport = transport_for(fresh_bootstrap)
    service = Shipper(ServiceSettings(http_port=-1), transport=transport)
    async with ServiceHarness(service) as harness:
        for n in range(count):
            await harness.publish("paid-orders", OrderPlaced(order_id=f"o-{n}"), key=f"o-{n}")
        handled = await harness.handled(OrderPlaced, count=count, timeout=60)
        shipped = await read_topic(transport, "shipments", count=count)
    assert [h.error for h in handled] == [None] * count
    assert len(shipped) == count
