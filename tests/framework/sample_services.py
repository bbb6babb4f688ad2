"""Services the framework's own tests run: in process (harness, HTTP) and as `msa run` processes.

`Shop` is the in-process sample: it consumes orders and price quotes, publishes accepted orders
and has HTTP routes. `make_shop` builds the same service on other topics (fresh topics per test
on a real broker).

`NumberRecorder`, `SlowWorker` (and `ImpatientWorker`, the same in another group) are run as
subprocesses by `test_runner.py`, as is `BrokenAtStart`; they read from the environment:

    SAMPLE_TOPIC    the topic they consume (read when this module is imported)
    SAMPLE_OUTPUT   the file they append one line per event to (flushed and fsynced, so a
                    SIGKILL never loses a line for work the broker was told is done)
    SAMPLE_DELAY    seconds each handler sleeps (to give a test time to act mid-stream)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, Field

from framework.bus import Message
from framework.http import json_response, read_json
from framework.messages import message_type
from framework.observability.tracing import get_correlation_id, get_trace
from framework.service import Service, ServiceSettings, handles, route

log = logging.getLogger("tests.sample")


class OrderLine(BaseModel):
    sku: str
    quantity: int = Field(gt=0)


@message_type("sample.order.placed")
class OrderPlaced(BaseModel):
    order_id: str
    total: float
    lines: list[OrderLine]


@message_type("sample.order.accepted")
class OrderAccepted(BaseModel):
    order_id: str
    line_count: int


@message_type("sample.price.requested")
@dataclass
class PriceRequested:
    sku: str
    quantity: int


@dataclass
class Price:
    sku: str
    amount: float


@message_type("sample.number")
class Number(BaseModel):
    n: int


@dataclass(frozen=True, kw_only=True)
class ShopTopics:
    orders: str = "sample.orders"
    prices: str = "sample.prices"
    accepted: str = "sample.accepted"


UNIT_PRICE = 2.5


def make_shop(topics: ShopTopics | None = None, *, name: str = "sample-shop") -> type[Service]:
    """The `Shop` service class, consuming and publishing on `topics`, in consumer group `name`."""
    shop_topics = topics or ShopTopics()
    service_name = name

    class Shop(Service):
        """Accepts placed orders and quotes prices."""

        name = service_name
        publishes: ClassVar[Mapping[str, Sequence[type]]] = {shop_topics.accepted: [OrderAccepted]}

        def __init__(self, settings: ServiceSettings | None = None, **options: Any) -> None:
            super().__init__(settings, **options)
            self.orders: list[tuple[OrderPlaced, Message[OrderPlaced]]] = []
            self.handler_trace_ids: list[str] = []

        @handles(shop_topics.orders)
        async def on_order_placed(self, order: OrderPlaced, message: Message[OrderPlaced]) -> None:
            self.orders.append((order, message))
            trace = get_trace()
            assert trace is not None
            self.handler_trace_ids.append(trace.trace_id)
            await self.publish(
                shop_topics.accepted,
                OrderAccepted(order_id=order.order_id, line_count=len(order.lines)),
                key=order.order_id,
            )

        @handles(shop_topics.prices)
        async def on_price_requested(self, request: PriceRequested) -> Price:
            if request.quantity < 0:
                raise ValueError(f"cannot price {request.quantity} items")
            return Price(sku=request.sku, amount=request.quantity * UNIT_PRICE)

        @route("GET", "/orders/{order_id}")
        async def get_order(self, request: web.Request) -> web.Response:
            """One order, with the request's correlation and trace ids."""
            trace = get_trace()
            return json_response(
                {
                    "order_id": request.match_info["order_id"],
                    "correlation_id": get_correlation_id(),
                    "trace_id": trace.trace_id if trace is not None else None,
                }
            )

        @route("POST", "/orders", body=OrderPlaced, response=OrderAccepted)
        async def place_order(self, request: web.Request) -> web.Response:
            """Place an order."""
            order = await read_json(request, OrderPlaced)
            return json_response(
                OrderAccepted(order_id=order.order_id, line_count=len(order.lines)), status=201
            )

        @route("GET", "/boom")
        async def boom(self, request: web.Request) -> web.Response:
            raise RuntimeError("database password is hunter2")

    return Shop


Shop = make_shop()


# -- services run as processes by test_runner.py -------------------------------------------------

SAMPLE_TOPIC = os.environ.get("SAMPLE_TOPIC", "sample.numbers")


class _LineWriter:
    """Appends lines to `SAMPLE_OUTPUT`, each one flushed and fsynced before the handler returns."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._file: IO[str] | None = None

    async def start(self) -> None:
        if self.path is not None:
            self._file = self.path.open("a", encoding="utf-8")

    async def stop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, line: str) -> None:
        if self._file is None:
            return
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def _delay(settings: ServiceSettings) -> float:
    return float(settings.env.get("SAMPLE_DELAY", "0"))


class NumberRecorder(Service):
    """Writes `<n> <partition> <offset>` for every number it handles."""

    name = "sample-recorder"

    def __init__(self, settings: ServiceSettings | None = None, **options: Any) -> None:
        super().__init__(settings, **options)
        self.output = self.use(_LineWriter(self.settings.env.get("SAMPLE_OUTPUT")))
        self.delay = _delay(self.settings)

    # One at a time, in fetch order: what a crash makes it redo is the last stretch it handled.
    @handles(SAMPLE_TOPIC, concurrency=1)
    async def on_number(self, number: Number, message: Message[Number]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        log.info("recorded number %d", number.n)
        self.output.write(f"{number.n} {message.record.partition} {message.record.offset}")


class SlowWorker(Service):
    """Writes `start <n> <partition> <offset>`, works `SAMPLE_DELAY` seconds, writes `done ...`.

    One record at a time per partition (`ordering="partition"`), so at a stop each partition has
    at most one record in flight and the rest of its records wait in its lane, unstarted.
    """

    name = "sample-slow"

    def __init__(self, settings: ServiceSettings | None = None, **options: Any) -> None:
        super().__init__(settings, **options)
        self.output = self.use(_LineWriter(self.settings.env.get("SAMPLE_OUTPUT")))
        self.delay = _delay(self.settings)

    @handles(SAMPLE_TOPIC, ordering="partition")
    async def on_number(self, number: Number, message: Message[Number]) -> None:
        where = f"{number.n} {message.record.partition} {message.record.offset}"
        self.output.write(f"start {where}")
        await asyncio.sleep(self.delay)
        self.output.write(f"done {where}")


class ImpatientWorker(SlowWorker):
    """`SlowWorker` in a group of its own, for tests that leave their group uncleanly."""

    name = "sample-impatient"


class _Unreachable:
    async def start(self) -> None:
        raise ConnectionRefusedError("the search index is unreachable")

    async def stop(self) -> None:
        return None


class BrokenAtStart(Service):
    """Fails to start: its one resource cannot be reached."""

    name = "sample-broken"

    def __init__(self, settings: ServiceSettings | None = None, **options: Any) -> None:
        super().__init__(settings, **options)
        self.use(_Unreachable())


class Ledger(Service):
    """Owns a PostgreSQL database (POSTGRES_URL) with two migrations, for `msa migrate`."""

    name = "sample-ledger"

    def __init__(self, settings: ServiceSettings | None = None, **options: Any) -> None:
        from framework.persistence.postgres import Migration, PostgresResource

        super().__init__(settings, **options)
        self.db = self.use(
            PostgresResource(
                self.settings.env.get("POSTGRES_URL", ""),
                migrations=[
                    Migration(1, "entries", "create table entries (id text primary key)"),
                    Migration(2, "amounts", "alter table entries add column cents int"),
                ],
            )
        )
