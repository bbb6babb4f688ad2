"""The load-and-verify client of the Kubernetes end-to-end test (`tests/k8s/shop_client.py`),
run as its own OS process, as that test runs it, against the shop as separate processes on real
Kafka, PostgreSQL and MongoDB (the way `tests/example_shop/test_processes.py` starts it).

What the client reports is checked against the services' own databases: the orders it says
were accepted are the orders that exist, and the stock it says is left is the stock inventory
holds. And it can fail: with the orders service killed under it, it reports the failed requests
and "ok": false.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from example_shop.processes import ShopLayout, ShopProcesses
from example_shop.shop import START_ORDER
from tests.conftest import SERVERS, servers_required, unique_name, why_unreachable
from tests.example_shop.conftest import free_ports
from tests.example_shop.test_processes import drop_databases
from tests.k8s import shop_client

REPO = Path(__file__).resolve().parents[2]
ADMIN = ("admin@shop.test", "admin-password-123")  # the services' dev-only default
CLIENT_DEADLINE = 240.0
"""A safety net only: the tests await the client's exit, this bounds a hang."""


@dataclass(kw_only=True)
class RunningShop:
    processes: ShopProcesses
    prefix: str

    @property
    def base(self) -> str:
        return self.processes.url.rstrip("/")

    def database(self, service: str) -> str:
        return f"{os.environ['POSTGRES_URL'].rsplit('/', 1)[0]}/{self.prefix}_{service}"


@pytest.fixture(scope="module")
async def shop(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningShop]:
    # Set up before the per-test check of the markers' servers: the same check, here.
    for server in SERVERS.values():
        problem = why_unreachable(server)
        if problem is not None:
            if servers_required():
                pytest.fail(problem, pytrace=False)
            pytest.skip(problem)
    ports = free_ports(len(START_ORDER) + 2)
    prefix = unique_name("client")
    layout = ShopLayout(
        env=dict(os.environ),
        run_dir=tmp_path_factory.mktemp("shop"),
        gateway_port=ports[0],
        gateway_admin_port=ports[1],
        ports=dict(zip(START_ORDER, ports[2:], strict=True)),
        database_prefix=prefix,
    )
    processes = ShopProcesses(layout)
    try:
        await asyncio.to_thread(processes.start)
        yield RunningShop(processes=processes, prefix=prefix)
    finally:
        await asyncio.to_thread(processes.stop)
        await drop_databases(prefix)


# -- the client, as its own process ------------------------------------------------------------


@dataclass(kw_only=True)
class Client:
    process: asyncio.subprocess.Process
    log: Path

    async def outcome(self) -> tuple[int, dict[str, Any]]:
        """Its exit code and the one JSON object it printed."""
        async with asyncio.timeout(CLIENT_DEADLINE):
            stdout, _ = await self.process.communicate()
        assert self.process.returncode is not None
        try:
            report: dict[str, Any] = json.loads(stdout)
        except ValueError:
            raise AssertionError(f"not one JSON object: {stdout!r}\n{self.tail()}") from None
        return self.process.returncode, report

    async def wait_for_file(self, path: Path) -> None:
        async with asyncio.timeout(CLIENT_DEADLINE):
            while not await asyncio.to_thread(path.exists):
                assert self.process.returncode is None, f"the client exited:\n{self.tail()}"
                await asyncio.sleep(0.1)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


async def start_client(log: Path, *args: str) -> Client:
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.k8s.shop_client",
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    return Client(process=process, log=log)


async def orders_placed(shop: RunningShop) -> int:
    import asyncpg

    conn = await asyncpg.connect(shop.database("orders"))
    try:
        return int(await conn.fetchval("select count(*) from orders"))
    finally:
        await conn.close()


async def until_orders_placed(shop: RunningShop, client: Client, count: int) -> None:
    """Return once `count` orders exist in the orders database (the load is flowing)."""
    async with asyncio.timeout(CLIENT_DEADLINE):
        while await orders_placed(shop) < count:
            assert client.process.returncode is None, f"the client exited:\n{client.tail()}"
            await asyncio.sleep(0.2)


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")  # the loop of the module's shop
@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.mongo
async def test_smoke_places_one_order_and_sees_it_confirmed(
    shop: RunningShop, tmp_path: Path
) -> None:
    import asyncpg

    client = await start_client(tmp_path / "smoke.log", "--base", shop.base, "smoke")
    code, report = await client.outcome()

    assert report["ok"] is True, f"{report}\n{client.tail()}"
    assert code == 0
    assert report["status"] == "confirmed"
    assert report["failures"] == 0
    assert report["requests"]["POST /api/orders"]["statuses"] == {"202": 1}
    conn = await asyncpg.connect(shop.database("orders"))
    try:
        status = await conn.fetchval(
            "select status from orders where order_id = $1", report["order_id"]
        )
    finally:
        await conn.close()
    assert status == "confirmed"


@pytest.mark.asyncio(loop_scope="module")  # the loop of the module's shop
@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.mongo
async def test_load_runs_until_the_file_appears_and_every_order_is_accounted_for(
    shop: RunningShop, tmp_path: Path
) -> None:
    import asyncpg

    before = await orders_placed(shop)
    started, until = tmp_path / "started", tmp_path / "until"
    email, password = ADMIN
    client = await start_client(
        tmp_path / "load.log",
        "--base",
        shop.base,
        "load",
        "--buyers",
        "3",
        "--rate",
        "4",
        "--products",
        "3",
        "--until-file",
        str(until),
        "--started-file",
        str(started),
        "--admin-email",
        email,
        "--admin-password",
        password,
        "--restock-to",
        "500",
    )
    await client.wait_for_file(started)
    await until_orders_placed(shop, client, before + 12)
    await asyncio.to_thread(until.touch)
    code, report = await client.outcome()

    assert report["ok"] is True, f"{json.dumps(report, indent=2)}\n{client.tail()}"
    assert code == 0
    assert report["failures"] == 0
    assert report["first_failures"] == []
    assert all(report["invariants"].values()), report["invariants"]
    orders = report["orders"]
    accepted = orders["accepted"]
    assert accepted >= 12
    assert orders["statuses"] == {"confirmed": accepted}
    assert orders["not_terminal"] == 0
    assert report["requests"]["POST /api/orders"]["statuses"] == {"202": accepted}
    assert report["latency_ms"]["POST /api/orders"]["count"] == accepted
    assert report["stock"]["source"] == "admin"

    # The databases agree: exactly these orders were placed, and the stock is what it says.
    assert await orders_placed(shop) - before == accepted
    conn = await asyncpg.connect(shop.database("inventory"))
    try:
        rows = await conn.fetch("select product_id, on_hand, reserved from stock")
    finally:
        await conn.close()
    stock = {row["product_id"]: (row["on_hand"], row["reserved"]) for row in rows}
    products = report["stock"]["products"]
    assert set(products) == set(report["config"]["products"])
    assert len(products) == 3
    for product, levels in products.items():
        assert levels["before"]["on_hand"] == 500, (product, levels)
        assert stock[product] == (levels["after"]["on_hand"], 0), (product, levels)
    assert sum(levels["sold"] for levels in products.values()) == accepted


@pytest.mark.asyncio(loop_scope="module")  # the loop of the module's shop
@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.mongo
async def test_load_reports_the_failures_when_the_orders_service_dies(
    shop: RunningShop, tmp_path: Path
) -> None:
    before = await orders_placed(shop)
    started, until = tmp_path / "started", tmp_path / "until"
    client = await start_client(
        tmp_path / "load.log",
        "--base",
        shop.base,
        "load",
        "--buyers",
        "2",
        "--rate",
        "4",
        "--products",
        "3",
        "--until-file",
        str(until),
        "--started-file",
        str(started),
        "--settle-timeout",
        "5",
    )
    try:
        await client.wait_for_file(started)
        await until_orders_placed(shop, client, before + 4)
        await asyncio.to_thread(shop.processes.kill, "orders")
        await asyncio.to_thread(until.touch)
        code, report = await client.outcome()
    finally:
        if "orders" not in shop.processes.processes:
            await asyncio.to_thread(shop.processes.restart, "orders")

    assert report["ok"] is False, report
    assert code == 1
    assert report["failures"] > 0
    assert report["invariants"]["no_failures"] is False
    # Four orders were placed before the kill; a buyer has one on the way at a time, so one
    # the kill cut off before its answer is an unanswered POST.
    assert report["orders"]["accepted"] + report["orders"]["unanswered_posts"] >= 4
    samples = report["first_failures"]
    assert 0 < len(samples) <= 20
    orders_endpoints = {
        "PUT /api/cart/items/{product_id}",
        "POST /api/orders",
        "GET /api/orders",
    }
    for sample in samples:
        assert sample["endpoint"] in orders_endpoints, sample
        assert sample["status"] is None or sample["status"] >= 500, sample
    # After the load, the histories could not be read: every round of it failed.
    assert report["requests"]["GET /api/orders"]["failures"] > 0
    assert report["stock"]["source"] == "public"


async def test_smoke_fails_where_no_shop_answers(tmp_path: Path) -> None:
    [port] = free_ports(1)
    client = await start_client(
        tmp_path / "smoke.log", "--base", f"http://127.0.0.1:{port}", "smoke"
    )
    code, report = await client.outcome()

    assert code == 1
    assert report["ok"] is False
    assert report["failures"] == 1  # nothing is retried
    [failure] = report["first_failures"]
    assert failure["endpoint"] == "POST /api/auth/signup"
    assert failure["status"] is None
    assert "Connect" in failure["error"], failure
    assert report["requests"] == {
        "POST /api/auth/signup": {"count": 1, "failures": 1, "statuses": {"no answer": 1}}
    }


def test_a_buyer_places_at_most_five_orders_a_second(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        shop_client.main(
            ["--base", "http://shop", "load", "--buyers", "2", "--rate", "20", "--duration", "1"]
        )
    assert exit_.value.code == 2
    assert "use --buyers 4 or more" in capsys.readouterr().err
