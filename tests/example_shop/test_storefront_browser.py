"""The storefront in a real headless Chromium (Debian's chromium, driven by Playwright): browse,
search, sign in, fill the cart, check out, watch the order confirmed live, and the admin view."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest

from example_shop.shop import Shop

CHROMIUM = os.environ.get("MSA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)


@pytest.fixture
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
    await expect(page.get_by_test_id("timeline")).to_contain_text("orders.confirmed")


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
