"""Per-client metering (Prometheus and the admin snapshot) and the one-line JSON access log."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from framework.gateway.config import MatchConfig, RouteConfig, TierConfig
from framework.gateway.metering import ACCESS_LOGGER, Meter, access_log_middleware
from framework.gateway.qos import RateLimiter, rate_limit_middleware
from framework.gateway.types import (
    ClientIdentity,
    Exchange,
    GatewayError,
    GatewayHandler,
    GatewayMiddleware,
)
from framework.observability.logging import JsonFormatter
from framework.observability.metrics import MetricsRegistry

ROUTE = RouteConfig(name="products", match=MatchConfig(path="/x"), upstream="u")
ALICE = ClientIdentity(id="alice", method="api_key", tier="free")


def chain(handler: GatewayHandler, *middlewares: GatewayMiddleware) -> GatewayHandler:
    call = handler
    for middleware in reversed(middlewares):

        def bind(mw: GatewayMiddleware, call_next: GatewayHandler) -> GatewayHandler:
            return lambda exchange: mw(exchange, call_next)

        call = bind(middleware, call)
    return call


def exchange_for(
    method: str = "GET", path: str = "/x", *, client: ClientIdentity | None = ALICE
) -> Exchange:
    request = make_mocked_request(method, path).clone(remote="10.0.0.9")
    return Exchange(
        request=request, route=ROUTE, params={}, gtxid="g-1", request_id="r-1", client=client
    )


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's records as the framework's JSON formatter writes them."""
    formatter = JsonFormatter("gateway")
    return [
        orjson.loads(formatter.format(record))
        for record in caplog.records
        if record.name == ACCESS_LOGGER
    ]


def sample(registry: MetricsRegistry, line_start: str) -> float:
    found = [
        line for line in registry.render().decode().splitlines() if line.startswith(line_start)
    ]
    assert len(found) == 1, (line_start, found)
    return float(found[0].rsplit(" ", 1)[1])


# -- Meter ---------------------------------------------------------------------------------------


def test_meter_counts_calls_bytes_and_latency_per_client_route_and_status_class() -> None:
    registry = MetricsRegistry()
    meter = Meter(registry)
    meter.record(route="products", client="alice", status=200, bytes_in=10, bytes_out=100)
    meter.record(route="products", client="alice", status=201, bytes_out=50, seconds=0.2)
    meter.record(route="orders", client="alice", status=404, bytes_in=5)
    meter.record(route="orders", client=None, status=503)

    assert (
        sample(registry, 'gateway_requests_total{client="alice",route="products",status="2xx"}')
        == 2
    )
    assert (
        sample(registry, 'gateway_requests_total{client="anonymous",route="orders",status="5xx"}')
        == 1
    )
    assert sample(registry, 'gateway_request_bytes_total{client="alice",direction="in"}') == 15
    assert sample(registry, 'gateway_request_bytes_total{client="alice",direction="out"}') == 150
    assert sample(registry, 'gateway_request_seconds_count{route="products"}') == 2

    assert meter.snapshot() == {
        "alice": {
            "calls": 3,
            "bytes_in": 15,
            "bytes_out": 150,
            "routes": {
                "products": {"calls": 2, "bytes_in": 10, "bytes_out": 150, "status": {"2xx": 2}},
                "orders": {"calls": 1, "bytes_in": 5, "bytes_out": 0, "status": {"4xx": 1}},
            },
        },
        "anonymous": {
            "calls": 1,
            "bytes_in": 0,
            "bytes_out": 0,
            "routes": {"orders": {"calls": 1, "bytes_in": 0, "bytes_out": 0, "status": {"5xx": 1}}},
        },
    }


def test_snapshot_reset_hands_over_usage_since_the_last_reset() -> None:
    meter = Meter(None)
    meter.record(route="products", client="alice", status=200, bytes_out=7)
    assert meter.snapshot(reset=True)["alice"]["bytes_out"] == 7
    assert meter.snapshot() == {}
    meter.record(route="products", client="alice", status=200, bytes_out=3)
    assert meter.snapshot()["alice"]["bytes_out"] == 3


def test_client_labels_and_snapshot_entries_are_bounded() -> None:
    registry = MetricsRegistry()
    meter = Meter(registry, label_clients=1, max_clients=2)
    for client in ("alice", "bob", "carol", "dave", None):
        meter.record(route="products", client=client, status=200, bytes_in=1)

    rendered = registry.render().decode()
    assert 'client="alice"' in rendered
    assert 'client="bob"' not in rendered
    assert (
        sample(registry, 'gateway_requests_total{client="other",route="products",status="2xx"}')
        == 3
    )
    assert 'client="anonymous"' in rendered  # never crowded out, and never crowding out

    snapshot = meter.snapshot()
    assert set(snapshot) == {"alice", "bob", "other"}
    assert snapshot["other"]["calls"] == 3  # carol, dave and the anonymous caller: totals kept
    assert sum(usage["calls"] for usage in snapshot.values()) == 5


# -- access_log_middleware -----------------------------------------------------------------------


async def test_one_json_line_per_request_with_every_field(
    access: pytest.LogCaptureFixture,
) -> None:
    async def handler(exchange: Exchange) -> web.StreamResponse:
        exchange.upstream = "http://10.0.0.5:8080"
        exchange.bytes_in = 12
        exchange.notes["cache"] = "miss"
        exchange.notes["message"] = "a note cannot replace a field"
        return web.Response(body=b"x" * 42, content_type="application/json")

    meter = Meter(None)
    exchange = exchange_for("GET", "/x?token=secret")
    response = await chain(handler, access_log_middleware(meter))(exchange)
    assert response.status == 200

    [line] = lines(access)
    assert line["logger"] == "framework.gateway.access"
    assert line["level"] == "INFO"
    assert line["message"] == "GET /x 200"
    assert line["latency_ms"] >= 0
    assert {k: v for k, v in line.items() if k not in ("time", "latency_ms")} == {
        "level": "INFO",
        "logger": "framework.gateway.access",
        "message": "GET /x 200",
        "service": "gateway",
        "route": "products",
        "method": "GET",
        "path": "/x",
        "client": "alice",
        "remote": "10.0.0.9",
        "status": 200,
        "bytes_in": 12,
        "bytes_out": 42,
        "upstream": "http://10.0.0.5:8080",
        "gtxid": "g-1",
        "request_id": "r-1",
        "notes": {"cache": "miss", "message": "a note cannot replace a field"},
    }
    assert meter.snapshot()["alice"]["bytes_out"] == 42


async def test_a_429_from_an_inner_layer_is_logged_and_re_raised(
    access: pytest.LogCaptureFixture,
) -> None:
    async def ok(exchange: Exchange) -> web.StreamResponse:
        return web.Response(text="ok")

    limiter = RateLimiter({"free": TierConfig(rate=1, burst=1)}, default_tier="free")
    meter = Meter(None)
    call = chain(ok, access_log_middleware(meter), rate_limit_middleware(limiter))
    await call(exchange_for())
    with pytest.raises(GatewayError) as refused:
        await call(exchange_for())
    assert refused.value.status == 429

    first, second = lines(access)
    assert (first["status"], second["status"]) == (200, 429)
    assert second["error"] == "Too Many Requests"
    assert second["notes"] == {"rate_limited": "rate"}
    assert meter.snapshot()["alice"]["routes"]["products"]["status"] == {"2xx": 1, "4xx": 1}


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (RuntimeError("boom"), "RuntimeError"),
        (GatewayError(500, "Internal Error"), "Internal Error"),
    ],
)
async def test_a_failure_inside_is_logged_as_500_and_re_raised(
    access: pytest.LogCaptureFixture, failure: Exception, error: str
) -> None:
    async def failing(exchange: Exchange) -> web.StreamResponse:
        raise failure

    meter = Meter(None)
    with pytest.raises(type(failure)):
        await chain(failing, access_log_middleware(meter))(exchange_for(client=None))

    [line] = lines(access)
    assert (line["status"], line["level"], line["error"]) == (500, "WARNING", error)
    assert line["client"] is None
    assert meter.snapshot()["anonymous"]["routes"]["products"]["status"] == {"5xx": 1}


@pytest.mark.parametrize("counted", [True, False])
async def test_a_streamed_response_is_logged_with_the_bytes_written(
    access: pytest.LogCaptureFixture, counted: bool
) -> None:
    async def events(exchange: Exchange) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(exchange.request)
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            await response.write(event)
            if counted:
                exchange.bytes_out += len(event)
        await response.write_eof()
        return response

    call = chain(events, access_log_middleware(Meter(None)))

    async def entry(request: web.Request) -> web.StreamResponse:
        return await call(
            Exchange(request=request, route=ROUTE, params={}, gtxid="g", request_id="r")
        )

    app = web.Application()
    app.router.add_get("/events", entry)
    client: TestClient[web.Request, web.Application]
    async with TestClient(TestServer(app)) as client, client.get("/events") as response:
        assert await response.read() == b"data: 1\n\ndata: 2\n\n"

    [line] = lines(access)
    assert line["status"] == 200
    if counted:
        assert line["bytes_out"] == 18
    else:  # aiohttp's count: status line, headers and chunk framing too
        assert line["bytes_out"] > 18 + len("HTTP/1.1 200 OK\r\n")
