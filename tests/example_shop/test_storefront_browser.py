"""The storefront in a real headless Chromium (Debian's chromium, driven by Playwright), as a
customer sees it: browse the pictures, search, open a product, sign in, fill the cart, check
out, watch the order confirmed (or cancelled) live, find it again in the order history, on a
desktop and on a phone.

Every page is checked the same way (`browsing.Browsing.shoot`): no console error, no failed
request, no text below WCAG AA contrast; and photographed into test-artifacts/screenshots."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from example_shop.shop import Shop
from tests.example_shop.browsing import (
    DECLINED_CARD,
    DEMO,
    PHONE,
    Browsing,
    api_session,
    browsing,
    loaded_images,
    stock_set_to,
)

pytestmark = pytest.mark.asyncio(loop_scope="package")  # the loop of `embedded_shop`

TIMELINE = ["Order placed", "Stock reserved", "Payment authorised", "Shipment created",
            "Order confirmed"]  # fmt: skip
TIMES = "\N{MULTIPLICATION SIGN}"  # as in "2 (times) Classic White Mug"
ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:")


@pytest_asyncio.fixture(loop_scope="package")
async def shopper(embedded_shop: Shop) -> AsyncIterator[Browsing]:
    await empty_cart(embedded_shop.url)
    async with browsing(embedded_shop.url, "desktop-shopper") as shop:
        yield shop


async def empty_cart(url: str) -> None:
    """The demo customer's cart emptied (a test that stopped half-way may have left items)."""
    async with api_session(url, DEMO) as http:
        async with http.get("/api/cart") as response:
            items = (await response.json())["items"]
        for item in items:
            async with http.delete(f"/api/cart/items/{item['product_id']}") as response:
                assert response.status == 200


def cents(text: str | None) -> int:
    assert text is not None
    return int(text)


async def place_order(shop: Browsing, product_id: str, card: str | None = None) -> str:
    """Put one of the product in the cart from the grid and check out; the new order's id."""
    from playwright.async_api import expect

    page = shop.page
    await shop.go("#/")
    card_of_product = page.locator(f'[data-testid=product][data-product-id="{product_id}"]')
    before = int(await page.locator("#cart-count").inner_text())
    await card_of_product.get_by_role("button", name="Add to cart").click()
    await expect(page.locator("#cart-count")).to_have_text(str(before + 1))
    await page.get_by_test_id("cart-link").click()
    checkout = page.get_by_test_id("checkout")
    if card is not None:
        await checkout.get_by_label("Card number").fill(card)
    await checkout.get_by_role("button", name="Place order").click()
    await page.wait_for_url(re.compile(r"#/orders/[0-9a-f]+$"))
    return str(page.url).rsplit("/", 1)[1]


async def stored_status(page: Any, url: str, order_id: str, *, until: set[str]) -> str:
    """The order's status as the orders service stores it, once it is one of `until`."""
    status = ""
    for _ in range(600):
        response = await page.request.get(f"{url}api/orders/{order_id}")
        status = str((await response.json())["status"])
        if status in until:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"order {order_id} still {status}")


async def test_a_customer_finds_buys_and_follows_an_order(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    from playwright.async_api import expect

    page = shopper.page

    # The grid: pictures made for the shop (loaded, not broken), prices, stock.
    await shopper.go("#/")
    products = page.get_by_test_id("product")
    await expect(products).to_have_count(12)
    sources = await loaded_images(page, "[data-testid=product] img")
    assert sources[0] == "/static/products/p-001.svg"
    assert len(set(sources)) == 12
    await expect(products.first.locator("[data-stock]")).to_have_text(re.compile(r"\d+ in stock"))
    await expect(products.first.get_by_role("button", name="Add to cart")).to_be_enabled()
    await expect(products.first.locator("img")).to_have_attribute("alt", "Classic White Mug")
    # Nobody is signed in, and the page knows it without asking (a 401 would be logged).
    assert not [u for u in shopper.watch.requests if "/api/auth/me" in u]
    await shopper.shoot("home")

    await page.get_by_test_id("search-input").fill("mug")
    await page.get_by_test_id("search-input").press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Results for “mug”")
    await expect(products.first).to_contain_text("Mug")
    assert 1 <= await products.count() < 12
    await shopper.shoot("search")

    # A product's page; adding to the cart asks a visitor to sign in first, then comes back.
    await products.first.get_by_role("link", name="Classic White Mug").click()
    product = page.get_by_test_id("product-page")
    await expect(product.get_by_role("heading", level=1)).to_have_text("Classic White Mug")
    await expect(product.locator("[data-cents]")).to_have_attribute("data-cents", "1290")
    await expect(product.get_by_test_id("product-stock")).to_have_text(re.compile(r"in stock"))
    await loaded_images(page, "[data-testid=product-page] img")
    await shopper.shoot("product")
    await product.get_by_role("button", name="Add to cart").click()
    await expect(page.get_by_test_id("signin-form")).to_be_visible()
    await expect(page.get_by_test_id("flash")).to_have_text("Sign in to add products to your cart.")
    await shopper.shoot("signin")
    await page.get_by_test_id("signin-form").get_by_role("button", name="Sign in").click()
    await expect(product).to_be_visible()  # back where the visitor was
    await expect(page.get_by_test_id("flash")).to_have_text("Welcome, Demo Customer.")
    await product.get_by_label("Quantity").fill("2")
    await product.get_by_role("button", name="Add to cart").click()
    await expect(page.locator("#cart-count")).to_have_text("2")
    await expect(page.get_by_test_id("flash")).to_have_text(
        f"Added 2 {TIMES} Classic White Mug to your cart."
    )

    await page.get_by_test_id("home").click()
    await expect(page.get_by_test_id("flash")).to_be_hidden()  # said on the page before
    tea = page.locator('[data-testid=product][data-product-id="p-007"]')
    await tea.get_by_role("button", name="Add to cart").click()
    await expect(page.locator("#cart-count")).to_have_text("3")
    await shopper.shoot("added-to-cart")

    # The cart: names, prices, quantities (one changed here), totals that add up.
    await page.get_by_test_id("cart-link").click()
    await expect(page.get_by_test_id("flash")).to_be_hidden()
    lines = page.get_by_test_id("cart-line")
    await expect(lines.get_by_test_id("line-name")).to_have_text(
        ["Classic White Mug", "Earl Grey Supreme"]
    )
    await lines.nth(1).get_by_label("Quantity of Earl Grey Supreme").fill("3")
    await lines.nth(1).get_by_label("Quantity of Earl Grey Supreme").press("Tab")
    await expect(lines.nth(1).get_by_test_id("line-total")).to_have_attribute(
        "data-cents", str(3 * 890)
    )
    await expect(page.locator("#cart-count")).to_have_text("5")
    totals = [
        cents(await t.get_attribute("data-cents"))
        for t in await lines.get_by_test_id("line-total").all()
    ]
    assert totals == [2 * 1290, 3 * 890]
    total = page.get_by_test_id("cart-total")
    await expect(total).to_have_attribute("data-cents", str(sum(totals)))
    await expect(total).to_have_text(re.compile(r"€\s?52\.50|52,50\s?€"))
    await shopper.shoot("cart")

    # Checkout, then the order's own page, live.
    await page.get_by_test_id("checkout").get_by_role("button", name="Place order").click()
    await page.wait_for_url(re.compile(r"#/orders/[0-9a-f]+$"))
    order_id = str(page.url).rsplit("/", 1)[1]
    number = page.get_by_test_id("order-number")
    await expect(number).to_have_text(re.compile(r"^Order #\d+$"))
    order_number = (await number.inner_text()).removeprefix("Order ")
    await expect(page.get_by_test_id("flash")).to_have_text(
        f"Thank you! Your order {order_number} is placed."
    )
    await expect(page.get_by_test_id("order-status")).to_have_text("Confirmed", timeout=30_000)
    items = page.get_by_test_id("order-line")
    await expect(items).to_have_count(2)
    await expect(items.nth(0)).to_contain_text("Classic White Mug")
    await expect(items.nth(1)).to_contain_text("Earl Grey Supreme")
    await expect(page.get_by_test_id("order-total")).to_have_attribute("data-cents", "5250")
    await expect(page.get_by_test_id("order-address")).to_have_text("1 Main Street, Springfield")
    await expect(page.get_by_test_id("order-card")).to_have_text("Card ending in 4242")
    steps = page.get_by_test_id("timeline").locator("li")
    await expect(steps.locator(".words")).to_have_text(TIMELINE)
    for step in await steps.all():  # each with its time
        await expect(step.locator("time")).to_have_text(re.compile(r"\d{1,2}:\d{2}:\d{2}"))
    assert not ISO_TIME.search(await page.locator("main").inner_text())
    await shopper.shoot("order")

    # The history: number, what it holds, status, total, a date for people.
    await page.get_by_test_id("orders-link").click()
    await expect(page.get_by_test_id("flash")).to_be_hidden()
    row = page.locator(f'[data-testid=order-row][data-order-id="{order_id}"]')
    await expect(row.get_by_role("link")).to_have_text(f"Order {order_number}")
    await expect(row).to_contain_text(f"2 {TIMES} Classic White Mug, 3 {TIMES} Earl Grey Supreme")
    await expect(row).to_contain_text("Confirmed")
    await expect(row.locator("[data-cents]")).to_have_attribute("data-cents", "5250")
    await expect(row.locator("time")).not_to_have_text("")
    assert not ISO_TIME.search(await page.get_by_test_id("orders").inner_text())
    await shopper.shoot("orders")

    await page.get_by_test_id("signout").click()
    await expect(page.get_by_test_id("signin-link")).to_be_visible()
    await expect(page.get_by_test_id("flash")).to_have_text("You are signed out.")
    assert await page.evaluate("document.cookie") == ""  # the hint is gone with the session


async def test_an_order_finished_before_its_live_stream_opens_shows_its_whole_progress(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    """The saga may finish before the browser's event stream is open (here: the page's first
    read of the order is answered as still pending, and its stream is held until the order is
    confirmed); the page shows what was stored, not an empty, pending timeline."""
    from playwright.async_api import Route, expect

    page = shopper.page
    confirmed = asyncio.Event()
    held: list[str] = []
    first_reads: list[str] = []

    async def hold_until_confirmed(route: Route) -> None:
        held.append(route.request.url)
        await confirmed.wait()
        await route.continue_()

    async def first_read_pending(route: Route) -> None:
        if route.request.method != "GET" or first_reads:
            await route.continue_()
            return
        first_reads.append(route.request.url)
        response = await route.fetch()
        order = await response.json()
        order.update(status="pending", reason=None, steps=order["steps"][:1])
        await route.fulfill(response=response, json=order)

    await page.route("**/api/live/**", hold_until_confirmed)
    await page.route(re.compile(r".*/api/orders/[0-9a-f]+$"), first_read_pending)
    await shopper.sign_in()
    order_id = await place_order(shopper, "p-001")
    assert await stored_status(page, embedded_shop.url, order_id, until={"confirmed"})
    confirmed.set()

    await expect(page.get_by_test_id("order-status")).to_have_text("Confirmed")
    await expect(page.get_by_test_id("timeline").locator("li .words")).to_have_text(TIMELINE)
    assert first_reads, "the page did not read the order"
    assert held, "the page opened no event stream for its pending order"


async def test_a_past_order_opened_from_the_history_shows_its_timeline(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    from playwright.async_api import expect

    page = shopper.page
    await shopper.sign_in()
    order_id = await place_order(shopper, "p-001")
    await stored_status(page, embedded_shop.url, order_id, until={"confirmed"})
    await shopper.go("#/")

    streams_before = len([u for u in shopper.watch.requests if "/api/live/" in u])
    await page.get_by_test_id("orders-link").click()
    await page.locator(f'[data-order-id="{order_id}"]').get_by_role("link").click()

    await expect(page.get_by_test_id("order-status")).to_have_text("Confirmed")
    steps = page.get_by_test_id("timeline").locator("li")
    await expect(steps.locator(".words")).to_have_text(TIMELINE)
    for step in await steps.all():
        await expect(step.locator("time")).not_to_have_text("")
    # An order that is over has nothing more to stream.
    assert len([u for u in shopper.watch.requests if "/api/live/" in u]) == streams_before


async def test_a_declined_card_cancels_the_order_and_the_page_says_what_was_undone(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    from playwright.async_api import expect

    page = shopper.page
    await shopper.sign_in()
    await place_order(shopper, "p-002", card=DECLINED_CARD)

    await expect(page.get_by_test_id("order-status")).to_have_text("Cancelled", timeout=30_000)
    await expect(page.get_by_test_id("order-reason")).to_contain_text("card declined")
    steps = page.get_by_test_id("timeline").locator("li")
    await expect(steps.locator(".words")).to_have_text(
        ["Order placed", "Stock reserved", "Payment declined", "Stock released", "Order cancelled"]
    )
    await expect(steps.nth(2).locator(".detail")).to_have_text("card declined")
    for step in range(5):  # every step with its time, the refusal included
        await expect(steps.nth(step).locator("time")).not_to_have_text("")
    await shopper.shoot("order-declined")

    # Read again from the history, the cancelled order tells the same.
    await page.get_by_test_id("orders-link").click()
    await page.get_by_test_id("order-row").first.get_by_role("link").click()
    await expect(page.get_by_test_id("timeline").locator("li .words")).to_have_text(
        ["Order placed", "Stock reserved", "Payment declined", "Stock released", "Order cancelled"]
    )


async def test_a_sold_out_product_cannot_be_put_in_the_cart(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    from playwright.async_api import expect

    page = shopper.page
    await shopper.sign_in()
    async with stock_set_to(embedded_shop.url, "p-012", 0):
        await page.get_by_test_id("search-input").fill("Rooibos")
        await page.get_by_test_id("search-input").press("Enter")
        card = page.locator('[data-testid=product][data-product-id="p-012"]')
        await expect(card.get_by_role("button")).to_have_text("Sold out")
        await expect(card.get_by_role("button")).to_be_disabled()
        await expect(card.locator("[data-stock]")).to_have_text("Sold out")
        await shopper.shoot("sold-out")

        await card.get_by_role("link", name="Rooibos Vanilla").click()
        product = page.get_by_test_id("product-page")
        await expect(product.get_by_test_id("product-stock")).to_have_text("Sold out")
        await expect(product.get_by_role("button", name="Sold out")).to_be_disabled()
    # Restocked, it can be bought again.
    await shopper.go("#/?q=Rooibos")
    await expect(card.get_by_role("button", name="Add to cart")).to_be_enabled()


async def test_an_anonymous_visitor_asks_nothing_that_fails(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    """No /api/auth/me without the sign-in hint, pages for customers send to sign in, and the
    icon is there under both of its names."""
    from playwright.async_api import expect

    page = shopper.page
    for route in ("#/", "#/products/p-013", "#/?category=tea", "#/?q=nothing-like-this"):
        await shopper.go(route)
        await expect(page.locator("main h1")).to_be_visible()
        await page.wait_for_load_state("networkidle")
        shopper.watch.check(route)
    await expect(page.get_by_text("No products match your search.")).to_be_visible()
    for route, words in (("#/cart", "cart"), ("#/orders", "orders"), ("#/admin", "admin")):
        await shopper.go(route)
        await expect(page.get_by_test_id("signin-form")).to_be_visible()
        await expect(page.get_by_test_id("flash")).to_contain_text(words)
    assert not [u for u in shopper.watch.requests if "/api/auth/me" in u]
    assert not [u for u in shopper.watch.requests if "/api/admin/" in u]

    await expect(page.locator('link[rel="icon"]')).to_have_attribute("href", "/static/favicon.svg")
    for path in ("favicon.ico", "static/favicon.svg"):
        response = await page.request.get(embedded_shop.url + path)
        assert response.status == 200
        assert response.headers["content-type"] == "image/svg+xml"


async def test_a_visitor_creates_an_account_and_is_signed_in(
    embedded_shop: Shop, shopper: Browsing
) -> None:
    from playwright.async_api import expect

    page = shopper.page
    await shopper.go("#/signin")
    form = page.get_by_test_id("signup-form")
    await form.get_by_label("Name").fill("Grace")
    await form.get_by_label("Email").fill(f"grace-{uuid.uuid4().hex[:8]}@example.com")
    await form.get_by_label("Password").fill("short")
    await form.get_by_role("button", name="Create account").click()
    assert not await form.get_by_label("Password").evaluate("(input) => input.validity.valid")
    await form.get_by_label("Password").fill("compiler-pioneer-1952")
    await form.get_by_role("button", name="Create account").click()
    await expect(page.get_by_test_id("flash")).to_have_text("Welcome, Grace.")
    await expect(page.get_by_test_id("signout")).to_be_visible()
    await expect(page.get_by_test_id("product").first).to_be_visible()
    assert "signed_in=1" in await page.evaluate("document.cookie")


async def test_every_shopper_page_fits_a_phone(embedded_shop: Shop) -> None:
    from playwright.async_api import expect

    await empty_cart(embedded_shop.url)
    async with browsing(embedded_shop.url, "phone-shopper", PHONE) as phone:
        page = phone.page

        async def fits(name: str) -> None:
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{name}: the page is {width} px wide"
            await phone.shoot(name)

        await phone.go("#/")
        await expect(page.get_by_test_id("product")).to_have_count(12)
        await loaded_images(page, "[data-testid=product] img")
        await fits("home")
        await phone.go("#/products/p-019")
        await expect(page.get_by_test_id("product-page")).to_be_visible()
        await fits("product")
        await phone.sign_in()
        await fits("signed-in")
        order_id = await place_order(phone, "p-004")
        await expect(page.get_by_test_id("order-status")).to_have_text("Confirmed", timeout=30_000)
        await fits("order")
        await phone.go("#/orders")
        await expect(page.locator(f'[data-order-id="{order_id}"]')).to_be_visible()
        await fits("orders")
        await phone.go("#/")
        await page.get_by_test_id("product").first.get_by_role("button", name="Add to cart").click()
        await expect(page.locator("#cart-count")).to_have_text("1")
        await phone.go("#/cart")
        await expect(page.get_by_test_id("cart-line")).to_have_count(1)
        await fits("cart")
    await empty_cart(embedded_shop.url)
