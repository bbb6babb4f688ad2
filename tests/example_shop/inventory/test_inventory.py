"""The inventory service on a real PostgreSQL, driven through the in-memory bus and HTTP.

Commands are published the way the orders saga sends them (an envelope carrying the saga id as
correlation id); replies are read from the `shop.inventory.events` topic, where the outbox relay
publishes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from example_shop.contracts import (
    TOPICS,
    CommitStock,
    OrderLine,
    ReleaseStock,
    ReserveStock,
    StockLevelChanged,
    StockRejected,
    StockReleased,
    StockReserved,
)
from example_shop.inventory import Inventory, RestockProduct
from example_shop.inventory.service import AVAILABILITY_LIMIT
from framework.bus import MemoryTransport
from framework.errors import PersistenceError
from framework.messages import Envelope, from_binary, to_binary, type_name
from framework.service import ServiceSettings
from framework.testing import ServiceHarness

pytestmark = pytest.mark.postgres

ADMIN = {"x-user-id": "root", "x-user-roles": "admin"}
ALICE = {"x-user-id": "alice", "x-user-roles": "customer"}


@dataclass
class Stockroom:
    """The running service, its harness, the bus it listens on and an HTTP client."""

    service: Inventory
    harness: ServiceHarness
    transport: MemoryTransport
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.service.http_port}{path}"

    async def send(
        self, command: Any, *, saga_id: str = "saga-1", envelope: Envelope[Any] | None = None
    ) -> Envelope[Any]:
        """Send a command as the saga does (or re-send `envelope`, same id: a redelivery)."""
        if envelope is None:
            envelope = Envelope(
                type=type_name(type(command)),
                source="orders",
                data=command,
                correlationid=saga_id,
                partitionkey=getattr(command, "order_id", None)
                or getattr(command, "product_id", None),
            )
        key, value, headers = to_binary(envelope)
        await self.transport.send(TOPICS.INVENTORY_COMMANDS, value, key=key, headers=headers)
        return envelope

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until the relay published everything committed so far."""
        deadline = time.monotonic() + timeout
        while await self.service.outbox.pending():
            assert time.monotonic() < deadline, "the outbox was not drained"
            await asyncio.sleep(0.02)

    def levels(self) -> list[StockLevelChanged]:
        """The stock levels announced so far, in the order published."""
        records = [from_binary(r) for r in self.transport.records(TOPICS.STOCK_EVENTS)]
        return [StockLevelChanged.model_validate_json(e.data) for e in records]

    def replies(self) -> list[Envelope[bytes]]:
        return [from_binary(r) for r in self.transport.records(TOPICS.INVENTORY_EVENTS)]

    async def wait_replies(self, count: int, timeout: float = 10.0) -> list[Envelope[bytes]]:
        await eventually(lambda: len(self.replies()) >= count, timeout)
        return self.replies()

    async def stock(self, product_id: str) -> tuple[int, int]:
        async with self.service.db.connection() as conn:
            row = await conn.fetchrow(
                "select on_hand, reserved from stock where product_id = $1", product_id
            )
        return (row["on_hand"], row["reserved"])

    async def reservations(self, order_id: str) -> dict[str, int]:
        async with self.service.db.connection() as conn:
            rows = await conn.fetch(
                "select product_id, quantity from reservations where order_id = $1", order_id
            )
        return {r["product_id"]: r["quantity"] for r in rows}


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
async def stockroom(postgres_database: str) -> AsyncIterator[Stockroom]:
    transport = MemoryTransport()
    settings = ServiceSettings.from_env(
        {
            "INVENTORY_DATABASE_URL": postgres_database,
            "MSA_HTTP_HOST": "127.0.0.1",
            "MSA_HTTP_PORT": "0",
        }
    )
    service = Inventory(settings, transport=transport)
    async with ServiceHarness(service) as harness, aiohttp.ClientSession() as http:
        yield Stockroom(service, harness, transport, http)


def reserve(order_id: str, *lines: tuple[str, int]) -> ReserveStock:
    return ReserveStock(
        order_id=order_id,
        lines=[OrderLine(product_id=p, quantity=q, unit_price_cents=100) for p, q in lines],
    )


# -- reserving ------------------------------------------------------------------------------------


async def test_seeded_demo_stock(stockroom: Stockroom) -> None:
    assert await stockroom.stock("p-001") == (50, 0)
    assert await stockroom.stock("p-013") == (0, 0)
    assert await stockroom.stock("p-014") == (2, 0)
    assert await stockroom.stock("p-024") == (50, 0)


async def test_reserves_every_line_and_answers_the_saga(stockroom: Stockroom) -> None:
    await stockroom.send(reserve("o-1", ("p-002", 3), ("p-001", 2), ("p-002", 1)), saga_id="s-1")

    [reply] = await stockroom.wait_replies(1)
    assert reply.type == type_name(StockReserved)
    assert StockReserved.model_validate_json(reply.data) == StockReserved(order_id="o-1")
    assert reply.correlationid == "s-1"  # the saga recognises its reply by this
    assert reply.partitionkey == "o-1"
    assert await stockroom.stock("p-001") == (50, 2)
    assert await stockroom.stock("p-002") == (50, 4)  # two lines of one product: one hold
    assert await stockroom.reservations("o-1") == {"p-001": 2, "p-002": 4}


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ((("p-001", 1), ("p-013", 1)), "p-013 is sold out"),
        ((("p-014", 3), ("p-001", 5)), "only 2 of p-014 left, 3 requested"),
        ((("p-001", 1), ("p-999", 1)), "p-999 is not stocked"),
    ],
)
async def test_a_line_without_stock_rejects_the_whole_order(
    stockroom: Stockroom, lines: tuple[tuple[str, int], ...], reason: str
) -> None:
    await stockroom.send(reserve("o-2", *lines), saga_id="s-2")

    [reply] = await stockroom.wait_replies(1)
    assert reply.type == type_name(StockRejected)
    assert StockRejected.model_validate_json(reply.data).reason == reason
    assert reply.correlationid == "s-2"
    assert await stockroom.stock("p-001") == (50, 0)  # nothing of the order is held
    assert await stockroom.stock("p-014") == (2, 0)
    assert await stockroom.reservations("o-2") == {}


async def test_a_redelivered_reserve_is_applied_and_answered_once(stockroom: Stockroom) -> None:
    first = await stockroom.send(reserve("o-3", ("p-005", 4)))
    await stockroom.send(None, envelope=first)  # the same message again (same id)
    await stockroom.send(None, envelope=first)

    await stockroom.harness.handled(ReserveStock, count=3)
    await stockroom.settled()
    assert [r.type for r in stockroom.replies()] == [type_name(StockReserved)]
    assert await stockroom.stock("p-005") == (50, 4)

    # A new message for an order that already holds its stock changes nothing either.
    await stockroom.send(reserve("o-3", ("p-005", 4)))
    replies = await stockroom.wait_replies(2)
    assert [r.type for r in replies] == [type_name(StockReserved)] * 2
    assert await stockroom.stock("p-005") == (50, 4)


async def test_concurrent_orders_for_the_last_items_never_oversell(stockroom: Stockroom) -> None:
    await asyncio.gather(
        *(stockroom.send(reserve(f"o-last-{n}", ("p-014", 1)), saga_id=f"s-{n}") for n in range(5))
    )

    replies = await stockroom.wait_replies(5)
    outcomes = sorted(r.type for r in replies)
    assert outcomes == sorted([type_name(StockReserved)] * 2 + [type_name(StockRejected)] * 3)
    assert await stockroom.stock("p-014") == (2, 2)
    held = [order for n in range(5) if (order := await stockroom.reservations(f"o-last-{n}"))]
    assert held == [{"p-014": 1}, {"p-014": 1}]


async def test_the_constraints_are_the_last_line_of_defence(stockroom: Stockroom) -> None:
    db = stockroom.service.db  # asyncpg's errors are translated as they leave the block
    for oversell in (
        "update stock set reserved = 3 where product_id = 'p-014'",
        "update stock set on_hand = -1 where product_id = 'p-001'",
        "update stock set reserved = -1 where product_id = 'p-001'",
    ):
        with pytest.raises(PersistenceError, match="violates check constraint"):
            async with db.connection() as conn:
                await conn.execute(oversell)
    assert await stockroom.stock("p-014") == (2, 0)


# -- releasing ------------------------------------------------------------------------------------


async def test_release_gives_the_stock_back_once(stockroom: Stockroom) -> None:
    await stockroom.send(reserve("o-4", ("p-006", 2), ("p-007", 1)), saga_id="s-4")
    await stockroom.wait_replies(1)
    assert await stockroom.stock("p-006") == (50, 2)

    release = await stockroom.send(ReleaseStock(order_id="o-4"), saga_id="s-4")
    await stockroom.send(None, envelope=release)  # redelivered
    await stockroom.send(ReleaseStock(order_id="o-4"), saga_id="s-4")  # resent by the saga

    await stockroom.harness.handled(ReleaseStock, count=3)
    await stockroom.settled()  # every reply of the three is on the bus
    replies = stockroom.replies()
    assert [r.type for r in replies] == [
        type_name(StockReserved),
        type_name(StockReleased),
        type_name(StockReleased),  # the redelivery is absorbed; the resend answered again
    ]
    assert all(r.correlationid == "s-4" for r in replies)
    assert await stockroom.stock("p-006") == (50, 0)
    assert await stockroom.stock("p-007") == (50, 0)
    assert await stockroom.reservations("o-4") == {}


async def test_releasing_an_unknown_order_is_confirmed(stockroom: Stockroom) -> None:
    await stockroom.send(ReleaseStock(order_id="never-reserved"), saga_id="s-5")

    [reply] = await stockroom.wait_replies(1)
    assert reply.type == type_name(StockReleased)
    assert reply.correlationid == "s-5"


async def test_restock_adds_units_once(stockroom: Stockroom) -> None:
    delivery = await stockroom.send(RestockProduct(product_id="p-013", quantity=5))
    await stockroom.send(None, envelope=delivery)
    await stockroom.send(RestockProduct(product_id="p-100", quantity=7))

    await stockroom.harness.handled(RestockProduct, count=3)
    assert await stockroom.stock("p-013") == (5, 0)
    assert await stockroom.stock("p-100") == (7, 0)


# -- selling --------------------------------------------------------------------------------------


async def test_commit_turns_the_reservation_into_a_sale_once(stockroom: Stockroom) -> None:
    await stockroom.send(reserve("o-6", ("p-008", 3), ("p-014", 2)), saga_id="s-6")
    await stockroom.wait_replies(1)
    assert await stockroom.stock("p-008") == (50, 3)

    commit = await stockroom.send(CommitStock(order_id="o-6"), saga_id="s-6")
    await stockroom.send(None, envelope=commit)  # redelivered
    await stockroom.send(CommitStock(order_id="o-6"), saga_id="s-6")  # sent again: nothing held
    await stockroom.send(CommitStock(order_id="never-reserved"), saga_id="s-7")

    await stockroom.harness.handled(CommitStock, count=4)
    await stockroom.settled()
    assert await stockroom.stock("p-008") == (47, 0)  # sold: off the shelves, no longer held
    assert await stockroom.stock("p-014") == (0, 0)
    assert await stockroom.reservations("o-6") == {}
    assert [r.type for r in stockroom.replies()] == [type_name(StockReserved)]  # no reply

    # A release after the sale (a late compensation) gives nothing back.
    await stockroom.send(ReleaseStock(order_id="o-6"), saga_id="s-6")
    await stockroom.wait_replies(2)
    assert await stockroom.stock("p-008") == (47, 0)


async def test_every_change_of_a_stock_row_announces_its_level(stockroom: Stockroom) -> None:
    await stockroom.settled()
    seeded = stockroom.levels()  # the demo stock, announced once at the start
    assert len(seeded) == 24
    assert {(x.product_id, x.available, x.version) for x in seeded} >= {
        ("p-001", 50, 1),
        ("p-013", 0, 1),
        ("p-014", 2, 1),
    }

    await stockroom.send(reserve("o-8", ("p-014", 2)), saga_id="s-8")
    await stockroom.wait_replies(1)
    await stockroom.send(CommitStock(order_id="o-8"), saga_id="s-8")
    await stockroom.harness.handled(CommitStock)
    await stockroom.send(RestockProduct(product_id="p-014", quantity=4))
    await stockroom.harness.handled(RestockProduct)
    await stockroom.send(reserve("o-9", ("p-014", 1)), saga_id="s-9")
    await stockroom.wait_replies(2)
    await stockroom.send(ReleaseStock(order_id="o-9"), saga_id="s-9")
    await stockroom.wait_replies(3)
    async with stockroom.http.put(
        stockroom.url("/stock/p-014"), json={"on_hand": 9}, headers=ADMIN
    ) as response:
        assert response.status == 200
    await stockroom.send(reserve("o-10", ("p-013", 1)), saga_id="s-10")  # rejected: no change
    await stockroom.wait_replies(4)
    await stockroom.settled()

    changed = [x for x in stockroom.levels() if x.version > 1]
    assert {x.product_id for x in changed} == {"p-014"}
    # reserved 2, sold 2, restocked 4, reserved 1, released 1, counted 9
    levels = [(x.available, x.version) for x in changed]  # one product: one partition, in order
    assert levels == [(0, 2), (0, 3), (4, 4), (3, 5), (4, 6), (9, 7)]


async def test_a_restart_announces_nothing_again(
    stockroom: Stockroom, postgres_database: str
) -> None:
    await stockroom.settled()
    settings = ServiceSettings.from_env(
        {
            "INVENTORY_DATABASE_URL": postgres_database,
            "MSA_HTTP_HOST": "127.0.0.1",
            "MSA_HTTP_PORT": "0",
        }
    )
    again = Inventory(settings, transport=stockroom.transport)
    async with ServiceHarness(again):
        assert await again.outbox.pending() == 0
    assert len(stockroom.levels()) == 24


# -- HTTP -----------------------------------------------------------------------------------------


async def test_available_stock_is_public(stockroom: Stockroom) -> None:
    await stockroom.send(reserve("o-6", ("p-003", 8)))
    await stockroom.wait_replies(1)

    async with stockroom.http.get(stockroom.url("/stock/p-003")) as response:
        assert response.status == 200
        assert await response.json() == {"product_id": "p-003", "available": 42}
    async with stockroom.http.get(stockroom.url("/stock/p-404")) as response:
        assert response.status == 404
        assert response.content_type == "application/problem+json"


async def test_availability_answers_several_products_in_one_request(stockroom: Stockroom) -> None:
    await stockroom.send(reserve("o-7", ("p-003", 8)))
    await stockroom.wait_replies(1)
    http, url = stockroom.http, stockroom.url

    async with http.get(url("/availability?ids=p-014,p-003,p-404,p-013,p-003")) as response:
        assert response.status == 200
        assert await response.json() == {
            "items": [  # as asked, once each; no stock is kept for p-404
                {"product_id": "p-014", "available": 2},
                {"product_id": "p-003", "available": 42},
                {"product_id": "p-013", "available": 0},
            ]
        }
    too_many = ",".join(f"p-{n}" for n in range(AVAILABILITY_LIMIT + 1))
    for query in ("", "?ids=", "?ids=p-001,,p-002", "?ids=p-001;drop", f"?ids={too_many}"):
        async with http.get(url(f"/availability{query}")) as response:
            assert response.status == 422, query
            assert response.content_type == "application/problem+json"


async def test_listing_and_counting_stock_is_for_admins(stockroom: Stockroom) -> None:
    http, url = stockroom.http, stockroom.url
    async with http.get(url("/stock")) as response:
        assert response.status == 401
    async with http.get(url("/stock"), headers=ALICE) as response:
        assert response.status == 403
    async with http.put(url("/stock/p-001"), json={"on_hand": 1}, headers=ALICE) as response:
        assert response.status == 403
    async with http.get(url("/stock"), headers=ADMIN) as response:
        rows = await response.json()
    assert len(rows) == 24
    assert rows[12] == {"product_id": "p-013", "on_hand": 0, "reserved": 0, "available": 0}

    await stockroom.send(reserve("o-7", ("p-001", 10)))
    await stockroom.wait_replies(1)
    async with http.put(url("/stock/p-001"), json={"on_hand": 9}, headers=ADMIN) as response:
        assert response.status == 409
        assert "10 unit(s) of p-001 are reserved" in (await response.json())["detail"]
    async with http.put(url("/stock/p-001"), json={"on_hand": 10}, headers=ADMIN) as response:
        assert response.status == 200
        assert await response.json() == {
            "product_id": "p-001",
            "on_hand": 10,
            "reserved": 10,
            "available": 0,
        }
    async with http.put(url("/stock/p-new"), json={"on_hand": 3}, headers=ADMIN) as response:
        assert response.status == 200
        assert (await response.json())["available"] == 3
    async with http.put(url("/stock/p-001"), json={"on_hand": -1}, headers=ADMIN) as response:
        assert response.status == 422
    assert await stockroom.stock("p-001") == (10, 10)
