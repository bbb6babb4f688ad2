"""W3C trace context: strict parsing, child spans, contextvars, the aiohttp middleware."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from framework.observability.tracing import (
    TRACEPARENT,
    TraceContext,
    continue_from,
    current_service,
    current_trace,
    get_correlation_id,
    get_trace,
    inject,
    use_correlation_id,
    use_service,
    use_trace,
)
from framework.observability.web import trace_middleware

# The examples of https://www.w3.org/TR/trace-context/#examples-of-http-traceparent-headers
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{SPAN_ID}-01"
NOT_SAMPLED = f"00-{TRACE_ID}-{SPAN_ID}-00"


def test_parses_the_specification_examples() -> None:
    sampled = TraceContext.parse(SAMPLED)
    not_sampled = TraceContext.parse(NOT_SAMPLED)

    assert sampled == TraceContext(TRACE_ID, SPAN_ID, sampled=True)
    assert not_sampled == TraceContext(TRACE_ID, SPAN_ID, sampled=False)


def test_to_header_round_trips() -> None:
    for header in (SAMPLED, NOT_SAMPLED):
        context = TraceContext.parse(header)
        assert context is not None
        assert context.to_header() == header


def test_only_the_sampled_bit_of_the_flags_counts() -> None:
    assert TraceContext.parse(f"00-{TRACE_ID}-{SPAN_ID}-03") == TraceContext(TRACE_ID, SPAN_ID)
    assert TraceContext.parse(f"00-{TRACE_ID}-{SPAN_ID}-02") == TraceContext(
        TRACE_ID, SPAN_ID, sampled=False
    )


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param(f"ff-{TRACE_ID}-{SPAN_ID}-01", id="version ff is forbidden"),
        pytest.param(f"0g-{TRACE_ID}-{SPAN_ID}-01", id="version not hex"),
        pytest.param(f"0A-{TRACE_ID}-{SPAN_ID}-01", id="version uppercase"),
        pytest.param(f"0-{TRACE_ID}-{SPAN_ID}-01", id="version one digit"),
        pytest.param(f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", id="trace id uppercase"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID.upper()}-01", id="span id uppercase"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-0A", id="flags uppercase"),
        pytest.param(f"00-{'0' * 32}-{SPAN_ID}-01", id="trace id all zero"),
        pytest.param(f"00-{TRACE_ID}-{'0' * 16}-01", id="span id all zero"),
        pytest.param(f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01", id="trace id 31 digits"),
        pytest.param(f"00-{TRACE_ID}a-{SPAN_ID}-01", id="trace id 33 digits"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID[:-1]}-01", id="span id 15 digits"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}a-01", id="span id 17 digits"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-1", id="flags one digit"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-011", id="flags three digits"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-01-extra", id="version 00 with more fields"),
        pytest.param(f"00_{TRACE_ID}_{SPAN_ID}_01", id="wrong separators"),
        pytest.param(f" {SAMPLED}", id="leading space"),
        pytest.param(f"00-{'x' * 32}-{SPAN_ID}-01", id="trace id not hex"),
        pytest.param(f"01-{TRACE_ID}-{SPAN_ID}-01x", id="later version without dash"),
    ],
)
def test_rejects_malformed_headers(header: str | None) -> None:
    assert TraceContext.parse(header) is None


@pytest.mark.parametrize(
    "header",
    [f"01-{TRACE_ID}-{SPAN_ID}-01", f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-will-be-like"],
)
def test_a_later_version_is_read_by_its_version_00_prefix(header: str) -> None:
    assert TraceContext.parse(header) == TraceContext(TRACE_ID, SPAN_ID, sampled=True)


def test_child_keeps_the_trace_and_flags_with_a_new_span() -> None:
    parent = TraceContext(TRACE_ID, SPAN_ID, sampled=False)

    first, second = parent.child(), parent.child()

    assert first.trace_id == second.trace_id == TRACE_ID
    assert not first.sampled
    assert len({parent.span_id, first.span_id, second.span_id}) == 3
    assert TraceContext.parse(first.to_header()) == first


def test_new_roots_are_valid_and_distinct() -> None:
    roots = [TraceContext.new_root() for _ in range(100)]

    assert len({root.trace_id for root in roots}) == 100
    for root in roots:
        assert TraceContext.parse(root.to_header()) == root
    assert not TraceContext.new_root(sampled=False).sampled


def test_trace_context_is_frozen() -> None:
    context = TraceContext(TRACE_ID, SPAN_ID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.span_id = "1" * 16  # type: ignore[misc]


def test_continue_from_a_valid_header_is_a_child() -> None:
    span = continue_from(SAMPLED)

    assert span.trace_id == TRACE_ID
    assert span.span_id != SPAN_ID
    assert TraceContext.continue_from(SAMPLED).trace_id == TRACE_ID


@pytest.mark.parametrize("header", [None, "garbage", f"ff-{TRACE_ID}-{SPAN_ID}-01"])
def test_continue_from_an_invalid_header_starts_a_new_trace(header: str | None) -> None:
    span = continue_from(header)

    assert span.trace_id != TRACE_ID
    assert TraceContext.parse(span.to_header()) == span


def test_use_trace_sets_and_restores_the_current_trace() -> None:
    outer, inner = TraceContext.new_root(), TraceContext.new_root()
    assert get_trace() is None

    with use_trace(outer):
        assert get_trace() is outer
        with use_trace(inner) as entered:
            assert entered is inner
            assert get_trace() is inner
        assert get_trace() is outer
    assert get_trace() is None


def test_use_trace_restores_after_an_exception() -> None:
    with pytest.raises(RuntimeError), use_trace(TraceContext.new_root()):
        raise RuntimeError("handler failed")
    assert current_trace.get() is None


def test_use_correlation_id_sets_and_restores() -> None:
    assert get_correlation_id() is None
    with use_correlation_id("c-1"):
        assert get_correlation_id() == "c-1"
        with use_correlation_id("c-2"):
            assert get_correlation_id() == "c-2"
        assert get_correlation_id() == "c-1"
    assert get_correlation_id() is None


def test_use_service_sets_and_restores() -> None:
    assert current_service.get() is None
    with use_service("orders") as entered:
        assert entered == current_service.get() == "orders"
        with use_service("billing"):
            assert current_service.get() == "billing"
        assert current_service.get() == "orders"
    assert current_service.get() is None


def test_inject_writes_a_child_of_the_current_trace() -> None:
    headers: dict[str, str] = {"accept": "application/json"}
    current = TraceContext(TRACE_ID, SPAN_ID)

    with use_trace(current):
        span = inject(headers)

    written = TraceContext.parse(headers[TRACEPARENT])
    assert written == span
    assert span.trace_id == TRACE_ID
    assert span.span_id != SPAN_ID
    assert headers["accept"] == "application/json"


def test_inject_outside_a_trace_starts_one() -> None:
    headers: dict[str, str] = {}

    span = inject(headers)

    assert TraceContext.parse(headers[TRACEPARENT]) == span
    assert get_trace() is None


# -- aiohttp middleware ---------------------------------------------------------------------------


async def _seen(request: web.Request) -> web.Response:
    trace = get_trace()
    assert trace is not None
    return web.json_response({"trace_id": trace.trace_id, "span_id": trace.span_id})


async def _conflict(request: web.Request) -> web.Response:
    trace = get_trace()
    raise web.HTTPConflict(text=trace.trace_id if trace is not None else "no trace")


def _app() -> web.Application:
    app = web.Application(middlewares=[trace_middleware])
    app.router.add_get("/seen", _seen)
    app.router.add_get("/conflict", _conflict)
    return app


async def test_middleware_continues_the_callers_trace_and_answers_with_a_child() -> None:
    async with TestClient(TestServer(_app())) as client:
        response = await client.get("/seen", headers={TRACEPARENT: SAMPLED})
        seen = await response.json()
        answered = TraceContext.parse(response.headers[TRACEPARENT])

    assert response.status == 200
    assert seen["trace_id"] == TRACE_ID
    assert seen["span_id"] != SPAN_ID
    assert answered == TraceContext(TRACE_ID, seen["span_id"], sampled=True)


async def test_middleware_starts_a_trace_when_the_header_is_missing_or_invalid() -> None:
    async with TestClient(TestServer(_app())) as client:
        without = await client.get("/seen")
        seen_without = await without.json()
        invalid = await client.get("/seen", headers={TRACEPARENT: SAMPLED.upper()})
        seen_invalid = await invalid.json()

    for response, seen in ((without, seen_without), (invalid, seen_invalid)):
        answered = TraceContext.parse(response.headers[TRACEPARENT])
        assert answered is not None
        assert answered.trace_id == seen["trace_id"] != TRACE_ID
        assert answered.span_id == seen["span_id"]
    assert seen_without["trace_id"] != seen_invalid["trace_id"]


async def test_middleware_sets_the_header_on_http_exceptions() -> None:
    async with TestClient(TestServer(_app())) as client:
        response = await client.get("/conflict", headers={TRACEPARENT: NOT_SAMPLED})
        body = await response.text()
        answered = TraceContext.parse(response.headers[TRACEPARENT])

    assert response.status == 409
    assert body == TRACE_ID
    assert answered is not None
    assert answered.trace_id == TRACE_ID
    assert not answered.sampled


def test_importing_observability_does_not_import_aiohttp() -> None:
    code = (
        "import sys, framework.observability; "
        "assert 'aiohttp' not in sys.modules, sorted(m for m in sys.modules if 'aiohttp' in m)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
