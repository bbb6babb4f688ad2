"""A load-and-verify client for the example shop, through its web gateway's public API only.

Run from the repository root (or by path), e.g. inside a cluster's network namespace:

    python -m tests.k8s.shop_client --base http://10.97.0.1:30080 smoke
    python -m tests.k8s.shop_client --base http://10.97.0.1:30080 load --buyers 10 --rate 10 \\
        --until-file /tmp/rollout-done --started-file /tmp/load-started \\
        --admin-email admin@shop.test --admin-password dev-only-admin-password

Each command prints ONE JSON object, on one line, on stdout when it is done (logs go to stderr)
and exits 0 when its "ok" is true, 1 otherwise (2: bad arguments).

`smoke`
    Signs up a new buyer, finds a stocked product (the catalog, then `/api/availability`), puts
    it in the cart (again while orders answers 404: it hears of products over Kafka a moment
    after start), places one order and polls it until it is terminal:
    {"ok", "order_id", "status", "reason", "seconds", "failures", "first_failures", "requests"}.

`load`
    `--buyers` buyers place orders at `--rate` orders a second in total, open loop: a clock
    hands each tick to an idle buyer, whatever the others are waiting for, and a tick that finds
    every buyer busy is counted (`orders.skipped_ticks.all_buyers_busy`), never queued. A buyer
    has one order on the way at a time (its cart is one), so `--buyers` caps the concurrency.
    The load runs until `--until-file` exists (or for `--duration` seconds); then no order is
    placed any more, the orders on the way are awaited, and so is every placed order's outcome
    (`--settle-timeout`). `--started-file` is written once the setup (sign-ups, products,
    stock) is done, as the first order goes out: a test that awaits it disturbs the load, not
    the setup. The report says what was requested per endpoint, every failure, the
    orders accepted and their outcomes, the stock before and after, and the invariants:

    no_failures           no request failed: no transport error or timeout (a reset connection
                          too), no 5xx, no status other than the one the step expects. Nothing
                          is retried, but a cart line for a product orders has not heard of yet
                          during setup.
    orders_accepted       at least one order was accepted (202)
    no_duplicates         no order id was handed out twice
    none_missing          every accepted order is in its buyer's order history
    no_unexpected_orders  no buyer has an order it was not told of, beyond its unanswered POSTs
    all_terminal          every order ended: confirmed, cancelled or failed
    outcomes_as_dictated  every order is confirmed (the card always pays; the client never asks
                          for more units than were available), or cancelled for stock of a
                          product asked beyond its stock
    stock_conserved       per product, available after = available before - units confirmed
                          (with the admin also on hand after = on hand before - units confirmed)
    stock_released        (with the admin) no unit of the products is reserved any more
    stock_sufficed        no tick was skipped for want of stock
    stopped_as_asked      the until-file appeared before `--max-duration`

    "ok" is true when they all hold. With `--admin-email/--admin-password` the client raises
    each product it uses to `--restock-to` units on hand first (`PUT /api/admin/stock/...`), so
    10 orders a second for minutes never sell out, and reads stock with its reservations
    (`GET /api/admin/stock`); without, it reads the public `/api/availability` and uses what
    is there. The stock checks assume nobody else shops these products meanwhile.

Each buyer identity places at most `HISTORY_LIMIT` orders (then the buyer signs up afresh), so
its order history (`GET /api/orders`, the newest 100) lists all of them: that is how the
outcomes are read, one request per identity and round. Requests are paced per identity below
the gateway's per-client rate limit (20/s, bursts of 40), so a 429 means something is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["main"]

log = logging.getLogger("shop_client")

APPROVED_CARD = "4242424242424242"
"""The simulated processor approves it for any amount up to its limit."""
AMOUNT_LIMIT_CENTS = 1_000_000
"""Payments declines more than this; products priced above it are left alone."""
ADDRESS = "1 Load Street"
TERMINAL = frozenset({"confirmed", "cancelled", "failed"})
STOCK_REASONS = ("is sold out", "left,", "is not stocked")
"""Words of a cancellation for stock (inventory's own reasons)."""
HISTORY_LIMIT = 100
"""Orders `GET /api/orders` lists (newest first): an identity never places more."""
AVAILABILITY_LIMIT = 100
"""Product ids one `GET /api/availability` may name."""
IDENTITY_RATE = 15.0
"""Requests a second one identity makes at most (the gateway allows 20, bursts of 40)."""
ANONYMOUS_RATE = 10.0
"""Requests a second made without a token (sign-ups, logins, catalog, availability), which the
gateway counts together, by the client's address."""
MAX_RATE_PER_BUYER = 5.0
"""Orders a second per buyer: two requests each, within `IDENTITY_RATE`."""
ADMIN_PRODUCTS = 8
"""Products bought by default with the admin (each restocked to `--restock-to`)."""
FAILURE_SAMPLES = 20
FAILURES_LOGGED = 50
"""Failures logged one by one on stderr; the progress lines count the rest."""
BODY_SNIPPET = 300
POLL_INTERVAL = 1.0
"""Seconds between two rounds of reading the buyers' order histories."""


# -- the record of every request -------------------------------------------------------------------


@dataclass(kw_only=True)
class EndpointStats:
    count: int = 0
    failures: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class Recorder:
    """Every request, per endpoint; every failure, the first `FAILURE_SAMPLES` in detail."""

    began: float = field(default_factory=time.monotonic)
    phase: str = "setup"
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    failures: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def answered(self, endpoint: str, status: str, seconds: float) -> None:
        stats = self.endpoints.setdefault(endpoint, EndpointStats())
        stats.count += 1
        stats.statuses[status] += 1
        stats.latencies.append(seconds)

    def failed(self, endpoint: str, *, status: int | None, error: str, body: str = "") -> None:
        self.endpoints.setdefault(endpoint, EndpointStats()).failures += 1
        self.failures += 1
        if len(self.samples) < FAILURE_SAMPLES:
            self.samples.append(
                {
                    "t": round(time.monotonic() - self.began, 3),
                    "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "phase": self.phase,
                    "endpoint": endpoint,
                    "status": status,
                    "error": error,
                    "body": body[:BODY_SNIPPET],
                }
            )
        if self.failures <= FAILURES_LOGGED:  # a reader may not drain stderr until the end
            log.warning("FAILED %s: %s %s", endpoint, status, error or body[:BODY_SNIPPET])

    def requests(self) -> dict[str, Any]:
        return {
            name: {"count": s.count, "failures": s.failures, "statuses": dict(s.statuses)}
            for name, s in sorted(self.endpoints.items())
        }

    def latency_ms(self) -> dict[str, Any]:
        return {
            name: {
                "count": len(s.latencies),
                "p50": _percentile(s.latencies, 50),
                "p99": _percentile(s.latencies, 99),
                "max": _percentile(s.latencies, 100),
            }
            for name, s in sorted(self.endpoints.items())
        }


def _percentile(seconds: list[float], percent: float) -> float | None:
    """The nearest-rank percentile, in milliseconds."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    rank = max(1, -(-len(ordered) * percent // 100))  # ceil
    return round(ordered[int(rank) - 1] * 1000, 1)


# -- one request, never retried ----------------------------------------------------------------


@dataclass(kw_only=True)
class Pacer:
    """A token bucket the client keeps itself under (never a reason to fail a request)."""

    rate: float
    burst: float
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass(frozen=True, kw_only=True)
class Reply:
    status: int | None
    """None: no answer (a transport error or a timeout)."""
    data: Any = None
    failed: bool = False
    """Recorded as a failure: no answer, or a status the step does not expect."""

    @property
    def unanswered(self) -> bool:
        """The server may or may not have done it: no answer, or a 5xx."""
        return self.status is None or self.status >= 500


@dataclass(kw_only=True)
class GatewayClient:
    """The shop's web gateway. `call` makes one request and records it; it never retries."""

    http: aiohttp.ClientSession
    base: str
    recorder: Recorder
    anonymous: Pacer = field(default_factory=lambda: Pacer(rate=ANONYMOUS_RATE, burst=10))

    async def call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        expect: Collection[int],
        tolerate: Collection[int] = (),
        token: str | None = None,
        pacer: Pacer | None = None,
        body: object = None,
    ) -> Reply:
        """`expect`: the statuses of success (their body must be JSON); `tolerate`: statuses
        the caller handles (not failures); anything else, or no answer, is a failure."""
        await (pacer or self.anonymous).acquire()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        began = time.monotonic()
        try:
            async with self.http.request(
                method, self.base + path, json=body, headers=headers
            ) as response:
                status = response.status
                text = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.recorder.answered(endpoint, "no answer", time.monotonic() - began)
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self.recorder.failed(endpoint, status=None, error=error)
            return Reply(status=None, failed=True)
        self.recorder.answered(endpoint, str(status), time.monotonic() - began)
        if status in tolerate:
            return Reply(status=status)
        if status not in expect:
            self.recorder.failed(endpoint, status=status, error="unexpected status", body=text)
            return Reply(status=status, failed=True)
        try:
            data = json.loads(text) if text else None
        except ValueError:
            self.recorder.failed(endpoint, status=status, error="not JSON", body=text)
            return Reply(status=status, failed=True)
        return Reply(status=status, data=data)


class StepFailed(Exception):
    """A step the rest depends on could not be done (its failed requests are recorded): the
    smoke's order, or the setup of the load."""


# -- buyers ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Identity:
    """One account: its token, and the orders it was told of."""

    email: str
    token: str
    pacer: Pacer = field(default_factory=lambda: Pacer(rate=IDENTITY_RATE, burst=IDENTITY_RATE))
    used: bool = False
    """It sent a cart or order request: its history is read at the end."""
    posts: int = 0
    unanswered_posts: int = 0
    accepted: list[str] = field(default_factory=list)


async def sign_up(gateway: GatewayClient, email: str) -> Identity | None:
    """A new customer account, signed in; None when a request failed (recorded)."""
    password = f"pw-{uuid.uuid4().hex[:16]}-9"
    profile = {"email": email, "password": password, "name": "Load Buyer"}
    signed_up = await gateway.call(
        "POST", "/api/auth/signup", endpoint="POST /api/auth/signup", expect={201}, body=profile
    )
    if signed_up.failed:
        return None
    return await log_in(gateway, email, password)


async def log_in(gateway: GatewayClient, email: str, password: str) -> Identity | None:
    credentials = {"email": email, "password": password}
    reply = await gateway.call(
        "POST", "/api/auth/login", endpoint="POST /api/auth/login", expect={200}, body=credentials
    )
    if reply.failed or not isinstance(reply.data, dict) or "access_token" not in reply.data:
        return None
    return Identity(email=email, token=str(reply.data["access_token"]))


async def put_line(gateway: GatewayClient, who: Identity, product_id: str, **kw: Any) -> Reply:
    who.used = True
    return await gateway.call(
        "PUT",
        f"/api/cart/items/{product_id}",
        endpoint="PUT /api/cart/items/{product_id}",
        expect={200},
        token=who.token,
        pacer=who.pacer,
        body={"quantity": 1},
        **kw,
    )


async def place_order(gateway: GatewayClient, who: Identity) -> Reply:
    who.used = True
    who.posts += 1
    reply = await gateway.call(
        "POST",
        "/api/orders",
        endpoint="POST /api/orders",
        expect={202},
        token=who.token,
        pacer=who.pacer,
        body={"address": ADDRESS, "card_number": APPROVED_CARD},
    )
    if reply.unanswered:
        who.unanswered_posts += 1
    return reply


async def history(gateway: GatewayClient, who: Identity) -> dict[str, dict[str, Any]] | None:
    """The identity's orders (all of them: it places at most `HISTORY_LIMIT`)."""
    reply = await gateway.call(
        "GET",
        "/api/orders",
        endpoint="GET /api/orders",
        expect={200},
        token=who.token,
        pacer=who.pacer,
    )
    if reply.failed:
        return None
    return {str(order["order_id"]): order for order in reply.data["orders"]}


async def stocked_products(gateway: GatewayClient) -> dict[str, int]:
    """Product id -> available units, of the catalog's products inventory keeps stock for (and
    payments would take the price of); StepFailed if a request failed."""
    ids: list[str] = []
    page = 1
    while True:
        reply = await gateway.call(
            "GET",
            f"/api/products?page={page}&size=100",
            endpoint="GET /api/products",
            expect={200},
        )
        if reply.failed:
            raise StepFailed("the catalog did not answer")
        items = reply.data["items"]
        ids += [p["product_id"] for p in items if 0 < p["price_cents"] <= AMOUNT_LIMIT_CENTS]
        if len(items) < 100 or page * 100 >= reply.data["total"] or page >= 10:
            break
        page += 1
    available: dict[str, int] = {}
    for start in range(0, len(ids), AVAILABILITY_LIMIT):
        chunk = ",".join(ids[start : start + AVAILABILITY_LIMIT])
        reply = await gateway.call(
            "GET", f"/api/availability?ids={chunk}", endpoint="GET /api/availability", expect={200}
        )
        if reply.failed:
            raise StepFailed("inventory's availability did not answer")
        available.update({i["product_id"]: int(i["available"]) for i in reply.data["items"]})
    return available


async def wait_until_sellable(
    gateway: GatewayClient, who: Identity, products: Iterable[str], timeout: float
) -> None:
    """Put each product in the cart, again while orders answers 404 (it has not heard of the
    product yet) or 409 (nor of its restocking); then empty the cart."""
    deadline = time.monotonic() + timeout
    products = list(products)
    for product in products:
        while (reply := await put_line(gateway, who, product, tolerate={404, 409})).status in {
            404,
            409,
        }:
            if time.monotonic() > deadline:
                raise StepFailed(f"orders would not sell {product} ({reply.status}) in {timeout} s")
            await asyncio.sleep(0.5)
        if reply.failed:
            raise StepFailed(f"could not put {product} in the cart")
    for product in products:
        emptied = await gateway.call(
            "DELETE",
            f"/api/cart/items/{product}",
            endpoint="DELETE /api/cart/items/{product_id}",
            expect={200},
            token=who.token,
            pacer=who.pacer,
        )
        if emptied.failed:
            raise StepFailed("could not empty the cart")


# -- stock ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StockReader:
    """Stock levels: the admin's rows (on hand, reserved, available), else the public
    availability."""

    gateway: GatewayClient
    admin: Identity | None

    async def levels(self, products: Collection[str]) -> dict[str, dict[str, int]] | None:
        if self.admin is not None:
            reply = await self.gateway.call(
                "GET",
                "/api/admin/stock",
                endpoint="GET /api/admin/stock",
                expect={200},
                token=self.admin.token,
                pacer=self.admin.pacer,
            )
            if reply.failed:
                return None
            return {
                row["product_id"]: {k: int(row[k]) for k in ("on_hand", "reserved", "available")}
                for row in reply.data
                if row["product_id"] in products
            }
        levels: dict[str, dict[str, int]] = {}
        ordered = sorted(products)
        for start in range(0, len(ordered), AVAILABILITY_LIMIT):
            chunk = ",".join(ordered[start : start + AVAILABILITY_LIMIT])
            reply = await self.gateway.call(
                "GET",
                f"/api/availability?ids={chunk}",
                endpoint="GET /api/availability",
                expect={200},
            )
            if reply.failed:
                return None
            levels.update(
                {i["product_id"]: {"available": int(i["available"])} for i in reply.data["items"]}
            )
        return levels

    async def settled(
        self, products: Collection[str], deadline: float
    ) -> dict[str, dict[str, int]] | None:
        """The levels once nothing of the products is reserved (with the admin: a confirmed
        order's units leave the shelves a moment after its confirmation), or at the deadline."""
        while True:
            levels = await self.levels(products)
            quiet = levels is not None and all(lv.get("reserved", 0) == 0 for lv in levels.values())
            if quiet or time.monotonic() > deadline:
                return levels
            await asyncio.sleep(POLL_INTERVAL)


# -- smoke ----------------------------------------------------------------------------------------


async def smoke(args: argparse.Namespace) -> dict[str, Any]:
    recorder = Recorder()
    began = time.monotonic()
    report: dict[str, Any] = {"ok": False, "order_id": None, "status": None, "reason": None}
    async with _session(args, connections=4) as http:
        gateway = GatewayClient(http=http, base=args.base, recorder=recorder)
        try:
            buyer = await sign_up(gateway, f"k8s-smoke-{uuid.uuid4().hex[:12]}@shop.test")
            if buyer is None:
                raise StepFailed("could not sign up")
            deadline = time.monotonic() + args.sellable_timeout
            while not (
                available := {p: n for p, n in (await stocked_products(gateway)).items() if n > 0}
            ):
                if time.monotonic() > deadline:
                    raise StepFailed("no product in stock")
                await asyncio.sleep(1)
            product = max(sorted(available), key=available.__getitem__)
            recorder.phase = "order"
            while (reply := await put_line(gateway, buyer, product, tolerate={404})).status == 404:
                if time.monotonic() > deadline:
                    raise StepFailed(f"orders never heard of {product}")
                await asyncio.sleep(0.5)
            if reply.failed:
                raise StepFailed(f"could not put {product} in the cart")
            placed = await place_order(gateway, buyer)
            if placed.failed:
                raise StepFailed("the order was not accepted")
            order_id = str(placed.data["order_id"])
            report["order_id"] = order_id
            log.info("smoke: order %s placed for %s", order_id, product)
            deadline = time.monotonic() + args.confirm_timeout
            while True:
                reply = await gateway.call(
                    "GET",
                    f"/api/orders/{order_id}",
                    endpoint="GET /api/orders/{order_id}",
                    expect={200},
                    token=buyer.token,
                    pacer=buyer.pacer,
                )
                if reply.failed:
                    raise StepFailed("the order could not be read")
                report["status"], report["reason"] = reply.data["status"], reply.data["reason"]
                if report["status"] in TERMINAL or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        except StepFailed as exc:
            report["error"] = str(exc)
    report["ok"] = report["status"] == "confirmed" and recorder.failures == 0
    report["seconds"] = round(time.monotonic() - began, 2)
    report["failures"] = recorder.failures
    report["first_failures"] = recorder.samples
    report["requests"] = recorder.requests()
    return report


# -- load -----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Attempt:
    identity: Identity
    product: str


@dataclass(kw_only=True)
class Buyer:
    """A buyer slot: one order on the way at a time, a fresh identity every `HISTORY_LIMIT`."""

    number: int
    run: str
    identity: Identity | None = None
    identities: int = 0

    def next_email(self) -> str:
        self.identities += 1
        return f"k8s-load-{self.run}-{self.number}-{self.identities}@shop.test"


@dataclass(kw_only=True)
class Load:
    args: argparse.Namespace
    gateway: GatewayClient
    recorder: Recorder
    stock: StockReader
    buyers: list[Buyer] = field(default_factory=list)
    identities: list[Identity] = field(default_factory=list)
    remaining: dict[str, int] = field(default_factory=dict)
    """Units the client may still ask for, per product (what was available, less its asks)."""
    accepted: dict[str, Attempt] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    dispatched: int = 0

    async def new_identity(self, buyer: Buyer) -> Identity | None:
        identity = await sign_up(self.gateway, buyer.next_email())
        if identity is not None:
            self.identities.append(identity)
            buyer.identity = identity
        return identity

    def choose_product(self) -> str | None:
        """The product with the most units left to ask for, taken; None when none is left."""
        product = max(sorted(self.remaining), key=self.remaining.__getitem__, default=None)
        if product is None or self.remaining[product] < 1:
            return None
        self.remaining[product] -= 1
        return product

    async def order(self, buyer: Buyer, product: str) -> None:
        identity = buyer.identity
        if identity is None or identity.posts >= HISTORY_LIMIT:
            identity = await self.new_identity(buyer)
            if identity is None:
                self.remaining[product] += 1  # never asked for
                return
        if (await put_line(self.gateway, identity, product)).failed:
            return
        placed = await place_order(self.gateway, identity)
        if placed.failed:
            return
        order_id = str(placed.data["order_id"])
        if order_id in self.accepted:
            self.duplicates.append(order_id)
        self.accepted[order_id] = Attempt(identity=identity, product=product)
        identity.accepted.append(order_id)

    async def place_orders(self, stop: Callable[[], bool]) -> float:
        """The open loop: a tick every 1/rate s to an idle buyer, until `stop()`; returns the
        seconds it ran. The orders on the way are awaited before it returns."""
        idle: deque[Buyer] = deque(self.buyers)
        tasks: set[asyncio.Task[None]] = set()
        interval = 1 / self.args.rate
        began = time.monotonic()
        next_tick = began
        last_log = began

        async def run(buyer: Buyer, product: str) -> None:
            try:
                await self.order(buyer, product)
            finally:
                idle.append(buyer)

        while not stop():
            now = time.monotonic()
            if now - last_log >= 5:
                last_log = now
                log.info(
                    "load: %.0f s, %d ticks, %d accepted, %d failures, %d on the way",
                    now - began,
                    self.dispatched,
                    len(self.accepted),
                    self.recorder.failures,
                    len(tasks),
                )
            if now < next_tick:
                await asyncio.sleep(min(next_tick - now, 0.05))
                continue
            if now - next_tick > 1:  # the loop stalled: do not fire a burst to catch up
                self.skipped["late"] += int((now - next_tick) / interval)
                next_tick = now
            next_tick += interval
            if not idle:
                self.skipped["all_buyers_busy"] += 1
                continue
            product = self.choose_product()
            if product is None:
                self.skipped["no_stock"] += 1
                continue
            self.dispatched += 1
            task = asyncio.create_task(run(idle.popleft(), product))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        seconds = time.monotonic() - began
        log.info("load: stopped after %.1f s; awaiting %d orders on the way", seconds, len(tasks))
        await asyncio.gather(*tasks)
        return seconds

    async def histories(self, deadline: float) -> dict[str, dict[str, Any]]:
        """Every order of every identity used, once all are terminal or at the deadline;
        identities whose history could not be read are missing from the last round."""
        used = [i for i in self.identities if i.used]
        orders: dict[str, dict[str, Any]] = {}
        while True:
            rounds = await asyncio.gather(*(history(self.gateway, who) for who in used))
            orders = {}
            for who, listed in zip(used, rounds, strict=True):
                for order_id, order in (listed or {}).items():
                    orders[order_id] = {**order, "identity": who.email}
            complete = all(listed is not None for listed in rounds)
            open_ = [o for o in orders.values() if o["status"] not in TERMINAL]
            missing = set(self.accepted) - set(orders)
            if complete and not open_ and not missing:
                return orders
            if time.monotonic() > deadline:
                return orders
            log.info("settle: %d open, %d not listed yet", len(open_), len(missing))
            await asyncio.sleep(POLL_INTERVAL)


async def load(args: argparse.Namespace) -> dict[str, Any]:
    recorder = Recorder()
    began = time.monotonic()
    until = Path(args.until_file) if args.until_file else None
    report: dict[str, Any] = {
        "ok": False,
        "base": args.base,
        "error": None,
        "accepted": 0,
        "failures": 0,
    }
    seconds: dict[str, float] = {}
    connections = args.buyers + 8
    async with _session(args, connections=connections) as http:
        gateway = GatewayClient(http=http, base=args.base, recorder=recorder)
        runner = Load(
            args=args,
            gateway=gateway,
            recorder=recorder,
            stock=StockReader(gateway=gateway, admin=None),
        )
        try:
            before, products = await _set_up(runner, args)
        except StepFailed as exc:
            report["error"] = f"setup: {exc}"
            report["failures"] = recorder.failures
            report["first_failures"] = recorder.samples
            report.update(_requests_part(recorder))
            return report
        seconds["setup"] = time.monotonic() - began

        # -- the load ---------------------------------------------------------------------------
        recorder.phase = "load"
        if args.started_file:
            stamp = datetime.now(UTC).isoformat()
            await asyncio.to_thread(Path(args.started_file).write_text, stamp)
        started = time.monotonic()
        stopped_as_asked = True

        def stop() -> bool:
            nonlocal stopped_as_asked
            elapsed = time.monotonic() - started
            if until is None:
                return bool(elapsed >= args.duration)
            if until.exists():
                return True
            if elapsed >= args.max_duration:
                stopped_as_asked = False
                return True
            return False

        seconds["load"] = await runner.place_orders(stop)
        placing_over = time.monotonic()

        # -- the outcome --------------------------------------------------------------------------
        recorder.phase = "settle"
        deadline = time.monotonic() + args.settle_timeout
        orders = await runner.histories(deadline)
        after = await runner.stock.settled(products, max(deadline, time.monotonic() + 30))
        seconds["settle"] = time.monotonic() - placing_over

    seconds["total"] = time.monotonic() - began
    report.update(_verdict(runner, orders, before, after or {}, stopped_as_asked=stopped_as_asked))
    report["accepted"] = len(runner.accepted)
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    report["orders"]["rate_achieved"] = round(
        report["orders"]["posted"] / max(seconds["load"], 1e-3), 2
    )
    report["config"] = {
        "buyers": args.buyers,
        "rate": args.rate,
        "products": sorted(products),
        "admin": runner.stock.admin is not None,
        "until_file": args.until_file,
        "duration": args.duration,
    }
    report.update(_requests_part(recorder))
    report["ok"] = all(report["invariants"].values())
    return report


async def _set_up(
    runner: Load, args: argparse.Namespace
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Products chosen (and restocked with the admin), buyers signed up, the products sellable;
    returns the stock before the load and the products."""
    gateway = runner.gateway
    deadline = time.monotonic() + args.sellable_timeout
    while not (available := await stocked_products(gateway)):
        if time.monotonic() > deadline:
            raise StepFailed("the catalog lists no stocked product")
        await asyncio.sleep(1)
    ranked = sorted(sorted(available), key=lambda p: -available[p])
    products = ranked[: args.products or (ADMIN_PRODUCTS if args.admin_email else None)]
    if args.admin_email:
        admin = await log_in(gateway, args.admin_email, args.admin_password)
        if admin is None:
            raise StepFailed("the admin could not sign in")
        runner.stock.admin = admin
        levels = await runner.stock.levels(products)
        if levels is None:
            raise StepFailed("the admin could not read the stock")
        for product in products:
            if levels[product]["on_hand"] >= args.restock_to:
                continue
            restocked = await gateway.call(
                "PUT",
                f"/api/admin/stock/{product}",
                endpoint="PUT /api/admin/stock/{product_id}",
                expect={200},
                token=admin.token,
                pacer=admin.pacer,
                body={"on_hand": args.restock_to},
            )
            if restocked.failed:
                raise StepFailed(f"could not restock {product}")
        log.info("setup: %s stocked with at least %d units each", products, args.restock_to)
    else:
        products = [p for p in products if available[p] > 0]
        if not products:
            raise StepFailed("no product is in stock")
    for number in range(args.buyers):
        buyer = Buyer(number=number, run=uuid.uuid4().hex[:8])
        runner.buyers.append(buyer)
        if await runner.new_identity(buyer) is None:
            raise StepFailed("a buyer could not sign up")
    first = runner.buyers[0].identity
    assert first is not None
    await wait_until_sellable(gateway, first, products, args.sellable_timeout)
    before = await runner.stock.settled(products, time.monotonic() + 30)
    if before is None:
        raise StepFailed("could not read the stock")
    if any(level.get("reserved", 0) for level in before.values()):
        raise StepFailed(f"units stay reserved, someone else is shopping: {before}")
    runner.remaining = {p: before[p]["available"] for p in products}
    capacity = sum(runner.remaining.values())
    log.info("setup: %d buyers, %d units available over %s", args.buyers, capacity, products)
    if capacity < args.rate * 300:
        log.warning("setup: %d units may not last 5 minutes at %s orders/s", capacity, args.rate)
    return before, products


def _verdict(
    runner: Load,
    orders: Mapping[str, dict[str, Any]],
    before: Mapping[str, dict[str, int]],
    after: Mapping[str, dict[str, int]],
    *,
    stopped_as_asked: bool,
) -> dict[str, Any]:
    accepted = runner.accepted
    missing = sorted(set(accepted) - set(orders))
    unexpected = [o for o in orders if o not in accepted]
    beyond_unanswered = {
        who.email: n
        for who in runner.identities
        if (n := sum(orders[o]["identity"] == who.email for o in unexpected)) > who.unanswered_posts
    }
    not_terminal = sorted(o for o, order in orders.items() if order["status"] not in TERMINAL)

    sold: Counter[str] = Counter()
    demand: Counter[str] = Counter()
    for order in orders.values():
        for line in order["lines"]:
            demand[line["product_id"]] += line["quantity"]
            if order["status"] == "confirmed":
                sold[line["product_id"]] += line["quantity"]
    scarce = {p for p in demand if demand[p] > before.get(p, {}).get("available", 0)}
    wrong = []
    for order_id, order in orders.items():
        if order["status"] == "confirmed" or order["status"] not in TERMINAL:
            continue
        for_stock = any(w in (order["reason"] or "") for w in STOCK_REASONS) and bool(
            scarce & {line["product_id"] for line in order["lines"]}
        )
        if not (order["status"] == "cancelled" and for_stock):
            wrong.append(
                {"order_id": order_id, "status": order["status"], "reason": order["reason"]}
            )

    stock: dict[str, Any] = {}
    conserved = bool(after) and set(after) >= set(before)
    released = True
    for product, was in sorted(before.items()):
        now = after.get(product, {})
        ok = bool(now) and all(
            now.get(k) == was[k] - sold[product] for k in ("available", "on_hand") if k in was
        )
        released = released and now.get("reserved", 0) == 0
        conserved = conserved and ok
        stock[product] = {"before": was, "after": now, "sold": sold[product], "conserved": ok}

    statuses = Counter(order["status"] for order in orders.values())
    reasons = Counter(
        order["reason"] for order in orders.values() if order["status"] != "confirmed"
    )
    return {
        "failures": runner.recorder.failures,
        "first_failures": runner.recorder.samples,
        "orders": {
            "dispatched": runner.dispatched,
            "posted": sum(who.posts for who in runner.identities),
            "accepted": len(accepted),
            "unanswered_posts": sum(who.unanswered_posts for who in runner.identities),
            "skipped_ticks": dict(runner.skipped),
            "listed": len(orders),
            "statuses": dict(statuses),
            "cancel_reasons": dict(reasons),
            "not_terminal": len(not_terminal),
            "not_terminal_ids": not_terminal[:FAILURE_SAMPLES],
            "missing": missing[:FAILURE_SAMPLES],
            "duplicates": runner.duplicates[:FAILURE_SAMPLES],
            "unexpected": unexpected[:FAILURE_SAMPLES],
            "wrong_outcome": wrong[:FAILURE_SAMPLES],
            "identities": len(runner.identities),
        },
        "stock": {"source": "admin" if runner.stock.admin else "public", "products": stock},
        "invariants": {
            "no_failures": runner.recorder.failures == 0,
            "orders_accepted": bool(accepted),
            "no_duplicates": not runner.duplicates,
            "none_missing": not missing,
            "no_unexpected_orders": not beyond_unanswered,
            "all_terminal": not not_terminal and not missing,
            "outcomes_as_dictated": not wrong,
            "stock_conserved": conserved,
            "stock_released": released,
            "stock_sufficed": runner.skipped["no_stock"] == 0,
            "stopped_as_asked": stopped_as_asked,
        },
    }


def _requests_part(recorder: Recorder) -> dict[str, Any]:
    return {"requests": recorder.requests(), "latency_ms": recorder.latency_ms()}


# -- the command line -----------------------------------------------------------------------------


def _session(args: argparse.Namespace, *, connections: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=min(5.0, args.timeout))
    # Idle connections are dropped well before the gateway's 30 s keep-alive would drop them,
    # so a request never races the server's close.
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=10)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shop_client", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--base", required=True, help="the web gateway, e.g. http://host:30080")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument(
        "--sellable-timeout", type=float, default=60.0, help="seconds to await a sellable product"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("smoke", help="one buyer, one order, confirmed")
    check.add_argument("--confirm-timeout", type=float, default=120.0)
    run = commands.add_parser("load", help="orders at a rate; then verify every outcome")
    run.add_argument("--buyers", type=int, default=10)
    run.add_argument("--rate", type=float, default=5.0, help="orders a second, in total")
    stop = run.add_mutually_exclusive_group(required=True)
    stop.add_argument("--until-file", help="place orders until this file exists")
    stop.add_argument("--duration", type=float, help="place orders for this many seconds")
    run.add_argument(
        "--max-duration", type=float, default=900.0, help="give up on --until-file after this"
    )
    run.add_argument("--started-file", help="written once the first order is on its way")
    run.add_argument("--settle-timeout", type=float, default=180.0)
    run.add_argument(
        "--products",
        type=int,
        help="how many products to buy (the most available; default: 8 with the admin, else all)",
    )
    run.add_argument("--admin-email")
    run.add_argument("--admin-password")
    run.add_argument("--restock-to", type=int, default=1000, help="units on hand (admin only)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.base = args.base.rstrip("/")
    if args.command == "load":
        if args.buyers < 1 or args.rate <= 0 or (args.products or 1) < 1:
            parser.error("--buyers, --rate and --products must be positive")
        if args.rate / args.buyers > MAX_RATE_PER_BUYER:
            parser.error(
                f"at most {MAX_RATE_PER_BUYER:g} orders/s per buyer (the gateway's rate limit "
                f"per client): use --buyers {int(-(-args.rate // MAX_RATE_PER_BUYER))} or more"
            )
        if bool(args.admin_email) != bool(args.admin_password):
            parser.error("--admin-email and --admin-password go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    command = smoke if args.command == "smoke" else load
    try:
        report = asyncio.run(command(args))
    except Exception as exc:  # a bug, or an answer of a shape it did not expect: still a report
        log.exception("%s crashed", args.command)
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    report = {"ok": report.pop("ok"), "command": args.command, **report}
    print(json.dumps(report), flush=True)  # one line: the last line of stdout is the report
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
