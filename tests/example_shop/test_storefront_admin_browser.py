"""The storefront's admin page in a real headless Chromium: sales charts drawn from the
analytics service, stock by product name with low-stock marks, the system drawn with its live
message rates, and the fault-injection switches flipped through the page and back.

Checked like every storefront page (`browsing.Browsing.shoot`): no console error, no failed
request, readable contrast; photographed into test-artifacts/screenshots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from example_shop.shop import Shop
from tests.example_shop.browsing import (
    ADMIN,
    APPROVED_CARD,
    DEMO,
    PHONE,
    Browsing,
    api_session,
    browsing,
    loaded_images,
    screenshots_dir,
    stock_set_to,
)

pytestmark = pytest.mark.asyncio(loop_scope="package")  # the loop of `embedded_shop`

SERVICES = 8  # backends and the storefront, each a node of the drawing (and gateways, topics)


@pytest_asyncio.fixture(loop_scope="package")
async def admin(embedded_shop: Shop) -> AsyncIterator[Browsing]:
    async with browsing(embedded_shop.url, "desktop-admin") as shop:
        yield shop


async def confirmed_order(url: str, product_id: str, quantity: int) -> None:
    """An order placed by the demo customer through the API, once it is confirmed."""
    async with api_session(url, DEMO) as http:
        put = http.put(f"/api/cart/items/{product_id}", json={"quantity": quantity})
        async with put as response:
            assert response.status == 200, await response.text()
        order = {"address": "2 Side Street, Shelbyville", "card_number": APPROVED_CARD}
        async with http.post("/api/orders", json=order) as response:
            assert response.status == 202, await response.text()
            order_id = (await response.json())["order_id"]
        for _ in range(600):
            async with http.get(f"/api/orders/{order_id}") as response:
                if (await response.json())["status"] == "confirmed":
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"order {order_id} was not confirmed")


async def open_admin(admin: Browsing) -> None:
    from playwright.async_api import expect

    await admin.sign_in(ADMIN)
    await expect(admin.page.get_by_test_id("admin-link")).to_be_visible()
    await admin.page.get_by_test_id("admin-link").click()
    await expect(admin.page.get_by_test_id("stock-row").first).to_be_visible()


async def test_an_admin_sees_sales_stock_and_the_system_drawn(
    embedded_shop: Shop, admin: Browsing
) -> None:
    from playwright.async_api import expect

    page = admin.page
    await confirmed_order(embedded_shop.url, "p-005", 2)

    async with stock_set_to(embedded_shop.url, "p-023", 3):
        await open_admin(admin)

        # Stock by name, with the low and the sold-out marked.
        stock = page.get_by_test_id("stock")
        low = stock.locator('[data-product-id="p-023"]')
        await expect(low).to_contain_text("Tea Infuser Ball")
        await expect(low.get_by_test_id("stock-mark")).to_have_text("Low stock")
        await expect(low).to_have_attribute("data-level", "low")
        await expect(stock.locator('[data-product-id="p-001"]')).to_contain_text(
            "Classic White Mug"
        )
        await expect(page.get_by_test_id("stock-row")).to_have_count(24)
        await loaded_images(page, "[data-testid=stock] img")

        # Sales: the tiles, and both charts drawn in the page.
        await expect(page.get_by_test_id("summary")).to_contain_text("orders confirmed")
        best = page.get_by_test_id("best-sellers").locator("svg")
        await expect(best.locator("g.bar").first).to_be_visible()
        await expect(best).to_contain_text("Travel Tumbler")
        timeline = page.get_by_test_id("sales-timeline").locator("svg")
        await expect(timeline.locator("rect.column").first).to_be_visible()
        await expect(timeline.locator("circle.point").first).to_be_visible()

        # The system: an SVG drawing (nodes, arrows), and per-topic rates once measured.
        graph = page.get_by_test_id("graph").locator("svg")
        await expect(graph.locator("g.node.service")).to_have_count(SERVICES, timeout=15_000)
        assert await graph.locator("g.edge [marker-end]").count() > 10
        await expect(graph.locator('g.node[data-name="orders"]')).to_be_visible()
        rates = page.get_by_test_id("rates").locator("[data-topic]")
        await expect(rates.first).to_be_visible(timeout=15_000)  # the second sample, 5 s on
        await expect(page.get_by_test_id("rates")).to_contain_text("shop.orders.events")
        await admin.shoot("admin")
        graph_shot = screenshots_dir() / "desktop-admin-graph.png"
        await page.get_by_test_id("graph").screenshot(path=str(graph_shot))
    # The 10-second refresh shows the restored stock.
    await expect(low.get_by_test_id("stock-mark")).to_have_text("In stock", timeout=15_000)


async def test_an_admin_flips_a_fault_switch_through_the_page_and_back(
    embedded_shop: Shop, admin: Browsing
) -> None:
    from playwright.async_api import expect

    page = admin.page
    url = embedded_shop.url
    await open_admin(admin)
    analytics = page.get_by_test_id("fault-analytics")
    await expect(analytics.get_by_test_id("fault-state")).to_have_text("normal")
    try:
        await analytics.get_by_label("Added delay (ms)").fill("250")
        await analytics.get_by_role("button", name="Apply").click()
        await expect(analytics.get_by_test_id("fault-state")).to_have_text("+250 ms")
        assert (await switches(url, "analytics"))["latency_ms"] == 250
        await admin.shoot("faults-on")

        # Out of range: the form says so and sends nothing.
        delay = analytics.get_by_label("Added delay (ms)")
        await delay.fill("99999")
        await analytics.get_by_role("button", name="Apply").click()
        assert not await delay.evaluate("(input) => input.validity.valid")
        assert (await switches(url, "analytics"))["latency_ms"] == 250
        # A refusal of the service (here one made up in the browser) is shown in its words.
        refusal = {"title": "Conflict", "status": 409, "detail": "the switches are busy"}
        await page.route(
            "**/api/admin/faults/analytics",
            lambda route: route.fulfill(status=409, json=refusal),
        )
        admin.watch.allow(409, "/api/admin/faults/analytics")
        await delay.fill("300")
        await analytics.get_by_role("button", name="Apply").click()
        await expect(analytics.get_by_test_id("fault-problem")).to_have_text(
            "the switches are busy"
        )
        await expect(analytics.get_by_test_id("fault-state")).to_have_text("+250 ms")
        await page.unroute("**/api/admin/faults/analytics")

        await analytics.get_by_role("button", name="Reset every switch of analytics").click()
        await expect(analytics.get_by_test_id("fault-state")).to_have_text("normal")
        await expect(analytics.get_by_label("Added delay (ms)")).to_have_value("0")
        assert (await switches(url, "analytics"))["latency_ms"] == 0
    finally:
        async with api_session(url, ADMIN) as http:
            off = {"latency_ms": 0, "paused": False}
            async with http.put("/api/admin/faults/analytics", json=off) as response:
                assert response.status == 200
    payments = page.get_by_test_id("fault-payments")
    await expect(payments.get_by_label("Declined payments (%)")).to_be_visible()
    await expect(analytics.get_by_label("Declined payments (%)")).to_have_count(0)
    now = await all_switches(url)
    crash = page.get_by_label("Crash at the next request")
    if now["processes"]:
        await expect(crash).to_have_count(len(now["services"]))  # type: ignore[arg-type]
    else:
        await expect(crash).to_have_count(0)
        await expect(page.get_by_test_id("crash-note")).to_contain_text("one process")


async def all_switches(url: str) -> dict[str, object]:
    async with api_session(url, ADMIN) as http, http.get("/api/admin/faults") as response:
        assert response.status == 200
        body: dict[str, object] = await response.json()
    return body


async def switches(url: str, service: str) -> dict[str, object]:
    services = (await all_switches(url))["services"]
    assert isinstance(services, dict)
    return dict(services[service])


async def test_the_admin_page_fits_a_phone(embedded_shop: Shop) -> None:
    from playwright.async_api import expect

    async with browsing(embedded_shop.url, "phone-admin", PHONE) as phone:
        await open_admin(phone)
        await expect(phone.page.get_by_test_id("graph").locator("svg")).to_be_visible()
        await expect(
            phone.page.get_by_test_id("best-sellers").locator("svg, .empty-chart")
        ).to_be_visible()
        width = await phone.page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the admin page is {width} px wide"
        await phone.shoot("admin")


async def test_admin_only_calls_are_made_for_admins_only(embedded_shop: Shop) -> None:
    """A customer's pages never call /api/admin/... (each would be a 403)."""
    from playwright.async_api import expect

    async with browsing(embedded_shop.url, "desktop-customer") as customer:
        await customer.sign_in(DEMO)
        await expect(customer.page.get_by_test_id("admin-link")).to_be_hidden()
        await customer.go("#/admin")
        await expect(customer.page.get_by_role("heading", name="Admins only")).to_be_visible()
        await customer.page.wait_for_load_state("networkidle")
        assert not [u for u in customer.watch.requests if "/api/admin/" in u]
    # And the gateway would refuse them anyway.
    async with (
        aiohttp.ClientSession() as http,
        http.get(embedded_shop.url + "api/admin/graph") as r,
    ):
        assert r.status == 401
