"""framework.streams: a Faust app in a service's lifecycle, on the real Kafka broker."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
import pytest
from pydantic import BaseModel

from framework.bus import MemoryTransport
from framework.errors import ConfigurationError, NotStartedError
from framework.messages import Envelope, message_type, to_binary
from framework.service import Service, ServiceSettings
from framework.streams import CloudEvents, StreamsResource
from framework.types import Transport

MINUTE = 60.0


@message_type("tests.streams.sale")
class Sale(BaseModel):
    sku: str
    units: int


@message_type("tests.streams.refund")
class Refund(BaseModel):
    sku: str


class SalesCounter(Service):
    """Counts units sold per SKU in one-minute windows of the events' own time."""

    name = "streams-sales"

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        topic: str = "sales",
    ) -> None:
        super().__init__(settings, transport=transport)
        self.streams = self.use(StreamsResource(self, start_timeout=30))
        self.per_minute = self.streams.table(
            "units-per-minute", default=int, tumbling=MINUTE, expires=3600
        )
        self.seen: list[tuple[Envelope[Sale], Sale]] = []
        self.streams.agent(topic, Sale)(self.count)

    async def count(self, events: CloudEvents[Sale]) -> None:
        async for envelope, sale in events:
            if sale.sku == "poison":
                raise RuntimeError("a bug in the agent")
            self.seen.append((envelope, sale))
            self.per_minute[sale.sku] += sale.units


def counter_class() -> type[SalesCounter]:
    """A SalesCounter with a name (so a Faust app id and group) no other test uses."""
    name = f"streams-test-{uuid.uuid4().hex[:10]}"
    return type("SalesCounter", (SalesCounter,), {"name": name})


def kafka_settings(bootstrap: str) -> ServiceSettings:
    return ServiceSettings(
        transport="kafka",
        http_host="127.0.0.1",
        http_port=0,
        shutdown_grace=5,
        env={"KAFKA_BOOTSTRAP": bootstrap},
    )


async def eventually(condition: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        await asyncio.sleep(0.05)


async def publish_at(service: Service, topic: str, sale: Sale, at: float) -> None:
    """Publish with our Bus, as any service would, with the event's time set to `at`."""
    envelope = service.bus.envelope(sale, key=sale.sku)
    envelope.time = datetime.fromtimestamp(at, UTC)
    result = await service.bus.publish_envelope(topic, envelope)
    assert not isinstance(result, asyncio.Future)


async def get_json(service: Service, path: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http_port}{path}") as response,
    ):
        return response.status, await response.json()


def a_window_start_ago(minutes: int) -> float:
    return (time.time() // MINUTE) * MINUTE - minutes * MINUTE


def other_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


# -- on the real broker --------------------------------------------------------------------------


@pytest.mark.kafka
async def test_an_agent_gets_typed_cloudevents_and_a_tumbling_table_counts_them(
    kafka_bootstrap: str, topic_name: str
) -> None:
    service = counter_class()(kafka_settings(kafka_bootstrap), topic=topic_name)
    assert not await service.streams.check()
    async with service:
        status, body = await get_json(service, "/ready")
        assert status == 200
        assert body["checks"] == {"bus": True, "consumers": True, "StreamsResource": True}
        assert service.streams.app.conf.id == f"{service.name}-streams"
        assert service.streams.app.conf.web_enabled is False

        first, second = a_window_start_ago(10), a_window_start_ago(9)
        sales = [
            (Sale(sku="apple", units=2), first + 1),
            (Sale(sku="apple", units=3), first + 59),
            (Sale(sku="pear", units=1), first + 30),
            (Sale(sku="apple", units=5), second),
            (Sale(sku="pear", units=4), second + 10),
        ]
        for sale, at in sales:
            await publish_at(service, topic_name, sale, at)
        await eventually(lambda: len(service.seen) == len(sales))

        envelope, sale = service.seen[0]
        assert isinstance(sale, Sale)
        assert envelope.data is sale
        assert envelope.type == "tests.streams.sale"
        assert envelope.source == service.name
        assert sorted((s.sku, s.units) for _, s in service.seen) == sorted(
            (s.sku, s.units) for s, _ in sales
        )
        table = service.per_minute
        assert table.window_value("apple", first) == 5
        assert table.window_value("pear", first + 59) == 1
        assert table.window_value("apple", second + 30) == 5
        assert table.window_value("pear", second) == 4
        assert table.window_value("apple", a_window_start_ago(8)) == 0
        assert service.streams.events_total("count") == len(sales)
        metrics = service.metrics.render().decode()
        assert 'msa_stream_events_total{agent="count",outcome="processed"} 5' in metrics
    assert not service.streams.ready
    with pytest.raises(NotStartedError):
        service.per_minute.window_value("apple", first)


@pytest.mark.kafka
async def test_bad_records_are_skipped_and_counted_and_the_agent_survives(
    kafka_bootstrap: str, topic_name: str
) -> None:
    service = counter_class()(kafka_settings(kafka_bootstrap), topic=topic_name)
    async with service:
        transport = service.bus.transport
        good = Envelope(type="tests.streams.sale", source="tests", data=Sale(sku="fig", units=1))
        _, _, headers = to_binary(good)
        broken: list[tuple[bytes, tuple[tuple[str, bytes], ...]]] = [
            (b'{"sku": "fig", "units": 1}', ()),  # not a CloudEvent: no ce_* headers
            (b"{not json", headers),  # a CloudEvent whose payload is not JSON
            (b'{"sku": "fig"}', headers),  # valid JSON, not a valid Sale
            (b'{"sku": "fig", "units": 1}', (("ce_id", b"x"), ("ce_specversion", b"1.0"))),
        ]
        for value, record_headers in broken:
            await (await transport.send(topic_name, value, key=b"fig", headers=record_headers))
        await service.bus.publish(topic_name, Refund(sku="fig"), key="fig")  # another type
        await service.bus.publish(topic_name, Sale(sku="poison", units=1), key="fig")  # raises
        await service.bus.publish(topic_name, Sale(sku="fig", units=7), key="fig")

        await eventually(lambda: len(service.seen) == 1)
        assert service.seen[0][1] == Sale(sku="fig", units=7)
        streams = service.streams
        await eventually(lambda: streams.events_total("count", "undecodable") == len(broken))
        assert streams.events_total("count", "ignored") == 1
        assert streams.events_total("count", "processed") == 1
        assert streams.events_total("count", "failed") == 1  # Faust restarted the agent
        assert streams.ready
        status, _ = await get_json(service, "/ready")
        assert status == 200


@pytest.mark.kafka
async def test_start_and_stop_twice_recovers_tables_and_leaks_nothing(
    kafka_bootstrap: str, topic_name: str
) -> None:
    cls = counter_class()  # the same name twice: the same Faust app id and consumer group
    window = a_window_start_ago(5)
    tasks_before, threads_before = other_tasks(), set(threading.enumerate())

    first = cls(kafka_settings(kafka_bootstrap), topic=topic_name)
    async with first:
        for units in (1, 2):
            await publish_at(first, topic_name, Sale(sku="kiwi", units=units), window + units)
        await eventually(lambda: len(first.seen) == 2)
        assert first.per_minute.window_value("kiwi", window) == 3

    second = cls(kafka_settings(kafka_bootstrap), topic=topic_name)
    async with second:
        # The table is recovered from its changelog; committed records are not read again.
        assert second.per_minute.window_value("kiwi", window) == 3
        await publish_at(second, topic_name, Sale(sku="kiwi", units=4), window + 10)
        await eventually(lambda: len(second.seen) == 1)
        assert second.per_minute.window_value("kiwi", window) == 7
    assert second.seen[0][1].units == 4

    unwinding = other_tasks() - tasks_before
    if unwinding:  # tasks cancelled at stop may still be finishing: await them, boundedly
        await asyncio.wait(unwinding, timeout=10)
    leaked = other_tasks() - tasks_before
    assert not leaked, leaked
    # Faust's consumer runs on a thread of its own; it must be gone too.
    assert set(threading.enumerate()) <= threads_before
    gc.collect()  # unclosed sockets or sessions would warn here, and warnings are errors


# -- without a broker -----------------------------------------------------------------------------


def memory_service() -> SalesCounter:
    return SalesCounter(ServiceSettings(http_port=-1), transport=MemoryTransport(), topic="t")


async def test_tables_exist_only_while_started() -> None:
    service = memory_service()
    with pytest.raises(NotStartedError):
        service.per_minute["apple"]
    with pytest.raises(NotStartedError):
        _ = service.streams.app
    assert not service.streams.ready


async def test_declarations_are_checked() -> None:
    service = memory_service()
    streams = service.streams
    with pytest.raises(ConfigurationError, match="declared twice"):
        streams.table("units-per-minute")
    with pytest.raises(ConfigurationError, match="tumbling"):
        streams.table("other", expires=60)
    with pytest.raises(ConfigurationError, match="named 'count'"):
        streams.agent("t", Sale)(service.count)
    plain = streams.table("plain", default=int)
    with pytest.raises(ConfigurationError, match="not windowed"):
        plain.window_value("x", 0.0)


async def test_a_resource_without_agents_refuses_to_start() -> None:
    service = Service(ServiceSettings(http_port=-1), transport=MemoryTransport())
    streams = StreamsResource(service, app_id="nothing")
    with pytest.raises(ConfigurationError, match="no agents"):
        await streams.start()


async def test_agent_functions_keep_their_type() -> None:
    service = memory_service()

    async def sales(events: CloudEvents[Sale]) -> None:
        async for _envelope, _sale in events:
            pass

    decorated: Callable[[CloudEvents[Sale]], Awaitable[None]] = service.streams.agent(
        "t", Sale, name="sales"
    )(sales)
    assert decorated is sales
