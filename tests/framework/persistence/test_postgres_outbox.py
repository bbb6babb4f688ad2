"""PostgreSQL resource, transactional outbox and idempotent inbox, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import BaseModel

import framework.persistence.postgres
from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.errors import DatabaseUnavailable, PersistenceError
from framework.messages import from_binary, message_type
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import (
    Migration,
    MigrationError,
    PostgresResource,
    UniqueViolation,
)
from tests.framework.fakes import FlakyTransport
from tests.framework.persistence.relaying import STAMP, StampingMiddleware, messages_out

pytestmark = pytest.mark.postgres

ORDERS = [
    Migration(1, "orders", "create table orders (id text primary key, status text not null)"),
    Migration(2, "order totals", "alter table orders add column total int not null default 0"),
]


@message_type("test.order.changed")
class OrderChanged(BaseModel):
    order_id: str
    status: str
    n: int = 0


@pytest.fixture
async def db(postgres_database: str) -> AsyncIterator[PostgresResource]:
    resource = PostgresResource(postgres_database, migrations=ORDERS, max_size=5)
    yield resource
    await resource.stop()


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    bus = Bus(MemoryTransport(), source="orders")
    await bus.start()
    yield bus
    await bus.stop(grace=1)


def published(bus: Bus, topic: str) -> list[OrderChanged]:
    transport = bus.transport
    assert isinstance(transport, MemoryTransport)
    records = sorted(transport.records(topic), key=lambda r: r.timestamp_ms)
    return [OrderChanged.model_validate_json(from_binary(r).data) for r in records]


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def drained(outbox: PostgresOutbox) -> None:
    deadline = time.monotonic() + 5
    while await outbox.pending():
        assert time.monotonic() < deadline, "a published row was never deleted"
        await asyncio.sleep(0.02)


async def test_migrations_apply_once_in_order_and_refuse_edits(postgres_database: str) -> None:
    first = PostgresResource(postgres_database, migrations=ORDERS)
    second = PostgresResource(postgres_database, migrations=ORDERS)
    await asyncio.gather(first.start(), second.start())  # replicas starting together
    try:
        async with first.connection() as conn:
            rows = await conn.fetch("select component, version from msa_migrations order by 2")
            assert [tuple(r) for r in rows] == [("app", 1), ("app", 2)]
            columns = {r["column_name"] for r in await conn.fetch(
                "select column_name from information_schema.columns where table_name = 'orders'"
            )}  # fmt: skip
            assert columns == {"id", "status", "total"}
        assert await first.check()
    finally:
        await first.stop()
        await second.stop()

    edited = [ORDERS[0], Migration(2, "order totals", "alter table orders add column x int")]
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await PostgresResource(postgres_database, migrations=edited).start()
    broken = [*ORDERS, Migration(3, "typo", "create tabel nope ()")]
    with pytest.raises(MigrationError, match="app:3"):
        await PostgresResource(postgres_database, migrations=broken).start()


async def test_transactions_and_error_translation(db: PostgresResource) -> None:
    await db.start()
    async with db.transaction() as tx:
        await tx.execute("insert into orders (id, status) values ('o-1', 'new')")
    with pytest.raises(UniqueViolation):
        async with db.transaction() as tx:
            await tx.execute("insert into orders (id, status) values ('o-2', 'new')")
            await tx.execute("insert into orders (id, status) values ('o-1', 'again')")
    async with db.connection() as conn:
        assert await conn.fetchval("select count(*) from orders") == 1, "o-2 rolled back"
    with pytest.raises(DatabaseUnavailable):
        await PostgresResource("postgresql://postgres@127.0.0.1:1/none").start()
    assert framework.persistence.postgres.DatabaseUnavailable is DatabaseUnavailable  # one class


async def test_outbox_commits_with_the_state_change_and_the_relay_publishes(
    db: PostgresResource, bus: Bus
) -> None:
    outbox = PostgresOutbox(db, bus, poll_interval=3600)  # NOTIFY, not polling, must wake it
    await db.start()
    await outbox.start()
    try:
        await eventually(lambda: outbox.is_leader)  # it LISTENs from now on
        async with db.transaction() as tx:
            await tx.execute("insert into orders (id, status) values ('o-1', 'placed')")
            envelope = await outbox.add(
                tx, "orders", OrderChanged(order_id="o-1", status="placed"), key="o-1"
            )
        await eventually(lambda: len(published(bus, "orders")) == 1)  # woken by the commit
        assert isinstance(bus.transport, MemoryTransport)
        [record] = bus.transport.records("orders")
        assert from_binary(record).id == envelope.id
        assert record.key == b"o-1"
        await drained(outbox)

        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await tx.execute("update orders set status = 'cancelled' where id = 'o-1'")
                await outbox.add(tx, "orders", OrderChanged(order_id="o-1", status="cancelled"))
                raise RuntimeError("the handler failed after adding the event")
        # A row leaves msa_outbox only after it was published: with the table empty, an event
        # of the rolled-back transaction would be on the bus by now.
        assert await outbox.pending() == 0
        assert [e.status for e in published(bus, "orders")] == ["placed"], "no invented events"
        async with db.connection() as conn:
            assert await conn.fetchval("select status from orders") == "placed"
    finally:
        await outbox.stop()


async def test_the_relay_publishes_through_the_bus_middleware_and_metrics(
    db: PostgresResource,
) -> None:
    stamping = StampingMiddleware()
    transport = MemoryTransport()
    bus = Bus(transport, source="orders", publish_middleware=[stamping])
    outbox = PostgresOutbox(db, bus, poll_interval=0.1)
    await bus.start()
    await db.start()
    await outbox.start()
    try:
        async with db.transaction() as tx:
            events = [
                await outbox.add(
                    tx, "orders", OrderChanged(order_id="o-1", status="placed", n=n), key="o-1"
                )
                for n in range(3)
            ]
        await eventually(lambda: len(transport.records("orders")) == 3)

        # the middleware saw each stored event, in order, with its id, type and key ...
        assert [(o.topic, o.envelope.id) for o in stamping.seen] == [
            ("orders", e.id) for e in events
        ]
        assert {o.envelope.type for o in stamping.seen} == {"test.order.changed"}
        # ... and what it added is on the bus, next to everything the outbox stored
        for record, event in zip(transport.records("orders"), events, strict=True):
            relayed = from_binary(record)
            assert relayed.id == event.id
            assert relayed.extensions == {STAMP: "relayed"}
            assert record.key == b"o-1"
            assert relayed.time == event.time
            assert relayed.traceparent == event.traceparent
        assert [e.n for e in published(bus, "orders")] == [0, 1, 2]
        assert messages_out(bus, "orders", "test.order.changed") == 3
        await drained(outbox)  # deleted once acknowledged, as before
    finally:
        await outbox.stop()
        await bus.stop(grace=1)


async def test_relay_keeps_order_per_aggregate_and_one_leader_among_replicas(
    db: PostgresResource, bus: Bus
) -> None:
    relays = [PostgresOutbox(db, bus, batch_size=7, poll_interval=0.2) for _ in range(3)]
    await db.start()
    for relay in relays:
        await relay.start()
    try:
        await eventually(lambda: sum(r.is_leader for r in relays) == 1)

        async def writer(order: str) -> None:
            for n in range(30):
                async with db.transaction() as tx:
                    await relays[0].add(
                        tx, "orders", OrderChanged(order_id=order, status="s", n=n), key=order
                    )

        await asyncio.gather(*(writer(f"o-{i}") for i in range(4)))
        await eventually(lambda: len(published(bus, "orders")) == 120)
        # A row is deleted in the transaction that published it: none left, none republished.
        await drained(relays[0])
        events = published(bus, "orders")
        assert len(events) == 120, "each event exactly once"
        for i in range(4):
            assert [e.n for e in events if e.order_id == f"o-{i}"] == list(range(30))
        await eventually(lambda: sum(r.published for r in relays) == 120)  # counted at commit
        leader = next(r for r in relays if r.is_leader)
        await leader.stop()  # another replica takes over
        await eventually(lambda: sum(r.is_leader for r in relays if r is not leader) == 1)
        async with db.transaction() as tx:
            await relays[1].add(tx, "orders", OrderChanged(order_id="o-9", status="late"))
        await eventually(lambda: len(published(bus, "orders")) == 121)
    finally:
        for relay in relays:
            await relay.stop()


async def test_relay_keeps_events_while_the_broker_is_down(db: PostgresResource) -> None:
    transport = FlakyTransport(failures=3)
    bus = Bus(transport, source="orders")
    await bus.start()
    outbox = PostgresOutbox(db, bus, poll_interval=0.1)
    await db.start()
    await outbox.start()
    try:
        async with db.transaction() as tx:
            await outbox.add(tx, "orders", OrderChanged(order_id="o-1", status="placed"))
        await eventually(lambda: len(transport.records("orders")) == 1)
        assert transport.failures == 0
        await drained(outbox)
        assert len(transport.records("orders")) == 1
    finally:
        await outbox.stop()
        await bus.stop()


async def test_inbox_runs_an_effect_once_per_message(db: PostgresResource, bus: Bus) -> None:
    inbox = PostgresInbox(db)
    await db.start()
    await inbox.start()
    effects: list[str] = []
    handled = 0

    async def on_changed(message: Message[OrderChanged]) -> None:
        nonlocal handled

        async def effect(tx: Any) -> None:
            await tx.execute(
                "insert into orders (id, status, total) values ($1, $2, 1) "
                "on conflict (id) do update set total = orders.total + 1",
                message.data.order_id,
                message.data.status,
            )
            effects.append(message.envelope.id)

        await inbox.run_once(message, effect)
        handled += 1

    await bus.subscribe_running(
        ["changes"],
        {"test.order.changed": HandlerSpec(OrderChanged, on_changed)},
        ConsumerOptions(group="billing", concurrency=4),
    )
    envelope = bus.envelope(OrderChanged(order_id="o-1", status="paid"), key="o-1")
    for _ in range(3):  # the same message id delivered three times
        await bus.publish_envelope("changes", envelope)
    await bus.publish("changes", OrderChanged(order_id="o-1", status="paid"), key="o-1")
    await eventually(lambda: handled == 4)  # all four deliveries went through the inbox
    assert len(effects) == 2
    async with db.connection() as conn:
        assert await conn.fetchval("select total from orders where id = 'o-1'") == 2
        assert await conn.fetchval("select count(*) from msa_inbox") == 2
        await conn.execute("update msa_inbox set processed_at = now() - interval '30 days'")
    assert await inbox.cleanup() == 2
    await inbox.stop()


async def test_concurrent_duplicates_block_then_skip(db: PostgresResource) -> None:
    inbox = PostgresInbox(db)
    await db.start()
    recorded, duplicate_waits = asyncio.Event(), asyncio.Event()

    async def first() -> bool:
        async with db.transaction() as tx:
            fresh = await inbox.record_id(tx, "g", "m-1")
            recorded.set()
            await duplicate_waits.wait()  # hold the uncommitted row until the duplicate blocks
            return fresh

    async def duplicate() -> bool:
        await recorded.wait()
        async with db.transaction() as tx:
            return await inbox.record_id(tx, "g", "m-1")

    async def release_once_blocked() -> None:
        try:
            async with db.connection() as conn, asyncio.timeout(10):
                while True:
                    blocked = await conn.fetchval(
                        "select count(*) from pg_stat_activity where datname = current_database() "
                        "and wait_event_type = 'Lock' and query like '%msa_inbox%'"
                    )
                    if blocked:
                        return
                    await asyncio.sleep(0.01)
        finally:
            duplicate_waits.set()

    fresh, again, _ = await asyncio.gather(first(), duplicate(), release_once_blocked())
    assert (fresh, again) == (True, False)


async def test_errors_are_framework_errors(db: PostgresResource) -> None:
    await db.start()
    with pytest.raises(PersistenceError) as error:
        async with db.connection() as conn:
            await conn.execute("select * from no_such_table")
    assert not isinstance(error.value, asyncpg.PostgresError)
    assert orjson.loads(b"1") == 1


async def test_stop_closes_a_connection_never_given_back_after_close_timeout(
    postgres_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = PostgresResource(postgres_database, migrations=ORDERS, close_timeout=0.2)
    await db.start()
    conn = await db.pool.acquire()  # borrowed and never released: `pool.close()` alone would hang
    pid = conn.get_server_pid()
    assert await conn.fetchval("select 1") == 1

    with caplog.at_level(logging.WARNING, logger="framework.persistence"):
        await asyncio.wait_for(db.stop(), 30)  # a regression fails here instead of hanging

    assert any("was not given back" in r.getMessage() for r in caplog.records)
    # Terminated: asyncpg detaches the borrower's proxy from the closed connection, so even
    # `conn.is_closed()` refuses, and the server-side backend goes away.
    with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
        conn.is_closed()
    probe = await asyncpg.connect(postgres_database)
    try:
        deadline = time.monotonic() + 10
        while await probe.fetchval("select count(*) from pg_stat_activity where pid = $1", pid):
            assert time.monotonic() < deadline, "the held connection's backend is still there"
            await asyncio.sleep(0.02)
    finally:
        await probe.close()
