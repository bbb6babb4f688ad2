"""The shop's fault switches: the admin API's contract (`example_shop.storefront.faults`), and
the one-process shop coping with them (a payment decline rate cancels orders, which the saga
compensates).

The embedded shop is shared by the package's end-to-end tests: every test here switches its
faults off again before it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from example_shop.inventory import Inventory
from example_shop.payments.service import DECLINE_RATE as PAYMENTS_DECLINE_RATE
from example_shop.payments.service import FAULT_DECLINE_REASON
from example_shop.shop import Shop
from example_shop.storefront.faults import (
    DECLINE_RATE,
    ONE_PROCESS_CRASH,
    SERVICES,
    FaultsAdmin,
    FaultsChange,
    runs_as_processes,
)
from framework.bus import Bus, MemoryTransport
from framework.errors import ConfigurationError
from framework.faults import FaultSwitches, Switches
from framework.service import Service, ServiceSettings, route
from framework.types import Transport
from tests.example_shop.test_shop import sign_in, wait_for_status

PROBLEM = "application/problem+json"
ADMIN = {"x-user-id": "u-admin", "x-user-roles": "customer admin"}
NO_FAULTS = {"decline_rate": 0.0, "latency_ms": 0, "paused": False, "crash_next": False}


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.01)


class FaultsPanel(Service):
    """The two routes exactly as the storefront serves them, on a service of their own."""

    name = "faults-panel"

    def __init__(self, settings: ServiceSettings, transport: Transport) -> None:
        super().__init__(settings, transport=transport)
        self.faults_admin = FaultsAdmin(self.bus, self.settings)

    async def on_start(self) -> None:
        await self.faults_admin.start()

    async def on_stop(self) -> None:
        await self.faults_admin.stop()

    @route("GET", "/faults")
    async def get_faults(self, request: web.Request) -> web.Response:
        return await self.faults_admin.get(request)

    @route("PUT", "/faults/{service}", body=FaultsChange)
    async def put_faults(self, request: web.Request) -> web.Response:
        return await self.faults_admin.put(request)


async def panel(transport: Transport, env: dict[str, str]) -> FaultsPanel:
    """The panel as a shop process runs it: its settings (`faults` too) from `env`."""
    settings = dataclasses.replace(
        ServiceSettings.from_env(env), http_host="127.0.0.1", http_port=0
    )
    service = FaultsPanel(settings, transport)
    await service.start()
    return service


@pytest.fixture
async def one_process() -> AsyncIterator[tuple[str, MemoryTransport]]:
    transport = MemoryTransport()
    service = await panel(transport, {"MSA_FAULTS": "1"})
    try:
        yield f"http://127.0.0.1:{service.http_port}", transport
    finally:
        await service.stop(grace=1)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> tuple[int, Any]:
    async with http.request(
        method, url, headers=ADMIN if headers is None else headers, **body
    ) as r:
        if r.status >= 400:
            assert r.content_type == PROBLEM, await r.text()
            problem = await r.json()
            assert problem["status"] == r.status, problem
            return r.status, problem
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def test_where_fault_injection_is_off_no_switch_is_offered() -> None:
    service = await panel(MemoryTransport(), {})  # no MSA_FAULTS: what the prod overlay runs
    base = f"http://127.0.0.1:{service.http_port}"
    try:
        async with aiohttp.ClientSession() as http:
            for method, path, body in (
                ("GET", "/faults", None),
                ("PUT", "/faults/payments", {"latency_ms": 5}),
            ):
                status, problem = await call(http, method, f"{base}{path}", json=body)
                assert status == 404
                assert "MSA_FAULTS=1" in problem["detail"]
    finally:
        await service.stop(grace=1)


async def test_every_service_has_the_four_switches(
    one_process: tuple[str, MemoryTransport],
) -> None:
    base, _ = one_process
    async with aiohttp.ClientSession() as http:
        status, body = await call(http, "GET", f"{base}/faults")
    assert status == 200
    assert body == {"processes": False, "services": dict.fromkeys(SERVICES, NO_FAULTS)}
    assert list(body["services"]) == [
        "identity",
        "catalog",
        "inventory",
        "orders",
        "payments",
        "shipping",
        "analytics",
    ]
    assert DECLINE_RATE == PAYMENTS_DECLINE_RATE


async def test_a_put_changes_the_switches_every_process_reads(
    one_process: tuple[str, MemoryTransport],
) -> None:
    base, transport = one_process
    async with aiohttp.ClientSession() as http:
        change = {"decline_rate": 0.25, "latency_ms": 300}
        status, payments = await call(http, "PUT", f"{base}/faults/payments", json=change)
        assert status == 200
        assert payments == {**NO_FAULTS, **change}
        status, shipping = await call(http, "PUT", f"{base}/faults/shipping", json={"paused": True})
        assert (status, shipping) == (200, {**NO_FAULTS, "paused": True})
        status, same = await call(http, "PUT", f"{base}/faults/shipping", json={})
        assert (status, same) == (200, shipping)
        status, body = await call(http, "GET", f"{base}/faults")
        assert body["services"]["payments"] == payments
        assert body["services"]["shipping"] == shipping
        assert body["services"]["orders"] == NO_FAULTS

    # Another process reads them from the bus.
    bus = Bus(transport, source="another")
    await bus.start()
    switches = FaultSwitches(bus)
    await switches.start()
    try:
        assert switches.get("payments") == Switches(latency_ms=300, rates={DECLINE_RATE: 0.25})
        assert switches.get("shipping") == Switches(paused=True)
    finally:
        await switches.stop()
        await bus.stop()


@pytest.mark.parametrize(
    ("service", "body", "status", "says"),
    [
        ("nobody", {"paused": True}, 404, "no service 'nobody'"),
        ("storefront", {"paused": True}, 404, "no service 'storefront'"),
        ("orders", {"latency_ms": "100"}, 422, "latency_ms"),
        ("orders", {"latency_ms": 10_001}, 422, "latency_ms"),
        ("orders", {"latency_ms": -1}, 422, "latency_ms"),
        ("orders", {"latency_ms": 1.5}, 422, "latency_ms"),
        ("orders", {"latency_ms": True}, 422, "latency_ms"),
        ("orders", {"paused": 1}, 422, "paused"),
        ("orders", {"paused": "true"}, 422, "paused"),
        ("orders", {"paused": None}, 422, "paused"),
        ("orders", {"crash_next": "yes"}, 422, "crash_next"),
        ("orders", {"slow": True}, 422, "slow"),
        ("payments", {"decline_rate": 1.01}, 422, "decline_rate"),
        ("payments", {"decline_rate": -0.1}, 422, "decline_rate"),
        ("payments", {"decline_rate": "0.5"}, 422, "decline_rate"),
        ("orders", {"decline_rate": 0.5}, 422, "decline_rate is a switch of payments only"),
        ("orders", [], 422, "object"),
        ("orders", {"crash_next": True}, 409, ONE_PROCESS_CRASH),
    ],
)
async def test_bad_changes_are_refused_with_a_problem(
    one_process: tuple[str, MemoryTransport], service: str, body: Any, status: int, says: str
) -> None:
    base, transport = one_process
    async with aiohttp.ClientSession() as http:
        answered, problem = await call(http, "PUT", f"{base}/faults/{service}", json=body)
        assert answered == status
        assert says in str(problem), problem
        _, everything = await call(http, "GET", f"{base}/faults")
    assert everything["services"] == dict.fromkeys(SERVICES, NO_FAULTS)
    assert transport.records("msa.faults") == []


async def test_bodies_that_are_not_json_and_callers_who_are_not_admins_are_refused(
    one_process: tuple[str, MemoryTransport],
) -> None:
    base, _ = one_process
    url = f"{base}/faults/orders"
    async with aiohttp.ClientSession() as http:
        assert (await call(http, "PUT", url, data=b""))[0] == 400
        assert (await call(http, "PUT", url, data=b"{not json"))[0] in (400, 422)
        customer = {"x-user-id": "u-1", "x-user-roles": "customer"}
        assert (await call(http, "PUT", url, headers=customer, json={}))[0] == 403
        assert (await call(http, "GET", f"{base}/faults", headers=customer))[0] == 403
        assert (await call(http, "GET", f"{base}/faults", headers={}))[0] == 401


async def test_crash_next_is_accepted_when_the_services_run_as_processes() -> None:
    transport = MemoryTransport()
    service = await panel(transport, {"MSA_FAULTS": "1", "MSA_SHOP_PROCESSES": "1"})
    base = f"http://127.0.0.1:{service.http_port}"
    try:
        async with aiohttp.ClientSession() as http:
            _, body = await call(http, "GET", f"{base}/faults")
            assert body["processes"] is True
            url = f"{base}/faults/inventory"
            status, armed = await call(http, "PUT", url, json={"crash_next": True})
            assert (status, armed) == (200, {**NO_FAULTS, "crash_next": True})
            status, disarmed = await call(http, "PUT", url, json={"crash_next": False})
            assert (status, disarmed) == (200, NO_FAULTS)
    finally:
        await service.stop(grace=1)


def test_the_admin_obeys_the_settings_faults_not_the_variable_again() -> None:
    bus = Bus(MemoryTransport(), source="storefront")
    # The settings' parsed value decides, whatever their environment says.
    assert FaultsAdmin(bus, ServiceSettings(faults=True)).enabled is True
    assert FaultsAdmin(bus, ServiceSettings(faults=False, env={"MSA_FAULTS": "1"})).enabled is False
    # ServiceSettings.from_env is MSA_FAULTS's one parser.
    assert FaultsAdmin(bus, ServiceSettings.from_env({"MSA_FAULTS": "yes"})).enabled is True
    assert FaultsAdmin(bus, ServiceSettings.from_env({})).enabled is False
    with pytest.raises(ConfigurationError, match="MSA_FAULTS must be 1 or 0, not 'maybe'"):
        ServiceSettings.from_env({"MSA_FAULTS": "maybe"})


@pytest.mark.parametrize(
    ("value", "processes"),
    [(None, False), ("", False), ("0", False), ("1", True), (" True ", True), ("on", True)],
)
def test_the_shop_runs_as_processes_when_msa_shop_processes_says_so(
    value: str | None, processes: bool
) -> None:
    env = {} if value is None else {"MSA_SHOP_PROCESSES": value}
    assert runs_as_processes(env) is processes
    bus = Bus(MemoryTransport(), source="storefront")
    assert FaultsAdmin(bus, ServiceSettings(env=env)).processes is processes


# -- the one-process shop copes ------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="package")  # the loop of the package's shop
async def test_a_payment_decline_rate_cancels_orders_and_releases_their_stock(
    embedded_shop: Shop,
) -> None:
    payments = embedded_shop.services["payments"]
    inventory = embedded_shop.services["inventory"]
    assert isinstance(inventory, Inventory)
    injector = payments.faults
    assert injector is not None, "msa shop runs its services with MSA_FAULTS=1"
    base = embedded_shop.url.rstrip("/")
    product = "p-003"

    async def stock() -> tuple[int, int]:
        async with inventory.db.connection() as conn:
            row = await conn.fetchrow(
                "select on_hand, reserved from stock where product_id = $1", product
            )
        return row["on_hand"], row["reserved"]

    switches = FaultSwitches(Bus(payments.bus.transport, source="test"))
    await switches.bus.start()
    await switches.start()
    try:
        await switches.set("payments", rates={DECLINE_RATE: 1.0})
        await eventually(lambda: injector.current.rate(DECLINE_RATE) == 1.0)
        before = await stock()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await sign_in(http, base, "demo@shop.test", "demo-password-123")
            async with http.put(f"{base}/api/cart/items/{product}", json={"quantity": 1}) as r:
                assert r.status == 200, await r.text()
            order = {"address": "1 Fault Lane", "card_number": "4242424242424242"}
            async with http.post(f"{base}/api/orders", json=order) as r:
                assert r.status == 202, await r.text()
                placed = await r.json()
            ended = await wait_for_status(
                http, base, placed["order_id"], {"cancelled", "confirmed", "failed"}
            )
        assert ended["status"] == "cancelled", ended
        assert ended["reason"] == FAULT_DECLINE_REASON
        # The saga undid its stock step: nothing is reserved for the order, nothing was sold.
        deadline = time.monotonic() + 10
        while await stock() != before:
            assert time.monotonic() < deadline, (before, await stock())
            await asyncio.sleep(0.05)
    finally:
        await switches.clear("payments")
        await eventually(lambda: injector.current == Switches())
        await switches.stop()
        await switches.bus.stop()


@pytest.mark.asyncio(loop_scope="package")
async def test_admins_flip_the_switches_through_the_gateway(embedded_shop: Shop) -> None:
    base = embedded_shop.url.rstrip("/")
    shipping = embedded_shop.services["shipping"]
    assert shipping.faults is not None
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await sign_in(http, base, "admin@shop.test", "admin-password-123")
        url = f"{base}/api/admin/faults/shipping"
        try:
            status, body = await call(http, "GET", f"{base}/api/admin/faults", headers={})
            assert status == 200
            assert body == {"processes": False, "services": dict.fromkeys(SERVICES, NO_FAULTS)}
            status, changed = await call(
                http, "PUT", url, headers={}, json={"latency_ms": 20, "paused": True}
            )
            assert (status, changed) == (200, {**NO_FAULTS, "latency_ms": 20, "paused": True})
            await eventually(lambda: all(s.paused for s in shipping.bus.subscriptions))
            status, problem = await call(http, "PUT", url, headers={}, json={"crash_next": True})
            assert status == 409
            assert problem["detail"] == ONE_PROCESS_CRASH
        finally:
            status, cleared = await call(
                http, "PUT", url, headers={}, json={"latency_ms": 0, "paused": False}
            )
            assert (status, cleared) == (200, NO_FAULTS)
        await eventually(lambda: not any(s.paused for s in shipping.bus.subscriptions))

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await sign_in(http, base, "demo@shop.test", "demo-password-123")
        async with http.get(f"{base}/api/admin/faults") as response:
            assert response.status == 403
