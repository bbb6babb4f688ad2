"""Upstream pools and the resilient client, against real aiohttp servers on 127.0.0.1.

The pools run on a fake clock (`Clock`) for the breaker, the retry budget, ejections and
latencies: a test moves it instead of sleeping, and an instance's `latency` is how far each of
its answers moves it. An instance makes a request wait until the test sets `release` when the
path has `?hold`.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from framework.client import ResilientClient
from framework.errors import (
    ConfigurationError,
    NotStartedError,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from framework.gateway.config import (
    BreakerConfig,
    EjectionConfig,
    HealthCheckConfig,
    RetryConfig,
    UpstreamConfig,
)
from framework.gateway.types import GatewayError
from framework.gateway.upstreams import HOP_BY_HOP, UpstreamPool, UpstreamResponse, clean_headers
from framework.observability.tracing import TraceContext, use_correlation_id, use_trace
from framework.resilience import AdaptiveConfig
from framework.service import Resource
from tests.framework.gateway.conftest import Clock, eventually

NO_RETRY = RetryConfig(attempts=1)
PATIENT_BREAKER = BreakerConfig(failures=1000)


class Instance:
    """A real upstream server whose behaviour a test changes while it runs."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self.status = 200
        self.ready = 200
        self.latency = 0.0
        """Seconds each answer takes on the pools' clock."""
        self.release = asyncio.Event()
        """Requests for `?hold` wait until it is set."""
        self.hits = 0
        self.url = ""
        self.received: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_get("/ready", self._ready)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=self.ready)

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.received.append(dict(request.headers))
        self.clock.advance(self.latency)
        if "hold" in request.query:
            await self.release.wait()
        headers = {
            "X-Served-By": self.name,
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "Connection": "x-secret",
            "X-Secret": "hop",
            "Set-Cookie": "a=1",
        }
        response = web.json_response(
            {"instance": self.name, "headers": dict(request.headers)},
            status=self.status,
            headers=headers,
        )
        response.headers.add("Set-Cookie", "b=2")
        return response


def closed_port_url() -> str:
    """The URL of a port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


ServerFactory = Callable[[int], Awaitable[list[Instance]]]
PoolFactory = Callable[..., Awaitable[UpstreamPool]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def servers(clock: Clock) -> AsyncIterator[ServerFactory]:
    started: list[Instance] = []

    async def make(count: int) -> list[Instance]:
        made = [Instance(f"i{len(started) + n}", clock) for n in range(count)]
        for instance in made:
            await instance.start()
        started.extend(made)
        return made

    yield make
    for instance in started:
        instance.release.set()
        await instance.stop()


@pytest.fixture(params=["http1", "aiohttp"])
async def pools(
    servers: ServerFactory, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[PoolFactory]:
    """Started pools on the fake clock, stopped before the servers go (so this depends on
    `servers`); every pool test runs on both HTTP clients (`UpstreamConfig.client`)."""
    started: list[UpstreamPool] = []

    async def make(name: str = "svc", **config: Any) -> UpstreamPool:
        default_timeout = config.pop("default_timeout", 5.0)
        config.setdefault("client", request.param)
        pool = UpstreamPool(
            name, UpstreamConfig(**config), default_timeout=default_timeout, time_fn=clock
        )
        await pool.start()
        started.append(pool)
        return pool

    yield make
    for pool in started:
        await pool.stop()


async def get(pool: UpstreamPool, path: str = "/", **options: Any) -> UpstreamResponse:
    return await pool.send("GET", path, headers={}, body=None, **options)


async def served_by(pool: UpstreamPool, requests: int, path: str = "/") -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(requests):
        counts[(await get(pool, path)).headers["X-Served-By"]] += 1
    return counts


def instance_view(pool: UpstreamPool, url: str) -> dict[str, Any]:
    return next(i for i in pool.snapshot()["instances"] if i["url"] == url)


def concurrency(pool: UpstreamPool) -> dict[str, Any]:
    view: dict[str, Any] = pool.snapshot()["concurrency"]
    return view


# -- balancing ------------------------------------------------------------------------------------


async def test_round_robin_spreads_evenly(servers: ServerFactory, pools: PoolFactory) -> None:
    a, b, c = await servers(3)
    pool = await pools(targets=(a.url, b.url, c.url + "/"))

    assert await served_by(pool, 30) == {"i0": 10, "i1": 10, "i2": 10}


async def test_least_outstanding_prefers_the_idle_instances(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    instances = await servers(3)
    pool = await pools(targets=tuple(i.url for i in instances), balance="least_outstanding")

    held = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: sum(i.hits for i in instances) == 1)
    busy = next(i for i in instances if i.hits)
    counts = await served_by(pool, 12)
    busy.release.set()
    assert (await held).headers["X-Served-By"] == busy.name

    assert busy.name not in counts
    assert sum(counts.values()) == 12


# -- retries --------------------------------------------------------------------------------------


async def test_get_on_a_down_instance_is_retried_on_another(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (up,) = await servers(1)
    down = closed_port_url()
    pool = await pools(targets=(down, up.url), retry=RetryConfig(attempts=2, backoff=0))

    response = await get(pool)  # round robin starts with the first target: the down one

    assert response.status == 200
    assert response.instance == up.url
    assert response.attempts == 2
    assert pool.retries == 1


async def test_a_post_is_not_retried_after_a_connect_error(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (up,) = await servers(1)
    pool = await pools(targets=(closed_port_url(), up.url), retry=RetryConfig(attempts=3))

    with pytest.raises(GatewayError) as caught:
        await pool.send("POST", "/orders", headers={}, body=b"{}")

    assert caught.value.status == 502
    assert caught.value.title == "Bad Gateway"
    assert up.hits == 0
    assert pool.retries == 0


async def test_retry_on_status_then_returns_the_last_answer(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    a, b = await servers(2)
    a.status = b.status = 503
    pool = await pools(targets=(a.url, b.url), retry=RetryConfig(attempts=2, backoff=0))

    response = await get(pool)

    assert response.status == 503
    assert response.attempts == 2
    assert (a.hits, b.hits) == (1, 1), "each try goes to another instance"


async def test_the_retry_budget_limits_retries_under_a_failing_upstream(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    a, b = await servers(2)
    a.status = b.status = 503
    pool = await pools(
        targets=(a.url, b.url),
        retry=RetryConfig(attempts=3, budget=0.2, backoff=0),
        breaker=PATIENT_BREAKER,
        eject=EjectionConfig(consecutive_failures=1000),
    )

    for _ in range(20):
        assert (await get(pool)).status == 503

    # Without a budget: 20 requests x 2 retries = 40. With it: 20% of the 20 requests (the
    # clock stands still, so all 20 are recent), and every request is refused its last retry.
    assert pool.retries == 4
    assert a.hits + b.hits == 20 + pool.retries
    assert pool.budget_exhausted == 20
    counters = pool.snapshot()["counters"]
    assert counters["retries"] == pool.retries
    assert counters["budget_exhausted"] == pool.budget_exhausted
    assert counters["requests"] == 20


async def test_a_cold_pool_may_still_retry_once(servers: ServerFactory, pools: PoolFactory) -> None:
    (up,) = await servers(1)
    pool = await pools(targets=(closed_port_url(), up.url), retry=RetryConfig(budget=0))

    assert (await get(pool)).status == 200
    assert pool.retries == 1


# -- health and ejection --------------------------------------------------------------------------


async def test_active_health_checks_take_an_instance_out_and_back(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    a, b = await servers(2)
    pool = await pools(
        targets=(a.url, b.url),
        health=HealthCheckConfig(interval=0.05, timeout=0.5, healthy_after=2, unhealthy_after=2),
    )
    assert await served_by(pool, 4) == {"i0": 2, "i1": 2}

    a.ready = 503
    await eventually(lambda: not instance_view(pool, a.url)["healthy"])
    assert await served_by(pool, 4) == {"i1": 4}

    a.ready = 200
    await eventually(lambda: instance_view(pool, a.url)["healthy"])
    assert set(await served_by(pool, 4)) == {"i0", "i1"}


async def test_an_unhealthy_instance_is_checked_often_so_it_comes_back_fast(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    """A healthy instance is checked once an hour here, an unhealthy one every 50 ms: a
    service that restarts is routed to again after two quick passes, not two hours."""
    (a,) = await servers(1)
    a.ready = 503
    pool = await pools(
        targets=(a.url,),
        health=HealthCheckConfig(
            interval=3600, unhealthy_interval=0.05, healthy_after=2, unhealthy_after=1
        ),
    )
    await eventually(lambda: not instance_view(pool, a.url)["healthy"])
    a.ready = 200
    await eventually(lambda: instance_view(pool, a.url)["healthy"])
    assert await served_by(pool, 2) == {"i0": 2}


async def test_all_instances_unhealthy_is_503(servers: ServerFactory, pools: PoolFactory) -> None:
    (a,) = await servers(1)
    a.ready = 500
    pool = await pools(targets=(a.url,), health=HealthCheckConfig(interval=0.05, unhealthy_after=1))
    await eventually(lambda: not instance_view(pool, a.url)["healthy"])

    with pytest.raises(GatewayError) as caught:
        await get(pool)
    assert caught.value.status == 503
    assert a.hits == 0


async def test_a_slow_instance_is_ejected_and_traffic_moves(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    slow, fast1, fast2 = await servers(3)
    slow.latency = 0.15
    pool = await pools(
        targets=(slow.url, fast1.url, fast2.url),
        eject=EjectionConfig(slow_ms=80, eject_for=30, max_ejected_percent=50),
    )

    await served_by(pool, 9)  # three samples each: enough to judge the average
    view = instance_view(pool, slow.url)
    assert view["ejected"]
    assert view["avg_latency_ms"] == pytest.approx(150)
    assert not instance_view(pool, fast1.url)["ejected"]

    assert await served_by(pool, 6) == {"i1": 3, "i2": 3}


async def test_an_ejected_instance_comes_back_after_eject_for(
    servers: ServerFactory, pools: PoolFactory, clock: Clock
) -> None:
    a, b = await servers(2)
    a.status = 500
    pool = await pools(
        targets=(a.url, b.url),
        retry=NO_RETRY,
        breaker=PATIENT_BREAKER,
        eject=EjectionConfig(consecutive_failures=2, eject_for=30),
    )
    await served_by(pool, 4)
    assert instance_view(pool, a.url)["ejected"]
    a.status = 200

    clock.advance(29)
    assert await served_by(pool, 2) == {"i1": 2}
    clock.advance(1)
    assert await served_by(pool, 4) == {"i0": 2, "i1": 2}


@pytest.mark.parametrize(("percent", "most"), [(34, 1), (100, 2), (0, 0)])
async def test_max_ejected_percent_is_respected(
    servers: ServerFactory, pools: PoolFactory, percent: int, most: int
) -> None:
    instances = await servers(3)
    for instance in instances:
        instance.status = 500
    pool = await pools(
        targets=tuple(i.url for i in instances),
        retry=NO_RETRY,
        breaker=PATIENT_BREAKER,
        eject=EjectionConfig(consecutive_failures=1, max_ejected_percent=percent),
    )

    for _ in range(12):
        assert (await get(pool)).status == 500

    ejected = [i for i in pool.snapshot()["instances"] if i["ejected"]]
    assert len(ejected) == most, "and never the last one, even at 100%"


async def test_connect_failures_eject_a_dead_instance(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (up,) = await servers(1)
    down = closed_port_url()
    pool = await pools(
        targets=(down, up.url),
        retry=RetryConfig(attempts=2, backoff=0, budget=1),
        eject=EjectionConfig(consecutive_failures=2),
    )

    for _ in range(6):
        assert (await get(pool)).status == 200

    assert instance_view(pool, down)["ejected"]
    assert pool.retries == 2, "after two failures in a row the dead instance is out"


# -- circuit breaker, timeouts, bulkhead ----------------------------------------------------------


async def test_the_breaker_opens_fails_fast_and_closes_after_a_good_trial(
    servers: ServerFactory, pools: PoolFactory, clock: Clock
) -> None:
    (a,) = await servers(1)
    a.status = 500
    pool = await pools(
        targets=(a.url,),
        retry=NO_RETRY,
        breaker=BreakerConfig(failures=3, window=5, open_for=10, half_open_requests=1),
    )
    for _ in range(3):
        assert (await get(pool)).status == 500
    assert pool.snapshot()["breaker"]["state"] == "open"

    with pytest.raises(GatewayError) as caught:
        await get(pool)
    assert caught.value.status == 503
    assert caught.value.detail == "circuit open for upstream svc"
    assert caught.value.headers["Retry-After"] == "10"
    assert a.hits == 3, "an open breaker fails fast, without calling the upstream"
    clock.advance(6)
    with pytest.raises(GatewayError) as caught:
        await get(pool)
    assert caught.value.headers["Retry-After"] == "4"

    a.status = 200
    clock.advance(4)
    trial = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 4)
    with pytest.raises(GatewayError) as caught:  # only one trial at a time while half-open
        await get(pool)
    assert caught.value.status == 503
    a.release.set()
    assert (await trial).status == 200
    assert pool.snapshot()["breaker"]["state"] == "closed"
    assert (await get(pool)).status == 200
    assert a.hits == 5


async def test_a_failed_trial_opens_the_breaker_again(
    servers: ServerFactory, pools: PoolFactory, clock: Clock
) -> None:
    (a,) = await servers(1)
    a.status = 502
    pool = await pools(
        targets=(a.url,),
        retry=NO_RETRY,
        breaker=BreakerConfig(failures=2, window=5, open_for=10),
    )
    for _ in range(2):
        await get(pool)
    clock.advance(10)

    assert (await get(pool)).status == 502  # the trial
    assert pool.snapshot()["breaker"]["state"] == "open"
    with pytest.raises(GatewayError) as caught:
        await get(pool)
    assert caught.value.status == 503


async def test_a_slow_upstream_is_a_504(servers: ServerFactory, pools: PoolFactory) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), timeout=0.2)  # GETs are retried by default

    with pytest.raises(GatewayError) as caught:
        await get(pool, "/?hold")  # answered only once the test ends
    assert caught.value.status == 504
    assert caught.value.title == "Gateway Timeout"
    assert caught.value.detail == "upstream svc did not answer within 0.2 s"
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert (instance_view(pool, a.url)["requests"], pool.retries) == (1, 0), (
        "the timeout bounds the call, retries included: none is left for a retry"
    )

    with pytest.raises(GatewayError) as caught:  # a per-call timeout wins over the config
        await get(pool, "/?hold", timeout=0.1)
    assert caught.value.status == 504
    assert caught.value.detail == "upstream svc did not answer within 0.1 s"


async def test_the_bulkhead_makes_calls_wait_at_most_their_timeout(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=1)

    busy = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 1)
    with pytest.raises(GatewayError) as caught:
        await get(pool, timeout=0.1)
    assert caught.value.status == 503
    assert "capacity" in caught.value.detail
    assert a.hits == 1
    a.release.set()
    assert (await busy).status == 200
    assert (await get(pool, timeout=0.5)).status == 200
    assert instance_view(pool, a.url)["failures"] == 0, "waiting is not the instance's fault"


# -- admission: a bounded wait for a slot, an adaptive limit ---------------------------------------


async def test_calls_over_the_limit_are_shed_once_queue_timeout_passes(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=2, queue_timeout=0.05)
    held = [asyncio.create_task(get(pool, "/?hold")) for _ in range(2)]
    await eventually(lambda: a.hits == 2)

    with pytest.raises(GatewayError) as caught:
        await get(pool)  # the call's own timeout (5 s) would let it wait far longer

    assert caught.value.status == 503
    assert caught.value.detail == "upstream svc is at capacity"
    assert caught.value.headers["Retry-After"] == "1"
    assert isinstance(caught.value.__cause__, UpstreamUnavailable)
    assert a.hits == 2
    counters = pool.snapshot()["counters"]
    assert (counters["shed"], counters["rejected"], pool.shed) == (1, 1, 1)
    assert concurrency(pool)["queued"] == 0, "a shed call leaves nothing behind"
    a.release.set()
    assert [(await call).status for call in held] == [200, 200]
    assert concurrency(pool)["in_flight"] == 0
    assert instance_view(pool, a.url)["failures"] == 0, "shedding is not the instance's fault"


async def test_queue_timeout_zero_refuses_at_once(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=1, queue_timeout=0)
    busy = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 1)

    with pytest.raises(GatewayError) as caught:
        await get(pool)

    assert caught.value.status == 503
    assert (pool.shed, concurrency(pool)["queued"]) == (1, 0)
    a.release.set()
    assert (await busy).status == 200


async def test_a_queued_call_is_admitted_when_a_slot_frees(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=1, queue_timeout=60)
    busy = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 1)
    queued = asyncio.create_task(get(pool))
    await eventually(lambda: concurrency(pool)["queued"] == 1)
    assert a.hits == 1

    a.release.set()

    assert (await busy).status == 200
    assert (await queued).status == 200
    assert a.hits == 2
    assert pool.shed == 0
    assert (concurrency(pool)["in_flight"], concurrency(pool)["queued"]) == (0, 0)


async def test_the_wait_for_a_slot_never_outlasts_the_calls_timeout(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=1, queue_timeout=60)
    busy = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 1)

    async with asyncio.timeout(10):  # only against a hang: queue_timeout alone waits a minute
        with pytest.raises(GatewayError) as caught:
            await get(pool, timeout=0.1)

    assert caught.value.status == 503
    assert caught.value.detail == "upstream svc is at capacity"
    assert pool.shed == 1
    a.release.set()
    assert (await busy).status == 200


async def test_a_cancelled_wait_gives_up_its_place(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=1, queue_timeout=60)
    busy = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 1)
    waiting = asyncio.create_task(get(pool))
    await eventually(lambda: concurrency(pool)["queued"] == 1)

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    assert concurrency(pool)["queued"] == 0
    a.release.set()
    assert (await busy).status == 200
    assert concurrency(pool)["in_flight"] == 0
    assert (await get(pool)).status == 200
    assert (a.hits, pool.shed) == (2, 0)


async def test_admission_follows_the_adaptive_limit(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(
        targets=(a.url,),
        max_connections=10,
        queue_timeout=0.05,
        adaptive=AdaptiveConfig(initial_limit=1, min_limit=1),
    )
    assert (concurrency(pool)["limit"], concurrency(pool)["max"]) == (1, 10)
    busy = asyncio.create_task(get(pool, "/?hold"))
    await eventually(lambda: a.hits == 1)

    with pytest.raises(GatewayError) as caught:
        await get(pool)

    assert caught.value.status == 503
    assert pool.shed == 1
    a.release.set()
    assert (await busy).status == 200


async def test_timeouts_and_the_upstreams_503s_push_the_adaptive_limit_down(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    a.latency = 1.0  # every call moves the pools' clock a second, so each closes a window
    pool = await pools(
        targets=(a.url,),
        retry=NO_RETRY,
        breaker=PATIENT_BREAKER,
        adaptive=AdaptiveConfig(min_samples=1, backoff=0.9),
    )

    with pytest.raises(GatewayError) as caught:
        await get(pool, "/?hold", timeout=0.05)
    assert caught.value.status == 504
    assert concurrency(pool)["limit"] == 90
    a.status = 503
    assert (await get(pool)).status == 503
    assert concurrency(pool)["limit"] == 81

    a.status = 404  # a fast 4xx is still the upstream answering: a latency sample
    assert (await get(pool)).status == 404
    adaptive = concurrency(pool)["adaptive"]
    assert adaptive["latency_ms"] == pytest.approx(1000)
    assert adaptive["limit"] == 81, "one call in flight says nothing about capacity"


async def test_connect_errors_teach_the_adaptive_limit_nothing(
    pools: PoolFactory, clock: Clock
) -> None:
    pool = await pools(
        targets=(closed_port_url(),),
        retry=NO_RETRY,
        breaker=PATIENT_BREAKER,
        adaptive=AdaptiveConfig(min_samples=1),
    )
    for _ in range(3):
        clock.advance(1)
        with pytest.raises(GatewayError) as caught:
            await get(pool)
        assert caught.value.status == 502

    assert concurrency(pool)["adaptive"] == {
        "limit": 100,
        "min": 4,
        "max": 100,
        "baseline_ms": None,
        "latency_ms": None,
    }


async def test_ordinary_traffic_meets_the_fixed_bulkhead(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,))  # adaptive by default
    a.latency = 0.01
    await served_by(pool, 20)
    a.latency = 0.2  # twenty times slower, but one call at a time is no overload
    await served_by(pool, 20)

    view = concurrency(pool)
    assert view["limit"] == 100
    assert view["adaptive"]["latency_ms"] == pytest.approx(200)


async def test_the_adaptive_limit_can_be_turned_off(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,), max_connections=3, adaptive=None)
    assert (await get(pool)).status == 200
    assert concurrency(pool) == {
        "limit": 3,
        "max": 3,
        "in_flight": 0,
        "queued": 0,
        "adaptive": None,
    }


async def test_sending_needs_a_started_pool() -> None:
    pool = UpstreamPool("svc", UpstreamConfig(targets=("http://127.0.0.1:1",)))
    with pytest.raises(NotStartedError):
        await get(pool)


# -- DNS discovery --------------------------------------------------------------------------------


async def test_dns_discovery_resolves_every_address(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(dns=f"localhost:{a.port}", retry=RetryConfig(attempts=2, backoff=0))

    urls = {i["url"] for i in pool.snapshot()["instances"]}
    assert f"http://127.0.0.1:{a.port}" in urls
    assert urls <= {f"http://127.0.0.1:{a.port}", f"http://[::1]:{a.port}"}
    for _ in range(4):  # ::1 (if localhost has it) refuses: GETs are retried on 127.0.0.1
        assert (await get(pool)).json()["headers"]["Host"] == f"localhost:{a.port}"


async def test_dns_keeps_the_last_good_set_when_resolution_fails(
    servers: ServerFactory, pools: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a,) = await servers(1)
    pool = await pools(dns=f"localhost:{a.port}", dns_refresh=0.05)
    before = pool.snapshot()["instances"]
    resolved = 0

    async def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal resolved
        resolved += 1
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", failing)
    await eventually(lambda: resolved >= 2)

    assert [i["url"] for i in pool.snapshot()["instances"]] == [i["url"] for i in before]


async def test_an_unresolvable_name_leaves_the_pool_empty(pools: PoolFactory) -> None:
    pool = await pools(dns="no-such-host.invalid:80")

    with pytest.raises(GatewayError) as caught:
        await get(pool)
    assert caught.value.status == 503
    assert pool.snapshot()["counters"]["rejected"] == 1


def test_a_malformed_dns_name_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        UpstreamPool("svc", UpstreamConfig(dns="no-port"))


# -- headers --------------------------------------------------------------------------------------


def test_clean_headers_drops_hop_by_hop_and_what_connection_names() -> None:
    headers = {
        "Connection": "keep-alive, X-Private",
        "X-Private": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Sum",
        "Transfer-Encoding": "chunked",
        "Upgrade": "websocket",
        "Proxy-Authorization": "Basic eA==",
        "Proxy-Whatever": "1",
        "Accept": "*/*",
    }
    assert dict(clean_headers(headers)) == {"Accept": "*/*"}
    assert {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"} <= (
        HOP_BY_HOP
    )


async def test_hop_by_hop_headers_are_not_forwarded_either_way(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    pool = await pools(targets=(a.url,))

    response = await pool.send(
        "GET",
        "/",
        headers={
            "Connection": "X-Drop",
            "X-Drop": "1",
            "Keep-Alive": "timeout=1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Upgrade": "h2c",
            "Host": "client.example",
            "X-Keep": "yes",
        },
        body=None,
    )

    received = {k.lower(): v for k, v in a.received[0].items()}
    assert received["x-keep"] == "yes"
    for name in ("x-drop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert name not in received, name
    assert received["host"] == a.url.removeprefix("http://")
    assert received.get("connection", "keep-alive").lower() == "keep-alive"  # aiohttp's own

    assert response.headers["X-Served-By"] == "i0"
    for name in ("Keep-Alive", "Proxy-Authenticate", "Connection", "X-Secret", "Content-Length"):
        assert name not in response.headers, name
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]


# -- the admin view -------------------------------------------------------------------------------


async def test_snapshot_reports_instances_breaker_and_counters(
    servers: ServerFactory, pools: PoolFactory
) -> None:
    (a,) = await servers(1)
    a.latency = 0.004
    down = closed_port_url()
    pool = await pools(
        "catalog",
        targets=(a.url, down),
        retry=RetryConfig(attempts=2, backoff=0, budget=1),
        eject=EjectionConfig(consecutive_failures=5),
    )
    for _ in range(4):
        await get(pool)

    snapshot = pool.snapshot()
    assert snapshot["name"] == "catalog"
    assert snapshot["balance"] == "round_robin"
    assert snapshot["breaker"] == {"state": "closed", "recent_failures": 0, "retry_after": None}
    assert snapshot["counters"] == {
        "requests": 4,
        "failures": 0,
        "retries": 2,
        "budget_exhausted": 0,
        "rejected": 0,
        "shed": 0,
    }
    assert snapshot["concurrency"] == {
        "limit": 100,
        "max": 100,
        "in_flight": 0,
        "queued": 0,
        "adaptive": {"limit": 100, "min": 4, "max": 100, "baseline_ms": None, "latency_ms": None},
    }
    up, dead = snapshot["instances"]
    assert up["url"] == a.url
    assert up["healthy"]
    assert not up["ejected"]
    assert up["in_flight"] == 0
    assert up["requests"] == 4
    assert up["avg_latency_ms"] == pytest.approx(4.0)
    assert (dead["failures"], dead["consecutive_failures"], dead["avg_latency_ms"]) == (2, 2, None)


# -- the resilient client -------------------------------------------------------------------------


async def test_the_client_propagates_the_trace_and_correlation_id(
    servers: ServerFactory,
) -> None:
    a, b = await servers(2)
    client = ResilientClient({"catalog": [a.url, b.url]})
    assert isinstance(client, Resource)
    root = TraceContext.new_root()

    async with client:
        with use_trace(root), use_correlation_id("corr-1"):
            response = await client.get("catalog", "/products/1")
        outside = await client.get("catalog", "products/2")

    sent = {k.lower(): v for k, v in response.json()["headers"].items()}
    child = TraceContext.parse(sent["traceparent"])
    assert child is not None
    assert child.trace_id == root.trace_id
    assert child.span_id != root.span_id
    assert sent["x-correlation-id"] == "corr-1"

    sent_outside = {k.lower(): v for k, v in outside.json()["headers"].items()}
    new_root = TraceContext.parse(sent_outside["traceparent"])
    assert new_root is not None
    assert new_root.trace_id != root.trace_id
    assert "x-correlation-id" not in sent_outside


async def test_the_client_posts_json_and_reuses_the_pool_behaviour(
    servers: ServerFactory,
) -> None:
    (a,) = await servers(1)
    client = ResilientClient(
        {
            "orders": UpstreamConfig(targets=(closed_port_url(), a.url)),
            "pricing": a.url,
        }
    )
    async with client:
        posted = await client.post("pricing", "/quotes", json={"sku": "x"})
        assert posted.ok
        assert posted.json()["headers"]["Content-Type"] == "application/json"
        assert posted.json()["headers"]["Content-Length"] == "11"
        with pytest.raises(UpstreamUnreachable) as caught:  # a framework error, not the gateway's
            await client.post("orders", "/", json={})  # to the dead one first, not retried
        assert caught.value.status == 502
        for _ in range(2):  # one of them goes to the dead one first, and is retried
            assert (await client.get("orders", "/")).status == 200
        with pytest.raises(ConfigurationError):
            await client.get("nope", "/")
        assert client.snapshot()["orders"]["counters"]["retries"] == 1
