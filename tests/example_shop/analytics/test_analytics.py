"""Analytics on the in-memory bus (as the one-process shop runs it), and its ledger's math."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from example_shop.analytics import Analytics
from example_shop.analytics.ledger import SalesLedger, Windows
from example_shop.contracts import TOPICS, OrderConfirmed, OrderLine, OrderPlaced
from framework.bus import MemoryTransport
from framework.messages import Envelope, type_name
from framework.service import ServiceSettings
from framework.testing import ServiceHarness

NOW = 1_767_225_630.0  # 30 seconds into a minute
MINUTE = 60.0
ADMIN = {"x-user-id": "u-admin", "x-user-roles": "customer admin"}
_order_ids = itertools.count(1)


def confirmed(
    *lines: tuple[str, int, int],
    order_id: str | None = None,
    names: dict[str, str] | None = None,
) -> OrderConfirmed:
    """A confirmed order of `lines` (product, quantity, unit price), its products named by
    `names` (unnamed: as in events from before lines carried names)."""
    order_lines = [
        OrderLine(product_id=p, quantity=q, unit_price_cents=c, name=(names or {}).get(p))
        for p, q, c in lines
    ]
    return OrderConfirmed(
        order_id=order_id or f"o-{next(_order_ids)}",
        customer_id="c-1",
        lines=order_lines,
        total_cents=sum(line.quantity * line.unit_price_cents for line in order_lines),
    )


@pytest.fixture
async def harness() -> AsyncIterator[ServiceHarness]:
    service = Analytics(
        ServiceSettings(http_host="127.0.0.1", http_port=0),
        transport=MemoryTransport(),
        clock=lambda: NOW,
    )
    assert type(service) is Analytics
    async with ServiceHarness(service) as running:
        yield running


async def publish_at(
    harness: ServiceHarness, data: OrderConfirmed | OrderPlaced, at: float
) -> None:
    """Publish as the orders service would, with the event's CloudEvents time set to `at`."""
    envelope = Envelope(
        type=type_name(type(data)),
        source="orders",
        data=data,
        partitionkey=data.order_id,
        time=datetime.fromtimestamp(at, UTC),
    )
    await harness.service.bus.publish_envelope(TOPICS.ORDERS_EVENTS, envelope)


async def get(
    harness: ServiceHarness, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{harness.service.http_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=ADMIN if headers is None else headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_sales_are_counted_per_minute_window_of_the_event_time(
    harness: ServiceHarness,
) -> None:
    await publish_at(harness, confirmed(("apple", 2, 100), ("pear", 1, 300)), NOW)
    await publish_at(harness, confirmed(("apple", 3, 100)), NOW - 29)  # same minute
    await publish_at(harness, confirmed(("apple", 1, 120)), NOW - 31)  # the minute before
    await publish_at(harness, confirmed(("apple", 4, 100)), NOW - 10 * MINUTE)
    await publish_at(harness, confirmed(("apple", 50, 100)), NOW - 2 * 3600)  # expired window
    await harness.handled(OrderConfirmed, count=5)

    status, one = await get(harness, "/analytics/sales?product_id=apple&minutes=1")
    assert status == 200
    assert (one["units"], one["revenue_cents"]) == (5, 500)
    assert [w["units"] for w in one["windows"]] == [5]
    assert one["windows"][0]["start"] == "2026-01-01T00:00:00Z"

    _, two = await get(harness, "/analytics/sales?product_id=apple&minutes=2")
    assert [(w["units"], w["revenue_cents"]) for w in two["windows"]] == [(1, 120), (5, 500)]

    _, fifteen = await get(harness, "/analytics/sales?product_id=apple&minutes=15")
    assert len(fifteen["windows"]) == 15
    assert fifteen["units"] == 1 + 5 + 4
    assert fifteen["windows"][4]["units"] == 4  # ten minutes before the current one

    _, hour = await get(harness, "/analytics/sales?product_id=apple&minutes=60")
    assert hour["units"] == 10  # the event two hours old is in no kept window

    _, pear = await get(harness, "/analytics/sales?product_id=pear")
    assert (pear["minutes"], pear["units"], pear["revenue_cents"]) == (15, 1, 300)
    _, unknown = await get(harness, "/analytics/sales?product_id=nothing&minutes=3")
    assert unknown["units"] == 0
    assert len(unknown["windows"]) == 3

    _, summary = await get(harness, "/analytics/summary")
    assert summary["orders_confirmed"] == 5
    assert summary["revenue_cents"] == 200 + 300 + 300 + 120 + 400 + 5000
    assert summary["top_products"][0] == {"product_id": "apple", "units": 60, "revenue_cents": 6020}


async def test_trending_ranks_units_in_the_last_minutes(harness: ServiceHarness) -> None:
    await publish_at(harness, confirmed(("kiwi", 5, 100)), NOW)
    await publish_at(harness, confirmed(("plum", 5, 200)), NOW - 3 * MINUTE)  # tie: more revenue
    await publish_at(harness, confirmed(("lime", 9, 10)), NOW - 20 * MINUTE)
    await publish_at(harness, confirmed(("date", 2, 100), ("kiwi", 1, 100)), NOW - 14 * MINUTE)
    await harness.handled(OrderConfirmed, count=4)

    _, trending = await get(harness, "/analytics/trending?minutes=15&limit=5")
    assert trending["minutes"] == 15
    assert [(p["product_id"], p["units"]) for p in trending["items"]] == [
        ("kiwi", 6),
        ("plum", 5),
        ("date", 2),
    ]
    _, last_five = await get(harness, "/analytics/trending?minutes=5")
    assert [(p["product_id"], p["units"]) for p in last_five["items"]] == [("plum", 5), ("kiwi", 5)]
    _, top = await get(harness, "/analytics/trending?minutes=30&limit=2")
    assert [p["product_id"] for p in top["items"]] == ["lime", "kiwi"]
    _, one = await get(harness, "/analytics/trending?minutes=1")
    assert [p["product_id"] for p in one["items"]] == ["kiwi"]


async def test_each_order_counts_once_and_placed_orders_are_counted(
    harness: ServiceHarness,
) -> None:
    order = confirmed(("fig", 2, 250), order_id="o-twice")
    placed = OrderPlaced(**order.model_dump())
    await publish_at(harness, placed, NOW - 5)
    await publish_at(harness, placed, NOW - 5)
    await publish_at(harness, order, NOW)
    await publish_at(harness, order, NOW)  # a redelivery: another event, the same order
    await harness.handled(OrderConfirmed, count=2)
    await harness.handled(OrderPlaced, count=2)

    _, summary = await get(harness, "/analytics/summary")
    assert (summary["orders_placed"], summary["orders_confirmed"]) == (1, 1)
    assert summary["revenue_cents"] == 500
    _, fig = await get(harness, "/analytics/sales?product_id=fig&minutes=1")
    assert fig["units"] == 2


async def test_best_sellers_are_ranked_over_all_time_with_their_names(
    harness: ServiceHarness,
) -> None:
    names = {"kiwi": "Kiwi Tea", "plum": "Plum Jam"}
    await publish_at(harness, confirmed(("kiwi", 5, 100), names=names), NOW)
    await publish_at(harness, confirmed(("plum", 9, 200), names=names), NOW - 2 * 3600)  # old
    await publish_at(harness, confirmed(("plum", 1, 200), ("lime", 5, 300)), NOW)  # unnamed
    await publish_at(harness, confirmed(("date", 1, 100), names={"date": "Dates"}), NOW)
    await publish_at(harness, confirmed(("date", 1, 100), names={"date": "Medjool"}), NOW)
    await harness.handled(OrderConfirmed, count=5)

    status, best = await get(harness, "/analytics/products")
    assert status == 200
    assert best == {
        "products": [
            {"product_id": "plum", "name": "Plum Jam", "units": 10, "revenue_cents": 2000},
            {"product_id": "lime", "name": None, "units": 5, "revenue_cents": 1500},
            {"product_id": "kiwi", "name": "Kiwi Tea", "units": 5, "revenue_cents": 500},
            {"product_id": "date", "name": "Medjool", "units": 2, "revenue_cents": 200},
        ]
    }
    _, top = await get(harness, "/analytics/products?limit=2")
    assert [p["product_id"] for p in top["products"]] == ["plum", "lime"]


async def test_the_timeline_has_every_minute_oldest_first(harness: ServiceHarness) -> None:
    first = confirmed(("fig", 2, 250), ("kiwi", 1, 100))
    await publish_at(harness, OrderPlaced(**first.model_dump()), NOW - 40)  # the minute before
    await publish_at(harness, first, NOW)
    await publish_at(harness, confirmed(("fig", 1, 250)), NOW - 29)  # the current minute too
    await publish_at(harness, confirmed(("fig", 3, 250)), NOW - 3 * 3600)
    await publish_at(harness, confirmed(("fig", 7, 250)), NOW - 25 * 3600)  # over a day ago
    await harness.handled(OrderPlaced, count=1)
    await harness.handled(OrderConfirmed, count=4)

    status, three = await get(harness, "/analytics/timeline?minutes=3")
    assert status == 200
    assert three["minutes"] == [
        {
            "minute": "2025-12-31T23:58:00Z",
            "orders": 0,
            "units": 0,
            "revenue_cents": 0,
            "placed": 0,
        },
        {
            "minute": "2025-12-31T23:59:00Z",
            "orders": 0,
            "units": 0,
            "revenue_cents": 0,
            "placed": 1,
        },
        {
            "minute": "2026-01-01T00:00:00Z",
            "orders": 2,
            "units": 4,
            "revenue_cents": 850,
            "placed": 0,
        },
    ]

    _, hour = await get(harness, "/analytics/timeline")
    assert len(hour["minutes"]) == 60
    assert hour["minutes"][-1]["minute"] == "2026-01-01T00:00:00Z"

    _, day = await get(harness, "/analytics/timeline?minutes=1440")
    assert len(day["minutes"]) == 1440
    assert sum(m["units"] for m in day["minutes"]) == 4 + 3  # not the one over a day old
    [three_hours_ago] = [m for m in day["minutes"] if m["units"] == 3]
    assert three_hours_ago["minute"] == "2025-12-31T21:00:00Z"


async def test_only_admins_may_ask_and_queries_are_validated(harness: ServiceHarness) -> None:
    status, _ = await get(harness, "/analytics/summary", headers={})
    assert status == 401
    customer = {"x-user-id": "u-1", "x-user-roles": "customer"}
    for path in (
        "/analytics/summary",
        "/analytics/trending",
        "/analytics/sales?product_id=x",
        "/analytics/products",
        "/analytics/timeline",
    ):
        status, body = await get(harness, path, headers=customer)
        assert (status, body["title"]) == (403, "Forbidden")
    for path in (
        "/analytics/sales",
        "/analytics/sales?product_id=x&minutes=0",
        "/analytics/sales?product_id=x&minutes=61",
        "/analytics/trending?limit=many",
        "/analytics/products?limit=0",
        "/analytics/products?limit=101",
        "/analytics/timeline?minutes=0",
        "/analytics/timeline?minutes=1441",
        "/analytics/timeline?minutes=-5",
        "/analytics/timeline?minutes=an%20hour",
    ):
        status, body = await get(harness, path)
        assert status == 422, path
        assert body["errors"]


async def test_the_service_documents_its_routes_and_consumption(harness: ServiceHarness) -> None:
    _, openapi = await get(harness, "/docs/openapi.json")
    assert {
        "/analytics/sales",
        "/analytics/trending",
        "/analytics/summary",
        "/analytics/products",
        "/analytics/timeline",
    } <= set(openapi["paths"])
    _, asyncapi = await get(harness, "/docs/asyncapi.json")
    assert TOPICS.ORDERS_EVENTS in str(asyncapi)


# -- the ledger alone ----------------------------------------------------------------------------


def test_windows_are_aligned_minutes_and_the_last_n_include_the_current_one() -> None:
    windows = Windows(size=60, retention=3600)
    assert windows.start(NOW) == NOW - 30
    assert list(windows.last(1, NOW)) == [NOW - 30]
    assert list(windows.last(3, NOW)) == [NOW - 150, NOW - 90, NOW - 30]
    assert windows.oldest(NOW) == NOW - 30 - 59 * 60
    assert len(windows.last(windows.max_minutes, NOW)) == 60


def test_the_ledger_forgets_expired_windows_and_duplicates_on_a_sweep() -> None:
    products: dict[str, Any] = {}
    timeline: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    ledger = SalesLedger(products=products, totals={}, timeline=timeline, seen=seen, sweep_every=60)
    at = datetime.fromtimestamp(NOW, UTC)
    assert ledger.confirmed(confirmed(("fig", 1, 100), order_id="o-a"), at, NOW)
    assert not ledger.confirmed(confirmed(("fig", 1, 100), order_id="o-a"), at, NOW)
    assert set(products["fig"]["windows"]) == {str(int(NOW - 30))}
    assert set(timeline) == {str(int(NOW - 30))}

    two_hours_later = NOW + 7200
    later = datetime.fromtimestamp(two_hours_later, UTC)
    assert ledger.confirmed(confirmed(("pear", 1, 100), order_id="o-b"), later, two_hours_later)
    assert products["fig"]["windows"] == {}  # swept: older than the retention
    assert products["fig"]["units"] == 1  # the all-time total stays
    assert set(seen) == {"confirmed:o-b"}
    assert set(timeline) == {str(int(NOW - 30)), str(int(two_hours_later - 30))}  # kept a day
    assert ledger.summary().orders_confirmed == 2
    next_day = NOW + 25 * 3600
    at = datetime.fromtimestamp(next_day, UTC)
    assert ledger.confirmed(confirmed(("pear", 1, 100), order_id="o-c"), at, next_day)
    # swept: the minute over a day old; kept: the one of two hours later, 23 hours ago now
    assert set(timeline) == {str(int(two_hours_later - 30)), str(int(next_day - 30))}
