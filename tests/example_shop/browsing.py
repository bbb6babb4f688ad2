"""What the storefront's browser tests share: a watched Chromium page, screenshots, signing in,
the admin API, and the checks every page must pass (no console errors, no failed requests,
readable contrast)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = os.environ.get("MSA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
ROOT = Path(__file__).resolve().parents[2]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
DEMO = ("demo@shop.test", "demo-password-123")
ADMIN = ("admin@shop.test", "admin-password-123")
APPROVED_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"


def screenshots_dir() -> Path:
    """`test-artifacts/screenshots` at the repository's root, or under MSA_ARTIFACTS_DIR."""
    base = os.environ.get("MSA_ARTIFACTS_DIR")
    directory = (Path(base) if base else ROOT / "test-artifacts") / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class Watch:
    """Everything that went wrong in a page: console errors, uncaught exceptions, requests that
    failed or were answered >= 400. `check` asserts there was nothing, page by page."""

    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    allowed: list[Callable[[int, str], bool]] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("request", lambda request: self.requests.append(request.url))

    def allow(self, status: int, path: str) -> None:
        """Let one known refusal through (a route another part of the shop has yet to wire)."""
        self.allowed.append(lambda s, url: s == status and url.split("?")[0].endswith(path))

    def _console(self, message: Any) -> None:
        if message.type == "error" and not self._expected_console(message):
            self.problems.append(f"console error: {message.text} ({message.location})")

    def _expected_console(self, message: Any) -> bool:
        # Chromium logs every refused resource; one that `allow` let through is not a problem.
        refused = re.search(r"Failed to load resource: .* status of (\d+)", message.text)
        if refused is None:
            return False
        url = str((message.location or {}).get("url", ""))
        return any(ok(int(refused.group(1)), url) for ok in self.allowed)

    def _failed(self, request: Any) -> None:
        # The page closes an order's event stream on purpose (the order is over, or the visitor
        # left the page): the browser reports that as an aborted request, which it is.
        if request.resource_type == "eventsource" and request.failure == "net::ERR_ABORTED":
            return
        self.problems.append(f"request failed: {request.method} {request.url}: {request.failure}")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and not any(
            ok(response.status, response.url) for ok in self.allowed
        ):
            self.problems.append(
                f"HTTP {response.status}: {response.request.method} {response.url}"
            )

    def check(self, where: str) -> None:
        problems, self.problems = self.problems, []
        assert not problems, f"{where}: " + "\n".join(problems)


@dataclass
class Browsing:
    """A page of a fresh browser context (its own cookies), watched, with screenshots named
    `<viewport>-<who>-<page>.png`."""

    page: Any
    watch: Watch
    url: str
    label: str

    async def shoot(self, name: str) -> Path:
        """Check the page (problems, contrast) and save its screenshot, whole page."""
        await self.page.wait_for_load_state("networkidle")
        self.watch.check(f"{self.label} {name}")
        low = await contrast_failures(self.page)
        assert not low, f"{self.label} {name}: text below WCAG AA contrast:\n" + "\n".join(low)
        path = screenshots_dir() / f"{self.label}-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def go(self, route: str) -> None:
        """Open a page of the shop by its hash route (`#/cart`)."""
        await self.page.goto(self.url + route)

    async def sign_in(self, who: tuple[str, str] = DEMO) -> None:
        from playwright.async_api import expect

        await self.go("#/signin")
        form = self.page.get_by_test_id("signin-form")
        await form.get_by_label("Email").fill(who[0])
        await form.get_by_label("Password").fill(who[1])
        await form.get_by_role("button", name="Sign in").click()
        await expect(self.page.get_by_test_id("signout")).to_be_visible()


@asynccontextmanager
async def browsing(
    url: str, label: str, viewport: dict[str, int] = DESKTOP
) -> AsyncIterator[Browsing]:
    """A watched page in a new context of a headless Chromium; checked once more at the end."""
    from playwright.async_api import async_playwright

    if not HAVE_CHROMIUM:
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/test does)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            context = await browser.new_context(viewport=viewport)  # type: ignore[arg-type]
            page = await context.new_page()
            watch = Watch()
            watch.attach(page)
            yield Browsing(page=page, watch=watch, url=url, label=label)
            watch.check(f"{label} (end)")
            await context.close()
        finally:
            await browser.close()


async def loaded_images(page: Any, selector: str) -> list[str]:
    """The `src` of each image matching `selector`, once all of them have loaded; fails for one
    that is broken (no pixels)."""
    images = page.locator(selector)
    count = await images.count()
    assert count > 0, f"no images match {selector}"
    sources = []
    for index in range(count):
        image = images.nth(index)
        await image.evaluate(
            "(img) => img.complete || new Promise((ok) => img.onload = img.onerror = ok)"
        )
        width = await image.evaluate("(img) => img.naturalWidth")
        source = await image.get_attribute("src")
        assert width > 0, f"image {source} did not load"
        sources.append(str(source))
    return sources


CONTRAST_JS = (Path(__file__).parent / "contrast.js").read_text(encoding="utf-8")


async def contrast_failures(page: Any) -> list[str]:
    """Text on the page whose contrast is below WCAG AA (4.5:1, large text 3:1)."""
    failures: list[str] = await page.evaluate(CONTRAST_JS)
    return failures


# -- the API, as a script would use it (set-up and clean-up of the tests' data) ------------------


@asynccontextmanager
async def api_session(url: str, who: tuple[str, str]) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session on the gateway signed in as `who` (its bearer token on every call)."""
    async with aiohttp.ClientSession(base_url=url) as http:
        credentials = {"email": who[0], "password": who[1]}
        async with http.post("/api/auth/login", json=credentials) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"
        yield http


async def stock_of(http: aiohttp.ClientSession, product_id: str) -> dict[str, Any]:
    async with http.get("/api/admin/stock") as response:
        assert response.status == 200, await response.text()
        levels = await response.json()
    [level] = [s for s in levels if s["product_id"] == product_id]
    return dict(level)


@asynccontextmanager
async def stock_set_to(url: str, product_id: str, on_hand: int) -> AsyncIterator[None]:
    """The product's units on hand set to `on_hand` (admin API), restored afterwards."""
    async with api_session(url, ADMIN) as http:
        before = await stock_of(http, product_id)
        async with http.put(f"/api/admin/stock/{product_id}", json={"on_hand": on_hand}) as r:
            assert r.status == 200, await r.text()
        try:
            yield
        finally:
            async with http.put(
                f"/api/admin/stock/{product_id}", json={"on_hand": before["on_hand"]}
            ) as r:
                assert r.status == 200, await r.text()
