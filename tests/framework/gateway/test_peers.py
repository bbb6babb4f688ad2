"""The workers of one gateway answering as one: the peer app on a unix socket, fetching from every
worker, and the merges of their metering and metrics."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from framework.gateway.config import GatewayConfig, GatewayConfigError, parse_config
from framework.gateway.metering import Meter
from framework.gateway.peers import get_all, merge_metering, merge_metrics, peer_app, post_all
from framework.observability.metrics import MetricsRegistry

# -- merge_metering ------------------------------------------------------------------------------


def usage(calls: int, bytes_in: int, bytes_out: int, **status: int) -> dict[str, object]:
    return {"calls": calls, "bytes_in": bytes_in, "bytes_out": bytes_out, "status": status}


def test_merge_metering_sums_every_number_per_client_route_and_status_class() -> None:
    first = Meter(None)
    second = Meter(None)
    first.record(route="products", client="alice", status=200, bytes_in=10, bytes_out=100)
    first.record(route="products", client="alice", status=404, bytes_in=0, bytes_out=20)
    first.record(route="orders", client=None, status=201, bytes_in=5, bytes_out=7)
    second.record(route="products", client="alice", status=200, bytes_in=1, bytes_out=50)
    second.record(route="orders", client="bob", status=503, bytes_in=2, bytes_out=3)

    merged = merge_metering([first.snapshot(), second.snapshot(), {}])

    assert merged == {
        "alice": {
            "calls": 3,
            "bytes_in": 11,
            "bytes_out": 170,
            "routes": {"products": usage(3, 11, 170, **{"2xx": 2, "4xx": 1})},
        },
        "anonymous": {
            "calls": 1,
            "bytes_in": 5,
            "bytes_out": 7,
            "routes": {"orders": usage(1, 5, 7, **{"2xx": 1})},
        },
        "bob": {
            "calls": 1,
            "bytes_in": 2,
            "bytes_out": 3,
            "routes": {"orders": usage(1, 2, 3, **{"5xx": 1})},
        },
    }


def test_merge_metering_leaves_the_snapshots_as_they_were() -> None:
    meter = Meter(None)
    meter.record(route="r", client="alice", status=200, bytes_in=1, bytes_out=2)
    snapshot = meter.snapshot()
    before = orjson.dumps(snapshot)
    assert merge_metering([snapshot, snapshot])["alice"]["calls"] == 2
    assert orjson.dumps(snapshot) == before
    assert merge_metering([snapshot]) == snapshot
    assert merge_metering([]) == {}


# -- merge_metrics -------------------------------------------------------------------------------


def worker_metrics(requests: int, seconds: float) -> bytes:
    """A worker's exposition: `requests` answered for alice on `products`, each in `seconds`."""
    registry = MetricsRegistry()
    meter = Meter(registry)
    for _ in range(requests):
        meter.record(
            route="products",
            client="alice",
            status=200,
            bytes_in=1,
            bytes_out=10,
            seconds=seconds,
        )
    registry.gauge("gateway_open_connections", "Open client connections.").labels().set(requests)
    return registry.render()


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_merge_metrics_labels_each_workers_series_and_round_trips() -> None:
    merged = merge_metrics([worker_metrics(3, 0.002), worker_metrics(2, 0.2)])
    text = merged.decode()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["gateway_requests"].type == "counter"
    assert families["gateway_request_seconds"].type == "histogram"
    assert families["gateway_open_connections"].type == "gauge"
    for name in ("gateway_requests_total", "gateway_request_seconds", "gateway_open_connections"):
        assert text.count(f"# HELP {name} ") == 1
        assert text.count(f"# TYPE {name} ") == 1

    found = samples(merged)
    route = {("route", "products"), ("client", "alice"), ("status", "2xx")}
    assert found["gateway_requests_total", frozenset({*route, ("worker", "0")})] == 3
    assert found["gateway_requests_total", frozenset({*route, ("worker", "1")})] == 2
    for worker, requests, fast in (("0", 3, 3), ("1", 2, 0)):
        labels = {("route", "products"), ("worker", worker)}
        bucket = frozenset({*labels, ("le", "0.0025")})
        assert found["gateway_request_seconds_bucket", bucket] == fast
        inf = frozenset({*labels, ("le", "+Inf")})
        assert found["gateway_request_seconds_bucket", inf] == requests
        assert found["gateway_request_seconds_count", frozenset(labels)] == requests
    gauge = frozenset({("worker", "1")})
    assert found["gateway_open_connections", gauge] == 2
    # Nothing but the worker label was added or lost.
    single = samples(worker_metrics(3, 0.002))
    assert {
        (name, frozenset(labels - {("worker", "0")}))
        for name, labels in found
        if ("worker", "0") in labels
    } == set(single)


def test_merge_metrics_replaces_a_worker_label_and_keeps_escaped_values() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("odd_total", 'Odd "label" values.\nTwo lines.', ("worker", "path"))
    counter.labels(worker="7", path='a "quoted"\\ path\nwith a newline').inc(2)

    merged = merge_metrics([b"", registry.render()])

    [family] = text_string_to_metric_families(merged.decode())
    [sample] = family.samples
    assert sample.name == "odd_total"
    assert sample.labels == {"worker": "1", "path": 'a "quoted"\\ path\nwith a newline'}
    assert sample.value == 2
    assert family.documentation == 'Odd "label" values.\nTwo lines.'


def test_merge_metrics_leaves_out_a_family_whose_type_differs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gauge = MetricsRegistry()
    gauge.gauge("confused", "A gauge here.").labels().set(1)
    histogram = MetricsRegistry()
    histogram.histogram("confused", "A histogram there.").labels().observe(1)

    merged = merge_metrics([gauge.render(), histogram.render()])

    [family] = text_string_to_metric_families(merged.decode())
    assert family.type == "gauge"
    assert [(s.name, s.labels) for s in family.samples] == [("confused", {"worker": "0"})]
    assert "confused is a histogram in gateway worker 1" in caplog.text


def test_a_worker_that_did_not_answer_keeps_its_place_in_the_labels() -> None:
    merged = samples(merge_metrics([worker_metrics(3, 0.002), None, worker_metrics(2, 0.2)]))
    route = {("route", "products"), ("client", "alice"), ("status", "2xx")}
    assert merged["gateway_requests_total", frozenset({*route, ("worker", "2")})] == 2
    assert not any(("worker", "1") in labels for _, labels in merged)


def test_merge_metrics_of_nothing_is_an_empty_exposition() -> None:
    assert merge_metrics([]) == b""
    assert merge_metrics([b"", b""]) == b""


# -- the peer app over unix sockets -------------------------------------------------------------


class FakeGateway:
    """What `peer_app` reads of a gateway; `reload` answers with `configs` in turn (a
    `GatewayConfigError` is raised)."""

    def __init__(self, configs: list[GatewayConfig | GatewayConfigError]) -> None:
        self.metrics = MetricsRegistry()
        self.meter = Meter(self.metrics)
        self.configs = configs
        self.reloads = 0

    async def reload(self) -> GatewayConfig:
        self.reloads += 1
        answer = self.configs.pop(0)
        if isinstance(answer, GatewayConfigError):
            raise answer
        return answer


TWO_ROUTES = parse_config(
    """
upstreams: {shop: {targets: ["http://127.0.0.1:1"]}}
routes:
  - {name: a, match: {path: /a}, upstream: shop}
  - {name: b, match: {path: /b}, upstream: shop}
"""
)


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short private directory for unix sockets (a socket's path is at most 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="msa-peers-"))
    yield directory
    shutil.rmtree(directory)


Serve = Callable[[FakeGateway, str], Awaitable[str]]


@pytest.fixture
async def serve(sockets: Path) -> AsyncIterator[Serve]:
    """Serve a fake gateway's peer app on `sockets/<name>.sock`; returns the socket's path."""
    runners: list[web.AppRunner] = []

    async def start(gateway: FakeGateway, name: str) -> str:
        runner = web.AppRunner(peer_app(gateway))
        await runner.setup()
        path = str(sockets / f"{name}.sock")
        await web.UnixSite(runner, path).start()
        runners.append(runner)
        return path

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_get_all_fetches_every_workers_metering_and_metrics(
    serve: Serve,
) -> None:
    workers = [FakeGateway([]), FakeGateway([])]
    for calls, gateway in enumerate(workers, start=1):
        for _ in range(calls):
            gateway.meter.record(route="a", client="alice", status=200, bytes_in=1, bytes_out=2)
    paths = [await serve(gateway, f"w{n}") for n, gateway in enumerate(workers)]

    metering = [body for body in await get_all(paths, "/peer/metering") if body is not None]
    assert [orjson.loads(body)["alice"]["calls"] for body in metering] == [1, 2]
    assert merge_metering(orjson.loads(body) for body in metering)["alice"]["calls"] == 3

    metrics = await get_all(paths, "/peer/metrics")
    assert metrics == [gateway.metrics.render() for gateway in workers]


async def test_a_worker_that_does_not_answer_is_none_in_a_get_and_a_503_for_a_post(
    serve: Serve,
    sockets: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alive = FakeGateway([TWO_ROUTES])
    alive.meter.record(route="a", client="alice", status=200)
    path = await serve(alive, "alive")
    gone = str(sockets / "gone.sock")

    [missing, body] = await get_all([gone, path], "/peer/metering")
    assert missing is None  # its place is kept: worker labels do not shift
    assert body is not None
    assert orjson.loads(body)["alice"]["calls"] == 1
    assert f"gateway worker at {gone} did not answer GET /peer/metering" in caplog.text

    [(status, refused), (ok, answer)] = await post_all([gone, path], "/peer/reload")
    assert status == 503
    assert orjson.loads(refused)["detail"].startswith(f"the gateway worker at {gone}")
    assert (ok, orjson.loads(answer)) == (200, {"reloaded": True, "routes": 2})


async def test_a_get_skips_a_worker_that_answers_with_an_error(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    path = await serve(FakeGateway([]), "w")
    assert await get_all([path], "/peer/nothing") == [None]
    assert "answered GET /peer/nothing with 404" in caplog.text


async def test_peer_reload_reports_a_refused_config_as_a_problem(
    serve: Serve,
) -> None:
    refusal = GatewayConfigError("gateway.yaml", ["routes[0]: no upstream named 'nope'"])
    gateway = FakeGateway([refusal, TWO_ROUTES])
    path = await serve(gateway, "w")

    [(status, body)] = await post_all([path], "/peer/reload")
    assert status == 400
    document = orjson.loads(body)
    assert document["problems"] == ["routes[0]: no upstream named 'nope'"]
    assert document["detail"] == "the new config was refused; the old one keeps serving"

    [(status, body)] = await post_all([path], "/peer/reload")
    assert (status, orjson.loads(body)) == (200, {"reloaded": True, "routes": 2})
    assert gateway.reloads == 2


async def test_a_worker_slower_than_the_timeout_is_a_503(sockets: Path) -> None:
    """The timeout bounds a worker that accepts but never answers."""
    app = web.Application()
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app.router.add_get("/peer/metrics", stuck)
    app.router.add_post("/peer/reload", stuck)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    path = str(sockets / "stuck.sock")
    await web.UnixSite(runner, path).start()
    try:
        assert await get_all([path], "/peer/metrics", timeout=0.05) == [None]
        [(status, _)] = await post_all([path], "/peer/reload", timeout=0.05)
        assert status == 503
    finally:
        release.set()
        await runner.cleanup()
