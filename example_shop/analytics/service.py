"""Analytics: sales per product in one-minute windows, trending products and totals.

    shop.orders.events  OrderConfirmed  ->  units and revenue per product and minute (kept ~1 h),
                                            the shop's per minute (kept ~1 day), all-time totals
                        OrderPlaced     ->  the count of placed orders (all time, per minute)

    GET /analytics/sales?product_id=&minutes=15   admin: a product's sales, minute by minute
    GET /analytics/trending?minutes=15&limit=5    admin: the most units sold in the last minutes
    GET /analytics/summary                        admin: orders placed/confirmed, revenue, top 5
    GET /analytics/products?limit=10              admin: the best sellers of all time, named
    GET /analytics/timeline?minutes=60            admin: the shop's sales, minute by minute

`/analytics/products` answers {"products": [{"product_id", "name", "units", "revenue_cents"}]},
most units first (then more revenue, then product id), counted since the service's data begins;
a product's name is the latest the orders' lines gave it (null when none did: orders placed
before lines carried names). `/analytics/timeline` answers {"minutes": [{"minute", "orders",
"units", "revenue_cents", "placed"}]}, one entry per minute of the last `minutes` (1 to 1440,
the current minute included), oldest first, zeros where nothing sold: `orders` counts confirmed
orders (whose units and revenue the entry sums), `placed` orders placed. Invalid queries are
refused with a 422 problem naming the field.

**Two ways to consume, one implementation of the math** (`example_shop.analytics.ledger`):

- On the in-memory bus (`MSA_TRANSPORT=memory`, the one-process shop) the events arrive through
  ordinary `@handles` subscriptions and the ledger lives in dicts. Simple and instant, but the
  state is the process's: a restart starts from zero (the in-memory bus keeps nothing either).
- On Kafka (`MSA_TRANSPORT=kafka`) the service is a `StreamingAnalytics`, which runs the same
  ledger inside Faust agents (`framework.streams`, app id `analytics-streams`) on Faust tables.
  Every update is written to the tables' changelog topics, so a restarted service recovers its
  windows and totals, and resumes where it committed (the first start reads the topic's whole
  history: totals are all-time). Queries answer from the tables this process holds, and the
  tables are keyed by product rather than by the records' key (`use_partitioner`), so this
  mode is meant to run as ONE replica; scaling it out would need a repartition by product and
  query routing. Readiness (`/ready`) waits for Faust to have joined and recovered.

Both modes count each order once (redeliveries are recognised by order id for an hour) and
window sales by the events' CloudEvents `time`.

Environment: the `ServiceSettings` variables (MSA_TRANSPORT, KAFKA_BOOTSTRAP, ...), MSA_HTTP_PORT
(default `PORTS["analytics"]`). `Analytics(clock=...)` freezes the time queries are relative to;
`Analytics(app_id=...)` names the Faust app (tests give each run its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, Field

from example_shop.analytics.ledger import (
    BestSellers,
    ProductSales,
    SalesLedger,
    Summary,
    Timeline,
    Trending,
    Windows,
)
from example_shop.common import default_settings, require_admin
from example_shop.contracts import TOPICS, OrderConfirmed, OrderPlaced
from framework.bus import Message
from framework.http import json_response
from framework.messages import validate_payload
from framework.service import Service, ServiceSettings, handles, route
from framework.types import Transport

if TYPE_CHECKING:  # framework.streams imports Faust, which only the Kafka mode needs
    from framework.streams import CloudEvents, StreamTable

__all__ = [
    "Analytics",
    "BestSellersQuery",
    "SalesQuery",
    "StreamingAnalytics",
    "TimelineQuery",
    "TrendingQuery",
]

WINDOWS = Windows(size=60, retention=3600, timeline_retention=24 * 3600)


class SalesQuery(BaseModel):
    """The query string of `GET /analytics/sales`."""

    product_id: str = Field(min_length=1)
    minutes: int = Field(15, ge=1, le=WINDOWS.max_minutes)


class TrendingQuery(BaseModel):
    """The query string of `GET /analytics/trending`."""

    minutes: int = Field(15, ge=1, le=WINDOWS.max_minutes)
    limit: int = Field(5, ge=1, le=50)


class BestSellersQuery(BaseModel):
    """The query string of `GET /analytics/products`."""

    limit: int = Field(10, ge=1, le=100)


class TimelineQuery(BaseModel):
    """The query string of `GET /analytics/timeline`."""

    minutes: int = Field(60, ge=1, le=WINDOWS.timeline_minutes)


def _settings(settings: ServiceSettings | None) -> ServiceSettings:
    return default_settings("analytics", settings)


def _on_kafka(settings: ServiceSettings, transport: Transport | None) -> bool:
    return (transport.name if transport is not None else settings.transport) == "kafka"


class Analytics(Service):
    """Sales analytics of confirmed orders; on Kafka, `Analytics(...)` is a
    `StreamingAnalytics` (see the module docstring)."""

    name = "analytics"

    def __new__(
        cls,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        **options: Any,
    ) -> Analytics:
        if cls is Analytics and _on_kafka(_settings(settings), transport):
            cls = StreamingAnalytics
        return super().__new__(cls)

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        app_id: str | None = None,
    ) -> None:
        """`clock`: the time queries are relative to; `app_id`: the Faust app (Kafka only)."""
        super().__init__(_settings(settings), transport=transport)
        self.clock = clock
        self.ledger = self._make_ledger(app_id)

    def _make_ledger(self, app_id: str | None) -> SalesLedger:
        return SalesLedger(products={}, totals={}, timeline={}, seen={}, windows=WINDOWS)

    # -- consuming (in-memory bus) ---------------------------------------------------------------

    # Sales figures need placed and confirmed orders; the saga's progress events are skipped.
    @handles(TOPICS.ORDERS_EVENTS, unhandled="skip")
    async def on_order_placed(self, order: OrderPlaced, message: Message[OrderPlaced]) -> None:
        self.ledger.placed(order, message.envelope.time, self.clock())

    @handles(TOPICS.ORDERS_EVENTS, unhandled="skip")
    async def on_order_confirmed(
        self, order: OrderConfirmed, message: Message[OrderConfirmed]
    ) -> None:
        self.ledger.confirmed(order, message.envelope.time, self.clock())

    # -- queries ---------------------------------------------------------------------------------

    def _admin_query(self, request: web.Request) -> None:
        require_admin(request)
        if not self.ready:  # Faust tables exist only once the streams have started
            raise web.HTTPServiceUnavailable(text="analytics is starting")

    @route("GET", "/analytics/sales", response=ProductSales)
    async def get_sales(self, request: web.Request) -> web.Response:
        """A product's units and revenue in each minute of the last `minutes` (admin)."""
        self._admin_query(request)
        query = validate_payload(dict(request.query), SalesQuery)
        return json_response(self.ledger.sales(query.product_id, query.minutes, self.clock()))

    @route("GET", "/analytics/trending", response=Trending)
    async def get_trending(self, request: web.Request) -> web.Response:
        """The products with the most units sold in the last `minutes` (admin)."""
        self._admin_query(request)
        query = validate_payload(dict(request.query), TrendingQuery)
        return json_response(self.ledger.trending(query.minutes, query.limit, self.clock()))

    @route("GET", "/analytics/summary", response=Summary)
    async def get_summary(self, request: web.Request) -> web.Response:
        """All-time orders placed and confirmed, revenue and the top products (admin)."""
        self._admin_query(request)
        return json_response(self.ledger.summary())

    @route("GET", "/analytics/products", response=BestSellers)
    async def get_best_sellers(self, request: web.Request) -> web.Response:
        """The products with the most units sold of all time, with their names (admin)."""
        self._admin_query(request)
        query = validate_payload(dict(request.query), BestSellersQuery)
        return json_response(self.ledger.best_sellers(query.limit))

    @route("GET", "/analytics/timeline", response=Timeline)
    async def get_timeline(self, request: web.Request) -> web.Response:
        """The shop's orders, units and revenue in each minute of the last `minutes` (admin)."""
        self._admin_query(request)
        query = validate_payload(dict(request.query), TimelineQuery)
        return json_response(self.ledger.by_minute(query.minutes, self.clock()))


class StreamingAnalytics(Analytics):
    """Analytics on Kafka: the same ledger, run by Faust agents on changelog-backed tables.

    The two handlers are redefined here without `@handles`, so this class subscribes nothing
    on the bus: Faust alone consumes the orders' events (in its own consumer group).
    """

    name = "analytics"

    def _make_ledger(self, app_id: str | None) -> SalesLedger:
        from framework.streams import StreamsResource

        self.streams = self.use(StreamsResource(self, app_id=app_id))

        def table(name: str) -> StreamTable:
            return self.streams.table(name, default=None, use_partitioner=True)

        self.streams.agent(TOPICS.ORDERS_EVENTS, OrderPlaced, name="orders-placed")(
            self._count_placed
        )
        self.streams.agent(TOPICS.ORDERS_EVENTS, OrderConfirmed, name="orders-confirmed")(
            self._count_confirmed
        )
        return SalesLedger(
            products=table("products"),
            totals=table("totals"),
            timeline=table("timeline"),
            seen=table("seen"),
            windows=WINDOWS,
        )

    # Not handlers here (no @handles): the agents below do their work.
    async def on_order_placed(self, order: OrderPlaced, message: Message[OrderPlaced]) -> None:
        await super().on_order_placed(order, message)

    async def on_order_confirmed(
        self, order: OrderConfirmed, message: Message[OrderConfirmed]
    ) -> None:
        await super().on_order_confirmed(order, message)

    async def _count_placed(self, events: CloudEvents[OrderPlaced]) -> None:
        async for envelope, order in events:
            self.ledger.placed(order, envelope.time, self.clock())

    async def _count_confirmed(self, events: CloudEvents[OrderConfirmed]) -> None:
        async for envelope, order in events:
            self.ledger.confirmed(order, envelope.time, self.clock())
