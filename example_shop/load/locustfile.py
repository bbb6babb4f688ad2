"""Locust users for the shop, through the web gateway (run by `msa shop load`).

Browsers look around (search, categories, product pages with stock); buyers sign in, fill a
cart and check out - mostly with a card that is approved, sometimes with one that is declined
(the saga then releases the stock and cancels the order).
"""

from __future__ import annotations

import random

from locust import HttpUser, between, task

SEARCHES = ["mug", "tea", "coffee", "green", "glaze", "filter", "", "cup"]
PRODUCTS = [f"p-{n:03d}" for n in range(1, 25) if n not in (13, 14)]
APPROVED, DECLINED = "4242424242424242", "4000000000000002"


class Browser(HttpUser):
    """Anonymous: every browser shares the load generator's address, so the gateway's tier
    for anonymous clients limits them together; its 429s are counted apart, not as errors."""

    weight = 3
    wait_time = between(0.2, 1.0)

    def _get(self, path: str, name: str) -> None:
        with self.client.get(path, name=name, catch_response=True) as response:
            if response.status_code == 429:
                response.success()
                self.environment.events.request.fire(
                    request_type="LIMITED",
                    name="rate limited (429)",
                    response_time=0,
                    response_length=0,
                    exception=None,
                    context={},
                )

    @task(3)
    def search(self) -> None:
        self._get(f"/api/products?q={random.choice(SEARCHES)}&page=1&size=12", "/api/products?q=")

    @task(2)
    def product_page(self) -> None:
        self._get(f"/api/product-page/{random.choice(PRODUCTS)}", "/api/product-page")

    @task(1)
    def categories(self) -> None:
        self._get("/api/categories", "/api/categories")


class Buyer(HttpUser):
    weight = 1
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.client.post(
            "/api/auth/login", json={"email": "demo@shop.test", "password": "demo-password-123"}
        )

    @task
    def buy(self) -> None:
        product = random.choice(PRODUCTS)
        with self.client.put(
            f"/api/cart/items/{product}",
            json={"quantity": 1},  # the price is the catalog's
            name="/api/cart/items",
            catch_response=True,
        ) as response:
            if response.status_code == 409:
                response.success()  # sold out (the load sells the stock): an answer, not an error
                return
        card = DECLINED if random.random() < 0.2 else APPROVED
        with self.client.post(
            "/api/orders",
            json={"address": "1 Main Street", "card_number": card},
            name="/api/orders (checkout)",
            catch_response=True,
        ) as response:
            if response.status_code == 202:
                response.success()
                self.environment.events.request.fire(
                    request_type="ORDER",
                    name="orders placed",
                    response_time=0,
                    response_length=0,
                    exception=None,
                    context={},
                )
            elif response.status_code == 409:
                response.success()  # an empty cart after a concurrent checkout: not an error
            else:
                response.failure(f"checkout answered {response.status_code}")
