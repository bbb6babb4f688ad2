"""Locust users for the shop, through the web gateway (run by `msa shop load`).

Browsers look around (search, categories, product pages with stock); buyers sign in, fill a
cart and check out - mostly with a card that is approved, sometimes with one that is declined
(the saga then releases the stock and cancels the order). Every buyer is the same demo customer,
so they share one cart: a checkout racing another finds it empty (409).

Every request is recorded in the run log (`example_shop.load.runlog`) when `MSA_LOAD_RUN_LOG`
names a file: its status, whatever it is (Locust's own pass/fail is not what `msa shop load`
reports), the order id of a checkout answered 202, and a gateway's "circuit open". With
`--msa-seconds N`, the run stops N seconds after the test started, on the real clock.
(Locust's `--run-time` timer counts from gevent's clock as it was before the locustfile was
imported: on a slow start a short run ends before its users have sent anything.)

Run it alone as any locustfile: `locust -f example_shop/load/locustfile.py --host ...`.
"""

from __future__ import annotations

import random
import time
from typing import Any

import gevent  # type: ignore[import-untyped]  # (no stubs)
from locust import HttpUser, between, events, task
from locust.env import Environment

from example_shop.load.runlog import (
    BUYER_EMAIL,
    BUYER_PASSWORD,
    CHECKOUT,
    RequestRecord,
    RunLogWriter,
    is_circuit_open,
)

SEARCHES = ["mug", "tea", "coffee", "green", "glaze", "filter", "", "cup"]
PRODUCTS = [f"p-{n:03d}" for n in range(1, 25) if n not in (13, 14)]
APPROVED, DECLINED = "4242424242424242", "4000000000000002"

run_log = RunLogWriter.from_env()


class Browser(HttpUser):
    """Anonymous: every browser shares the load generator's address, so the gateway's tier
    for anonymous clients limits them together (429, reported as rate-limited)."""

    weight = 3
    wait_time = between(0.2, 1.0)

    @task(3)
    def search(self) -> None:
        self.client.get(
            f"/api/products?q={random.choice(SEARCHES)}&page=1&size=12", name="/api/products?q="
        )

    @task(2)
    def product_page(self) -> None:
        self.client.get(f"/api/product-page/{random.choice(PRODUCTS)}", name="/api/product-page")

    @task(1)
    def categories(self) -> None:
        self.client.get("/api/categories")


class Buyer(HttpUser):
    weight = 1
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.sign_in()

    def sign_in(self) -> None:
        """The session cookie the answer sets signs in the user's later requests."""
        self.client.post("/api/auth/login", json={"email": BUYER_EMAIL, "password": BUYER_PASSWORD})

    @task
    def buy(self) -> None:
        product = random.choice(PRODUCTS)
        added = self.client.put(
            f"/api/cart/items/{product}",
            json={"quantity": 1},  # the price is the catalog's
            name="/api/cart/items",
        )
        if added.status_code == 401:  # the sign-in was refused (a 429 to it): again next time
            self.sign_in()
            return
        if not 200 <= added.status_code < 300:  # sold out (409), rate-limited: nothing to order
            return
        card = DECLINED if random.random() < 0.2 else APPROVED
        self.client.post(
            "/api/orders", json={"address": "1 Main Street", "card_number": card}, name=CHECKOUT
        )


def record_request(
    request_type: str,
    name: str,
    response_time: float,
    response: Any = None,
    start_time: float | None = None,
    **_: Any,
) -> None:
    if run_log is None:
        return
    status = int(getattr(response, "status_code", 0) or 0)
    order_id = None
    if status == 202:
        try:
            order_id = response.json().get("order_id")
        except ValueError:
            order_id = None
    run_log.request(
        RequestRecord(
            at=start_time if start_time is not None else time.time() - response_time / 1000,
            ms=response_time,
            method=request_type,
            name=name,
            status=status,
            circuit_open=is_circuit_open(status, getattr(response, "content", None) or b""),
            order_id=order_id if isinstance(order_id, str) else None,
        )
    )


def start_the_clock(environment: Environment, **_: Any) -> None:
    if run_log is not None:
        run_log.started(time.time())
    seconds = float(getattr(environment.parsed_options, "msa_seconds", 0) or 0)
    if seconds > 0:
        gevent.spawn(_quit_after, environment, seconds)


def _quit_after(environment: Environment, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        gevent.sleep(min(left, 0.25))
    if environment.runner is not None:
        environment.runner.quit()


def note_the_users(environment: Environment, **_: Any) -> None:
    if run_log is not None and environment.runner is not None:
        run_log.stopping(time.time(), environment.runner.user_count)


def close_the_log(**_: Any) -> None:
    if run_log is not None:
        run_log.close()


def add_run_seconds(parser: Any) -> None:
    parser.add_argument(
        "--msa-seconds",
        type=float,
        default=0,
        help="stop this many seconds after the test started, on the real clock (msa shop load)",
    )


for hook, listener in (
    (events.init_command_line_parser, add_run_seconds),
    (events.request, record_request),
    (events.test_start, start_the_clock),
    (events.test_stopping, note_the_users),
    (events.quit, close_the_log),
):
    hook.add_listener(listener)  # type: ignore[no-untyped-call]  # (EventHook is unannotated)
