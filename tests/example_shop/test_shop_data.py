"""`msa shop` keeps its data in a data directory across restarts; `--fresh` starts empty."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from example_shop.shop import MONGO_SNAPSHOT, Shop, reset_data
from tests.example_shop.conftest import start_shop
from tests.example_shop.test_shop import sign_in, wait_for_status

ADMIN = ("admin@shop.test", "admin-password-123")
DEMO = ("demo@shop.test", "demo-password-123")
NEW_PRODUCT = {
    "product_id": "kept-across-restarts",
    "name": "Kept Across Restarts",
    "category": "mugs",
    "price_cents": 1234,
}


async def _base(shop: Shop) -> str:
    return shop.url.rstrip("/")


async def _order_and_product(shop: Shop) -> str:
    """Place and complete an order as the demo customer (PostgreSQL), create a product as the
    admin (the catalog's MongoDB); returns the order's id."""
    base = await _base(shop)
    async with aiohttp.ClientSession() as http:
        await sign_in(http, base, *ADMIN)
        async with http.post(f"{base}/api/admin/products", json=NEW_PRODUCT) as response:
            assert response.status == 201, await response.text()
    async with aiohttp.ClientSession() as http:
        await sign_in(http, base, *DEMO)
        async with http.put(f"{base}/api/cart/items/p-001", json={"quantity": 1}) as response:
            assert response.status == 200, await response.text()
        order = {"address": "1 Main Street", "card_number": "4242424242424242"}
        async with http.post(f"{base}/api/orders", json=order) as response:
            assert response.status == 202, await response.text()
            order_id: str = (await response.json())["order_id"]
        await wait_for_status(http, base, order_id, {"confirmed"})
    return order_id


async def _what_is_there(shop: Shop, order_id: str) -> tuple[int | None, bool]:
    """The status of `order_id` (None: not found) and whether the new product exists."""
    base = await _base(shop)
    async with aiohttp.ClientSession() as http:
        await sign_in(http, base, *DEMO)
        async with http.get(f"{base}/api/orders/{order_id}") as response:
            found = response.status
        async with http.get(f"{base}/api/products/{NEW_PRODUCT['product_id']}") as response:
            product = response.status == 200
    return (found if found == 200 else None), product


@pytest.mark.asyncio(loop_scope="package")
async def test_the_shop_keeps_its_data_across_restarts_and_fresh_empties_it(
    tmp_path: Path,
) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    shop = await start_shop(real=False, env=dict(env), data_dir=tmp_path)
    try:
        order_id = await _order_and_product(shop)
    finally:
        await shop.stop()
    assert (tmp_path / "pg" / "PG_VERSION").exists()
    snapshot = json.loads((tmp_path / MONGO_SNAPSHOT).read_text())
    assert any(
        doc.get("_id") == NEW_PRODUCT["product_id"]
        for collections in snapshot.values()
        for documents in collections.values()
        for doc in documents
    )

    shop = await start_shop(real=False, env=dict(env), data_dir=tmp_path)
    try:
        assert await _what_is_there(shop, order_id) == (200, True)
    finally:
        await shop.stop()

    reset_data(tmp_path)
    shop = await start_shop(real=False, env=dict(env), data_dir=tmp_path)
    try:
        assert await _what_is_there(shop, order_id) == (None, False)
    finally:
        await shop.stop()


def test_fresh_and_data_dir_are_refused_outside_the_embedded_mode() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "framework.cli", "shop", "--real", "--fresh"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result
    assert "--fresh and --data-dir are for the embedded mode" in result.stderr
