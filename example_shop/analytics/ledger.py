"""The sales math, once: tumbling windows per product, trending, totals, on any mutable mapping.

`SalesLedger` keeps its state in four mappings and never mutates a value in place (it reads,
builds a new value and assigns it). So the same code runs on plain dicts (the in-memory bus) and
on Faust tables (Kafka), where each assignment is what writes the table's changelog. Values are
JSON-shaped (string keys, ints), as a Faust changelog stores them:

    products  product_id -> {"units": 12, "revenue_cents": 3400,       (all time)
                             "name": "Classic White Mug",              (the latest an order
                                                                        named it, if any did)
                             "windows": {"1767225600": [3, 850], ...}}  (window start -> units,
                                                                          revenue; kept ~1 h)
    totals    "orders"   -> {"placed": 40, "confirmed": 31, "revenue_cents": 912000}
    timeline  "1767225600" -> {"placed": 3, "confirmed": 2,            (the whole shop's minute:
                               "units": 5, "revenue_cents": 4200}       kept ~1 day)
    seen      "confirmed:<order_id>" -> event time   (deduplication of redelivered events,
                                                       remembered for the retention period)

Windows are tumbling, `Windows.size` seconds long (one minute), aligned to the Unix epoch, and
chosen by the event's own CloudEvents `time`, not by when it is processed. A product's window
older than `Windows.retention` (one hour) is dropped, a minute of the timeline older than the
timeline's retention (a day); an event that old still counts in the totals.
Queries are pure reads relative to a `now` the caller passes (tests freeze it).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from example_shop.contracts import OrderConfirmed, OrderPlaced

__all__ = [
    "BestSellers",
    "MinuteSales",
    "NamedProductTotal",
    "ProductSales",
    "ProductTotal",
    "SalesLedger",
    "Summary",
    "Timeline",
    "Trending",
    "WindowSales",
    "Windows",
]

_ORDERS = "orders"
_NO_MINUTE = {"placed": 0, "confirmed": 0, "units": 0, "revenue_cents": 0}


class WindowSales(BaseModel):
    start: datetime
    units: int
    revenue_cents: int


class ProductTotal(BaseModel):
    product_id: str
    units: int
    revenue_cents: int


class ProductSales(ProductTotal):
    """A product's sales over the last `minutes`, with each one-minute window."""

    minutes: int
    windows: list[WindowSales]


class Trending(BaseModel):
    minutes: int
    items: list[ProductTotal]


class Summary(BaseModel):
    orders_placed: int
    orders_confirmed: int
    revenue_cents: int
    top_products: list[ProductTotal]


class NamedProductTotal(ProductTotal):
    """A product's sales with its name, as the orders named it (None: none did)."""

    name: str | None


class BestSellers(BaseModel):
    products: list[NamedProductTotal]


class MinuteSales(BaseModel):
    """The whole shop's minute: `orders` confirmed (and their units and revenue), and orders
    `placed`."""

    minute: datetime
    orders: int
    units: int
    revenue_cents: int
    placed: int


class Timeline(BaseModel):
    minutes: list[MinuteSales]


@dataclass(frozen=True, kw_only=True)
class Windows:
    """Tumbling windows of `size` seconds, kept for `retention` seconds (a product's; the
    timeline's are the same size, kept for `timeline_retention` seconds)."""

    size: int = 60
    retention: int = 3600
    timeline_retention: int = 24 * 3600

    @property
    def max_minutes(self) -> int:
        return self.retention // 60

    @property
    def timeline_minutes(self) -> int:
        return self.timeline_retention // 60

    def start(self, at: float) -> int:
        """The start of the window that contains `at`."""
        return int(at // self.size) * self.size

    def last(self, minutes: int, now: float) -> range:
        """Starts of the windows covering the last `minutes` (the current one included)."""
        count = max(1, -(-minutes * 60 // self.size))
        current = self.start(now)
        return range(current - (count - 1) * self.size, current + 1, self.size)

    def oldest(self, now: float) -> int:
        """The start of the oldest window still kept."""
        return self.last(self.max_minutes, now).start

    def oldest_minute(self, now: float) -> int:
        """The start of the oldest minute of the timeline still kept."""
        return self.last(self.timeline_minutes, now).start


class SalesLedger:
    """Windowed sales per product, trending, totals and the shop's timeline over four mappings
    (see the module docstring). `sweep_every` seconds at most, recording also forgets expired
    windows, minutes and deduplication entries."""

    def __init__(
        self,
        *,
        products: MutableMapping[str, Any],
        totals: MutableMapping[str, Any],
        timeline: MutableMapping[str, Any],
        seen: MutableMapping[str, Any],
        windows: Windows | None = None,
        sweep_every: float = 60.0,
    ) -> None:
        self.products = products
        self.totals = totals
        self.timeline = timeline
        self.seen = seen
        self.windows = windows or Windows()
        self.sweep_every = sweep_every
        self._swept = 0.0

    # -- recording ------------------------------------------------------------------------------

    def placed(self, order: OrderPlaced, at: datetime, now: float) -> bool:
        """Count a placed order; False when it was counted already."""
        if not self._first_time(f"placed:{order.order_id}", at):
            return False
        self._add_to_totals(placed=1)
        self._add_to_minute(at, now, placed=1)
        self._maybe_sweep(now)
        return True

    def confirmed(self, order: OrderConfirmed, at: datetime, now: float) -> bool:
        """Count a confirmed order's sales in the window of `at`; False for a duplicate."""
        if not self._first_time(f"confirmed:{order.order_id}", at):
            return False
        window = self.windows.start(at.timestamp())
        oldest = self.windows.oldest(now)
        for line in order.lines:
            revenue = line.quantity * line.unit_price_cents
            product = self.products.get(line.product_id) or {
                "units": 0,
                "revenue_cents": 0,
                "windows": {},
            }
            kept = {s: v for s, v in product["windows"].items() if int(s) >= oldest}
            if window >= oldest:
                units, cents = kept.get(str(window), (0, 0))
                kept[str(window)] = [units + line.quantity, cents + revenue]
            self.products[line.product_id] = {
                "units": product["units"] + line.quantity,
                "revenue_cents": product["revenue_cents"] + revenue,
                "name": line.name or product.get("name"),
                "windows": kept,
            }
        self._add_to_totals(confirmed=1, revenue_cents=order.total_cents)
        self._add_to_minute(
            at,
            now,
            confirmed=1,
            units=sum(line.quantity for line in order.lines),
            revenue_cents=order.total_cents,
        )
        self._maybe_sweep(now)
        return True

    def _first_time(self, key: str, at: datetime) -> bool:
        if key in self.seen:
            return False
        self.seen[key] = at.timestamp()
        return True

    def _add_to_totals(self, **amounts: int) -> None:
        totals = dict(self.totals.get(_ORDERS) or {})
        for name, amount in amounts.items():
            totals[name] = totals.get(name, 0) + amount
        self.totals[_ORDERS] = totals

    def _add_to_minute(self, at: datetime, now: float, **amounts: int) -> None:
        minute = self.windows.start(at.timestamp())
        if minute < self.windows.oldest_minute(now):
            return
        counts = dict(self.timeline.get(str(minute)) or _NO_MINUTE)
        for name, amount in amounts.items():
            counts[name] += amount
        self.timeline[str(minute)] = counts

    def _maybe_sweep(self, now: float) -> None:
        if now - self._swept < self.sweep_every:
            return
        self._swept = now
        oldest = self.windows.oldest(now)
        for key, at in list(self.seen.items()):
            if at < now - self.windows.retention:
                del self.seen[key]
        for product_id, product in list(self.products.items()):
            kept = {s: v for s, v in product["windows"].items() if int(s) >= oldest}
            if len(kept) != len(product["windows"]):
                self.products[product_id] = {**product, "windows": kept}
        oldest_minute = self.windows.oldest_minute(now)
        for minute in list(self.timeline):
            if int(minute) < oldest_minute:
                del self.timeline[minute]

    # -- queries --------------------------------------------------------------------------------

    def sales(self, product_id: str, minutes: int, now: float) -> ProductSales:
        """One product's units and revenue in each window of the last `minutes`."""
        product = self.products.get(product_id) or {"windows": {}}
        windows = [
            WindowSales(
                start=datetime.fromtimestamp(start, UTC),
                units=product["windows"].get(str(start), (0, 0))[0],
                revenue_cents=product["windows"].get(str(start), (0, 0))[1],
            )
            for start in self.windows.last(minutes, now)
        ]
        return ProductSales(
            product_id=product_id,
            minutes=minutes,
            units=sum(w.units for w in windows),
            revenue_cents=sum(w.revenue_cents for w in windows),
            windows=windows,
        )

    def trending(self, minutes: int, limit: int, now: float) -> Trending:
        """The products with the most units sold in the last `minutes` (ties: more revenue,
        then product id)."""
        starts = [str(start) for start in self.windows.last(minutes, now)]
        items = []
        for product_id, product in list(self.products.items()):
            sold = [product["windows"][s] for s in starts if s in product["windows"]]
            units = sum(u for u, _ in sold)
            if units:
                items.append(
                    ProductTotal(
                        product_id=product_id,
                        units=units,
                        revenue_cents=sum(c for _, c in sold),
                    )
                )
        return Trending(minutes=minutes, items=_ranked(items)[:limit])

    def summary(self, limit: int = 5) -> Summary:
        """All-time totals and the best-selling products by units."""
        totals = self.totals.get(_ORDERS) or {}
        products = [
            ProductTotal(product_id=product_id, units=p["units"], revenue_cents=p["revenue_cents"])
            for product_id, p in list(self.products.items())
        ]
        return Summary(
            orders_placed=totals.get("placed", 0),
            orders_confirmed=totals.get("confirmed", 0),
            revenue_cents=totals.get("revenue_cents", 0),
            top_products=_ranked(products)[:limit],
        )

    def best_sellers(self, limit: int) -> BestSellers:
        """The products with the most units sold ever (since the ledger's data begins), with
        their names."""
        products = [
            NamedProductTotal(
                product_id=product_id,
                name=p.get("name"),
                units=p["units"],
                revenue_cents=p["revenue_cents"],
            )
            for product_id, p in list(self.products.items())
        ]
        return BestSellers(products=_ranked(products)[:limit])

    def by_minute(self, minutes: int, now: float) -> Timeline:
        """The shop's orders, units and revenue in each minute of the last `minutes` (the
        current one included), oldest first; a minute without any is all zeros."""
        entries = []
        for start in self.windows.last(minutes, now):
            counts = self.timeline.get(str(start)) or _NO_MINUTE
            entries.append(
                MinuteSales(
                    minute=datetime.fromtimestamp(start, UTC),
                    orders=counts["confirmed"],
                    units=counts["units"],
                    revenue_cents=counts["revenue_cents"],
                    placed=counts["placed"],
                )
            )
        return Timeline(minutes=entries)


_Ranked = TypeVar("_Ranked", bound=ProductTotal)


def _ranked(items: list[_Ranked]) -> list[_Ranked]:
    return sorted(items, key=lambda p: (-p.units, -p.revenue_cents, p.product_id))
