"""Fault injection (`framework.faults`): switches on a compacted topic, seen by every process,
and applied to a service's handlers: latency, pause, crash_next.

The tests marked `[memory]`/`[kafka]` run on both transports; on Kafka every bus is a client of
its own, like a process of its own. A crash calls the injector's `exit` (a recorder here) and a
latency its `sleep` (a recorder too): nothing depends on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.errors import ConfigurationError, PayloadValidationError
from framework.faults import (
    CRASH_EXIT_CODE,
    CrashClaim,
    FaultInjector,
    FaultSwitches,
    Switches,
)
from framework.messages import Envelope, message_type, to_binary
from framework.service import Service, ServiceSettings, handles
from framework.types import RebalanceListener, Record, StartFrom, Transport, TransportConsumer
from tests.conftest import unique_name

TransportFactory = Callable[[], Transport]


@message_type("test.faults.ping")
class Ping(BaseModel):
    n: int


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@dataclass
class Received:
    """A handler that records what it handled, in order (with whatever `journal` is shared)."""

    journal: list[tuple[str, object]] = field(default_factory=list)

    async def handle(self, message: Message[Any]) -> None:
        self.journal.append(("handled", message.data.n))

    @property
    def handled(self) -> list[int]:
        return [n for what, n in self.journal if what == "handled" and isinstance(n, int)]


class CountingTransport:
    """A transport that counts the fetches of its consumer-group members, so a test can wait
    for fetch rounds instead of for time."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name
        self.fetches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        listener: RebalanceListener,
        start_from: StartFrom = "earliest",
        max_poll_records: int = 500,
    ) -> TransportConsumer:
        consumer = self.inner.consumer(
            topics,
            group=group,
            listener=listener,
            start_from=start_from,
            max_poll_records=max_poll_records,
        )
        return consumer if group is None else cast(TransportConsumer, _Counted(consumer, self))


class _Counted:
    def __init__(self, inner: TransportConsumer, counter: CountingTransport) -> None:
        self.inner = inner
        self.counter = counter

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def fetch(self, *, timeout: float, max_records: int) -> Sequence[Record]:
        records = await self.inner.fetch(timeout=timeout, max_records=max_records)
        self.counter.fetches += 1
        return records


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


@pytest.fixture
def faults_topic(topic_name: str) -> str:
    return f"{topic_name}-faults"


async def started_switches(
    stack: AsyncExitStack, transport: Transport, topic: str, source: str = "admin"
) -> FaultSwitches:
    """A bus and its switches reader of their own (a process of its own, on Kafka)."""
    bus = Bus(transport, source=source)
    await bus.start()
    stack.push_async_callback(bus.stop, 1)
    switches = FaultSwitches(bus, topic=topic)
    await switches.start()
    stack.push_async_callback(switches.stop)
    return switches


@dataclass
class Worker:
    """A process-like service instance: a bus with one subscription, behind an injector."""

    bus: Bus
    injector: FaultInjector
    received: Received
    exits: list[int]


async def start_worker(
    stack: AsyncExitStack,
    transport: Transport,
    *,
    topic: str,
    faults_topic: str,
    group: str,
    journal: list[tuple[str, object]] | None = None,
) -> Worker:
    journal = journal if journal is not None else []
    bus = Bus(transport, source="worker")
    received = Received(journal)
    exits: list[int] = []

    async def sleep(seconds: float) -> None:
        journal.append(("slept", seconds))

    injector = FaultInjector(
        bus,
        "worker",
        switches=FaultSwitches(bus, topic=faults_topic),
        exit=exits.append,
        sleep=sleep,
    )
    bus.add_consume_middleware(injector.apply)
    bus.subscribe(
        [topic],
        {"*": HandlerSpec(Ping, received.handle)},
        ConsumerOptions(group=group, commit_interval=0.05, fetch_timeout=0.1),
    )
    await bus.start()
    stack.push_async_callback(bus.stop, 1)
    await injector.switches.start()
    stack.push_async_callback(injector.switches.stop)
    await injector.start()
    stack.push_async_callback(injector.stop)
    return Worker(bus, injector, received, exits)


async def ping(switches: FaultSwitches, topic: str, *numbers: int) -> None:
    for n in numbers:
        await switches.bus.publish(topic, Ping(n=n), key=f"k-{n}")


# -- the switches: stored once, seen everywhere --------------------------------------------------


async def test_switches_set_in_one_process_are_seen_by_another(
    make_transport: TransportFactory, stack: AsyncExitStack, faults_topic: str
) -> None:
    writer = await started_switches(stack, make_transport(), faults_topic)
    following = await started_switches(stack, make_transport(), faults_topic, "following")
    assert writer.get("payments") == Switches()

    written = await writer.set("payments", latency_ms=250, rates={"decline_rate": 0.5})
    assert written.latency_ms == 250
    assert written.rate("decline_rate") == 0.5
    assert written.rate("other") == 0.0
    assert not written.paused
    assert not written.crash_armed

    # A reader that was running sees the change; one started later reads it from the topic.
    await eventually(lambda: following.get("payments") == written, what="the live reader")
    later = await started_switches(stack, make_transport(), faults_topic, "later")
    assert later.get("payments") == written  # start() returns once it has read to the end
    assert later.get("shipping") == Switches()

    # Changes merge into what is there.
    paused = await writer.set("payments", paused=True)
    assert paused == written.model_copy(update={"paused": True})
    await eventually(lambda: later.get("payments").paused, what="pause seen")
    assert later.all() == {"payments": paused}
    assert await writer.clear("payments") == Switches()
    await eventually(lambda: later.get("payments") == Switches(), what="cleared")


@pytest.mark.kafka
async def test_the_switches_topic_is_compacted_on_kafka(
    kafka_bootstrap: str, stack: AsyncExitStack, faults_topic: str
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from framework.bus.kafka import KafkaSettings, KafkaTransport

    transport = KafkaTransport(KafkaSettings(bootstrap_servers=kafka_bootstrap, linger_ms=1))
    switches = await started_switches(stack, transport, faults_topic)
    await switches.set("orders", latency_ms=10)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, faults_topic)]
        )
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    assert configs["cleanup.policy"] == "compact"
    assert await transport.partitions_for(faults_topic) == 1


async def test_bad_values_are_refused_before_anything_is_written(
    stack: AsyncExitStack, faults_topic: str
) -> None:
    transport = MemoryTransport()
    switches = await started_switches(stack, transport, faults_topic)
    with pytest.raises(PayloadValidationError, match="latency_ms"):
        await switches.set("orders", latency_ms=10_001)
    with pytest.raises(PayloadValidationError, match="latency_ms"):
        await switches.set("orders", latency_ms=-1)
    with pytest.raises(PayloadValidationError, match="rates"):
        await switches.set("orders", rates={"decline_rate": 1.5})
    with pytest.raises(PayloadValidationError, match="rates"):
        await switches.set("orders", rates={"Not A Name": 0.5})
    with pytest.raises(ConfigurationError):
        await switches.set("", latency_ms=1)
    assert transport.records(faults_topic) == []


async def test_records_that_are_not_switches_are_skipped(
    stack: AsyncExitStack, faults_topic: str
) -> None:
    transport = MemoryTransport()
    writer = await started_switches(stack, transport, faults_topic)
    await writer.set("orders", latency_ms=5)
    hostile = Envelope(type="msa.faults.switches", source="x", data={"latency_ms": 99_999})
    _, value, headers = to_binary(hostile)
    await transport.send(faults_topic, value, key=b"orders", headers=headers)
    other = Envelope(type="something.else", source="x", data={"latency_ms": 1})
    _, value, headers = to_binary(other)
    await transport.send(faults_topic, value, key=b"orders", headers=headers)
    await transport.send(faults_topic, b"not a cloud event", key=b"orders")
    await transport.send(faults_topic, b"{}", key=None, headers=headers)  # no service
    reader = await started_switches(stack, transport, faults_topic, "reader")
    assert reader.all() == {"orders": Switches(latency_ms=5)}

    # A tombstone resets the service's switches.
    await transport.send(faults_topic, b"", key=b"orders")
    await eventually(lambda: reader.get("orders") == Switches(), what="the tombstone")


# -- crash_next: claimed in the log's order, so a restart does not crash again --------------------


async def test_a_crash_claim_wins_only_where_the_switch_is_still_armed(
    stack: AsyncExitStack, faults_topic: str
) -> None:
    transport = MemoryTransport()
    admin = await started_switches(stack, transport, faults_topic)
    armed = await admin.set("orders", crash_next=True, latency_ms=7)
    assert armed.crash_armed
    arm = armed.crash_next
    assert arm is not None
    assert (await admin.set("orders", crash_next=True)).crash_next == arm  # stays armed as it was

    first = await started_switches(stack, transport, faults_topic, "replica-1")
    second = await started_switches(stack, transport, faults_topic, "replica-2")
    # Both replicas saw the switch armed; their claims race, and the log orders them.
    won = await asyncio.gather(first.claim_crash("orders", arm), second.claim_crash("orders", arm))
    assert sorted(won) == [False, True]
    await eventually(lambda: not admin.get("orders").crash_armed, what="the switch cleared")
    assert admin.get("orders") == Switches(latency_ms=7)
    assert not await first.claim_crash("orders", arm)  # nothing armed any more

    # Re-armed while a stale claim is on its way: the claim loses and the new arm stays.
    stale = CrashClaim(arm=arm, instance="late", switches=Switches())
    rearmed = await admin.set("orders", crash_next=True)
    assert rearmed.crash_next not in (None, arm)
    await admin.bus.publish(faults_topic, stale, key="orders")
    restarted = await started_switches(stack, transport, faults_topic, "restarted")
    assert restarted.get("orders") == rearmed
    await eventually(lambda: admin.get("orders") == rearmed, what="the admin's reader")


async def test_crash_next_exits_once_and_not_again_after_the_restart(
    stack: AsyncExitStack, topic_name: str, faults_topic: str
) -> None:
    transport = MemoryTransport()
    admin = await started_switches(stack, transport, faults_topic)
    group = unique_name("workers")
    async with AsyncExitStack() as first_life:
        worker = await start_worker(
            first_life, transport, topic=topic_name, faults_topic=faults_topic, group=group
        )
        await admin.set("worker", crash_next=True)
        await eventually(lambda: worker.injector.current.crash_armed, what="armed")
        await ping(admin, topic_name, 1, 2, 3)
        # The recorder's exit returns, so the handlers go on: three handled, one exit.
        await eventually(lambda: len(worker.received.handled) == 3, what="three handled")
        assert worker.exits == [CRASH_EXIT_CODE]
        assert not worker.injector.current.crash_armed
        await eventually(lambda: not admin.get("worker").crash_armed, what="cleared for all")

    # The restarted process reads the topic from its beginning: arm, then the won claim.
    restarted = await start_worker(
        stack, transport, topic=topic_name, faults_topic=faults_topic, group=group
    )
    assert not restarted.injector.current.crash_armed
    await ping(admin, topic_name, 4)
    await eventually(lambda: 4 in restarted.received.handled, what="handled after the restart")
    assert restarted.exits == []
    assert worker.exits == [CRASH_EXIT_CODE]


async def test_of_two_replicas_exactly_one_crashes(
    make_transport: TransportFactory, stack: AsyncExitStack, topic_name: str, faults_topic: str
) -> None:
    admin = await started_switches(stack, make_transport(), faults_topic)
    group = unique_name("replicas")
    replicas = [
        await start_worker(
            stack, make_transport(), topic=topic_name, faults_topic=faults_topic, group=group
        )
        for _ in range(2)
    ]
    await admin.set("worker", crash_next=True)
    await eventually(
        lambda: all(r.injector.current.crash_armed for r in replicas), what="armed everywhere"
    )
    numbers = list(range(1, 31))  # keys on every partition, so both replicas handle some
    await ping(admin, topic_name, *numbers)
    await eventually(
        lambda: sorted(n for r in replicas for n in r.received.handled) == numbers,
        what="every ping handled",
    )
    assert [code for r in replicas for code in r.exits] == [CRASH_EXIT_CODE]


# -- latency and pause ----------------------------------------------------------------------------


async def test_latency_is_waited_before_each_handler(
    stack: AsyncExitStack, topic_name: str, faults_topic: str
) -> None:
    transport = MemoryTransport()
    admin = await started_switches(stack, transport, faults_topic)
    journal: list[tuple[str, object]] = []
    worker = await start_worker(
        stack,
        transport,
        topic=topic_name,
        faults_topic=faults_topic,
        group=unique_name("g"),
        journal=journal,
    )
    await admin.set("worker", latency_ms=250)
    await eventually(lambda: worker.injector.current.latency_ms == 250, what="latency read")
    await ping(admin, topic_name, 1)
    await eventually(lambda: worker.received.handled == [1], what="handled")
    assert journal == [("slept", 0.25), ("handled", 1)]

    await admin.set("worker", latency_ms=0)
    await eventually(lambda: worker.injector.current.latency_ms == 0, what="latency cleared")
    await ping(admin, topic_name, 2)
    await eventually(lambda: worker.received.handled == [1, 2], what="handled")
    assert journal == [("slept", 0.25), ("handled", 1), ("handled", 2)]
    assert worker.exits == []


async def test_a_paused_service_stops_fetching_and_resumes(
    make_transport: TransportFactory, stack: AsyncExitStack, topic_name: str, faults_topic: str
) -> None:
    admin = await started_switches(stack, make_transport(), faults_topic)
    counting = CountingTransport(make_transport())
    worker = await start_worker(
        stack,
        cast(Transport, counting),
        topic=topic_name,
        faults_topic=faults_topic,
        group=unique_name("g"),
    )
    [subscription] = worker.bus.subscriptions
    await ping(admin, topic_name, 1)
    await eventually(lambda: worker.received.handled == [1], what="handled before the pause")

    await admin.set("worker", paused=True)
    await eventually(lambda: subscription.paused, what="the subscription paused")
    await ping(admin, topic_name, 2, 3, 4)
    fetched = counting.fetches
    await eventually(lambda: counting.fetches >= fetched + 3, what="three fetch rounds")
    assert worker.received.handled == [1], "fetched while paused"

    await admin.set("worker", paused=False)
    await eventually(lambda: sorted(worker.received.handled) == [1, 2, 3, 4], what="drained")
    assert not subscription.paused


# -- the service hooks ---------------------------------------------------------------------------


class Pinged(Service):
    name = "pinged"

    def __init__(self, settings: ServiceSettings, transport: Transport) -> None:
        super().__init__(settings, transport=transport)
        self.journal: list[tuple[str, object]] = []

    @handles("pings")
    async def on_ping(self, ping: Ping) -> None:
        self.journal.append(("handled", ping.n))


def test_services_obey_the_switches_only_when_their_settings_say_so() -> None:
    assert ServiceSettings.from_env({}).faults is False
    assert ServiceSettings.from_env({"MSA_FAULTS": "1"}).faults is True
    assert ServiceSettings.from_env({"MSA_FAULTS": "0"}).faults is False
    with pytest.raises(ConfigurationError, match="MSA_FAULTS must be 1 or 0, not 'maybe'"):
        ServiceSettings.from_env({"MSA_FAULTS": "maybe"})
    off = Pinged(ServiceSettings(http_port=-1), MemoryTransport())
    assert off.faults is None


async def test_a_service_with_faults_on_applies_its_switches(stack: AsyncExitStack) -> None:
    transport = MemoryTransport()
    service = Pinged(ServiceSettings(http_port=-1, faults=True), transport)
    injector = service.faults
    assert injector is not None
    assert injector.service == "pinged"

    async def sleep(seconds: float) -> None:
        service.journal.append(("slept", seconds))

    injector.sleep = sleep
    await service.start()
    stack.push_async_callback(service.stop, 1)
    admin = await started_switches(stack, transport, "msa.faults")
    await admin.set("pinged", latency_ms=40, paused=True)
    await eventually(lambda: injector.current.latency_ms == 40, what="switches read")
    assert all(s.paused for s in service.bus.subscriptions)
    await admin.set("pinged", paused=False)
    await admin.bus.publish("pings", Ping(n=1))
    await eventually(lambda: ("handled", 1) in service.journal, what="handled")
    assert service.journal == [("slept", 0.04), ("handled", 1)]
    await admin.clear("pinged")
