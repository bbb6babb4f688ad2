"""A missing database is created at `start()`, or refused with a clear error: real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from framework.errors import MsaError, PersistenceError
from framework.persistence.postgres import DatabaseMissing, Migration, PostgresResource
from tests.conftest import SERVERS, unique_name

pytestmark = pytest.mark.postgres

ORDERS = [Migration(1, "orders", "create table orders (id text primary key)")]


def _server() -> str:
    url = SERVERS["postgres"].url()
    assert url is not None
    return url


def _url(database: str, *, role: str | None = None) -> str:
    parts = urlsplit(_server())
    netloc = parts.netloc
    if role is not None:
        netloc = f"{quote(role)}@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(database)))


async def _exists(database: str) -> bool:
    admin = await asyncpg.connect(_server())
    try:
        return bool(await admin.fetchval("select 1 from pg_database where datname = $1", database))
    finally:
        await admin.close()


@pytest.fixture
async def missing_database() -> AsyncIterator[str]:
    """A database name no one has created (it needs quoting: a hyphen, capitals, a quote);
    dropped afterwards if a test created it."""
    name = unique_name('test-New"db')
    yield name
    admin = await asyncpg.connect(_server())
    try:
        await admin.execute(f'drop database if exists "{name.replace(chr(34), 2 * chr(34))}"')
    finally:
        await admin.close()


@pytest.fixture
async def role_without_createdb() -> AsyncIterator[str]:
    """A login role that may not create databases; dropped afterwards."""
    role = unique_name("nocreatedb")
    admin = await asyncpg.connect(_server())
    try:
        await admin.execute(f'create role "{role}" login nocreatedb')
        yield role
        await admin.execute(f'drop role if exists "{role}"')
    finally:
        await admin.close()


async def test_start_creates_a_missing_database_then_migrates_it(missing_database: str) -> None:
    db = PostgresResource(_url(missing_database), migrations=ORDERS, create_database=True)
    await db.start()
    try:
        assert await _exists(missing_database)
        async with db.connection() as conn:
            assert await conn.fetchval("select count(*) from orders") == 0
    finally:
        await db.stop()


async def test_two_concurrent_starts_both_succeed(missing_database: str) -> None:
    first, second = (
        PostgresResource(_url(missing_database), migrations=ORDERS, create_database=True)
        for _ in "ab"
    )
    try:
        await asyncio.gather(first.start(), second.start())
        assert await first.check()
        assert await second.check()
    finally:
        await first.stop()
        await second.stop()


async def test_a_role_without_createdb_is_told_what_an_admin_should_run(
    missing_database: str, role_without_createdb: str
) -> None:
    db = PostgresResource(_url(missing_database, role=role_without_createdb), create_database=True)
    with pytest.raises(DatabaseMissing) as caught:
        await db.start()
    assert isinstance(caught.value, PersistenceError)
    assert isinstance(caught.value, MsaError)
    message = str(caught.value)
    assert f'role "{role_without_createdb}" may not create it' in message
    quoted = missing_database.replace('"', '""')
    assert f'CREATE DATABASE "{quoted}" OWNER "{role_without_createdb}"' in message
    assert not await _exists(missing_database)


async def test_without_create_database_a_missing_database_stops_the_start(
    missing_database: str,
) -> None:
    db = PostgresResource(_url(missing_database))  # the default
    with pytest.raises(DatabaseMissing, match=r"does not exist.*CREATE DATABASE"):
        await db.start()
    assert not await _exists(missing_database)
