"""The storefront in a real headless Chromium (Debian's chromium, driven by Playwright): browse,
search, sign in, fill the cart, check out, watch the order confirmed live, find it again in the
order history, and the admin view."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from example_shop.shop import Shop

pytestmark = pytest.mark.asyncio(loop_scope="package")  # the loop of `embedded_shop`

CHROMIUM = os.environ.get("MSA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)


@pytest_asyncio.fixture(loop_scope="package")
async def page() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    if not HAVE_CHROMIUM:
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/test does)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        context = await browser.new_context()
        yield await context.new_page()
        await context.close()
        await browser.close()


async def test_a_customer_buys_a_mug_and_sees_it_confirmed_live(
    embedded_shop: Shop, page: object
) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    await page.goto(embedded_shop.url)
    products = page.get_by_test_id("product")
    await expect(products.first).to_be_visible()
    assert await products.count() > 1

    await page.get_by_test_id("search-input").fill("mug")
    await page.get_by_test_id("search-input").press("Enter")
    await expect(products.first).to_contain_text("ug")

    await page.get_by_test_id("signin-link").click()
    await page.get_by_test_id("signin-form").get_by_role("button").click()
    await expect(page.get_by_test_id("signout")).to_be_visible()

    await products.first.get_by_role("button", name="Add to cart").click()
    await expect(page.locator("#cart-count")).not_to_have_text("0")
    await page.get_by_test_id("cart-link").click()
    await expect(page.get_by_test_id("cart")).to_be_visible()
    await page.get_by_test_id("checkout").get_by_role("button", name="Place order").click()

    await expect(page.get_by_test_id("order-status")).to_have_text("confirmed", timeout=30_000)
    await expect(page.get_by_test_id("timeline")).to_contain_text("Order confirmed")


TIMELINE = ["Order placed", "Stock reserved", "Payment authorised", "Shipment created",
            "Order confirmed"]  # fmt: skip


async def sign_in_and_order(page: Any, url: str) -> str:
    """Sign in as the demo customer, buy the first product; the new order's id."""
    from playwright.async_api import expect

    await page.goto(url + "#/signin")
    await page.get_by_test_id("signin-form").get_by_role("button").click()
    await expect(page.get_by_test_id("signout")).to_be_visible()
    await page.goto(url + "#/")
    await page.get_by_test_id("product").first.get_by_role("button", name="Add to cart").click()
    await expect(page.locator("#cart-count")).not_to_have_text("0")
    await page.get_by_test_id("cart-link").click()
    await page.get_by_test_id("checkout").get_by_role("button", name="Place order").click()
    await page.wait_for_url("**#/orders/*")
    return str(page.url).rsplit("/", 1)[1]


async def stored_status(page: Any, url: str, order_id: str, *, until: set[str]) -> str:
    """The order's status as the orders service stores it, once it is one of `until`."""
    for _ in range(600):
        response = await page.request.get(f"{url}api/orders/{order_id}")
        status = str((await response.json())["status"])
        if status in until:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"order {order_id} still {status}")


async def test_an_order_finished_before_its_live_stream_opens_shows_its_whole_progress(
    embedded_shop: Shop, page: object
) -> None:
    """The saga may finish before the browser's event stream is open (here: held until the
    order is confirmed); the page shows what was stored, not an empty, pending timeline."""
    from playwright.async_api import Page, Route, expect

    assert isinstance(page, Page)
    confirmed = asyncio.Event()

    async def hold_until_confirmed(route: Route) -> None:
        await confirmed.wait()
        await route.continue_()

    await page.route("**/api/live/**", hold_until_confirmed)
    order_id = await sign_in_and_order(page, embedded_shop.url)
    assert await stored_status(page, embedded_shop.url, order_id, until={"confirmed"})
    confirmed.set()

    await expect(page.get_by_test_id("order-status")).to_have_text("confirmed")
    await expect(page.get_by_test_id("timeline").locator("li")).to_have_count(len(TIMELINE))
    for words in TIMELINE:
        await expect(page.get_by_test_id("timeline")).to_contain_text(words)


async def test_a_past_order_opened_from_the_history_shows_its_timeline(
    embedded_shop: Shop, page: object
) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    order_id = await sign_in_and_order(page, embedded_shop.url)
    await stored_status(page, embedded_shop.url, order_id, until={"confirmed"})
    await page.goto(embedded_shop.url + "#/")

    await page.get_by_test_id("orders-link").click()
    await page.get_by_test_id("orders").get_by_role("link", name=order_id).click()

    await expect(page.get_by_test_id("order-status")).to_have_text("confirmed")
    items = page.get_by_test_id("timeline").locator("li")
    await expect(items).to_have_count(len(TIMELINE))
    for index, words in enumerate(TIMELINE):
        await expect(items.nth(index)).to_contain_text(words)


async def test_an_admin_sees_stock_and_the_system_graph(embedded_shop: Shop, page: object) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    await page.goto(embedded_shop.url + "#/signin")
    form = page.get_by_test_id("signin-form")
    await form.locator("input[name=email]").fill("admin@shop.test")
    await form.locator("input[name=password]").fill("admin-password-123")
    await form.get_by_role("button").click()
    await expect(page.get_by_test_id("admin-link")).to_be_visible()
    await page.get_by_test_id("admin-link").click()
    await expect(page.get_by_test_id("stock")).to_contain_text("p-001")
    await expect(page.get_by_test_id("graph")).to_contain_text("flowchart", timeout=15_000)
