"""The HTTP side of a service: probes, metrics, API documents, problem responses, tracing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from framework.bus import MemoryTransport
from framework.http import json_response
from framework.observability.tracing import TraceContext
from framework.service import Service, ServiceSettings, route
from framework.testing import ServiceHarness
from framework.types import NOT_PROCESSED
from tests.framework.sample_services import OrderPlaced, Shop

HTTP = ServiceSettings(http_host="127.0.0.1", http_port=0)
PROBLEM = "application/problem+json"


def base_url(service: Service) -> str:
    assert service.http_port is not None
    return f"http://127.0.0.1:{service.http_port}"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def shop() -> AsyncIterator[ServiceHarness]:
    async with ServiceHarness(Shop(HTTP, transport=MemoryTransport())) as harness:
        yield harness


async def get_json(client: aiohttp.ClientSession, url: str, **options: Any) -> tuple[int, str, Any]:
    async with client.get(url, **options) as response:
        return response.status, response.content_type, await response.json(content_type=None)


# -- probes ---------------------------------------------------------------------------------------


async def test_http_port_zero_picks_a_free_port(shop: ServiceHarness) -> None:
    assert shop.service.http_port not in (None, 0)


async def test_alive_and_ready_answer_200_once_started(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    status, _, alive = await get_json(client, base_url(shop.service) + "/alive")
    assert (status, alive) == (200, {"status": "alive", "service": "sample-shop"})

    status, _, ready = await get_json(client, base_url(shop.service) + "/ready")
    assert status == 200
    assert ready["status"] == "ready"
    assert ready["checks"] == {"bus": True, "consumers": True}


class Gate:
    """A resource whose start or stop waits until the test opens the gate."""

    def __init__(self, *, on: str) -> None:
        self.on = on
        self.reached = asyncio.Event()
        self.open = asyncio.Event()

    async def _maybe_wait(self, step: str) -> None:
        if step == self.on:
            self.reached.set()
            await self.open.wait()

    async def start(self) -> None:
        await self._maybe_wait("start")

    async def stop(self) -> None:
        await self._maybe_wait("stop")


async def test_ready_is_503_until_resources_have_started(client: aiohttp.ClientSession) -> None:
    service = Shop(HTTP, transport=MemoryTransport())
    gate = service.use(Gate(on="start"))
    starting = asyncio.create_task(service.start())
    try:
        await asyncio.wait_for(gate.reached.wait(), 5)
        status, _, _ = await get_json(client, base_url(service) + "/alive")
        assert status == 200  # the HTTP side starts first
        status, content_type, body = await get_json(client, base_url(service) + "/ready")
        assert (status, content_type) == (503, "application/json")
        assert body["status"] == "not ready"

        gate.open.set()
        await starting
        status, _, _ = await get_json(client, base_url(service) + "/ready")
        assert status == 200
    finally:
        gate.open.set()
        await starting
        await service.stop()


async def test_ready_is_503_while_stopping_and_the_http_side_stops_last(
    client: aiohttp.ClientSession,
) -> None:
    service = Shop(HTTP, transport=MemoryTransport())
    gate = service.use(Gate(on="stop"))
    await service.start()
    url = base_url(service)
    stopping = asyncio.create_task(service.stop())
    try:
        await asyncio.wait_for(gate.reached.wait(), 5)  # the bus has stopped by now
        status, content_type, body = await get_json(client, url + "/ready")
        assert (status, content_type) == (503, "application/json")
        assert body["status"] == "not ready"
        assert body["stopping"] is True
        assert body["checks"]["bus"] is False
        status, _, _ = await get_json(client, url + "/alive")
        assert status == 200
    finally:
        gate.open.set()
        await stopping
    assert service.http_port is None
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_json(client, url + "/alive")


class Held(Service):
    """A service whose `GET /held` answers when the test says so; `events` records the order of
    a held request's end and the resources' stop."""

    name = "held"

    def __init__(self) -> None:
        super().__init__(HTTP, transport=MemoryTransport())
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.events: list[str] = []
        self.gate = self.use(Gate(on="stop"))
        self.use(Recorder(self.events))

    @route("GET", "/held")
    async def held(self, request: web.Request) -> web.Response:
        self.entered.set()
        await self.release.wait()
        self.events.append("request answered")
        return json_response({"held": True})

    @route("GET", "/quick")
    async def quick(self, request: web.Request) -> web.Response:
        return json_response({"quick": True})


class Recorder:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.events.append("resources stopped")


async def test_a_request_under_way_when_the_stop_begins_finishes_before_resources_stop(
    client: aiohttp.ClientSession,
) -> None:
    service = Held()
    service.gate.open.set()
    await service.start()
    url = base_url(service)

    async def get_held() -> tuple[int, str]:
        async with client.get(url + "/held") as response:
            await response.read()
            return response.status, response.headers.get("Connection", "")

    request = asyncio.create_task(get_held())
    await asyncio.wait_for(service.entered.wait(), 5)
    stopping = asyncio.create_task(service.stop())
    await asyncio.sleep(0)  # the stop begins: it waits for the request
    assert service.stopping
    service.release.set()
    assert await asyncio.wait_for(request, 10) == (200, "close")
    await asyncio.wait_for(stopping, 10)
    assert service.events == ["request answered", "resources stopped"]


async def test_a_drained_service_refuses_work_as_not_processed_and_probes_still_answer(
    client: aiohttp.ClientSession,
) -> None:
    """Once drained, a request on a connection kept alive from before is answered 503 "not
    processed" and the connection is closed; probes answer until the HTTP side stops."""
    service = Held()
    await service.start()
    assert service.http_port is not None
    url = base_url(service)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
    try:
        writer.write(b"GET /quick HTTP/1.1\r\nHost: held\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in head.lower()  # kept alive
        await asyncio.wait_for(reader.readexactly(len(b'{"quick":true}')), 5)
        stopping = asyncio.create_task(service.stop())
        try:
            await asyncio.wait_for(service.gate.reached.wait(), 5)  # resources are stopping
            writer.write(b"POST /quick HTTP/1.1\r\nHost: held\r\nContent-Length: 0\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the server closed it
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503")
            lines = head.lower().split(b"\r\n")
            assert b"connection: close" in lines
            assert b"retry-after: 1" in lines
            assert NOT_PROCESSED.lower().encode() + b": 1" in lines
            assert json.loads(body)["status"] == 503

            async with client.get(url + "/quick") as response:  # a new connection: the same
                assert (response.status, response.content_type) == (503, PROBLEM)
                assert response.headers[NOT_PROCESSED] == "1"
            status, _, _ = await get_json(client, url + "/alive")
            assert status == 200
            status, _, body = await get_json(client, url + "/ready")
            assert (status, body["stopping"]) == (503, True)
            async with client.get(url + "/metrics") as response:
                assert response.status == 200
        finally:
            service.gate.open.set()
            await stopping
    finally:
        writer.close()


async def test_a_port_in_use_fails_the_start_and_leaves_nothing_behind(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    port = shop.service.http_port
    assert port is not None
    settings = ServiceSettings(http_host="127.0.0.1", http_port=port)
    second = Shop(settings, transport=MemoryTransport())
    with pytest.raises(OSError, match="address already in use"):
        await second.start()
    assert (second.http_port, second.ready) == (None, False)  # nothing is left behind

    await shop.service.stop()  # frees the port: starting again works and serves HTTP
    await second.start()
    try:
        assert second.http_port == port
        status, _, _ = await get_json(client, base_url(second) + "/ready")
        assert status == 200
    finally:
        await second.stop()


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_count_handled_messages_and_handler_latency(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    await shop.publish("sample.orders", OrderPlaced(order_id="o-1", total=1.0, lines=[]), key="o-1")
    await shop.handled(OrderPlaced)

    async with client.get(base_url(shop.service) + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()

    labels = 'topic="sample.orders",type="sample.order.placed"'  # written in sorted order
    assert "# TYPE msa_messages_in_total counter\n" in text
    assert f'msa_messages_in_total{{outcome="ok",{labels}}} 1.0\n' in text
    assert "# TYPE msa_handler_seconds histogram\n" in text
    buckets = re.findall(
        rf'^msa_handler_seconds_bucket\{{le="([^"]+)",{labels}\}} (\d+)\.0$', text, re.M
    )
    assert len(buckets) > 1
    assert buckets[-1] == ("+Inf", "1")
    assert [int(count) for _, count in buckets] == sorted(int(count) for _, count in buckets)
    assert f"msa_handler_seconds_count{{{labels}}} 1.0\n" in text
    assert (
        'msa_messages_out_total{topic="sample.accepted",type="sample.order.accepted"} 1.0\n' in text
    )


# -- API documents --------------------------------------------------------------------------------


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` value anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                assert isinstance(value, str)
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: Any, ref: str) -> Any:
    """The node a local JSON Pointer reference (`#/a/b`) points to; fails if there is none."""
    assert ref.startswith("#/"), f"{ref!r} is not a reference inside the document"
    node = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            assert token.isdigit(), f"{ref!r}: {token!r} is not an index"
            assert int(token) < len(node), f"{ref!r}: no item {token!r}"
            node = node[int(token)]
        else:
            assert isinstance(node, dict), f"{ref!r}: {token!r} is inside a scalar"
            assert token in node, f"{ref!r}: no member {token!r}"
            node = node[token]
    return node


def resolved(document: Any, node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(document, node["$ref"])
    return node


def test_resolve_refuses_a_dangling_reference() -> None:
    document = {"components": {"schemas": {"A": {"type": "object"}}}}
    assert resolve(document, "#/components/schemas/A") == {"type": "object"}
    with pytest.raises(AssertionError, match="no member 'B'"):
        resolve(document, "#/components/schemas/B")


async def test_asyncapi_describes_consumed_and_published_channels(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    status, _, doc = await get_json(client, base_url(shop.service) + "/docs/asyncapi.json")
    assert status == 200
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "sample-shop"
    all_refs = list(refs(doc))
    assert all_refs
    for ref in all_refs:
        resolve(doc, ref)

    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == {"sample.orders", "sample.prices", "sample.accepted"}
    actions = {
        (op["action"], resolved(doc, op["channel"])["address"]) for op in doc["operations"].values()
    }
    assert actions == {
        ("receive", "sample.orders"),
        ("receive", "sample.prices"),
        ("send", "sample.accepted"),
    }

    [receive_orders] = [
        op
        for op in doc["operations"].values()
        if resolved(doc, op["channel"])["address"] == "sample.orders"
    ]
    [placed] = [resolved(doc, m) for m in receive_orders["messages"]]
    assert placed["name"] == "sample.order.placed"
    payload = placed["payload"]
    assert set(payload["required"]) == {"order_id", "total", "lines"}
    assert payload["properties"]["order_id"]["type"] == "string"
    line = resolved(doc, payload["properties"]["lines"]["items"])
    assert line["properties"]["quantity"]["exclusiveMinimum"] == 0  # OrderLine's Field(gt=0)
    assert "ce_type" in placed["headers"]["required"]


async def test_openapi_lists_routes_with_path_parameters_and_the_builtins(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    status, _, doc = await get_json(client, base_url(shop.service) + "/docs/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    for ref in refs(doc):
        resolve(doc, ref)

    paths = doc["paths"]
    assert {"/alive", "/ready", "/metrics", "/orders/{order_id}", "/orders", "/boom"} <= set(paths)
    get_order = paths["/orders/{order_id}"]["get"]
    assert get_order["parameters"] == [
        {"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    assert get_order["summary"] == "One order, with the request's correlation and trace ids."
    body = paths["/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "order_id" in body["properties"]


# -- routes and problems --------------------------------------------------------------------------


async def test_a_route_answers(shop: ServiceHarness, client: aiohttp.ClientSession) -> None:
    order = {"order_id": "o-3", "total": 3.0, "lines": [{"sku": "mug", "quantity": 2}]}
    async with client.post(base_url(shop.service) + "/orders", json=order) as response:
        assert response.status == 201
        assert await response.json() == {"order_id": "o-3", "line_count": 1}


async def test_an_invalid_body_is_a_422_problem_with_field_errors(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    invalid = {"order_id": "o-4", "lines": [{"sku": "mug", "quantity": 0}]}
    async with client.post(base_url(shop.service) + "/orders", json=invalid) as response:
        assert response.status == 422
        assert response.content_type == PROBLEM
        problem = await response.json(content_type=PROBLEM)

    assert problem["status"] == 422
    assert problem["title"] == "Unprocessable Content"
    locations = {tuple(error["loc"]) for error in problem["errors"]}
    assert locations == {("total",), ("lines", 0, "quantity")}


async def test_an_empty_body_is_a_400_problem(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    async with client.post(base_url(shop.service) + "/orders") as response:
        assert response.status == 400
        assert response.content_type == PROBLEM
        problem = await response.json(content_type=PROBLEM)
    assert problem["status"] == 400
    assert "empty" in problem["detail"]


async def test_an_unhandled_error_is_a_500_problem_that_leaks_nothing(
    shop: ServiceHarness, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with client.get(base_url(shop.service) + "/boom") as response:
        assert response.status == 500
        assert response.content_type == PROBLEM
        text = await response.text()

    assert "hunter2" not in text
    assert "RuntimeError" not in text
    problem = await response.json(content_type=PROBLEM)
    assert problem["title"] == "Internal Server Error"
    [logged] = [r for r in caplog.records if r.name == "framework.http"]
    assert logged.exc_info is not None  # the details go to the log instead


async def test_an_unknown_path_is_a_404_problem(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    status, content_type, problem = await get_json(client, base_url(shop.service) + "/nope")
    assert (status, content_type) == (404, PROBLEM)
    assert problem["status"] == 404


# -- tracing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/orders/o-5", "/boom"])
async def test_the_callers_trace_is_continued(
    path: str, shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    caller = TraceContext.new_root()
    url = base_url(shop.service) + path
    async with client.get(url, headers={"traceparent": caller.to_header()}) as response:
        answered = TraceContext.parse(response.headers.get("traceparent"))
        body = await response.json(content_type=None)

    assert answered is not None
    assert answered.trace_id == caller.trace_id
    assert answered.span_id != caller.span_id
    if path == "/orders/o-5":
        assert body["trace_id"] == caller.trace_id  # the route ran inside the trace


async def test_a_request_runs_with_the_callers_correlation_id(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    url = base_url(shop.service) + "/orders/o-6"
    _, _, body = await get_json(client, url, headers={"X-Correlation-ID": "checkout-6"})
    assert body["correlation_id"] == "checkout-6"


async def test_without_a_correlation_id_the_trace_id_is_used(
    shop: ServiceHarness, client: aiohttp.ClientSession
) -> None:
    _, _, body = await get_json(client, base_url(shop.service) + "/orders/o-7")
    assert body["trace_id"] is not None
    assert body["correlation_id"] == body["trace_id"]
