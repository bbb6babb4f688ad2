"""`Bus.publish` writes records without building an `Envelope` when no publish middleware would
see one: the bytes must be exactly what the envelope path (`to_binary(bus.envelope(...))`)
writes, in every context a publish can happen in (inside a handled message, a trace, a
correlation), and the time must be written as `format_time` writes it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

import framework.messages
from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Outgoing
from framework.messages import format_time, from_binary, time_now
from framework.observability.tracing import TraceContext, use_correlation_id, use_trace
from framework.types import Record

TOPIC = "publish.path"
# What differs between two publishes of the same thing: a new id, the time, a new span.
PER_EVENT = {"ce_id", "ce_time", "ce_traceparent"}


class PriceChanged(BaseModel):
    sku: str
    cents: int


async def passthrough(outgoing: Outgoing, call_next: Any) -> Any:
    return await call_next(outgoing)


async def both_paths(**publish: Any) -> tuple[Record, Record]:
    """The record the fast path wrote and the one the envelope path (a middleware on the bus,
    so an `Envelope` is built and `to_binary` writes it) wrote, for the same publish."""
    fast_transport, enveloped_transport = MemoryTransport(), MemoryTransport()
    fast = Bus(fast_transport, source="pricing")
    enveloped = Bus(enveloped_transport, source="pricing", publish_middleware=[passthrough])
    await fast.start()
    await enveloped.start()
    try:
        await fast.publish(TOPIC, PriceChanged(sku="tea-1", cents=450), **publish)
        await enveloped.publish(TOPIC, PriceChanged(sku="tea-1", cents=450), **publish)
    finally:
        await fast.stop()
        await enveloped.stop()
    (fast_record,) = fast_transport.records(TOPIC)
    (enveloped_record,) = enveloped_transport.records(TOPIC)
    return fast_record, enveloped_record


def same_but_per_event(fast: Record, enveloped: Record) -> None:
    assert [name for name, _ in fast.headers] == [name for name, _ in enveloped.headers]
    assert [h for h in fast.headers if h[0] not in PER_EVENT] == [
        h for h in enveloped.headers if h[0] not in PER_EVENT
    ]
    assert (fast.key, fast.value) == (enveloped.key, enveloped.value)


@pytest.mark.parametrize(
    "publish",
    [
        pytest.param({}, id="no key"),
        pytest.param({"key": "tea-1"}, id="key"),
        pytest.param({"key": "tea-1", "subject": "tea-1", "type": "pricing.changed"}, id="all"),
        pytest.param({"extensions": {"tenant": "north", "replyto": "r"}}, id="extensions"),
    ],
)
async def test_the_fast_path_writes_what_the_envelope_path_writes(
    publish: dict[str, Any],
) -> None:
    fast, enveloped = await both_paths(**publish)
    same_but_per_event(fast, enveloped)
    event = from_binary(fast)
    assert event.type == publish.get("type", "PriceChanged")
    assert event.partitionkey == publish.get("key")
    assert event.subject == publish.get("subject")
    assert event.extensions == publish.get("extensions", {})
    assert event.correlationid is None
    assert event.causationid is None
    assert TraceContext.parse(event.traceparent) is not None  # a new root trace


async def test_the_fast_path_continues_the_trace_and_the_correlation() -> None:
    trace = TraceContext.new_root()
    with use_trace(trace), use_correlation_id("checkout-7"):
        fast, enveloped = await both_paths(key="tea-1")
    same_but_per_event(fast, enveloped)
    for record in (fast, enveloped):
        event = from_binary(record)
        assert event.correlationid == "checkout-7"
        published = TraceContext.parse(event.traceparent)
        assert published is not None
        assert published.trace_id == trace.trace_id
        assert published.span_id != trace.span_id  # a child span


async def test_the_fast_path_inside_a_handler_is_caused_by_the_message() -> None:
    transport = MemoryTransport()
    bus = Bus(transport, source="pricing")
    published = asyncio.Event()

    async def on_price(message: Any) -> None:
        await bus.publish("publish.followup", PriceChanged(sku="tea-2", cents=1), key="tea-2")
        published.set()

    bus.subscribe(
        [TOPIC], {"PriceChanged": HandlerSpec(PriceChanged, on_price)}, ConsumerOptions(group="g")
    )
    await bus.start()
    try:
        with use_correlation_id("order-9"):
            await bus.publish(TOPIC, PriceChanged(sku="tea-1", cents=450), key="tea-1")
        (cause,) = [from_binary(r) for r in transport.records(TOPIC)]
        async with asyncio.timeout(10):
            await published.wait()
    finally:
        await bus.stop()
    (followup,) = [from_binary(r) for r in transport.records("publish.followup")]
    assert followup.causationid == cause.id
    assert followup.correlationid == "order-9"
    assert TraceContext.parse(followup.traceparent).trace_id == (  # type: ignore[union-attr]
        TraceContext.parse(cause.traceparent).trace_id  # type: ignore[union-attr]
    )


@pytest.mark.parametrize(
    ("epoch", "written"),
    [
        (0.0, b"1970-01-01T00:00:00.000000Z"),
        (1764672000.123456, b"2025-12-02T10:40:00.123456Z"),
        (1764672000.999999, b"2025-12-02T10:40:00.999999Z"),
        (1764672001.5, b"2025-12-02T10:40:01.500000Z"),
    ],
)
def test_time_now_is_format_time_of_the_clock(
    monkeypatch: pytest.MonkeyPatch, epoch: float, written: bytes
) -> None:
    monkeypatch.setattr(framework.messages, "epoch_seconds", lambda: epoch)
    assert time_now() == written
    as_datetime = datetime.fromtimestamp(epoch, UTC)
    # the same text as the envelope path, to the microsecond float arithmetic allows
    assert abs(datetime.fromisoformat(time_now().decode()) - as_datetime).total_seconds() < 2e-6
    assert format_time(as_datetime)[:19] == written[:19]


def test_time_now_formats_each_second_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1764672000.25, 1764672000.75, 1764675600.0, 1764672000.5])
    monkeypatch.setattr(framework.messages, "epoch_seconds", lambda: next(clock))
    assert [time_now() for _ in range(4)] == [
        b"2025-12-02T10:40:00.250000Z",
        b"2025-12-02T10:40:00.750000Z",
        b"2025-12-02T11:40:00.000000Z",
        b"2025-12-02T10:40:00.500000Z",  # a clock stepped back is written as it reads
    ]


@pytest.mark.parametrize("flags", [f"{n:02x}" for n in range(256)])
def test_the_sampled_flag_is_read_from_any_flags_byte(flags: str) -> None:
    header = f"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"
    parsed = TraceContext.parse(header)
    assert parsed is not None
    assert parsed.sampled is bool(int(flags, 16) & 1)
