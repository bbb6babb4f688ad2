"""The shop's HTTP API fuzzed through the web gateway with Schemathesis: whatever a client sends,
the answer is never a 5xx, and every error is an RFC 9457 problem document.

Each service's own OpenAPI document (`/docs/openapi.json`, fetched from the service) is run
against the gateway, under the prefix where the `web` profile exposes those routes and as the
caller they expect (`EXPOSED`); payments and shipping have no public route, so they are not in
it. Schemathesis runs its coverage phase (boundary and invalid values, missing fields,
unexpected methods) and its fuzzing phase, positive and negative, derandomized with a fixed
seed and a few examples per operation: a bounded run that repeats itself.

The fuzzer creates products, changes stock and places orders, so it runs on a shop of its own,
not on the package's `embedded_shop` that the end-to-end tests expect in its seeded state. The
gateway lets a client make 20 requests/s (burst 40): the runs go one at a time, paced below
that (`RATE`), so the answers are the services', not 429s.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import schemathesis
from schemathesis.engine import events, from_schema
from schemathesis.engine.recorder import Interaction

from example_shop.catalog.seed import DEMO_PRODUCTS
from example_shop.orders import Orders
from example_shop.shop import Shop
from tests.example_shop.conftest import start_shop

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the loop of the module's shop

ACCOUNTS = {
    "customer": ("demo@shop.test", "demo-password-123"),
    "admin": ("admin@shop.test", "admin-password-123"),
}
RATE = "18/s"
"""Requests per second to the gateway, below its `browser` tier (20/s)."""
SEED = 20260101
"""Schemathesis' seed: another one draws other examples (try a few when the shop changes)."""
MAX_EXAMPLES = 20
"""Fuzzing examples per operation and generation mode (positive, negative)."""
PROBLEM = "application/problem+json"
PRODUCT_IDS = [product["product_id"] for product in DEMO_PRODUCTS]


@dataclass(frozen=True, kw_only=True)
class Exposure:
    """Where the gateway serves some of a service's routes: `prefix` + the path of the
    service's document reaches the route for a client signed in as `caller` (None: anonymous).
    `operations` picks them, a regular expression over "METHOD /path"."""

    service: str
    prefix: str
    caller: str | None
    operations: str


EXPOSED = (
    Exposure(service="identity", prefix="/api", caller=None, operations=r"^POST /auth/"),
    Exposure(service="identity", prefix="/api", caller="customer", operations=r"^GET /auth/me$"),
    Exposure(service="identity", prefix="", caller=None, operations=r"^GET /\.well-known/"),
    Exposure(
        service="catalog", prefix="/api", caller=None, operations=r"^GET /(products|categories)"
    ),
    Exposure(service="catalog", prefix="/api/admin", caller="admin", operations=r"^(POST|PATCH) /"),
    Exposure(service="inventory", prefix="/api", caller=None, operations=r"^GET /stock/"),
    Exposure(service="inventory", prefix="/api/admin", caller="admin", operations=r" /stock"),
    Exposure(service="orders", prefix="/api", caller="customer", operations=r" /(cart|orders)"),
    Exposure(service="analytics", prefix="/api/admin", caller="admin", operations=r" /analytics/"),
    Exposure(service="storefront", prefix="", caller=None, operations=r"^GET /($|static/)"),
    Exposure(service="storefront", prefix="/api/admin", caller="admin", operations=r"^GET /graph$"),
)


def fuzz_config(base_url: str, token: str | None) -> schemathesis.Config:
    """A bounded, repeatable run: fixed seed, derandomized, no shrinking, no on-disk cache.
    Only `not_a_server_error` is checked by Schemathesis; `Findings.inspect` adds the rest."""
    return schemathesis.Config.from_dict(
        {
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {token}"} if token else {},
            "seed": SEED,
            "workers": 1,
            "rate-limit": RATE,
            "request-timeout": 10,
            "cache": {"enabled": False},
            # Half the product ids are the demo products', so lookups find some and carts fill.
            "dictionaries": {"products": {"values": PRODUCT_IDS}},
            "parameters": {"path.product_id": {"dictionary": "products", "probability": 0.5}},
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "no-shrink": True,
            },
            "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
            "phases": {
                "coverage": {"unexpected-methods": ["DELETE", "PATCH", "TRACE"]},
                "stateful": {"enabled": False},
            },
        }
    )


@dataclass
class Findings:
    """What one run saw: answers by operation and status, and what is wrong with them."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def inspect(self, operation: str, interaction: Interaction) -> None:
        request, response = interaction.request, interaction.response
        sent = f"{request.method} {request.uri} {_shorten(request.body)}".rstrip()
        if response is None:
            self.problems.append(f"{sent} -> no answer")
            return
        status = response.status_code
        self.statuses[operation, status] += 1
        if status >= 500:
            self.problems.append(f"{sent} -> {status} {_shorten(response.content)}")
        elif status >= 400:
            media_type = (response.headers.get("content-type") or [""])[0].split(";")[0]
            try:
                document = json.loads(response.content)
            except ValueError:
                document = None
            if media_type.strip() != PROBLEM or not isinstance(document, dict):
                self.problems.append(f"{sent} -> {status} {media_type!r}, not a problem document")
            elif document.get("status") != status:
                self.problems.append(f"{sent} -> {status} a problem that says {document}")


def _shorten(data: bytes | None, limit: int = 300) -> str:
    text = (data or b"").decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."


def fuzz(
    document: dict[str, Any], exposure: Exposure, base_url: str, token: str | None
) -> Findings:
    """Run Schemathesis on the operations of `document` that `exposure` picks (blocking: call it
    in a thread while the shop serves on the event loop)."""
    config = fuzz_config(base_url, token)
    schema = schemathesis.openapi.from_dict(document, config=config).include(
        name_regex=exposure.operations
    )
    findings = Findings()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                findings.inspect(event.recorder.label, interaction)
        elif isinstance(event, events.NonFatalError):
            findings.problems.append(f"{event.label}: schemathesis failed: {event.info}")
        elif isinstance(event, events.FatalError):
            findings.problems.append(f"schemathesis failed: {event.exception!r}")
    return findings


@pytest.fixture(scope="module")
async def fuzzed_shop() -> AsyncIterator[Shop]:
    shop = await start_shop(real=False, env={"PATH": "/usr/bin:/bin"})
    yield shop
    await shop.stop()


async def sign_in(http: aiohttp.ClientSession, base: str, email: str, password: str) -> str:
    async with http.post(
        f"{base}/api/auth/login", json={"email": email, "password": password}
    ) as response:
        assert response.status == 200, await response.text()
        token: str = (await response.json())["access_token"]
    return token


# Hypothesis' advice on how Schemathesis drives it is not the shop's business, and one of them is
# wrong here: the shop, in this process, moves the `random` module's state while Schemathesis
# draws in its thread, which Hypothesis takes for a strategy that uses `random`.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
async def test_hostile_requests_through_the_gateway_get_problems_never_5xx(
    fuzzed_shop: Shop,
) -> None:
    base = f"http://127.0.0.1:{fuzzed_shop.gateway_port}"
    async with aiohttp.ClientSession() as http:
        tokens = {caller: await sign_in(http, base, *ACCOUNTS[caller]) for caller in ACCOUNTS}
        documents: dict[str, dict[str, Any]] = {}
        for name in {exposure.service for exposure in EXPOSED}:
            port = fuzzed_shop.ports[name]
            async with http.get(f"http://127.0.0.1:{port}/docs/openapi.json") as response:
                documents[name] = await response.json()

    problems: list[str] = []
    for exposure in EXPOSED:
        token = tokens[exposure.caller] if exposure.caller else None
        findings = await asyncio.to_thread(
            fuzz, documents[exposure.service], exposure, base + exposure.prefix, token
        )
        where = f"{exposure.service} at {exposure.prefix or '/'} as {exposure.caller}"
        problems += [f"{where}: {problem}" for problem in findings.problems]
        answers = sorted(findings.statuses.items())
        # The exposure is real: the gateway routed some request to the service, which said yes.
        assert any(200 <= status < 300 for (_, status), _ in answers), (where, answers)
        limited = sum(n for (_, status), n in answers if status == 429)
        assert limited <= findings.statuses.total() // 10, (where, answers)
    assert not problems, "\n".join(problems)


async def test_the_requests_that_once_got_a_5xx_get_a_problem(fuzzed_shop: Shop) -> None:
    """What fuzzing the shop turned up, kept as plain requests: each of them once got a 500."""
    base = f"http://127.0.0.1:{fuzzed_shop.gateway_port}"
    account = {"email": "hostile@shop.test", "password": "correct-horse-battery-9", "name": "H"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/auth/signup", json=account) as response:
            assert response.status == 201, await response.text()
        token = await sign_in(http, base, account["email"], account["password"])
        customer = {"Authorization": f"Bearer {token}"}
        token = await sign_in(http, base, *ACCOUNTS["admin"])
        admin = {"Authorization": f"Bearer {token}"}

        async def status(
            method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
        ) -> int:
            async with http.request(method, base + path, json=body, headers=headers) as response:
                if response.status >= 400:
                    assert response.content_type == PROBLEM, await response.text()
                return response.status

        # NUL, which PostgreSQL text cannot hold, in a sign-in, a sign-up and an address.
        login = {"email": "demo@shop.test\x00", "password": "demo-password-123"}
        assert await status("POST", "/api/auth/login", login) == 422
        signup = {**account, "email": "other@shop.test", "name": "N\x00"}
        assert await status("POST", "/api/auth/signup", signup) == 422
        order = {"address": "1 Main St\x00", "card_number": "4242424242424242"}
        assert await status("POST", "/api/orders", order, customer) == 422
        # A cart worth more than an order's total can hold (10**10 cents): the dearest product
        # the catalog takes, stocked, 100 of it.
        dear = {"product_id": "p-dear", "name": "Dear", "category": "tea", "price_cents": 10**8}
        assert await status("POST", "/api/admin/products", dear, admin) == 201
        assert await status("PUT", "/api/admin/stock/p-dear", {"on_hand": 100}, admin) == 200
        orders = fuzzed_shop.services["orders"]
        assert isinstance(orders, Orders)
        async with asyncio.timeout(30):  # the orders service hears of its price and stock
            await orders.until_known(["p-dear"])
        line = {"quantity": 100}
        assert await status("PUT", "/api/cart/items/p-dear", line, customer) == 200
        order["address"] = "1 Main St"
        assert await status("POST", "/api/orders", order, customer) == 409
        # The system graph, drawn from gateway profiles that keep their development secrets.
        assert await status("GET", "/api/admin/graph", headers=admin) == 200
