"""The whole shop, end to end through the web gateway: `msa shop` on embedded defaults (one
process, in-memory bus, embedded PostgreSQL, in-memory MongoDB), and the same service classes on
real Kafka, PostgreSQL and MongoDB (`msa shop --real`)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from example_shop.contracts import OrderConfirmed, OrderPlaced
from example_shop.inventory import Inventory
from example_shop.orders import OrderStatusChanged
from example_shop.shop import Shop
from framework.messages import type_name
from tests.example_shop.conftest import start_shop

pytestmark = pytest.mark.asyncio(loop_scope="package")  # the loop of the package's shop


async def sign_in(http: aiohttp.ClientSession, base: str, email: str, password: str) -> None:
    credentials = {"email": email, "password": password}
    async with http.post(f"{base}/api/auth/login", json=credentials) as r:
        assert r.status == 200, await r.text()


async def wait_for_status(
    http: aiohttp.ClientSession, base: str, order_id: str, wanted: set[str]
) -> dict[str, Any]:
    deadline = time.monotonic() + 40
    while True:
        async with http.get(f"{base}/api/orders/{order_id}") as response:
            assert response.status == 200, await response.text()
            order: dict[str, Any] = await response.json()
        if order["status"] in wanted:
            return order
        assert time.monotonic() < deadline, order
        await asyncio.sleep(0.1)


async def live_events(stream: aiohttp.ClientResponse, until: str) -> list[dict[str, Any]]:
    """The events of an SSE stream as they arrive (CloudEvents), up to one of type `until`."""
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(40):
        async for raw in stream.content:
            line = raw.decode().rstrip("\r\n")
            if line:  # a field of the event being read; a comment (":...") is a heartbeat
                name, _, value = line.partition(":")
                if name:
                    fields[name] = value.removeprefix(" ")
                continue
            if "event" in fields:  # a blank line ends an event
                events.append(json.loads(fields["data"]))
                if fields["event"] == until:
                    return events
            fields = {}
    raise AssertionError(f"the stream ended before a {until} event: {events}")


async def checkout_flow(shop: Shop) -> None:
    base = shop.url.rstrip("/")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{base}/") as response:  # the storefront page, through the gateway
            assert response.status == 200
            assert "msa shop" in await response.text()
        async with http.get(f"{base}/api/products?q=mug&page=1&size=5") as response:
            assert response.status == 200
            products = await response.json()
        assert products["items"]
        product = products["items"][0]

        async with http.get(f"{base}/api/orders") as response:
            assert response.status == 401  # not signed in: the gateway refuses
        await sign_in(http, base, "demo@shop.test", "demo-password-123")

        async def order_with(card: str) -> dict[str, Any]:
            async with http.put(
                f"{base}/api/cart/items/{product['product_id']}",
                json={"quantity": 1},
            ) as response:
                assert response.status in (200, 204), await response.text()
                cart = await response.json()
            # The cart is priced by the server, from the catalog's price.
            [line] = [i for i in cart["items"] if i["product_id"] == product["product_id"]]
            assert line["unit_price_cents"] == product["price_cents"]
            async with http.post(
                f"{base}/api/orders", json={"address": "1 Main Street", "card_number": card}
            ) as response:
                assert response.status == 202, await response.text()
                placed: dict[str, Any] = await response.json()
            return placed

        # Live status over SSE while the saga runs. The stream follows one order, so it opens
        # once the order is placed; to be sure its saga is not over by then, the test holds
        # the product's stock row meanwhile: the saga waits at its stock step.
        inventory = shop.services["inventory"]
        assert isinstance(inventory, Inventory)
        async with inventory.db.transaction() as tx:
            await tx.execute(
                "select 1 from stock where product_id = $1 for update", product["product_id"]
            )
            placed = await order_with("4242424242424242")
            stream = await http.get(f"{base}/api/live/orders/{placed['order_id']}")
        async with stream:  # open (its listener is in place) before the saga went on
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            events = await live_events(stream, until=type_name(OrderConfirmed))
        live = [e for e in events if e["type"] != type_name(OrderPlaced)]  # perhaps before it
        assert [e["type"] for e in live] == [type_name(OrderStatusChanged)] * 3 + [
            type_name(OrderConfirmed)
        ]
        assert [e["data"].get("status") for e in live[:3]] == [
            "stock_reserved",
            "payment_authorized",
            "shipment_created",
        ]
        assert {e["data"]["order_id"] for e in events} == {placed["order_id"]}
        async with http.get(f"{base}/api/orders/{placed['order_id']}") as response:
            assert (await response.json())["status"] == "confirmed"

        declined = await order_with("4000000000000002")
        cancelled = await wait_for_status(
            http, base, declined["order_id"], {"cancelled", "confirmed"}
        )
        assert cancelled["status"] == "cancelled"
        assert "declined" in (cancelled.get("reason") or "")

        async with http.get(f"{base}/api/orders") as response:
            history = await response.json()
        ids = [o["order_id"] for o in history["orders"]]
        assert placed["order_id"] in ids
        assert declined["order_id"] in ids

        async with http.get(f"{base}/api/admin/stock") as response:
            assert response.status == 403  # a customer is not an admin

    # Another customer who learns the order id cannot follow that order's live status: the
    # gateway asks the orders service first, which does not confirm other people's orders.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        email = f"other-{placed['order_id'][:8]}@shop.test"
        async with other.post(
            f"{base}/api/auth/signup",
            json={"email": email, "password": "another-password-123", "name": "Other"},
        ) as response:
            assert response.status in (200, 201), await response.text()
        await sign_in(other, base, email, "another-password-123")
        async with other.get(f"{base}/api/live/orders/{placed['order_id']}") as response:
            assert response.status == 404
            assert response.content_type == "application/problem+json"


async def test_the_embedded_shop_sells_through_the_gateway(embedded_shop: Shop) -> None:
    await checkout_flow(embedded_shop)


async def test_admins_see_stock_and_the_system_graph(embedded_shop: Shop) -> None:
    base = embedded_shop.url.rstrip("/")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await sign_in(http, base, "admin@shop.test", "admin-password-123")
        async with http.get(f"{base}/api/admin/stock") as response:
            assert response.status == 200
            stock = await response.json()
        assert any(row["product_id"] == "p-001" for row in stock)
        async with http.get(f"{base}/api/admin/graph") as response:
            assert response.status == 200
            graph = await response.json()
        assert "shop.orders.events" in graph["mermaid"]
        # The second look has live rates: what each topic carried since the first.
        async with http.get(f"{base}/api/admin/graph") as response:
            rates = (await response.json())["rates"]
        assert set(rates) >= {"shop.orders.events", "shop.inventory.commands"}


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.mongo
async def test_the_same_services_run_on_kafka_postgres_and_mongodb(
    kafka_bootstrap: str, mongo_url: str, mongo_database_name: str
) -> None:
    import os

    env = {
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "POSTGRES_URL": os.environ["POSTGRES_URL"],
        "MONGO_URL": mongo_url,
        # A catalog of its own, seeded (and so announcing its products) afresh.
        "CATALOG_MONGO_DB": mongo_database_name,
        "PATH": "/usr/bin:/bin",
    }
    shop = await start_shop(real=True, env=env)
    try:
        await checkout_flow(shop)
    finally:
        await shop.stop()
