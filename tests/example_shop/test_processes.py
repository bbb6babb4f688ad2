"""`msa shop --processes`: every service its own OS process plus the web gateway, on real Kafka,
PostgreSQL and MongoDB, checked end to end through the gateway."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from example_shop.processes import GATEWAY, ShopLayout, ShopProcesses
from example_shop.shop import MONGO_SERVICES, POSTGRES_SERVICES, START_ORDER
from tests.conftest import unique_name
from tests.example_shop.conftest import free_ports
from tests.example_shop.test_shop import sign_in, wait_for_status

ADDRESS = "1 Main Street"


async def drop_databases(prefix: str) -> None:
    import asyncpg
    from pymongo import AsyncMongoClient

    admin = await asyncpg.connect(os.environ["POSTGRES_URL"])
    try:
        for name in POSTGRES_SERVICES:
            await admin.execute(f'DROP DATABASE IF EXISTS "{prefix}_{name}" WITH (FORCE)')
    finally:
        await admin.close()
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(os.environ["MONGO_URL"])
    try:
        for name in MONGO_SERVICES:
            await client.drop_database(f"{prefix}_{name}")
    finally:
        await client.close()


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.mongo
async def test_every_service_runs_as_its_own_process(tmp_path: Path) -> None:
    ports = free_ports(len(START_ORDER) + 2)
    prefix = unique_name("test")  # databases no earlier run has seen
    layout = ShopLayout(
        env=dict(os.environ),
        run_dir=tmp_path,
        gateway_port=ports[0],
        gateway_admin_port=ports[1],
        ports=dict(zip(START_ORDER, ports[2:], strict=True)),
        database_prefix=prefix,
    )
    shop = ShopProcesses(layout)
    try:
        await asyncio.to_thread(shop.start)
        assert set(shop.processes) == {*START_ORDER, GATEWAY}
        started = {n: p for n, p in shop.processes.items() if n != "payments"}  # payments: below
        assert all(status["ready"] for status in shop.status().values()), shop.status()

        base = shop.url.rstrip("/")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await sign_in(http, base, "demo@shop.test", "demo-password-123")
            # Orders hears of the products' prices and stock over Kafka, a moment after start.
            deadline = time.monotonic() + 30
            while True:
                async with http.put(
                    f"{base}/api/cart/items/p-001", json={"quantity": 1}
                ) as response:
                    if response.status != 404:
                        assert response.status == 200, await response.text()
                        break
                assert time.monotonic() < deadline, "orders never heard of p-001"
                await asyncio.sleep(0.2)
            order_request = {"address": ADDRESS, "card_number": "4242424242424242"}
            async with http.post(f"{base}/api/orders", json=order_request) as response:
                assert response.status == 202, await response.text()
                order = await response.json()
            confirmed = await wait_for_status(http, base, order["order_id"], {"confirmed"})
            assert confirmed["status"] == "confirmed"

            # A crash (SIGKILL, or the admin page's crash switch): the process is started again.
            payments = shop.processes["payments"]
            assert await asyncio.to_thread(shop.revive_exited) == []
            payments.kill()
            await asyncio.to_thread(payments.wait)
            assert await asyncio.to_thread(shop.revive_exited) == ["payments"]
            assert shop.processes["payments"].pid != payments.pid
            assert shop.status()["payments"]["ready"]
            async with http.put(f"{base}/api/cart/items/p-002", json={"quantity": 1}) as response:
                assert response.status == 200, await response.text()
            async with http.post(f"{base}/api/orders", json=order_request) as response:
                assert response.status == 202, await response.text()
                again = await response.json()
            confirmed = await wait_for_status(http, base, again["order_id"], {"confirmed"})
            assert confirmed["status"] == "confirmed"  # the new payments process authorized it
    finally:
        await asyncio.to_thread(shop.stop)
        await drop_databases(prefix)

    assert shop.processes == {}
    for name, process in started.items():
        assert process.returncode is not None, name
        assert process.returncode != -9, f"{name} needed SIGKILL; see {shop.log_path(name)}"
        assert shop.log_path(name).stat().st_size > 0, name
