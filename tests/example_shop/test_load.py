"""`msa shop load`: Locust, headless, against the running shop; the report it prints."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from example_shop.common import postgres_url
from example_shop.identity.service import DEMO_EMAIL, DEMO_PASSWORD
from example_shop.load import parse_duration, run_load, spawn_rate_for
from example_shop.load.orders import OrderState, Settlement
from example_shop.load.report import summarize
from example_shop.load.runlog import (
    BUYER_EMAIL,
    BUYER_PASSWORD,
    CHECKOUT,
    RequestRecord,
    RunLog,
    RunLogWriter,
    is_circuit_open,
)
from example_shop.shop import Shop
from framework.http import problem


async def _orders_since(shop: Shop, since: datetime) -> list[tuple[str, str]]:
    """(order_id, status) of the demo customer's orders created since `since`, from the orders
    service's own database."""
    identity = await asyncpg.connect(postgres_url(shop.env, "identity"))
    try:
        customer = await identity.fetchval("select id from users where email = $1", DEMO_EMAIL)
    finally:
        await identity.close()
    orders = await asyncpg.connect(postgres_url(shop.env, "orders"))
    try:
        rows = await orders.fetch(
            "select order_id, status from orders where customer_id = $1 and created_at >= $2",
            customer,
            since,
        )
    finally:
        await orders.close()
    return [(row["order_id"], row["status"]) for row in rows]


async def _database_now(shop: Shop) -> datetime:
    conn = await asyncpg.connect(postgres_url(shop.env, "orders"))
    try:
        now: datetime = await conn.fetchval("select clock_timestamp()")
    finally:
        await conn.close()
    return now


@pytest.mark.asyncio(loop_scope="package")  # the loop of the package's shop
async def test_the_report_counts_the_orders_the_orders_database_holds(
    embedded_shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    since = await _database_now(embedded_shop)
    status = await asyncio.to_thread(
        run_load,
        host=embedded_shop.url,
        users=6,
        spawn_rate=6,
        duration="6s",
        json_output=True,
    )
    out = capsys.readouterr().out
    report = json.loads(out)  # one JSON object, and nothing else on stdout
    assert status == 0, report["problems"]

    placed = await _orders_since(embedded_shop, since)
    orders = report["orders"]
    assert orders["placed"] == len(placed) > 0
    completed = [order for order, state in placed if state in ("confirmed", "cancelled")]
    assert orders["completed"] == len(completed)
    assert orders["confirmed"] + orders["cancelled"] == orders["completed"]
    assert orders["pending"] == orders["failed"] == orders["unread"] == 0
    assert orders["checkouts"] == orders["placed"] + sum(orders["not_placed"].values())
    assert report["requests_per_s"] == pytest.approx(report["requests"] / report["measured_s"])
    assert report["users"] == report["users_running"] == 6
    assert report["host"] == embedded_shop.url.rstrip("/")
    endpoints = {row["endpoint"]: row for row in report["endpoints"]}
    assert endpoints[f"POST {CHECKOUT}"]["requests"] == orders["checkouts"]
    assert sum(row["requests"] for row in endpoints.values()) == report["requests"]


@pytest.mark.asyncio(loop_scope="package")
async def test_a_two_second_run_makes_requests_and_reports_without_progress_frames_in_a_pipe(
    embedded_shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await asyncio.to_thread(
        run_load, host=embedded_shop.url, users=4, spawn_rate=1, duration="2s"
    )
    captured = capsys.readouterr()
    assert status == 0, captured.out
    assert "\r" not in captured.out
    assert "\r" not in captured.err
    all_requests = next(line for line in captured.out.splitlines() if line.startswith("all"))
    assert int(all_requests.split()[2]) > 0  # requests (how many depends on the machine)
    # spawn rate 1/s would start 4 users in 4 s: raised so that all run within the first half
    assert "(spawn rate 4/s; 4 running at the end)" in captured.out
    assert "(spawn rate raised from 1/s" in captured.out


# -- the report's arithmetic, from a run log written by hand ----------------------------------


T0 = 1_800_000_000.0
PLACED_AT = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)


def _request(at: float, ms: float, name: str, status: int, **extra: Any) -> RequestRecord:
    method = "POST" if name == CHECKOUT else "GET"
    return RequestRecord(at=T0 + at, ms=ms, method=method, name=name, status=status, **extra)


@pytest.fixture
def run_log(tmp_path: Path) -> Path:
    """A 10 s run: 10 catalog reads (1, 2 ... 10 ms), a 429, a circuit-open 503, a 500, one
    unanswered, and four checkouts: two placed, one 409 (the cart was empty), one 503."""
    path = tmp_path / "run.jsonl"
    writer = RunLogWriter(path)
    writer.started(T0 - 0.5)
    for n in range(10):
        writer.request(_request(n * 0.5, n + 1, "/api/categories", 200))
    writer.request(_request(1, 1, "/api/categories", 429))
    writer.request(_request(2, 1, "/api/categories", 503, circuit_open=True))
    writer.request(_request(3, 5, "/api/categories", 500))
    writer.request(_request(4, 5000, "/api/categories", 0))
    writer.request(_request(1, 20, CHECKOUT, 202, order_id="o-1"))
    writer.request(_request(2, 20, CHECKOUT, 202, order_id="o-2"))
    writer.request(_request(3, 20, CHECKOUT, 409))
    writer.request(_request(9.98, 20, CHECKOUT, 503))  # answered at T0 + 10: the last answer
    writer.stopping(T0 + 9.5, users=3)
    writer.close()
    return path


def test_rates_are_counts_over_the_measured_seconds(run_log: Path) -> None:
    settlement = Settlement(
        orders={
            "o-1": OrderState(
                order_id="o-1",
                status="confirmed",
                created_at=PLACED_AT,
                updated_at=PLACED_AT + timedelta(seconds=2),
            ),
            "o-2": OrderState(
                order_id="o-2",
                status="pending",
                created_at=PLACED_AT + timedelta(seconds=1),
                updated_at=PLACED_AT + timedelta(seconds=1),
            ),
        },
        waited=30,
    )
    report = summarize(
        RunLog.read(run_log),
        settlement,
        host="http://shop",
        users=3,
        spawn_rate=1,
        duration_s=10,
    )

    assert report.measured_s == pytest.approx(10)  # first sent (T0) to last answered (T0 + 10)
    assert report.requests == 18
    assert report.requests_per_s == pytest.approx(1.8)
    assert report.users_running == 3
    categories, checkout = report.endpoints
    assert categories.endpoint == "GET /api/categories"
    assert categories.requests == 14
    assert categories.per_second == pytest.approx(1.4)
    assert categories.answers == {
        "2xx": 10,
        "4xx": 0,
        "429": 1,
        "5xx": 1,
        "circuit_open": 1,
        "no_answer": 1,
        "other": 0,
    }
    assert categories.non_2xx == 4
    # 14 latencies, sorted: 1, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 5000 (nearest rank)
    assert (categories.p50_ms, categories.p95_ms, categories.p99_ms) == (5, 5000, 5000)
    assert checkout.answers["2xx"] == 2
    assert checkout.answers["4xx"] == 1
    assert checkout.answers["5xx"] == 1

    orders = report.orders
    assert (orders.checkouts, orders.placed) == (4, 2)
    assert orders.not_placed == {"409": 1, "503": 1}  # answers, never counted as placed
    assert orders.placed_per_s == pytest.approx(0.2)
    assert (orders.completed, orders.confirmed, orders.pending) == (1, 1, 1)
    assert orders.completion_window_s == pytest.approx(2)  # first placed to last completed
    assert orders.completed_per_s == pytest.approx(0.5)
    assert report.problems == [
        "5xx answers: 2",
        "circuit-open answers: 1",
        "requests without an answer: 1",
        "orders still pending: 1",
    ]

    text = report.render()
    assert "measured: 10.00 s, from the first request sent to the last answer received" in text
    assert "checkouts: 4; placed (answered 202): 2; not placed: 2 (409 x1, 503 x1)" in text
    assert "orders placed: 2, 0.20/s over the measured 10.00 s" in text
    assert "orders completed: 1 (confirmed 1, cancelled 0), 0.50/s over 2.00 s" in text
    figures = report.as_json()
    assert orjson.loads(orjson.dumps(figures)) == figures  # plain JSON values only
    assert figures["measured_s"] == pytest.approx(10)


def test_a_run_log_cut_short_reads_up_to_its_last_whole_line(run_log: Path) -> None:
    with run_log.open("ab") as log:
        log.write(b'{"event": "request", "at": 1')
    assert len(RunLog.read(run_log).requests) == 18


def test_the_gateways_circuit_open_problem_is_recognised() -> None:
    open_body = problem(503, "Service Unavailable", "circuit open for upstream orders").body
    full_body = problem(503, "Service Unavailable", "upstream orders is at capacity").body
    assert isinstance(open_body, bytes)
    assert isinstance(full_body, bytes)
    assert is_circuit_open(503, open_body)
    assert not is_circuit_open(503, full_body)
    assert not is_circuit_open(503, b"<html>busy</html>")
    assert not is_circuit_open(502, open_body)


def test_the_buyers_sign_in_as_the_seeded_demo_customer() -> None:
    assert (BUYER_EMAIL, BUYER_PASSWORD) == (DEMO_EMAIL, DEMO_PASSWORD)


def test_durations_parse_like_locust() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("2m") == 120
    assert parse_duration("1h30m") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_all_users_are_spawned_within_the_first_half_of_the_run() -> None:
    assert spawn_rate_for(users=20, spawn_rate=10, seconds=30) == 10
    assert spawn_rate_for(users=20, spawn_rate=10, seconds=2) == 20
    assert spawn_rate_for(users=6, spawn_rate=1, seconds=6) == 2
