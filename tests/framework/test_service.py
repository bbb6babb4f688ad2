"""Services: `@handles` discovery, what a handler's publications carry, replies, the lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pydantic import BaseModel

from framework.bus import MemoryTransport, Message
from framework.errors import ConfigurationError, RemoteError
from framework.messages import Envelope, message_type, to_binary, type_name
from framework.observability.metrics import Counter, MetricsRegistry
from framework.observability.tracing import TraceContext
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness
from tests.framework.sample_services import (
    UNIT_PRICE,
    OrderAccepted,
    OrderLine,
    OrderPlaced,
    Price,
    PriceRequested,
    Shop,
)

NO_HTTP = ServiceSettings(http_port=-1)
MakeHarness = Callable[..., ServiceHarness]


@message_type("test.parcel")
class Parcel(BaseModel):
    parcel_id: str


def order(order_id: str = "o-1") -> OrderPlaced:
    return OrderPlaced(order_id=order_id, total=12.5, lines=[OrderLine(sku="mug", quantity=2)])


# -- @handles -------------------------------------------------------------------------------------


def test_handles_takes_the_payload_type_from_the_annotation() -> None:
    handlers = {info.attribute: info for info in Shop.__msa_handlers__}

    assert set(handlers) == {"on_order_placed", "on_price_requested"}
    placed = handlers["on_order_placed"]
    assert placed.payload_type is OrderPlaced
    assert placed.topics == ("sample.orders",)
    assert placed.wants_message is True
    priced = handlers["on_price_requested"]
    assert priced.payload_type is PriceRequested
    assert priced.wants_message is False


async def test_handles_groups_handlers_into_subscriptions_with_their_options() -> None:
    class Depot(Service):
        name = "depot"

        @handles("parcels", type="depot.parcel.arrived", concurrency=3)
        async def on_arrived(self, parcel: Parcel) -> None: ...

        @handles("parcels", type="depot.parcel.left", concurrency=3)
        async def on_left(self, parcel: Parcel, message: Message[Parcel]) -> None: ...

        @handles("audit", group="depot-audit")
        async def on_audit(self, parcel: Parcel) -> None: ...

    depot = Depot(NO_HTTP, transport=MemoryTransport())
    await depot.start()
    try:
        by_topics = {s.topics: s for s in depot.bus.subscriptions}
        assert set(by_topics) == {("parcels",), ("audit",)}
        parcels = by_topics[("parcels",)]
        assert set(parcels.handlers) == {"depot.parcel.arrived", "depot.parcel.left"}
        assert parcels.group == "depot"  # the service's name by default
        assert parcels.options.concurrency == 3
        assert by_topics[("audit",)].group == "depot-audit"
        assert by_topics[("audit",)].handlers.keys() == {"test.parcel"}  # type_name(Parcel)
    finally:
        await depot.stop()


def test_a_handler_without_payload_annotation_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="annotate the payload parameter 'parcel'"):

        class Unannotated(Service):
            @handles("parcels")
            async def on_parcel(self, parcel) -> None:  # type: ignore[no-untyped-def]
                ...


def test_a_handler_that_is_not_async_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be `async def`"):

        class Blocking(Service):
            @handles("parcels")
            def on_parcel(self, parcel: Parcel) -> None: ...


def test_a_handler_with_too_many_parameters_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"takes \(self, payload\[, message\]\)"):

        class Greedy(Service):
            @handles("parcels")
            async def on_parcel(self, parcel: Parcel, message: Message[Parcel], x: int) -> None: ...


def test_an_unknown_consumer_option_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="concurency"):
        handles("parcels", concurency=3)


async def test_two_handlers_for_one_type_on_the_same_topics_are_refused() -> None:
    class Twice(Service):
        @handles("parcels")
        async def first(self, parcel: Parcel) -> None: ...

        @handles("parcels")
        async def second(self, parcel: Parcel) -> None: ...

    twice = Twice(NO_HTTP, transport=MemoryTransport())
    with pytest.raises(ConfigurationError, match=r"two handlers for 'test\.parcel'"):
        await twice.start()
    assert not twice.ready


# -- what handlers see and publish ----------------------------------------------------------------


async def test_a_handler_receives_the_payload_and_the_message(msa_harness: MakeHarness) -> None:
    async with msa_harness(Shop) as harness:
        await harness.publish("sample.orders", order("o-7"), key="o-7")
        [handled] = await harness.handled(OrderPlaced)

        assert handled.error is None
        [(payload, message)] = harness.service.orders  # type: ignore[attr-defined]
        assert payload == order("o-7")
        assert message.topic == "sample.orders"
        assert message.key == "o-7"
        assert message.attempt == 1
        assert message.group == "sample-shop"
        assert message.envelope.id == handled.message.envelope.id


async def test_a_published_event_continues_correlation_causation_and_trace(
    msa_harness: MakeHarness,
) -> None:
    incoming = TraceContext.new_root()
    async with msa_harness(Shop) as harness:
        await harness.publish(
            "sample.orders",
            order(),
            key="o-1",
            extensions={"correlationid": "checkout-42", "traceparent": incoming.to_header()},
        )
        [accepted] = await harness.wait_published(OrderAccepted)
        [handled] = harness.handled_log

    assert accepted.data == OrderAccepted(order_id="o-1", line_count=1)
    assert accepted.source == "sample-shop"
    assert accepted.correlationid == "checkout-42"
    assert accepted.causationid == handled.message.envelope.id
    published_trace = TraceContext.parse(accepted.traceparent)
    assert published_trace is not None
    assert published_trace.trace_id == incoming.trace_id
    assert published_trace.span_id != incoming.span_id
    assert harness.service.handler_trace_ids == [incoming.trace_id]  # type: ignore[attr-defined]


async def test_without_a_correlation_id_the_incoming_id_becomes_it(
    msa_harness: MakeHarness,
) -> None:
    async with msa_harness(Shop) as harness:
        # Raw, as a producer that sets neither a correlation id nor a trace would send it
        # (`harness.publish` sets both, as a service's own publish does).
        _, value, headers = to_binary(
            Envelope(type=type_name(OrderPlaced), source="elsewhere", data=order())
        )
        await harness.send_raw("sample.orders", value, key=b"o-1", headers=headers)
        [accepted] = await harness.wait_published(OrderAccepted)
        [handled] = harness.handled_log

    incoming_id = handled.message.envelope.id
    assert handled.message.envelope.correlationid is None
    assert accepted.correlationid == incoming_id
    assert accepted.causationid == incoming_id
    published_trace = TraceContext.parse(accepted.traceparent)
    assert published_trace is not None
    assert [published_trace.trace_id] == harness.service.handler_trace_ids  # type: ignore[attr-defined]


async def test_the_return_value_of_a_handler_is_the_reply(msa_harness: MakeHarness) -> None:
    async with msa_harness(Shop) as harness:
        price = await harness.request(
            "sample.prices", PriceRequested(sku="mug", quantity=4), reply_type=Price
        )
        assert price == Price(sku="mug", amount=4 * UNIT_PRICE)

        with pytest.raises(RemoteError, match="cannot price -1 items") as failed:
            await harness.request("sample.prices", PriceRequested(sku="mug", quantity=-1))
        assert failed.value.error_type == "ValueError"


async def test_the_bus_counts_into_the_registry_given_to_the_service() -> None:
    registry = MetricsRegistry()  # empty, hence falsy: it must still be the one used
    async with ServiceHarness(Shop(NO_HTTP, transport=MemoryTransport(), metrics=registry)) as h:
        assert h.service.metrics is registry
        await h.publish("sample.orders", order(), key="o-1")
        await h.handled(OrderPlaced)

    messages_in = registry.get("msa_messages_in_total")
    assert isinstance(messages_in, Counter)
    ok = messages_in.labels(topic="sample.orders", type="sample.order.placed", outcome="ok")
    assert ok.value == 1


# -- lifecycle ------------------------------------------------------------------------------------


class RecordingTransport(MemoryTransport):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    async def start(self) -> None:
        await super().start()
        self.events.append("bus started")

    async def stop(self) -> None:
        self.events.append("bus stopping")
        await super().stop()


class RecordingResource:
    def __init__(self, name: str, events: list[str], *, fail_start: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail_start = fail_start

    async def start(self) -> None:
        if self.fail_start:
            self.events.append(f"{self.name} failed to start")
            raise OSError(f"{self.name} is unreachable")
        self.events.append(f"{self.name} started")

    async def stop(self) -> None:
        self.events.append(f"{self.name} stopped")


class Warehouse(Service):
    def __init__(self, events: list[str], *resources: RecordingResource) -> None:
        super().__init__(NO_HTTP, transport=RecordingTransport(events))
        self.events = events
        for resource in resources:
            self.use(resource)

    async def on_start(self) -> None:
        self.events.append(f"on_start (ready={self.ready})")

    async def on_stop(self) -> None:
        self.events.append(f"on_stop (bus started={self.bus.started})")

    @handles("parcels")
    async def on_parcel(self, parcel: Parcel) -> None: ...


async def test_resources_start_before_the_bus_and_stop_after_it_in_reverse() -> None:
    events: list[str] = []
    db, cache = RecordingResource("db", events), RecordingResource("cache", events)
    warehouse = Warehouse(events, db, cache)

    await warehouse.start()
    ready_once_started = warehouse.ready
    assert events == ["db started", "cache started", "bus started", "on_start (ready=False)"]

    events.clear()
    await warehouse.stop()
    assert (ready_once_started, warehouse.ready) == (True, False)
    assert events == [
        "bus stopping",
        "on_stop (bus started=False)",
        "cache stopped",
        "db stopped",
    ]


async def test_stop_twice_is_safe() -> None:
    events: list[str] = []
    warehouse = Warehouse(events, RecordingResource("db", events))
    await warehouse.start()
    events.clear()

    await asyncio.gather(warehouse.stop(), warehouse.stop())
    await warehouse.stop()

    assert events == ["bus stopping", "on_stop (bus started=False)", "db stopped"]


async def test_a_second_stop_returns_only_once_the_service_stopped() -> None:
    events: list[str] = []
    closing, release = asyncio.Event(), asyncio.Event()

    class SlowToClose(RecordingResource):
        async def stop(self) -> None:
            closing.set()
            await release.wait()
            await super().stop()

    warehouse = Warehouse(events, SlowToClose("db", events))
    await warehouse.start()
    first = asyncio.create_task(warehouse.stop())
    second = asyncio.create_task(warehouse.stop())
    await closing.wait()  # the first stop() is stuck in the resource; the second ran meanwhile
    assert not second.done(), "the second stop() returned while the first was still stopping"

    release.set()
    await asyncio.gather(first, second)
    assert events[-1] == "db stopped"


async def test_a_failed_start_stops_what_had_started_in_reverse() -> None:
    events: list[str] = []
    warehouse = Warehouse(
        events,
        RecordingResource("db", events),
        RecordingResource("cache", events),
        RecordingResource("search", events, fail_start=True),
        RecordingResource("mail", events),
    )

    with pytest.raises(OSError, match="search is unreachable"):
        await warehouse.start()

    assert not warehouse.ready
    assert events == [
        "db started",
        "cache started",
        "search failed to start",
        "cache stopped",
        "db stopped",
    ]


async def test_stop_lets_running_handlers_finish_and_starts_no_new_ones() -> None:
    started: list[int] = []
    finished: list[int] = []
    first_started = asyncio.Event()

    class OneAtATime(Service):
        @handles("jobs", concurrency=1)
        async def on_job(self, parcel: Parcel) -> None:
            started.append(int(parcel.parcel_id))
            first_started.set()
            await asyncio.sleep(0.1)
            finished.append(int(parcel.parcel_id))

    async with ServiceHarness(OneAtATime(NO_HTTP, transport=MemoryTransport())) as harness:
        for n in range(4):  # four keys: four lanes waiting for the one slot
            await harness.publish("jobs", Parcel(parcel_id=str(n)), key=str(n))
        await asyncio.wait_for(first_started.wait(), 5)
        await harness.service.stop(grace=5)

    assert finished == started  # the handler that was running finished
    assert len(started) == 1, f"handlers started after stop(): {started[1:]}"


@message_type("test.kill.job")
class KillJob(BaseModel):
    n: int


KILL_SEEN: list[tuple[str, int]] = []


class KillWorker(Service):
    """Holds forever on its first instance, so that instance can be killed mid-handler."""

    name = "kill-worker"
    holding = asyncio.Event()

    @handles("kill-jobs")
    async def on_job(self, job: KillJob) -> None:
        KILL_SEEN.append((self.settings.instance_id or "", job.n))
        if self.settings.instance_id == "first":
            self.holding.set()
            await asyncio.sleep(3600)


async def test_kill_commits_nothing_so_a_new_instance_gets_the_work_again() -> None:
    """kill() is a crash: the in-flight record is not committed, the next instance redoes it."""
    transport = MemoryTransport()
    first = KillWorker(ServiceSettings(http_port=-1, instance_id="first"), transport=transport)
    await first.start()
    await first.publish("kill-jobs", KillJob(n=1), key="a")
    await asyncio.wait_for(KillWorker.holding.wait(), 5)
    [job] = transport.records("kill-jobs")
    # The commit loop runs while the job is in flight: it commits up to the job, not past it.
    async with asyncio.timeout(5):
        while True:
            committed = transport.committed("kill-worker", job.topic_partition)
            if committed is not None:
                break
            await asyncio.sleep(0.01)
    assert committed == job.offset
    await first.kill()
    assert first.bus.started is False

    second = KillWorker(ServiceSettings(http_port=-1, instance_id="second"), transport=transport)
    async with ServiceHarness(second) as harness:
        await harness.handled(KillJob)
    assert KILL_SEEN == [("first", 1), ("second", 1)]
