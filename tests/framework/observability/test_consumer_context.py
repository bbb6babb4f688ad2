"""The consumer's own log lines carry the message's context, and its attempts share one trace.

A retry, a dead letter or an unhandled type is logged by the framework outside the handler; those
lines must carry the same service, correlation id and trace id as the handler's lines, or the
one line that explains a failure cannot be found by the id of the request that caused it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from framework.bus import MemoryTransport, RetryPolicy
from framework.messages import Envelope, message_type, to_binary, type_name
from framework.observability.logging import JsonFormatter
from framework.observability.tracing import TraceContext, get_trace
from framework.service import Service, ServiceSettings, handles
from framework.testing import ServiceHarness

NO_HTTP = ServiceSettings(http_port=-1)
QUICK = RetryPolicy(max_attempts=2, initial_backoff=0.001, jitter=0)
TRACE = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
log = logging.getLogger("tests.observability.consumer")


@message_type("test.ctx.job")
class Job(BaseModel):
    n: int


@message_type("test.ctx.other")
class Other(BaseModel):
    n: int


class Worker(Service):
    name = "worker"

    @handles("jobs", retry=QUICK)
    async def on_job(self, job: Job) -> None:
        log.info("working on job %d", job.n)
        raise RuntimeError(f"job {job.n} failed")


Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    """Lines of the framework's and this test's loggers, formatted as JSON for a process that
    configured its logging as service "process"."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("process"))
    loggers = [logging.getLogger("framework"), log]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield lambda: [orjson.loads(line) for line in stream.getvalue().splitlines()]
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


async def send(
    harness: ServiceHarness,
    topic: str,
    data: Any,
    *,
    type: str | None = None,
    correlationid: str | None = None,
    traceparent: str | None = None,
) -> None:
    envelope = Envelope(
        type=type or type_name(data.__class__),
        source="tests",
        data=data,
        correlationid=correlationid,
        traceparent=traceparent,
    )
    key, value, headers = to_binary(envelope)
    await harness.send_raw(topic, value, key=key, headers=headers)


def the_line(lines: list[dict[str, Any]], text: str) -> dict[str, Any]:
    [line] = [line for line in lines if text in line["message"]]
    return line


async def test_retry_and_dead_letter_lines_carry_service_correlation_and_trace(
    json_lines: Lines,
) -> None:
    async with ServiceHarness(Worker(NO_HTTP, transport=MemoryTransport())) as harness:
        await send(
            harness, "jobs", Job(n=1), correlationid="checkout-7", traceparent=TRACE.to_header()
        )
        await harness.dead_lettered(Job)

    lines = json_lines()
    retry = the_line(lines, "attempt 1 failed")
    dead_letter = the_line(lines, "failed 2 time(s), dead-lettering")
    first, second = [line for line in lines if line["message"] == "working on job 1"]
    for line in (retry, dead_letter, first, second):
        assert line["service"] == "worker"
        assert line["correlation_id"] == "checkout-7"
        assert line["trace_id"] == TRACE.trace_id
    # Each attempt is a span of its own, and the line about it is in its span.
    assert retry["span_id"] == first["span_id"]
    assert dead_letter["span_id"] == second["span_id"]
    assert first["span_id"] != second["span_id"]
    assert TRACE.span_id not in {first["span_id"], second["span_id"]}


async def test_lines_about_records_refused_before_any_handler_carry_their_context(
    json_lines: Lines,
) -> None:
    async with ServiceHarness(Worker(NO_HTTP, transport=MemoryTransport())) as harness:
        await send(
            harness, "jobs", Other(n=1), correlationid="c-other", traceparent=TRACE.to_header()
        )
        await send(
            harness,
            "jobs",
            {"n": "many"},
            type="test.ctx.job",
            correlationid="c-invalid",
            traceparent=TRACE.to_header(),
        )
        await harness.dead_lettered(count=2)

    lines = json_lines()
    unhandled = the_line(lines, "takes type 'test.ctx.other'")
    invalid = the_line(lines, "is not a valid test.ctx.job")
    assert unhandled["correlation_id"] == "c-other"
    assert invalid["correlation_id"] == "c-invalid"
    for line in (unhandled, invalid):
        assert line["service"] == "worker"
        assert line["trace_id"] == TRACE.trace_id
        assert line["level"] == "WARNING"


@pytest.mark.parametrize("retry_mode", ["in_place", "retry_topic"])
@pytest.mark.parametrize("traceparent", [None, TRACE.to_header()], ids=["untraced", "traced"])
async def test_all_attempts_of_a_message_share_one_trace(
    retry_mode: str, traceparent: str | None
) -> None:
    seen: list[TraceContext] = []

    class Stubborn(Service):
        @handles(
            "jobs",
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.001, jitter=0),
            retry_mode=retry_mode,
        )
        async def on_job(self, job: Job) -> None:
            trace = get_trace()
            assert trace is not None
            seen.append(trace)
            raise RuntimeError("again")

    async with ServiceHarness(Stubborn(NO_HTTP, transport=MemoryTransport())) as harness:
        await send(harness, "jobs", Job(n=1), traceparent=traceparent)
        await harness.dead_lettered(Job)

    assert len(seen) == 3
    assert len({trace.trace_id for trace in seen}) == 1
    assert len({trace.span_id for trace in seen}) == 3
    if traceparent is not None:
        assert seen[0].trace_id == TRACE.trace_id


async def test_each_service_of_a_process_names_itself_on_its_lines(json_lines: Lines) -> None:
    class Orders(Service):
        @handles("orders")
        async def on_job(self, job: Job) -> None:
            log.info("orders got job %d", job.n)

    class Billing(Service):
        @handles("orders")
        async def on_job(self, job: Job) -> None:
            log.info("billing got job %d", job.n)

    shared = MemoryTransport()
    async with (
        ServiceHarness(Orders(NO_HTTP, transport=shared)) as orders,
        ServiceHarness(Billing(NO_HTTP, transport=shared)) as billing,
    ):
        await orders.publish("orders", Job(n=5))
        await orders.handled(Job)
        await billing.handled(Job)

    lines = json_lines()
    assert the_line(lines, "orders got job 5")["service"] == "orders"
    assert the_line(lines, "billing got job 5")["service"] == "billing"
