"""A shop service creates its own missing database at start (and `msa migrate` does), on a
real PostgreSQL: separate processes start without `msa shop` creating the databases first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from example_shop.inventory import Inventory
from framework.bus import MemoryTransport
from framework.cli import main
from framework.service import ServiceSettings
from framework.testing import ServiceHarness
from tests.conftest import SERVERS, unique_name

pytestmark = pytest.mark.postgres


def _server() -> str:
    url = SERVERS["postgres"].url()
    assert url is not None
    return url


async def _tables(database: str) -> set[str]:
    conn = await asyncpg.connect(urlunsplit(urlsplit(_server())._replace(path="/" + database)))
    try:
        rows = await conn.fetch("select tablename from pg_tables where schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """A database name not created yet; dropped afterwards."""
    name = unique_name("shop_test")
    yield name
    admin = await asyncpg.connect(_server())
    try:
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


def _database_url(name: str) -> str:
    return urlunsplit(urlsplit(_server())._replace(path="/" + name))


async def test_inventory_creates_its_missing_database_at_start(fresh_database: str) -> None:
    settings = ServiceSettings.from_env(
        {
            "INVENTORY_DATABASE_URL": _database_url(fresh_database),
            "MSA_HTTP_HOST": "127.0.0.1",
            "MSA_HTTP_PORT": "0",
        }
    )
    async with ServiceHarness(Inventory(settings, transport=MemoryTransport())):
        assert "stock" in await _tables(fresh_database)


async def test_msa_migrate_creates_the_missing_database(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INVENTORY_DATABASE_URL", _database_url(fresh_database))
    # `msa migrate` runs its own event loop, as it does from a shell
    assert await asyncio.to_thread(main, ["migrate", "example_shop.inventory:Inventory"]) == 0
    assert "inventory: PostgresResource: applied" in capsys.readouterr().out
    assert "stock" in await _tables(fresh_database)
