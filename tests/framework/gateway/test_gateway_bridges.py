"""Protocol translation through the gateway: publish + 202 + status, request/reply (504 on
timeout), an SSE stream and a queue drained to an upstream, on the in-memory bus and on Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.messages import message_type, type_name
from framework.types import Transport
from tests.framework.gateway.conftest import (
    ADMIN_HASH,
    GatewayFactory,
    Upstream,
    base,
    eventually,
)


@message_type("gw.order.place")
class PlaceOrder(BaseModel):
    order_id: str
    quantity: int


@message_type("gw.order.placed")
class OrderPlaced(BaseModel):
    order_id: str


@message_type("gw.order.shipped")
class OrderShipped(BaseModel):
    order_id: str


@message_type("gw.quote")
class QuoteAsked(BaseModel):
    sku: str


@pytest.fixture
async def buses(make_transport: Callable[[], Transport]) -> AsyncIterator[tuple[Bus, Bus]]:
    edge, worker = Bus(make_transport(), source="gateway"), Bus(make_transport(), source="svc")
    yield edge, worker
    await edge.stop(grace=1)
    await worker.stop(grace=1)


async def test_the_gateway_translates_http_to_the_bus_and_back(
    buses: tuple[Bus, Bus],
    make_gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    topic_name: str,
) -> None:
    edge, worker = buses
    commands, events, quotes = f"{topic_name}.cmd", f"{topic_name}.ev", f"{topic_name}.q"

    async def place(message: Message[PlaceOrder]) -> None:
        key = message.data.order_id
        await worker.publish(events, OrderPlaced(order_id=key), key=key)
        await worker.publish(events, OrderShipped(order_id=key), key=key)

    async def quote(message: Message[QuoteAsked]) -> dict[str, Any]:
        return {"sku": message.data.sku, "price": 1250}

    worker.subscribe(
        [commands],
        {type_name(PlaceOrder): HandlerSpec(PlaceOrder, place)},
        ConsumerOptions(group="orders", commit_interval=0.05),
    )
    worker.subscribe(
        [quotes],
        {type_name(QuoteAsked): HandlerSpec(QuoteAsked, quote)},
        ConsumerOptions(group="quotes", commit_interval=0.05),
    )
    await worker.start()
    await edge.start()
    a = upstreams["a"]
    gateway = await make_gateway(
        f"""
gateway:
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
upstreams:
  erp: {{targets: ["{a.url}"]}}
routes:
  - name: place
    match: {{methods: [POST], path: /orders}}
    publish:
      topic: {commands}
      event_type: gw.order.place
      key: order_id
      status_topics: [{events}]
      states: {{gw.order.shipped: completed}}
  - name: quote
    match: {{methods: [POST], path: /quote}}
    request: {{topic: {quotes}, event_type: gw.quote, timeout: 10}}
  - name: silent
    match: {{methods: [POST], path: /silent}}
    request: {{topic: {quotes}.nobody, event_type: gw.quote, timeout: 0.5}}
  - name: live
    match: {{methods: [GET], path: "/orders/{{order_id}}/events"}}
    stream: {{topics: [{events}], key: "{{order_id}}"}}
  - name: erp
    match: {{path: /erp, prefix: true}}
    drain: {{topic: {topic_name}.erp, upstream: erp, rate: 50}}
""",
        bus=edge,
    )
    async with aiohttp.ClientSession() as http:
        # A live stream for order o-1, open before the order is placed: the gateway adds the
        # client to the feed before it answers, and the feed has been reading since it started.
        stream = await http.get(f"{base(gateway)}/orders/o-1/events")
        assert stream.status == 200
        assert stream.headers.getall("Server") == ["msa-gateway"]  # streamed: no banner either

        async with http.post(
            f"{base(gateway)}/orders", json={"order_id": "o-1", "quantity": 2}
        ) as response:
            assert response.status == 202
            assert response.headers.getall("Server") == ["msa-gateway"]
            accepted = await response.json()
        status_url = accepted["status"]
        assert status_url.startswith("/_status/place/")
        status: dict[str, Any] = {}

        async def completed() -> bool:
            nonlocal status
            async with http.get(f"{base(gateway)}{status_url}") as response:
                status = await response.json()
            return bool(status["state"] == "completed")

        await eventually(completed, within=20)
        assert [e["type"] for e in status["events"]] == ["gw.order.placed", "gw.order.shipped"]

        seen: list[str] = []
        buffer = b""
        async with asyncio.timeout(20):
            while len(seen) < 2:
                buffer += await stream.content.readany()
                seen = [
                    orjson.loads(line[6:])["type"]
                    for line in buffer.split(b"\n")
                    if line.startswith(b"data: ")
                ]
        assert seen == ["gw.order.placed", "gw.order.shipped"]
        stream.close()

        async with http.post(f"{base(gateway)}/quote", json={"sku": "mug"}) as response:
            assert response.status == 200
            assert await response.json() == {"sku": "mug", "price": 1250}
        async with http.post(f"{base(gateway)}/silent", json={"sku": "mug"}) as response:
            assert response.status == 504
        async with http.post(
            f"{base(gateway)}/orders", data=b"{broken", headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400

        async def upstream_hits() -> int:
            async with http.get(f"{a.url}/hits") as response:
                return int((await response.json())["hits"])

        before = await upstream_hits()
        async with http.post(f"{base(gateway)}/erp/invoices/1", data=b"invoice") as response:
            assert response.status == 202

        async def delivered() -> bool:  # the queued request reached the upstream
            return await upstream_hits() > before

        await eventually(delivered, within=20)
