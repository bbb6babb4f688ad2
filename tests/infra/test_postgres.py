"""The database the suite runs against is a real PostgreSQL with real transactions."""

from __future__ import annotations

import asyncpg
import pytest

pytestmark = pytest.mark.postgres


class Boom(Exception):
    pass


async def test_transaction_rollback_leaves_nothing_behind(postgres_database: str) -> None:
    conn = await asyncpg.connect(postgres_database)
    try:
        version = await conn.fetchval("show server_version")
        print(f"PostgreSQL {version}")
        await conn.execute("create table accounts (id text primary key, balance int not null)")
        async with conn.transaction():
            await conn.execute("insert into accounts values ('a', 10)")

        async def transfer_then_fail() -> None:
            async with conn.transaction():
                await conn.execute("update accounts set balance = balance - 5 where id = 'a'")
                await conn.execute("insert into accounts values ('b', 5)")
                raise Boom

        with pytest.raises(Boom):
            await transfer_then_fail()

        rows = await conn.fetch("select id, balance from accounts order by id")
        assert [tuple(r) for r in rows] == [("a", 10)]

        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("insert into accounts values ('a', 1)")
    finally:
        await conn.close()


async def test_concurrent_writers_are_isolated(postgres_database: str) -> None:
    first = await asyncpg.connect(postgres_database)
    second = await asyncpg.connect(postgres_database)
    try:
        await first.execute("create table jobs (id int primary key, claimed_by text)")
        await first.execute("insert into jobs select g, null from generate_series(1, 4) g")
        claim = (
            "select id from jobs where claimed_by is null order by id "
            "limit 2 for update skip locked"
        )
        tx1 = first.transaction()
        await tx1.start()
        mine = [r["id"] for r in await first.fetch(claim)]
        # A second worker skips the rows the first one holds: the basis of an outbox relay.
        async with second.transaction():
            theirs = [r["id"] for r in await second.fetch(claim)]
        await tx1.rollback()
        assert mine == [1, 2]
        assert theirs == [3, 4]
    finally:
        await first.close()
        await second.close()
