"""A shop service creates its own missing database at start (and `msa migrate` does), on a
real PostgreSQL: separate processes start without `msa shop` creating the databases first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from example_shop.common import PORTS
from example_shop.inventory import Inventory
from example_shop.shop import service_classes
from framework.bus import MemoryTransport
from framework.cli import main
from framework.runner import load_service
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


@pytest.mark.parametrize("name", sorted(PORTS))
def test_msa_run_starts_each_service_on_its_own_port(name: str) -> None:
    """`msa run example_shop.<name>:<Class>` as the README gives it: the runner hands the class
    `ServiceSettings.from_env()` without MSA_HTTP_PORT, and each service takes its own port
    (all eight took the framework's 8080 before); MSA_HTTP_PORT still wins."""
    spec = f"example_shop.{name}:{service_classes()[name].__name__}"
    env = {
        "MSA_TRANSPORT": "memory",
        "POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/postgres",  # not connected to
        "MONGO_URL": "mongodb://127.0.0.1:27017/",
    }
    service = load_service(spec, ServiceSettings.from_env(env))
    assert service.settings.http_port == PORTS[name]
    chosen = load_service(spec, ServiceSettings.from_env({**env, "MSA_HTTP_PORT": "9999"}))
    assert chosen.settings.http_port == 9999
