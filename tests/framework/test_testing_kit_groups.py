"""On a real broker the harness runs the service in consumer groups of its own.

A test against a shared broker must never join the group of a deployed instance of the same
service: it would take some of that instance's partitions (and records), and see only part of
what it published. Nor may it handle the history of a shared topic (and publish the effects).
The harness gives every subscription's group a unique suffix on any transport but the in-memory
one, starting at the end of the topics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from pydantic import BaseModel

from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import message_type
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness

pytestmark = pytest.mark.kafka

NO_HTTP = ServiceSettings(http_port=-1)


@message_type("test.kit.parcel")
class Parcel(BaseModel):
    n: int


def depot_on(topic: str) -> type[Service]:
    class Depot(Service):
        name = f"depot-{topic}"

        @handles(topic)
        async def on_parcel(self, parcel: Parcel) -> None:
            return None

    return Depot


@pytest.fixture
def make_kafka(kafka_bootstrap: str) -> Callable[[], KafkaTransport]:
    return lambda: KafkaTransport(
        KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            linger_ms=1,
            session_timeout_ms=6_000,
            heartbeat_interval_ms=200,
        )
    )


@pytest.fixture
async def deployed(
    make_kafka: Callable[[], KafkaTransport], topic_name: str
) -> AsyncIterator[ServiceHarness]:
    """The "deployed" instance of the service, in the service's own group (watched by a
    harness told to keep that group)."""
    service = depot_on(topic_name)(NO_HTTP, transport=make_kafka())
    async with ServiceHarness(service, group_suffix="") as watched:
        yield watched


async def test_a_harness_never_joins_the_group_of_a_deployed_instance(
    deployed: ServiceHarness, make_kafka: Callable[[], KafkaTransport], topic_name: str
) -> None:
    await deployed.publish(topic_name, Parcel(n=-1), key="parcel-0")  # on the topic before
    await deployed.handled(Parcel)
    depot = depot_on(topic_name)
    async with ServiceHarness(depot(NO_HTTP, transport=make_kafka())) as harness:
        [group] = {s.group for s in harness.service.bus.subscriptions}
        assert group == f"depot-{topic_name}{harness.group_suffix}"
        assert harness.group_suffix.startswith("-test-")
        deployed_groups = [s.group for s in deployed.service.bus.subscriptions]
        assert deployed_groups == [f"depot-{topic_name}"]

        for n in range(12):  # twelve keys: every partition gets some
            await harness.publish(topic_name, Parcel(n=n), key=f"parcel-{n}")
        handled = await harness.handled(Parcel, count=12, timeout=30)
        in_deployed = await deployed.handled(Parcel, count=13, timeout=30)  # it got all too

    # Parcel -1 was on the topic before the test: not the harness's (it would have come before
    # parcel 0, of the same key).
    assert sorted(h.message.data.n for h in handled) == list(range(12))
    assert {h.message.group for h in handled} == {group}
    assert sorted(h.message.data.n for h in in_deployed) == list(range(-1, 12))


async def test_two_harnesses_get_two_groups_and_an_explicit_suffix_wins(
    make_kafka: Callable[[], KafkaTransport], topic_name: str
) -> None:
    depot = depot_on(topic_name)
    first = ServiceHarness(depot(NO_HTTP, transport=make_kafka()))
    second = ServiceHarness(depot(NO_HTTP, transport=make_kafka()))
    own = ServiceHarness(depot(NO_HTTP, transport=make_kafka()), group_suffix="")
    assert first.group_suffix != second.group_suffix
    async with own:
        assert [s.group for s in own.service.bus.subscriptions] == [f"depot-{topic_name}"]
