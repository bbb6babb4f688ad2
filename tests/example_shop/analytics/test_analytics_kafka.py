"""Analytics on Kafka: Faust agents and changelog-backed tables, queried over HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import pytest

from example_shop.analytics import Analytics, StreamingAnalytics
from example_shop.contracts import TOPICS, OrderConfirmed, OrderLine, OrderPlaced
from framework.service import ServiceSettings

pytestmark = pytest.mark.kafka

ADMIN = {"x-user-id": "u-admin", "x-user-roles": "admin"}


def make_analytics(bootstrap: str, app_id: str) -> StreamingAnalytics:
    settings = ServiceSettings(
        transport="kafka",
        http_host="127.0.0.1",
        http_port=0,
        shutdown_grace=5,
        env={"KAFKA_BOOTSTRAP": bootstrap},
    )
    service = Analytics(settings, app_id=app_id)
    assert isinstance(service, StreamingAnalytics)
    return service


async def get(service: Analytics, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{service.http_port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=ADMIN) as response:
        return response.status, await response.json(content_type=None)


async def until(service: Analytics, path: str, wanted: Any, within: float = 20.0) -> Any:
    """GET `path` until `wanted(body)` holds; the last body."""
    deadline = time.monotonic() + within
    while True:
        status, body = await get(service, path)
        if status == 200 and wanted(body):
            return body
        assert time.monotonic() < deadline, f"{path} never satisfied the test: {status} {body}"
        await asyncio.sleep(0.2)


def order(run: str, number: int, *lines: tuple[str, int, int]) -> OrderConfirmed:
    order_lines = [
        OrderLine(product_id=f"{run}-{p}", quantity=q, unit_price_cents=c) for p, q, c in lines
    ]
    return OrderConfirmed(
        order_id=f"{run}-o{number}",
        customer_id="c-1",
        lines=order_lines,
        total_cents=sum(line.quantity * line.unit_price_cents for line in order_lines),
    )


async def test_confirmed_orders_published_on_the_bus_show_up_in_the_queries(
    kafka_bootstrap: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    analytics = make_analytics(kafka_bootstrap, app_id=f"analytics-test-{run}")
    async with analytics:
        status, ready = await get(analytics, "/ready")
        assert status == 200
        assert ready["checks"]["StreamsResource"] is True

        orders = [
            order(run, 1, ("tea", 40, 500), ("mug", 1, 900)),
            order(run, 2, ("tea", 30, 500)),
            order(run, 3, ("mug", 60, 900)),
        ]
        placed = OrderPlaced(**orders[0].model_dump())
        await analytics.bus.publish(TOPICS.ORDERS_EVENTS, placed, key=placed.order_id)
        for confirmed in [*orders, orders[1]]:  # the last one is a redelivery
            await analytics.bus.publish(TOPICS.ORDERS_EVENTS, confirmed, key=confirmed.order_id)
        # The redelivery changes no figure, so no query can wait for it. A marker order on its
        # key, so on its partition, comes after it: once the marker counts, the redelivery
        # was taken (and must have been counted once, as the figures below say).
        marker = order(run, 4, ("marker", 1, 100))
        await analytics.bus.publish(TOPICS.ORDERS_EVENTS, marker, key=orders[1].order_id)
        await until(
            analytics, f"/analytics/sales?product_id={run}-marker", lambda body: body["units"] == 1
        )

        tea = await until(
            analytics,
            f"/analytics/sales?product_id={run}-tea&minutes=2",
            lambda body: body["units"] >= 70,
        )
        assert (tea["units"], tea["revenue_cents"]) == (70, 35_000)
        assert len(tea["windows"]) == 2
        mug = await until(
            analytics,
            f"/analytics/sales?product_id={run}-mug&minutes=5",
            lambda body: body["units"] >= 61,
        )
        assert (mug["units"], mug["revenue_cents"]) == (61, 61 * 900)

        _, trending = await get(analytics, "/analytics/trending?minutes=15&limit=50")
        mine = [(p["product_id"], p["units"]) for p in trending["items"] if run in p["product_id"]]
        assert mine == [(f"{run}-tea", 70), (f"{run}-mug", 61), (f"{run}-marker", 1)]

        _, summary = await get(analytics, "/analytics/summary")
        assert summary["orders_confirmed"] >= 4
        assert summary["orders_placed"] >= 1
        assert summary["revenue_cents"] >= 70 * 500 + 61 * 900 + 100


async def test_a_restarted_service_recovers_its_windows_from_the_changelog(
    kafka_bootstrap: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    app_id = f"analytics-test-{run}"
    first = make_analytics(kafka_bootstrap, app_id)
    async with first:
        await first.bus.publish(TOPICS.ORDERS_EVENTS, order(run, 1, ("jam", 7, 300)))
        await until(first, f"/analytics/sales?product_id={run}-jam", lambda b: b["units"] == 7)

    second = make_analytics(kafka_bootstrap, app_id)
    async with second:
        _, jam = await get(second, f"/analytics/sales?product_id={run}-jam")
        assert jam["units"] == 7  # recovered before the service reported ready
        _, timeline = await get(second, "/analytics/timeline?minutes=5")
        assert sum(m["units"] for m in timeline["minutes"]) >= 7  # the shop's minutes too
        await second.bus.publish(TOPICS.ORDERS_EVENTS, order(run, 2, ("jam", 2, 300)))
        await until(second, f"/analytics/sales?product_id={run}-jam", lambda b: b["units"] == 9)
